"""Recommenders behind one protocol: implicit ALS, BPR and item-kNN, EASE, RP3beta, repurchase timing (TIFU),
popularity, repeat-purchase and a blend.

The arithmetic of EASE, RP3beta and TIFU lives in :mod:`nextbest.training.item_models`; this module holds their
configs and protocol classes beside the others, because the blend's config must name every kind of part.

Every model follows implicit's calling convention::

    model = make_recommender("als", ALSConfig(factors=32))
    model.fit(interactions)                                 # customers × items csr_matrix, float32
    ids, scores = model.recommend(7, interactions[7], n=10)  # one customer: 1-D arrays
    ids, scores = model.recommend(users, interactions[users], n=10)  # a batch: 2-D arrays
    model.save(path); model = load_recommender(path)         # JSON config + npz, never pickle

``user_items`` holds one row per requested customer (their history: what is filtered with
``filter_already_liked`` and what history-based models score). Customers the model was not fitted on (index −1
or beyond the fitted rows) are handled: ALS folds their history in, item-kNN and repeat score their history, and
a customer without any signal gets the popularity ranking. Ties are always broken by popularity, so results are
deterministic and the popularity fallback falls out of the same ranking code.

Every model scores all items densely (learned factors or similarity from implicit, top-n here), so the same
filtering, candidate restriction and tie-breaking apply to every model and a result is never padded: a single
customer gets exactly ``min(n, valid items)`` results; in a batch, rows with fewer valid items than the widest
row end in id −1 with score −inf.

Why it is longer than the project's ~600 lines: it is one protocol and the nine models that honour it. Ranking,
filtering, tie-breaking, the popularity fallback and the saved format are written once, in :class:`Recommender`;
a model adds only its config, ``_fit``, ``_scores`` and state (15–110 lines each). The blend builds its parts
through :func:`make_recommender`, whose table names every class, so a module per model would need a cycle or
late imports; the arithmetic that can stand alone already lives in :mod:`nextbest.training.item_models`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from nextbest.features.errors import NextbestError
from nextbest.training import item_models

FORMAT = "nextbest-recommender"
FORMAT_VERSION = 1
CONFIG_FILE = "recommender.json"
STATE_FILE = "state.npz"
IMPLICIT_FILE = "implicit.npz"
MISSING_ID = -1
"""Id in a batch row that has fewer valid items than the widest row (its score is −inf)."""

IterationCallback = Callable[[int], None]
"""Called with the number of completed iterations (ALS, BPR) while fitting; may raise to stop the fit."""


class RecommenderError(NextbestError, ValueError):
    """A recommender was given input it cannot use (wrong shape, unfitted model, unknown model name…)."""


# --- configs ------------------------------------------------------------------------------------------------


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ALSConfig(_Config):
    """implicit's Alternating Least Squares (Hu, Koren & Volinsky 2008, conjugate-gradient solver).

    Attributes:
        factors: latent factors.
        regularization: L2 penalty.
        alpha: confidence scaling of the interaction weights (``C = alpha · weight``).
        iterations: ALS sweeps.
    """

    kind: Literal["als"] = "als"
    factors: int = Field(64, ge=1, le=2048)
    regularization: float = Field(0.05, ge=0)
    alpha: float = Field(2.0, gt=0)
    iterations: int = Field(15, ge=1, le=1000)


class BPRConfig(_Config):
    """implicit's Bayesian Personalised Ranking (binary signal: weights are ignored).

    Attributes:
        factors: latent factors (implicit adds one for the item bias).
        learning_rate: SGD step.
        regularization: L2 penalty.
        iterations: epochs.
        verify_negative_samples: resample negatives the customer actually interacted with.
    """

    kind: Literal["bpr"] = "bpr"
    factors: int = Field(64, ge=1, le=2048)
    learning_rate: float = Field(0.01, gt=0)
    regularization: float = Field(0.01, ge=0)
    iterations: int = Field(100, ge=1, le=10_000)
    verify_negative_samples: bool = True


class ItemKNNConfig(_Config):
    """implicit's item-item nearest neighbours; a customer's score for item j is Σ_i weight_i · sim(i, j).

    Attributes:
        weighting: ``cosine`` on the raw weights, or ``bm25`` weighting (long histories count less).
        K: neighbours kept per item.
        K1: BM25 term saturation.
        B: BM25 length normalisation.
    """

    kind: Literal["itemknn"] = "itemknn"
    weighting: Literal["cosine", "bm25"] = "bm25"
    K: int = Field(100, ge=1)
    K1: float = Field(1.2, ge=0)
    B: float = Field(0.75, ge=0, le=1)


class PopularityConfig(_Config):
    """The same ranking for everyone.

    Attributes:
        measure: ``customers`` counts distinct customers per item; ``weight`` sums interaction weights.
    """

    kind: Literal["popularity"] = "popularity"
    measure: Literal["customers", "weight"] = "customers"


class RepeatConfig(_Config):
    """The customer's own items first, by frequency and recency; popular items after them.

    score(item) = (1 − recency_mix) · weight / max weight + recency_mix · 0.5 ** (age_days / half_life_days)

    Attributes:
        recency_mix: 0 ranks by frequency (summed weight) only, 1 by recency only.
        half_life_days: age at which the recency signal halves.
    """

    kind: Literal["repeat"] = "repeat"
    recency_mix: float = Field(0.3, ge=0, le=1)
    half_life_days: float = Field(30.0, gt=0)


class EASEConfig(_Config):
    """EASE (Steck 2019): a closed-form item×item linear model, ``B = I − P·diag(1/diag(P))``, ``P = (XᵀX + λI)⁻¹``.

    The item×item matrix is dense, so it is learned on the ``max_items`` items bought by the most customers
    (8,000 items: a 256 MB float32 matrix). Items outside that set rank after every item inside it, by
    popularity; ``n_items_used`` on the fitted model says how many were kept.

    Attributes:
        l2: λ, the ridge penalty (Complete Journey: 800 on binary purchases).
        max_items: items the model is learned on (the most bought ones).
        binary: learn from and score 1/0 purchases instead of the interaction weights.
    """

    kind: Literal["ease"] = "ease"
    l2: float = Field(800.0, gt=0)
    max_items: int = Field(8000, ge=1, le=40_000)
    binary: bool = True


class RP3BetaConfig(_Config):
    """RP3beta (Paudel et al. 2017; Dacrema et al. 2019): a two-step random walk item → customer → item, with
    the steps' probabilities raised to ``alpha`` and the target item's popularity penalised by ``beta``.

    Attributes:
        alpha: exponent on the transition probabilities (1 = plain random walk).
        beta: popularity penalty: the walk's weight of item j is divided by (customers of j) ** beta.
        K: neighbours kept per item.
    """

    kind: Literal["rp3beta"] = "rp3beta"
    alpha: float = Field(1.0, gt=0, le=3)
    beta: float = Field(0.5, ge=0, le=2)
    K: int = Field(100, ge=1)


class TIFUConfig(_Config):
    """Repurchase timing, TIFU-kNN style (Hu et al. 2020): a time-decayed repeat vector per customer, weighted
    by how due each item is, mixed with the same vectors of the most similar customers.

    An item's own score is its time-decayed purchase count (each purchase counts ``0.5 ** (age /
    half_life_days)``; only the latest purchase's age is stored, the others are taken as spread evenly over the
    customer's tenure) × ``due ** due_weight``. ``due`` compares the days since the last purchase with the
    customer's usual interval for the item (tenure / purchases; the item's typical interval across customers
    when they bought it once): ``min(1, (days since + horizon) / interval) × 0.5 ** (intervals overdue /
    lapse_intervals)`` — an item due now beats one bought yesterday, and a habit long overdue fades. The
    customer's vector, scaled to a maximum of 1, is mixed with the mean vector of their ``neighbours`` most
    similar customers: ``(1 − neighbour_weight) · own + neighbour_weight · neighbours``; the neighbour part also
    scores items the customer never bought (TIFU's discovery side).

    Interaction weights are read as purchase counts in units of the smallest positive weight in the fitted
    matrix (5 per purchase on Complete Journey → counts). Customers without purchase ages (not fitted on, or
    fitted without ``recency``) are scored by their plain counts.

    Attributes:
        half_life_days: age at which a purchase counts half.
        horizon_days: how far ahead a recommendation should hold.
        lapse_intervals: usual intervals overdue that halve the due factor.
        due_weight: exponent on the due factor (0 = decayed frequency only).
        neighbours: similar customers mixed in (0 = the customer's own vector only).
        neighbour_weight: weight of the neighbours' mean vector.
    """

    kind: Literal["tifu"] = "tifu"
    half_life_days: float = Field(90.0, gt=0)
    horizon_days: float = Field(30.0, gt=0)
    lapse_intervals: float = Field(4.0, gt=0)
    due_weight: float = Field(0.5, ge=0, le=1)
    neighbours: int = Field(100, ge=0)
    neighbour_weight: float = Field(0.3, ge=0, le=1)


def _kind_or(default: str) -> Callable[[Any], str]:
    """A discriminator that reads ``kind`` and falls back to ``default``: configs written before a part could
    be of several kinds carry no ``kind`` for it, and must keep loading as they did."""

    def kind(value: Any) -> str:
        if isinstance(value, dict):
            return str(value.get("kind", default))
        return str(getattr(value, "kind", default))

    return kind


def _discovery_config(default: str) -> Any:
    """The configuration of a blend's discovery part: any model that scores items a customer has not bought,
    picked by its ``kind`` (``default`` without one)."""
    return Annotated[
        Annotated[ALSConfig, Tag("als")]
        | Annotated[BPRConfig, Tag("bpr")]
        | Annotated[ItemKNNConfig, Tag("itemknn")]
        | Annotated[EASEConfig, Tag("ease")]
        | Annotated[RP3BetaConfig, Tag("rp3beta")]
        | Annotated[TIFUConfig, Tag("tifu")],
        Discriminator(_kind_or(default)),
    ]


CFConfig = _discovery_config("als")
"""A blend's collaborative part: any model that scores items a customer has not bought."""

SecondCFConfig = _discovery_config("itemknn")
"""A blend's second discovery part: the same kinds as ``cf``; without a ``kind`` it is item-kNN."""

RepeatPartConfig = Annotated[
    Annotated[RepeatConfig, Tag("repeat")] | Annotated[TIFUConfig, Tag("tifu")],
    Discriminator(_kind_or("repeat")),
]
"""A blend's repeat part: frequency and recency (``repeat``) or repurchase timing (``tifu``)."""


class BlendConfig(_Config):
    """Repeat signal plus collaborative filtering for discovery.

    score = repeat_weight · repeat score + (1 − repeat_weight) · CF score, where the CF score is the ``cf``
    model's scores min-max scaled per customer to [0, 1] and, when ``knn`` is set, mixed with the item-kNN
    scores scaled the same way: ``(1 − knn_weight) · cf + knn_weight · knn``.

    The repeat score is 0 outside a customer's history, so a discovery list (history left out) is ranked by the
    CF score alone: the CF side decides discovery, the repeat side and ``repeat_weight`` the repeat purchases.
    Factor models and item-kNN make different mistakes (global taste vs. "bought together"); on the grocery
    baskets of Complete Journey their mix ranks new items better than either alone.

    Attributes:
        repeat_weight: weight of the repeat score (both parts lie in [0, 1]).
        repeat: the repeat part (``repeat`` or ``tifu``; without a ``kind`` it is ``repeat``).
        cf: the collaborative part (ALS, BPR, item-kNN, EASE, RP3beta or TIFU config; its ``kind`` picks the
            model; without a ``kind`` it is ALS).
        knn: an optional second discovery part mixed into the CF score: item-kNN (without a ``kind``), or any
            model ``cf`` can be (EASE and RP3beta make different mistakes from a factor model too).
        knn_weight: its weight within the CF score (ignored without ``knn``).
    """

    kind: Literal["blend"] = "blend"
    repeat_weight: float = Field(0.5, ge=0, le=1)
    repeat: RepeatPartConfig = Field(default_factory=RepeatConfig)
    cf: CFConfig = Field(default_factory=ALSConfig)
    knn: SecondCFConfig | None = None
    knn_weight: float = Field(0.3, ge=0, le=1)


RecommenderConfig = Annotated[
    ALSConfig
    | BPRConfig
    | ItemKNNConfig
    | PopularityConfig
    | RepeatConfig
    | BlendConfig
    | EASEConfig
    | RP3BetaConfig
    | TIFUConfig,
    Field(discriminator="kind"),
]


# --- shared pieces ------------------------------------------------------------------------------------------


def as_interaction_matrix(matrix: Any, *, name: str = "interactions") -> sp.csr_matrix:
    """``matrix`` as a float32 ``csr_matrix`` (implicit rejects ``csr_array``), checked for NaN and infinities.

    Raises:
        RecommenderError: not a 2-D sparse matrix, or holding non-finite values.
    """
    if not sp.issparse(matrix) or matrix.ndim != 2:
        raise RecommenderError(f"{name} must be a 2-D scipy.sparse matrix, got {type(matrix).__name__}")
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    if csr.nnz and not np.isfinite(csr.data).all():
        bad = int((~np.isfinite(csr.data)).sum())
        raise RecommenderError(f"{name} holds {bad} non-finite value(s)")
    return csr


def blas_single_thread() -> Any:
    """A context limiting BLAS to one thread, as implicit asks (its own threads do the parallel work)."""
    # implicit's extensions must be loaded before the limit is set: threadpoolctl only limits the libraries
    # loaded when the context is entered.
    import implicit.cpu.als
    import implicit.nearest_neighbours  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def top_n(scores: np.ndarray, n: int, tie_order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best columns of each row of ``scores``; −inf marks columns that must not be returned.

    Args:
        scores: (rows × items) float scores; ``-inf`` = not allowed, NaN is treated as −inf.
        n: how many per row.
        tie_order: a permutation of the columns; among equal scores the column earlier in it wins
            (default: lower index wins).

    Returns:
        ``(ids, scores)`` of shape (rows × k) with ``k = min(n, most valid columns in any row)``, sorted by
        descending score; rows with fewer valid columns end in id −1 / score −inf.
    """
    scores = np.asarray(scores, dtype=np.float32)
    rows, m = scores.shape
    order = np.arange(m) if tie_order is None else np.asarray(tie_order)
    s = scores[:, order]
    s[np.isnan(s)] = -np.inf
    n_valid = np.isfinite(s).sum(axis=1)
    k = int(min(n, m, n_valid.max() if rows else 0))
    if k <= 0:
        return np.empty((rows, 0), dtype=np.int64), np.empty((rows, 0), dtype=np.float32)
    kth = np.partition(s, m - k, axis=1)[:, m - k]
    above = s > kth[:, None]
    tied = s == kth[:, None]
    room = k - above.sum(axis=1)
    take = above | tied
    # Among tied columns take the first ones in tie order (np.nonzero below keeps that order per row). Only rows
    # with more tied columns than room need trimming, and a running count over whole rows is slow at 60k items.
    crowded = np.nonzero(tied.sum(axis=1) > room)[0]
    if crowded.size:
        r, c = np.nonzero(tied[crowded])
        rank = np.arange(len(r)) - np.searchsorted(r, r)
        keep = rank < room[crowded][r]
        take[crowded] = above[crowded]
        take[crowded[r[keep]], c[keep]] = True
    cols = np.nonzero(take)[1].reshape(rows, k)
    vals = np.take_along_axis(s, cols, axis=1)
    o = np.argsort(-vals, axis=1, kind="stable")
    cols = np.take_along_axis(cols, o, axis=1)
    vals = np.take_along_axis(vals, o, axis=1)
    ids = order[cols].astype(np.int64)
    ids[~np.isfinite(vals)] = MISSING_ID
    vals[~np.isfinite(vals)] = -np.inf
    return ids, vals


def _rows(user_index: int | np.ndarray, user_items: Any, n_items: int) -> tuple[np.ndarray, sp.csr_matrix]:
    users = np.atleast_1d(np.asarray(user_index, dtype=np.int64))
    if users.ndim != 1:
        raise RecommenderError(f"user_index must be an int or a 1-D array, got shape {users.shape}")
    items = as_interaction_matrix(user_items, name="user_items")
    if items.shape[0] != len(users):
        raise RecommenderError(
            f"user_items must have one row per customer: {items.shape[0]} row(s) for {len(users)} "
            "customer(s) (pass matrix[user_index])"
        )
    if items.shape[1] != n_items:
        raise RecommenderError(f"user_items has {items.shape[1]} columns; the model was fitted on {n_items}")
    return users, items


def _csr_arrays(prefix: str, m: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_data": m.data,
        f"{prefix}_indices": m.indices,
        f"{prefix}_indptr": m.indptr,
        f"{prefix}_shape": np.asarray(m.shape, dtype=np.int64),
    }


def _csr_from(arrays: Any, prefix: str) -> sp.csr_matrix:
    shape = tuple(int(x) for x in arrays[f"{prefix}_shape"])
    return sp.csr_matrix(
        (arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]), shape=shape
    )


# --- the protocol -------------------------------------------------------------------------------------------


class Recommender(ABC):
    """The model protocol. Subclasses implement ``_fit`` and ``_scores``; ranking lives here.

    Attributes:
        config: hyperparameters (a pydantic config; ``config.kind`` names the model).
        seed: random seed for models that draw random numbers (run option, not a hyperparameter).
        threads: threads for implicit (0 = all cores).
        item_popularity: distinct customers per item in the fitted matrix (tie-breaks and fallback).
        user_has_history: per fitted row, whether it had any interaction.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise RecommenderError(
                f"{self.name} needs a {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        self.seed = seed
        self.threads = threads
        self.item_popularity: np.ndarray | None = None
        self.user_has_history: np.ndarray | None = None
        self._tie_order: np.ndarray | None = None

    def set_threads(self, threads: int) -> None:
        """Threads for implicit's work from now on (0 = all cores), in every part of the model.

        A service answers one customer per call, many calls at once: one thread each (``set_threads(1)``)
        avoids an OpenMP fork/join per fold-in, which on a busy machine costs far more than the fold-in itself.
        """
        self.threads = threads
        for model in self._implicit_models():
            if hasattr(model, "num_threads"):
                model.num_threads = threads

    def _implicit_models(self) -> list[Any]:
        """The implicit models this recommender wraps (none for our own models)."""
        return []

    # fitting ---------------------------------------------------------------------------------------------

    def fit(
        self,
        interactions: sp.csr_matrix,
        *,
        recency: sp.csr_matrix | None = None,
        progress: bool = False,
        callback: IterationCallback | None = None,
    ) -> Self:
        """Learn from a customers × items matrix of interaction weights.

        Args:
            interactions: ``csr_matrix`` (float32 preferred), rows = customers, columns = items.
            recency: optional matrix of the same shape whose entries are the age in days of each pair's latest
                interaction (see ``training.histories.recency_matrix``); used by repeat and blend.
            progress: show implicit's progress bar.
            callback: called after each iteration of iterative models.

        Returns:
            the fitted model (``self``).
        """
        matrix = as_interaction_matrix(interactions)
        if recency is not None:
            recency = as_interaction_matrix(recency, name="recency")
            if recency.shape != matrix.shape:
                raise RecommenderError(f"recency has shape {recency.shape}, interactions {matrix.shape}")
        self._set_popularity(matrix)
        with blas_single_thread():
            self._fit(matrix, recency=recency, progress=progress, callback=callback)
        return self

    def _set_popularity(self, matrix: sp.csr_matrix) -> None:
        positive = matrix.copy()
        positive.data = (positive.data > 0).astype(np.float32)
        positive.eliminate_zeros()
        self.item_popularity = np.asarray(positive.sum(axis=0)).ravel().astype(np.float32)
        self.user_has_history = np.diff(positive.indptr) > 0
        self._tie_order = None

    @abstractmethod
    def _fit(
        self,
        matrix: sp.csr_matrix,
        *,
        recency: sp.csr_matrix | None,
        progress: bool,
        callback: IterationCallback | None,
    ) -> None: ...

    @abstractmethod
    def _scores(self, users: np.ndarray, user_items: sp.csr_matrix, *, recalculate_user: bool) -> np.ndarray:
        """Dense (len(users) × items) scores; a constant row means "no signal" (popularity takes over)."""

    # state -------------------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return self.item_popularity is not None

    @property
    def n_items(self) -> int:
        self._require_fitted()
        assert self.item_popularity is not None
        return len(self.item_popularity)

    @property
    def n_users(self) -> int:
        self._require_fitted()
        assert self.user_has_history is not None
        return len(self.user_has_history)

    def _require_fitted(self) -> None:
        if self.item_popularity is None:
            raise RecommenderError(f"the {self.name} model is not fitted: call fit() or load() first")

    @property
    def tie_order(self) -> np.ndarray:
        """Items by descending popularity, then index: the order that breaks score ties."""
        if self._tie_order is None:
            assert self.item_popularity is not None
            self._tie_order = np.lexsort((np.arange(self.n_items), -self.item_popularity))
        return self._tie_order

    def popularity_scores(self) -> np.ndarray:
        """Popularity scaled to [0, 1] (the fallback scores)."""
        assert self.item_popularity is not None
        top = float(self.item_popularity.max()) if self.n_items else 0.0
        return (self.item_popularity / top if top > 0 else self.item_popularity).astype(np.float32)

    def known(self, users: np.ndarray) -> np.ndarray:
        """Which of ``users`` are fitted rows with a history (index −1 and beyond the fitted rows are not)."""
        assert self.user_has_history is not None
        ok = (users >= 0) & (users < self.n_users)
        out = np.zeros(len(users), dtype=bool)
        out[ok] = self.user_has_history[users[ok]]
        return out

    # recommending ------------------------------------------------------------------------------------------

    def scores(
        self, user_index: int | np.ndarray, user_items: sp.csr_matrix, *, recalculate_user: bool = False
    ) -> np.ndarray:
        """Dense scores (customers × items) with the popularity fallback applied to rows without signal."""
        self._require_fitted()
        users, items = _rows(user_index, user_items, self.n_items)
        s = np.asarray(self._scores(users, items, recalculate_user=recalculate_user), dtype=np.float32)
        s[np.isnan(s)] = -np.inf
        if s.size:
            flat = s.max(axis=1) == s.min(axis=1)
            if flat.any():
                s[flat] = self.popularity_scores()
        return s

    def recommend(
        self,
        user_index: int | np.ndarray,
        user_items: sp.csr_matrix,
        n: int = 10,
        *,
        filter_already_liked: bool = True,
        exclude: sp.csr_matrix | None = None,
        candidates: np.ndarray | None = None,
        recalculate_user: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best items for one customer or a batch.

        Args:
            user_index: fitted row index of the customer (−1 or out of range = not fitted on), or an array.
            user_items: one row per customer: their history (``matrix[user_index]``).
            n: how many items.
            filter_already_liked: leave out items stored in ``user_items``.
            exclude: one row per customer of further items to leave out.
            candidates: only rank these item indices.
            recalculate_user: ALS: fold in ``user_items`` instead of the fitted factors (BPR cannot).

        Returns:
            ``(ids, scores)``: 1-D for an int ``user_index`` (exactly ``min(n, valid)`` long), 2-D for an
            array (see the module docstring).
        """
        if n < 0:
            raise RecommenderError(f"n must be >= 0, got {n}")
        single = np.ndim(user_index) == 0
        users, items = _rows(user_index, user_items, self.n_items)
        s = self.scores(users, items, recalculate_user=recalculate_user)
        if candidates is not None:
            cand = np.unique(np.asarray(candidates, dtype=np.int64))
            if cand.size and (cand[0] < 0 or cand[-1] >= self.n_items):
                raise RecommenderError(f"candidates must be item indices in [0, {self.n_items})")
            allowed = np.zeros(self.n_items, dtype=bool)
            allowed[cand] = True
            s[:, ~allowed] = -np.inf
        if filter_already_liked:
            _mask(s, items)
        if exclude is not None:
            excl = as_interaction_matrix(exclude, name="exclude")
            if excl.shape != items.shape:
                raise RecommenderError(f"exclude has shape {excl.shape}; expected {items.shape}")
            _mask(s, excl)
        ids, vals = top_n(s, n, self.tie_order)
        if single:
            keep = ids[0] != MISSING_ID
            return ids[0][keep], vals[0][keep]
        return ids, vals

    def similar_items(self, item_index: int | np.ndarray, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Items most similar to ``item_index`` (the item itself left out); 1-D for an int, 2-D for an array."""
        self._require_fitted()
        single = np.ndim(item_index) == 0
        items = np.atleast_1d(np.asarray(item_index, dtype=np.int64))
        if items.size and (items.min() < 0 or items.max() >= self.n_items):
            raise RecommenderError(f"item_index must lie in [0, {self.n_items})")
        s = np.asarray(self._item_similarity(items), dtype=np.float32)
        s[np.arange(len(items)), items] = -np.inf
        ids, vals = top_n(s, n, self.tie_order)
        if single:
            keep = ids[0] != MISSING_ID
            return ids[0][keep], vals[0][keep]
        return ids, vals

    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        # Models without a notion of similarity answer with the most popular other items.
        return np.tile(self.popularity_scores(), (len(items), 1))

    # persistence -------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model into directory ``path``: ``recommender.json`` and npz files (no pickle)."""
        self._require_fitted()
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.name,
            "config": self.config.model_dump(mode="json"),
            "run_options": {"seed": self.seed, "threads": self.threads},
            "n_users": self.n_users,
            "n_items": self.n_items,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        assert self.item_popularity is not None and self.user_has_history is not None
        state = {
            "item_popularity": self.item_popularity,
            "user_has_history": self.user_has_history,
            **self._state_arrays(),
        }
        np.savez(directory / STATE_FILE, **state)
        self._save_extra(directory)
        return directory

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _save_extra(self, directory: Path) -> None:
        return None

    def _load_state(self, arrays: Any, directory: Path) -> None:
        return None

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """Read a model written by :meth:`save` (any kind; the JSON says which)."""
        return load_recommender(path)


def _mask(s: np.ndarray, rows: sp.csr_matrix) -> None:
    r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    s[r, rows.indices] = -np.inf


# --- models -------------------------------------------------------------------------------------------------


class PopularityRecommender(Recommender):
    """The most popular items, the same for everyone (already-bought items filtered when asked)."""

    name = "popularity"
    config_class = PopularityConfig
    config: PopularityConfig

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        if self.config.measure == "weight":
            # Ranking and tie-breaks then follow the summed weight instead of the customer count.
            self.item_popularity = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
            self._tie_order = None

    def _scores(self, users, user_items, *, recalculate_user):
        return np.tile(self.popularity_scores(), (len(users), 1))


class RepeatRecommender(Recommender):
    """The customer's own items by frequency and recency (see :class:`RepeatConfig`), then popular items."""

    name = "repeat"
    config_class = RepeatConfig
    config: RepeatConfig

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        super().__init__(config, seed=seed, threads=threads)
        self.recency: sp.csr_matrix | None = None

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        self.recency = recency

    def _scores(self, users, user_items, *, recalculate_user):
        return self.repeat_scores(users, user_items)

    def repeat_scores(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        """Scores in [0, 1] on each customer's history items, 0 elsewhere."""
        hist = user_items.copy()
        hist.data = np.maximum(hist.data, 0)
        hist.eliminate_zeros()
        row_max = np.zeros(hist.shape[0], dtype=np.float32)
        nonempty = np.diff(hist.indptr) > 0
        if hist.nnz:
            row_max[nonempty] = np.maximum.reduceat(hist.data, hist.indptr[:-1][nonempty])
        r = np.repeat(np.arange(hist.shape[0]), np.diff(hist.indptr))
        freq = hist.data / row_max[r]
        rec = np.zeros_like(freq)
        mix = self.config.recency_mix
        if mix > 0 and self.recency is not None:
            fitted = (users >= 0) & (users < self.recency.shape[0])
            rows = sp.csr_matrix(hist.shape, dtype=np.float32)
            if fitted.any():
                sel = np.where(fitted, users, 0)
                ages = self.recency[sel].tocsr()
                ages = sp.diags(fitted.astype(np.float32)) @ ages
                ages.data = (0.5 ** (ages.data / self.config.half_life_days)).astype(np.float32)
                rows = ages.tocsr()
            # The recency of each history entry (0 where the fitted history does not have the pair).
            rec = np.asarray(rows[r, hist.indices]).ravel() if hist.nnz else rec
        s = np.zeros(hist.shape, dtype=np.float32)
        s[r, hist.indices] = (1 - mix) * freq + mix * rec
        return s

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return _csr_arrays("recency", self.recency) if self.recency is not None else {}

    def _load_state(self, arrays, directory) -> None:
        self.recency = _csr_from(arrays, "recency") if "recency_data" in arrays else None


class _ImplicitRecommender(Recommender):
    """Shared save/load of the wrapped implicit model."""

    implicit_model: Any

    def _save_extra(self, directory: Path) -> None:
        self.implicit_model.save(str(directory / IMPLICIT_FILE))

    def _load_state(self, arrays, directory) -> None:
        self.implicit_model = self._implicit_class().load(str(directory / IMPLICIT_FILE))

    @abstractmethod
    def _implicit_class(self) -> Any: ...

    def _implicit_models(self) -> list[Any]:
        model = getattr(self, "implicit_model", None)
        return [] if model is None else [model]


class _FactorRecommender(_ImplicitRecommender):
    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        f = np.asarray(self.implicit_model.item_factors)
        norms = np.linalg.norm(f, axis=1)
        norms[norms == 0] = 1.0
        unit = f / norms[:, None]
        return unit[items] @ unit.T

    def _user_factors(
        self, users: np.ndarray, user_items: sp.csr_matrix, recalculate_user: bool
    ) -> np.ndarray:
        model = self.implicit_model
        known = self.known(users)
        factors = np.zeros((len(users), model.item_factors.shape[1]), dtype=model.item_factors.dtype)
        factors[known] = model.user_factors[users[known]]
        return factors

    def _scores(self, users, user_items, *, recalculate_user):
        factors = self._user_factors(users, user_items, recalculate_user)
        return factors @ np.asarray(self.implicit_model.item_factors).T


class ALSRecommender(_FactorRecommender):
    """implicit ALS; customers not fitted on, or ``recalculate_user=True``, get factors from their history."""

    name = "als"
    config_class = ALSConfig
    config: ALSConfig

    def _implicit_class(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        return AlternatingLeastSquares

    def new_implicit_model(self) -> Any:
        """A fresh implicit model with this config (CPU: the device is chosen here, nowhere else)."""
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.config
        return AlternatingLeastSquares(
            factors=c.factors,
            regularization=c.regularization,
            alpha=c.alpha,
            iterations=c.iterations,
            num_threads=self.threads,
            random_state=self.seed,
        )

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        self.implicit_model = self.new_implicit_model()
        hook = None if callback is None else (lambda it, _elapsed, _loss: callback(it + 1))
        self.implicit_model.fit(matrix, show_progress=progress, callback=hook)

    def _user_factors(self, users, user_items, recalculate_user):
        factors = super()._user_factors(users, user_items, recalculate_user)
        has_items = np.diff(user_items.indptr) > 0
        fold_in = has_items & (recalculate_user | ~self.known(users))
        if fold_in.any():
            idx = np.nonzero(fold_in)[0]
            factors[idx] = self.implicit_model.recalculate_user(idx, user_items[idx])
        return factors


class BPRRecommender(_FactorRecommender):
    """implicit BPR; customers it was not fitted on get the popularity ranking (BPR cannot fold in)."""

    name = "bpr"
    config_class = BPRConfig
    config: BPRConfig

    def _implicit_class(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.config
        self.implicit_model = BayesianPersonalizedRanking(
            factors=c.factors,
            learning_rate=c.learning_rate,
            regularization=c.regularization,
            iterations=c.iterations,
            verify_negative_samples=c.verify_negative_samples,
            num_threads=self.threads,
            random_state=self.seed,
        )
        hook = None if callback is None else (lambda it, *_: callback(it + 1))
        self.implicit_model.fit(matrix, show_progress=progress, callback=hook)

    def _user_factors(self, users, user_items, recalculate_user):
        if recalculate_user:
            raise RecommenderError("bpr cannot recalculate users from their history; use als or itemknn")
        return super()._user_factors(users, user_items, recalculate_user)


class ItemKNNRecommender(_ImplicitRecommender):
    """implicit item-item nearest neighbours (cosine or BM25); scores any history, fitted on or not."""

    name = "itemknn"
    config_class = ItemKNNConfig
    config: ItemKNNConfig

    def _implicit_class(self) -> Any:
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

        return BM25Recommender if self.config.weighting == "bm25" else CosineRecommender

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        from implicit.nearest_neighbours import (
            BM25Recommender,
            CosineRecommender,
            ItemItemRecommender,
            bm25_weight,
            normalize,
        )

        c = self.config
        # The same weighting as implicit's BM25Recommender / CosineRecommender.fit, handed over as CSR: theirs
        # passes COO and pays a conversion (with a warning) inside all_pairs_knn.
        if c.weighting == "bm25":
            model = BM25Recommender(K=c.K, K1=c.K1, B=c.B, num_threads=self.threads)
            weighted = bm25_weight(matrix.T, c.K1, c.B).T.tocsr()
        else:
            model = CosineRecommender(K=c.K, num_threads=self.threads)
            weighted = normalize(matrix.T).T.tocsr()
        ItemItemRecommender.fit(model, weighted, show_progress=progress)
        self.implicit_model = model

    def _scores(self, users, user_items, *, recalculate_user):
        return np.asarray((user_items @ self.implicit_model.similarity).todense(), dtype=np.float32)

    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        sim = self.implicit_model.similarity[items].toarray().astype(np.float32)
        # Items outside the K neighbours are not similar at all: leave them out rather than rank them by
        # popularity.
        sim[sim <= 0] = -np.inf
        return sim


class EASERecommender(Recommender):
    """EASE on the most bought items (see :class:`EASEConfig`); scores any history, fitted on or not.

    Attributes:
        items_used: indices of the items the model was learned on (ascending).
        weights: the (items used × items used) EASE matrix, zero diagonal.
    """

    name = "ease"
    config_class = EASEConfig
    config: EASEConfig

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        super().__init__(config, seed=seed, threads=threads)
        self.items_used: np.ndarray | None = None
        self.weights: np.ndarray | None = None

    @property
    def n_items_used(self) -> int:
        """How many items the item×item matrix covers (at most ``config.max_items``)."""
        self._require_fitted()
        assert self.items_used is not None
        return len(self.items_used)

    def _input(self, m: sp.csr_matrix) -> sp.csr_matrix:
        assert self.items_used is not None
        sub = sp.csr_matrix(m[:, self.items_used])
        if self.config.binary:
            return item_models.binary(sub)
        sub = sub.copy()
        sub.data = np.maximum(sub.data, 0)
        return sub

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        from threadpoolctl import threadpool_limits

        self.items_used = item_models.most_bought_items(matrix, self.config.max_items)
        # The inverse is one big BLAS/LAPACK call: let it use the cores implicit would have used.
        with threadpool_limits(limits=self.threads or None, user_api="blas"):
            self.weights = item_models.ease_weights(self._input(matrix), self.config.l2)

    def _scores(self, users, user_items, *, recalculate_user):
        assert self.items_used is not None and self.weights is not None
        x = self._input(user_items)
        inside = np.asarray(x @ self.weights, dtype=np.float32)
        out = np.zeros((len(users), self.n_items), dtype=np.float32)
        signal = np.diff(x.indptr) > 0
        if signal.any() and self.items_used.size:
            # Items outside the learned set rank below every item inside it (ties among them: popularity).
            floor = inside[signal].min(axis=1, keepdims=True) - 1.0
            rows = out[signal]
            rows[:] = floor
            rows[:, self.items_used] = inside[signal]
            out[signal] = rows
        return out

    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        assert self.items_used is not None and self.weights is not None
        sim = np.full((len(items), self.n_items), -np.inf, dtype=np.float32)
        position = np.full(self.n_items, -1, dtype=np.int64)
        position[self.items_used] = np.arange(len(self.items_used))
        inside = position[items] >= 0
        if inside.any():
            rows = sim[inside]
            rows[:, self.items_used] = self.weights[position[items[inside]]]
            sim[inside] = rows
        sim[~inside] = self.popularity_scores()
        return sim

    def _state_arrays(self) -> dict[str, np.ndarray]:
        assert self.items_used is not None and self.weights is not None
        return {"items_used": self.items_used, "weights": self.weights}

    def _load_state(self, arrays, directory) -> None:
        self.items_used = arrays["items_used"]
        self.weights = arrays["weights"]


class RP3BetaRecommender(Recommender):
    """RP3beta item-item walk (see :class:`RP3BetaConfig`); scores any history, fitted on or not.

    Attributes:
        similarity: items × items CSR, top ``K`` per row (row = an item in the history).
    """

    name = "rp3beta"
    config_class = RP3BetaConfig
    config: RP3BetaConfig

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        super().__init__(config, seed=seed, threads=threads)
        self.similarity: sp.csr_matrix | None = None

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        c = self.config
        self.similarity = item_models.rp3beta_similarity(matrix, alpha=c.alpha, beta=c.beta, k=c.K)

    def _scores(self, users, user_items, *, recalculate_user):
        assert self.similarity is not None
        return np.asarray((item_models.binary(user_items) @ self.similarity).toarray(), dtype=np.float32)

    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        assert self.similarity is not None
        sim = self.similarity[items].toarray().astype(np.float32)
        sim[sim <= 0] = -np.inf
        return sim

    def _state_arrays(self) -> dict[str, np.ndarray]:
        assert self.similarity is not None
        return _csr_arrays("similarity", self.similarity)

    def _load_state(self, arrays, directory) -> None:
        self.similarity = _csr_from(arrays, "similarity")


class TIFURecommender(Recommender):
    """Repurchase timing with neighbours (see :class:`TIFUConfig`).

    Customers the model was fitted on are scored from their ``user_items`` history with the purchase ages and
    tenure of the fit; customers it was not fitted on (and pairs newer than the fit) have no ages, so their own
    part is the purchase rate alone. Without ``recency`` at fit time every customer is scored that way.

    Attributes:
        recency: fitted customers × items, days since the latest purchase (as given to ``fit``).
        tenure: per fitted customer, the days observed (the oldest latest-purchase age in their row; NaN
            without recency).
        item_interval: per item, the typical interval in days across customers.
        unit: the interaction weight that counts as one purchase.
        vectors: fitted customers' own timing vectors, each scaled to a maximum of 1 (the neighbours).
    """

    name = "tifu"
    config_class = TIFUConfig
    config: TIFUConfig

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        super().__init__(config, seed=seed, threads=threads)
        self.recency: sp.csr_matrix | None = None
        self.tenure: np.ndarray | None = None
        self.item_interval: np.ndarray | None = None
        self.unit: float = 1.0
        self.vectors: sp.csr_matrix | None = None

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        positive = matrix.copy()
        positive.data = np.maximum(positive.data, 0)
        positive.eliminate_zeros()
        self.unit = float(positive.data.min()) if positive.nnz else 1.0
        self.recency = recency
        tenure = np.full(matrix.shape[0], np.nan, dtype=np.float32)
        if recency is not None and recency.nnz:
            rows_with = np.diff(recency.indptr) > 0
            tenure[rows_with] = np.maximum.reduceat(recency.data, recency.indptr[:-1][rows_with])
        self.tenure = tenure
        r = np.repeat(np.arange(positive.shape[0]), np.diff(positive.indptr))
        self.item_interval = item_models.typical_intervals(
            positive.indices, positive.data / self.unit, tenure[r].astype(np.float64), matrix.shape[1]
        )
        self.vectors = item_models.row_max_scaled(self._own(np.arange(matrix.shape[0]), positive))

    def _own(self, users: np.ndarray, user_items: sp.csr_matrix) -> sp.csr_matrix:
        """Timing scores on each customer's history items (sparse, same pattern as the positive history)."""
        assert self.tenure is not None and self.item_interval is not None
        hist = sp.csr_matrix(user_items, dtype=np.float32, copy=True)
        hist.data = np.maximum(hist.data, 0)
        hist.eliminate_zeros()
        r = np.repeat(np.arange(hist.shape[0]), np.diff(hist.indptr))
        fitted = (users >= 0) & (users < len(self.tenure))
        ages = np.full(hist.nnz, np.nan)
        tenure = np.full(hist.nnz, np.nan)
        if self.recency is not None and fitted.any() and hist.nnz:
            sel = np.where(fitted, users, 0)
            rows = sp.csr_matrix(sp.diags(fitted.astype(np.float32)) @ self.recency[sel])
            found = np.asarray(rows[r, hist.indices]).ravel()
            # Stored ages are at least one second, so 0 means "no age for this pair".
            ages = np.where(found > 0, found, np.nan)
            tenure = np.where(fitted, self.tenure[sel], np.nan)[r]
        c = self.config
        params = item_models.TimingParameters(
            c.half_life_days, c.horizon_days, c.lapse_intervals, c.due_weight
        )
        hist.data = item_models.purchase_timing(
            hist.data / self.unit, ages, tenure, self.item_interval[hist.indices], params
        )
        return hist

    def repeat_scores(self, users: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        """The own timing part: scores in [0, 1] on each customer's history items, 0 elsewhere."""
        return np.asarray(
            item_models.row_max_scaled(self._own(users, user_items)).toarray(), dtype=np.float32
        )

    def _scores(self, users, user_items, *, recalculate_user):
        own = item_models.row_max_scaled(self._own(users, user_items))
        w = self.config.neighbour_weight
        scores = np.asarray(own.toarray(), dtype=np.float32)
        if w > 0 and self.config.neighbours > 0:
            assert self.vectors is not None
            fitted = (users >= 0) & (users < self.vectors.shape[0])
            neighbours = item_models.neighbour_mean(
                own, self.vectors, self.config.neighbours, exclude=np.where(fitted, users, -1)
            )
            scores = (1 - w) * scores + w * neighbours
        return scores

    def _state_arrays(self) -> dict[str, np.ndarray]:
        assert self.tenure is not None and self.item_interval is not None and self.vectors is not None
        arrays = {
            "tenure": self.tenure,
            "item_interval": self.item_interval,
            "unit": np.asarray(self.unit, dtype=np.float64),
            **_csr_arrays("vectors", self.vectors),
        }
        if self.recency is not None:
            arrays.update(_csr_arrays("recency", self.recency))
        return arrays

    def _load_state(self, arrays, directory) -> None:
        self.tenure = arrays["tenure"]
        self.item_interval = arrays["item_interval"]
        self.unit = float(arrays["unit"])
        self.vectors = _csr_from(arrays, "vectors")
        self.recency = _csr_from(arrays, "recency") if "recency_data" in arrays else None


class BlendRecommender(Recommender):
    """Repeat scores plus min-max scaled CF (and item-kNN) scores (see :class:`BlendConfig`)."""

    name = "blend"
    config_class = BlendConfig
    config: BlendConfig

    def __init__(self, config: BaseModel | None = None, *, seed: int = 0, threads: int = 0) -> None:
        super().__init__(config, seed=seed, threads=threads)
        self.repeat: Recommender = make_recommender(
            self.config.repeat.kind, self.config.repeat, seed=seed, threads=threads
        )
        self.cf = make_recommender(self.config.cf.kind, self.config.cf, seed=seed, threads=threads)
        self.knn: Recommender | None = (
            None
            if self.config.knn is None
            else make_recommender(self.config.knn.kind, self.config.knn, seed=seed, threads=threads)
        )

    @classmethod
    def from_parts(
        cls,
        config: BlendConfig,
        repeat: RepeatRecommender | TIFURecommender,
        cf: Recommender,
        knn: Recommender | None = None,
    ) -> BlendRecommender:
        """A blend of parts already fitted on one matrix, e.g. to tune the weights without refitting the CF.

        Raises:
            RecommenderError: a part is unfitted, its config differs from ``config``'s, or the parts were fitted
                on matrices of different shapes.
        """
        parts: list[tuple[str, Recommender | None, BaseModel | None]] = [
            ("repeat", repeat, config.repeat),
            ("cf", cf, config.cf),
            ("knn", knn, config.knn),
        ]
        for label, part, wanted in parts:
            if (part is None) != (wanted is None):
                raise RecommenderError(f"blend part {label}: config and model must both be given or neither")
            if part is None:
                continue
            part._require_fitted()
            if part.config != wanted:
                raise RecommenderError(
                    f"blend part {label}: fitted with {part.config!r}, config says {wanted!r}"
                )
            if (part.n_users, part.n_items) != (cf.n_users, cf.n_items):
                raise RecommenderError(
                    f"blend part {label} was fitted on {part.n_users} × {part.n_items}, "
                    f"cf on {cf.n_users} × {cf.n_items}"
                )
        blend = cls(config, seed=cf.seed, threads=cf.threads)
        blend.repeat, blend.cf, blend.knn = repeat, cf, knn
        blend.item_popularity = cf.item_popularity
        blend.user_has_history = cf.user_has_history
        return blend

    def _parts(self) -> list[Recommender]:
        return [p for p in (self.repeat, self.cf, self.knn) if p is not None]

    def set_threads(self, threads: int) -> None:
        super().set_threads(threads)
        for part in self._parts():
            part.set_threads(threads)

    def _fit(self, matrix, *, recency, progress, callback) -> None:
        for part in self._parts():
            part._set_popularity(matrix)
            part._fit(matrix, recency=recency, progress=progress, callback=callback)

    @staticmethod
    def _scaled(scores: Any) -> np.ndarray:
        s = np.asarray(scores, np.float32)
        lo = s.min(axis=1, keepdims=True) if s.size else s
        span = (s.max(axis=1, keepdims=True) - lo) if s.size else s
        return np.divide(s - lo, span, out=np.zeros_like(s), where=span > 0)

    def _scores(self, users, user_items, *, recalculate_user):
        cf = self._scaled(self.cf._scores(users, user_items, recalculate_user=recalculate_user))
        if self.knn is not None:
            knn = self._scaled(self.knn._scores(users, user_items, recalculate_user=recalculate_user))
            cf = (1 - self.config.knn_weight) * cf + self.config.knn_weight * knn
        w = self.config.repeat_weight
        assert isinstance(self.repeat, RepeatRecommender | TIFURecommender)
        return w * self.repeat.repeat_scores(users, user_items) + (1 - w) * cf

    def _item_similarity(self, items: np.ndarray) -> np.ndarray:
        return self.cf._item_similarity(items)

    def _save_extra(self, directory: Path) -> None:
        self.repeat.save(directory / "repeat")
        self.cf.save(directory / "cf")
        if self.knn is not None:
            self.knn.save(directory / "knn")

    def _load_state(self, arrays, directory) -> None:
        repeat = load_recommender(directory / "repeat")
        cf = load_recommender(directory / "cf")
        assert isinstance(repeat, RepeatRecommender | TIFURecommender)
        self.repeat, self.cf = repeat, cf
        self.knn = load_recommender(directory / "knn") if self.config.knn is not None else None


# --- factory and loading ------------------------------------------------------------------------------------

RECOMMENDERS: dict[str, type[Recommender]] = {
    c.name: c
    for c in (
        ALSRecommender,
        BPRRecommender,
        ItemKNNRecommender,
        PopularityRecommender,
        RepeatRecommender,
        BlendRecommender,
        EASERecommender,
        RP3BetaRecommender,
        TIFURecommender,
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(RECOMMENDERS)


def config_for(name: str, config: BaseModel | dict[str, Any] | None = None) -> BaseModel:
    """The typed config of model ``name`` from a config, a plain dict (JSON) or ``None`` (defaults).

    Raises:
        RecommenderError: unknown model name, or a config of another model.
        pydantic.ValidationError: a dict with a bad field (the message names it).
    """
    if name not in RECOMMENDERS:
        raise RecommenderError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    cls = RECOMMENDERS[name].config_class
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.model_validate({"kind": name, **config})
    if not isinstance(config, cls):
        raise RecommenderError(f"model {name!r} needs a {cls.__name__}, got {type(config).__name__}")
    return config


def make_recommender(
    name: str, config: BaseModel | dict[str, Any] | None = None, *, seed: int = 0, threads: int = 0
) -> Recommender:
    """An unfitted recommender.

    Args:
        name: one of ``als``, ``bpr``, ``itemknn``, ``popularity``, ``repeat``, ``blend``, ``ease``,
            ``rp3beta``, ``tifu``.
        config: its config (typed, a dict, or ``None`` for the defaults).
        seed: random seed (ALS, BPR).
        threads: implicit's threads (0 = all cores).
    """
    typed = config_for(name, config)
    return RECOMMENDERS[name](typed, seed=seed, threads=threads)


def load_recommender(path: str | Path) -> Recommender:
    """Load a model saved with :meth:`Recommender.save`.

    Raises:
        RecommenderError: the directory holds no nextbest recommender, or one of a newer format.
    """
    directory = Path(path)
    meta_path = directory / CONFIG_FILE
    if not meta_path.exists():
        raise RecommenderError(f"{directory} holds no saved recommender ({CONFIG_FILE} is missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RecommenderError(f"{meta_path} is not a nextbest recommender of format {FORMAT_VERSION}")
    options = meta.get("run_options", {})
    model = make_recommender(
        meta["kind"], meta["config"], seed=options.get("seed", 0), threads=options.get("threads", 0)
    )
    with np.load(directory / STATE_FILE, allow_pickle=False) as arrays:
        model.item_popularity = arrays["item_popularity"]
        model.user_has_history = arrays["user_has_history"]
        model._load_state(arrays, directory)
    return model
