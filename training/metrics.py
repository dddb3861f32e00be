"""Ranking metrics of top-K recommendations: pure numpy functions with per-customer results.

Conventions (binary relevance, shared by every function):

* ``recommended`` is a (customers × L) integer array of item indices, best first; −1 marks an empty slot.
* ``relevant`` is a customers × items sparse matrix whose stored positive entries are the relevant items.
* ``hits = hit_matrix(recommended, relevant)`` is the boolean (customers × L) matrix the metrics read.
* Metrics at K read the first K columns. Per-customer arrays are returned so callers can average over any
  group (all customers, a segment); customers without relevant items should be left out before averaging.

Definitions, with h_i = 1 if the item at rank i (1-based) is relevant and R = number of relevant items:

* precision@K = Σ_{i≤K} h_i / K (a short list still divides by K)
* recall@K    = Σ_{i≤K} h_i / R
* hit rate@K  = 1 if Σ_{i≤K} h_i > 0
* NDCG@K      = Σ_{i≤K} h_i / log2(i + 1)  ÷  Σ_{i≤min(K, R)} 1 / log2(i + 1)
* AP@K        = Σ_{i≤K} h_i · precision@i  ÷  min(K, R)      (MAP@K is its mean)
* coverage@K  = distinct items in the top-K lists ÷ catalogue size
* popularity bias@K = mean over customers of the mean popularity percentile of their top-K items, where an
  item's percentile is the share of catalogue items strictly less popular than it plus half the share of
  the other items exactly as popular (0 = least popular, → 1 = most popular)
* ARP@K (average recommendation popularity) = the same mean over raw popularity counts
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MISSING = -1


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def relevance_matrix(rows: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A boolean-valued CSR of relevant (customer row, item) pairs (duplicates collapse to one)."""
    m = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (np.asarray(rows), np.asarray(items))), shape=shape
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def hit_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean (customers × L): whether each recommended item is relevant to its customer.

    Raises:
        ValueError: the row counts differ.
    """
    rec = np.asarray(recommended, dtype=np.int64)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D (customers × L), got shape {rec.shape}")
    if rec.shape[0] != relevant.shape[0]:
        raise ValueError(f"recommended has {rec.shape[0]} rows, relevant {relevant.shape[0]}")
    if rec.size == 0:
        return np.zeros(rec.shape, dtype=bool)
    rel = sp.csr_matrix(relevant)
    valid = rec >= 0
    rows = np.broadcast_to(np.arange(rec.shape[0])[:, None], rec.shape)
    looked_up = np.asarray(rel[rows[valid], rec[valid]]).ravel()
    hits = np.zeros(rec.shape, dtype=bool)
    hits[valid] = looked_up > 0
    return hits


def relevant_counts(relevant: sp.csr_matrix) -> np.ndarray:
    """Number of relevant items per customer (R)."""
    rel = sp.csr_matrix(relevant)
    return np.asarray((rel > 0).sum(axis=1)).ravel().astype(np.int64)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-customer precision@K (hits in the top K divided by K)."""
    _check_k(k)
    return hits[:, :k].sum(axis=1) / k


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-customer recall@K (0 where a customer has no relevant item)."""
    _check_k(k)
    n = np.asarray(n_relevant, dtype=np.float64)
    return np.divide(hits[:, :k].sum(axis=1), n, out=np.zeros(len(n)), where=n > 0)


def hit_rate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Per-customer hit rate@K (1.0 when any of the top K is relevant)."""
    _check_k(k)
    return hits[:, :k].any(axis=1).astype(np.float64)


def _discounts(length: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, length + 2))


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-customer NDCG@K with binary gains (0 where a customer has no relevant item)."""
    _check_k(k)
    h = hits[:, :k].astype(np.float64)
    disc = _discounts(k)
    dcg = (h * disc[: h.shape[1]]).sum(axis=1)
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])
    n = np.minimum(np.asarray(n_relevant, dtype=np.int64), k)
    idcg = ideal_cum[n]
    return np.divide(dcg, idcg, out=np.zeros(len(n)), where=idcg > 0)


def average_precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-customer AP@K, normalised by min(K, R); MAP@K is its mean."""
    _check_k(k)
    h = hits[:, :k].astype(np.float64)
    ranks = np.arange(1, h.shape[1] + 1)
    precision_at_i = np.cumsum(h, axis=1) / ranks
    n = np.minimum(np.asarray(n_relevant, dtype=np.float64), k)
    return np.divide((precision_at_i * h).sum(axis=1), n, out=np.zeros(len(n)), where=n > 0)


def catalogue_coverage(recommended: np.ndarray, n_items: int, k: int) -> float:
    """Share of the ``n_items`` catalogue that appears in at least one top-K list."""
    _check_k(k)
    if n_items <= 0:
        return 0.0
    top = np.asarray(recommended)[:, :k]
    return float(np.unique(top[top >= 0]).size / n_items)


def popularity_percentiles(item_popularity: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile in [0, 1): share strictly less popular + half the share of its ties."""
    pop = np.asarray(item_popularity, dtype=np.float64)
    m = len(pop)
    if m == 0:
        return pop
    sorted_pop = np.sort(pop)
    below = np.searchsorted(sorted_pop, pop, side="left")
    at_or_below = np.searchsorted(sorted_pop, pop, side="right")
    ties_other = at_or_below - below - 1
    return (below + 0.5 * ties_other) / m


def mean_item_value_at_k(recommended: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Per-customer mean of ``values[item]`` over the top-K (empty slots skipped; NaN for an empty list)."""
    _check_k(k)
    top = np.asarray(recommended)[:, :k]
    valid = top >= 0
    v = np.where(valid, np.asarray(values, dtype=np.float64)[np.where(valid, top, 0)], 0.0)
    count = valid.sum(axis=1)
    return np.divide(v.sum(axis=1), count, out=np.full(len(top), np.nan), where=count > 0)


def popularity_bias_at_k(recommended: np.ndarray, item_popularity: np.ndarray, k: int) -> np.ndarray:
    """Per-customer mean popularity percentile of the top-K items (see :func:`popularity_percentiles`)."""
    return mean_item_value_at_k(recommended, popularity_percentiles(item_popularity), k)


def arp_at_k(recommended: np.ndarray, item_popularity: np.ndarray, k: int) -> np.ndarray:
    """Per-customer average recommendation popularity (raw popularity counts) of the top-K items."""
    return mean_item_value_at_k(recommended, item_popularity, k)


def paired_bootstrap(
    ours: np.ndarray, theirs: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap of the difference of two models' mean per-customer metric on the same customers.

    Customers where either value is NaN (e.g. no new items to find) are left out of both. Each resample draws
    customers with replacement and takes both means over the same draw, so customer-to-customer variation that
    affects both models cancels.

    Returns:
        ``ours``, ``theirs`` (the means), ``difference`` (ours − theirs), ``low``/``high`` (the percentile
        interval of the difference at ``level``), ``relative`` (ours / theirs − 1), ``relative_low`` /
        ``relative_high`` (the same interval for the ratio) and ``customers`` (pairs used).

    Raises:
        ValueError: the arrays differ in length, no customer has both values, or ``level`` is not in (0, 1).
    """
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size == 0:
        raise ValueError("paired_bootstrap: no customer has both values")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, a.size, size=(resamples, a.size))
    mean_a, mean_b = a[draws].mean(axis=1), b[draws].mean(axis=1)
    tail = 100 * (1 - level) / 2
    diff = np.percentile(mean_a - mean_b, [tail, 100 - tail])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.percentile(mean_a / mean_b - 1, [tail, 100 - tail])
    return {
        "ours": float(a.mean()),
        "theirs": float(b.mean()),
        "difference": float(a.mean() - b.mean()),
        "low": float(diff[0]),
        "high": float(diff[1]),
        "relative": float(a.mean() / b.mean() - 1) if b.mean() else float("inf"),
        "relative_low": float(ratio[0]),
        "relative_high": float(ratio[1]),
        "customers": int(a.size),
    }
