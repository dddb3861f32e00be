"""The arithmetic of three recommenders past ALS: EASE, RP3beta and a repurchase-timing model (TIFU-kNN style).

Pure functions on sparse matrices; the classes that follow the recommender protocol (configs, save/load,
ranking) live in :mod:`nextbest.training.recommenders` and call these. Kept apart so each formula can be tested
on a hand-sized matrix without a model around it, and so the protocol module does not grow a sixth job.

* :func:`ease_weights` — Steck 2019, "Embarrassingly Shallow Autoencoders": the closed-form item×item regression
  ``B = I − P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹`` and ``diag(B) = 0``.
* :func:`rp3beta_similarity` — Paudel et al. 2017 / Dacrema et al. 2019: a two-step random walk item → customer
  → item with transition probabilities raised to ``alpha``, divided by the target item's popularity to the
  power ``beta``, top-``K`` per item kept sparse.
* :func:`purchase_timing` and :func:`neighbour_mean` — how *due* each item a customer bought before is (time
  since the last purchase against their usual interval for it) and TIFU-kNN's (Hu et al. 2020) mix with
  similar customers' vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

DEFAULT_INTERVAL_DAYS = 30.0
"""Usual interval assumed when no customer bought any item twice (nothing to learn an interval from)."""


def binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """1 where ``matrix`` is positive, as float32 CSR (zeros and negative weights dropped)."""
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.data = (out.data > 0).astype(np.float32)
    out.eliminate_zeros()
    return out


def most_bought_items(matrix: sp.csr_matrix, max_items: int) -> np.ndarray:
    """Indices (ascending) of the ``max_items`` items bought by the most customers; items nobody bought are left
    out. Ties go to the lower index, so the choice is deterministic."""
    customers = np.asarray(binary(matrix).sum(axis=0)).ravel()
    order = np.lexsort((np.arange(len(customers)), -customers))
    order = order[customers[order] > 0][:max_items]
    return np.sort(order).astype(np.int64)


# --- EASE ---------------------------------------------------------------------------------------------------


def ease_weights(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE's item×item weights for the customers × items matrix ``x`` (Steck 2019, closed form).

    ``B = I − P · diag(1/diag(P))`` with ``P = (XᵀX + λI)⁻¹``; the diagonal is 0, so an item never explains
    itself and a customer's score for item j is Σ_i x_i · B[i, j] over the *other* items in their history.

    Args:
        x: customers × items (binary or weighted).
        l2: λ > 0, the ridge penalty (larger: smoother, more popular-leaning weights).

    Returns:
        dense float32 (items × items).
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    # Gram matrix in float64: λ is small against the largest co-counts on big data, and float32 loses digits in
    # the inverse there; the result is stored as float32.
    gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    del gram
    b = p / (-np.diag(p))[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


# --- RP3beta ------------------------------------------------------------------------------------------------


def _row_normalised(m: sp.csr_matrix) -> sp.csr_matrix:
    sums = np.asarray(m.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums, dtype=np.float64), where=sums > 0)
    return sp.csr_matrix(sp.diags(inv.astype(np.float32)) @ m)


def rp3beta_similarity(
    x: sp.csr_matrix, *, alpha: float, beta: float, k: int, chunk: int = 512
) -> sp.csr_matrix:
    """RP3beta's item×item transition weights, top ``k`` per item (row = the item a customer has).

    ``W[i, j] = Σ_u P(i→u)^α · P(u→j)^α / popularity(j)^β``: ``P(i→u)`` is 1 / (customers of i) for each
    customer u of item i, ``P(u→j)`` is 1 / (items of u) for each item j of u, popularity is the number of
    customers of j. ``beta`` > 0 demotes items everybody buys, which a plain walk (P3, ``beta = 0``) favours.

    Rows are computed ``chunk`` items at a time and pruned to the top ``k`` straight away, because the full
    product has Σ_u (items of u)² entries — far more than memory on grocery baskets.

    Args:
        x: customers × items (only positive entries count; weights are ignored).
        alpha: exponent on the transition probabilities (1 = the plain random walk).
        beta: popularity penalty exponent.
        k: neighbours kept per item.
        chunk: items per block (memory: ``chunk × items`` floats).

    Returns:
        items × items CSR, float32, at most ``k`` stored entries per row, all positive.
    """
    xb = binary(x)
    n_items = xb.shape[1]
    p_ui = _row_normalised(xb)
    p_iu = _row_normalised(sp.csr_matrix(xb.T))
    if alpha != 1.0:
        p_ui.data **= alpha
        p_iu.data **= alpha
    popularity = np.asarray(xb.sum(axis=0)).ravel()
    penalty = np.zeros(n_items, dtype=np.float32)
    seen = popularity > 0
    penalty[seen] = popularity[seen] ** -beta
    keep = min(k, n_items)
    rows, cols, vals = [], [], []
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        block = np.asarray((p_iu[start:stop] @ p_ui).toarray(), dtype=np.float32) * penalty[None, :]
        if keep < n_items:
            top = np.argpartition(-block, keep - 1, axis=1)[:, :keep]
        else:
            top = np.broadcast_to(np.arange(n_items), block.shape)
        v = np.take_along_axis(block, top, axis=1)
        r = np.broadcast_to(np.arange(start, stop)[:, None], top.shape)
        positive = v > 0
        rows.append(r[positive])
        cols.append(top[positive])
        vals.append(v[positive])
    w = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_items, n_items),
        dtype=np.float32,
    )
    w.sort_indices()
    return w


# --- repurchase timing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingParameters:
    """How the timing score of one purchased item is formed (see :func:`purchase_timing`).

    Attributes:
        half_life_days: age at which a purchase counts half in the time-decayed frequency.
        horizon_days: how far ahead the recommendation should hold.
        lapse_intervals: how many usual intervals overdue halve the due factor (the habit may be over).
        due_weight: exponent on the due factor (0 = decayed frequency alone, 1 = fully timed).
    """

    half_life_days: float
    horizon_days: float
    lapse_intervals: float
    due_weight: float


def decayed_frequency(
    counts: np.ndarray, ages: np.ndarray, tenure: np.ndarray, half_life_days: float
) -> np.ndarray:
    """TIFU's time-decayed purchase count Σ 0.5 ** (age / half-life), from the count, the latest age and tenure.

    Only the latest purchase's age is known; the other ``counts − 1`` purchases are taken as spread evenly
    between it and the start of the customer's tenure, so each counts the mean decay over ``[age, tenure]``.
    """
    h = float(half_life_days)
    a = np.asarray(ages, dtype=np.float64)
    t = np.maximum(np.asarray(tenure, dtype=np.float64), a)
    latest = 0.5 ** (a / h)
    span = t - a
    spread = np.where(
        span > 1e-9,
        h / np.log(2.0) * (latest - 0.5 ** (t / h)) / np.where(span > 1e-9, span, 1.0),
        latest,
    )
    return latest + np.maximum(np.asarray(counts, dtype=np.float64) - 1.0, 0.0) * spread


def purchase_timing(
    counts: np.ndarray,
    ages: np.ndarray,
    tenure: np.ndarray,
    fallback_interval: np.ndarray,
    params: TimingParameters,
) -> np.ndarray:
    """The score of each (customer, item) a customer bought before: time-decayed frequency × how due it is.

    A customer's usual interval for an item is their tenure divided by their purchases of it (bought at least
    twice), otherwise ``fallback_interval`` (the item's typical interval across customers). With age ``a``
    (days since the last purchase), interval ``d`` and horizon ``h``:

    * readiness = min(1, (a + h) / d) — the share of an interval that will have passed by the end of the
      horizon: 1 for an item due now or within the horizon, small for one bought yesterday;
    * lapse = 0.5 ** (max(0, a − d) / (lapse_intervals · d)) — long overdue means the habit may be over;
    * score = :func:`decayed_frequency` × (readiness × lapse) ** due_weight.

    Entries with an unknown age or tenure (NaN: a customer the model was not fitted on, or a pair newer than
    the fit) get the plain count.

    Args:
        counts: purchases per entry (≥ 0).
        ages: days since the latest purchase per entry (NaN = unknown).
        tenure: days the customer has been observed, per entry (NaN = unknown).
        fallback_interval: the item's typical interval per entry (days, > 0).
        params: half-life, horizon, lapse and the weight of the due factor.

    Returns:
        float32 scores per entry, ≥ 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    ages = np.asarray(ages, dtype=np.float64)
    tenure = np.asarray(tenure, dtype=np.float64)
    known = np.isfinite(ages) & np.isfinite(tenure)
    a = np.where(known, ages, 0.0)
    t = np.where(known, np.maximum(tenure, a), 1.0)
    repeat = counts >= 1.5
    interval = np.where(
        repeat, np.maximum(t, 1.0) / np.maximum(counts, 1e-9), np.asarray(fallback_interval, dtype=np.float64)
    )
    interval = np.maximum(interval, 1e-3)
    readiness = np.minimum(1.0, (a + params.horizon_days) / interval)
    overdue = np.maximum(0.0, a - interval) / (params.lapse_intervals * interval)
    due = (readiness * 0.5**overdue) ** params.due_weight
    decayed = decayed_frequency(counts, a, t, params.half_life_days)
    return np.where(known, decayed * due, counts).astype(np.float32)


def typical_intervals(items: np.ndarray, counts: np.ndarray, tenure: np.ndarray, n_items: int) -> np.ndarray:
    """Each item's typical interval in days: the geometric mean of tenure / purchases over the customers who
    bought it at least twice; items without such customers get the geometric mean over all of them (or
    :data:`DEFAULT_INTERVAL_DAYS` when no one bought anything twice)."""
    ok = (counts >= 1.5) & np.isfinite(tenure)
    log_d = np.log(np.maximum(tenure[ok], 1.0) / counts[ok])
    overall = float(np.exp(log_d.mean())) if log_d.size else DEFAULT_INTERVAL_DAYS
    sums = np.bincount(items[ok], weights=log_d, minlength=n_items)
    n = np.bincount(items[ok], minlength=n_items)
    out = np.full(n_items, overall, dtype=np.float64)
    out[n > 0] = np.exp(sums[n > 0] / n[n > 0])
    return out.astype(np.float32)


def row_max_scaled(m: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its maximum (rows of non-negative scores end in [0, 1]; empty rows stay empty)."""
    m = sp.csr_matrix(m, dtype=np.float32, copy=True)
    nonempty = np.diff(m.indptr) > 0
    row_max = np.ones(m.shape[0], dtype=np.float32)
    if m.nnz:
        row_max[nonempty] = np.maximum.reduceat(m.data, m.indptr[:-1][nonempty])
    row_max[row_max <= 0] = 1.0
    m.data /= np.repeat(row_max, np.diff(m.indptr))
    return m


def neighbour_mean(
    query: sp.csr_matrix, fitted: sp.csr_matrix, k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """TIFU-kNN's neighbour part: the mean of the ``k`` fitted rows most cosine-similar to each query row.

    Args:
        query: (customers asked × items) vectors.
        fitted: (fitted customers × items) vectors.
        k: neighbours per query row (only positively similar ones count; fewer may remain).
        exclude: per query row, a fitted row index to leave out (the customer themself), or −1.

    Returns:
        dense float32 (customers asked × items); zero rows for queries without similar customers.
    """
    out = np.zeros(query.shape, dtype=np.float32)
    if k <= 0 or fitted.shape[0] == 0 or query.shape[0] == 0:
        return out
    q = _l2_rows(query)
    f = _l2_rows(fitted)
    sims = np.asarray((q @ f.T).toarray(), dtype=np.float32)
    if exclude is not None:
        rows = np.nonzero(exclude >= 0)[0]
        sims[rows, exclude[rows]] = 0.0
    keep = min(k, sims.shape[1])
    top = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
    chosen = np.take_along_axis(sims, top, axis=1) > 0
    r = np.broadcast_to(np.arange(sims.shape[0])[:, None], top.shape)
    counts = chosen.sum(axis=1).astype(np.float32)
    rr = r[chosen]
    weights = sp.csr_matrix((1.0 / counts[rr], (rr, top[chosen])), shape=sims.shape, dtype=np.float32)
    return np.asarray((weights @ fitted).toarray(), dtype=np.float32)


def _l2_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(inv.astype(np.float32)) @ m)
