"""Temporal evaluation of recommenders: relevant items are the purchases of a later period.

Two views of every list metric (precision, recall, NDCG, MAP, hit rate at K in {5, 10, 20}):

* repeats counted: the model recommends freely (already-bought items allowed); relevant = every item bought in
  the period. Names: ``ndcg_at_10`` …
* discovery: the list leaves out items the customer bought in training; relevant = items bought in the period
  that the customer had not bought before; averaged over customers with at least one such item. Names:
  ``new_ndcg_at_10`` …

Plus catalogue coverage and popularity bias of the lists (``coverage_at_10``, ``popularity_bias_at_10``,
``arp_at_10``, and their ``new_`` versions), and a tidy per-segment table. Customers and items not in the
training vocabularies are dropped (a recommender cannot rank an item it never saw); the counts say how many.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from nextbest.features.interactions import Interactions
from nextbest.features.schema import CUSTOMER_ID, EVENT_TYPE, ITEM_ID
from nextbest.training import metrics as M
from nextbest.training.recommenders import MISSING_ID, Recommender

LIST_METRICS: tuple[str, ...] = ("precision", "recall", "ndcg", "map", "hit_rate")
SET_METRICS: tuple[str, ...] = ("coverage",)
BIAS_METRICS: tuple[str, ...] = ("popularity_bias", "arp")
DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
DEFAULT_SEGMENTS: tuple[str, ...] = ("age_band", "region", "journey_phase")
NEW_PREFIX = "new_"
UNKNOWN_SEGMENT = "unknown"
_METRIC_NAME = re.compile(
    r"^(?P<new>new_)?(?P<kind>precision|recall|ndcg|map|hit_rate|coverage|popularity_bias|arp)_at_(?P<k>\d+)$"
)


class EvaluationConfig(BaseModel):
    """What an evaluation measures.

    Attributes:
        ks: list lengths.
        segments: profile columns to break the metrics down by (missing columns are skipped).
        relevant_event: the event type that makes an item relevant.
        batch_size: customers scored per batch (memory ≈ batch_size × items × 4 bytes × a few).
        max_customers: evaluate a seeded random sample of at most this many customers (tuning speed).
        seed: seed of that sample.
    """

    model_config = ConfigDict(extra="forbid")

    ks: list[int] = Field(default_factory=lambda: list(DEFAULT_KS))
    segments: list[str] = Field(default_factory=lambda: list(DEFAULT_SEGMENTS))
    relevant_event: str = "purchase"
    batch_size: int = Field(256, ge=1)
    max_customers: int | None = Field(None, ge=1)
    seed: int = 0


def metric_name(kind: str, k: int, *, new: bool = False) -> str:
    """``ndcg_at_10``, ``new_ndcg_at_10`` …"""
    return f"{NEW_PREFIX if new else ''}{kind}_at_{k}"


def parse_metric_name(name: str) -> tuple[str, int, bool]:
    """``new_ndcg_at_10`` → (``ndcg``, 10, True).

    Raises:
        ValueError: not a metric name this module produces.
    """
    m = _METRIC_NAME.match(name)
    if not m:
        raise ValueError(
            f"unknown metric {name!r}: expected e.g. ndcg_at_10, new_recall_at_20 "
            f"(kinds: {', '.join(LIST_METRICS + SET_METRICS + BIAS_METRICS)})"
        )
    return m["kind"], int(m["k"]), m["new"] is not None


@dataclass(frozen=True)
class EvaluationTask:
    """One period's evaluation, prepared once and reusable for many models (tuning).

    Attributes:
        train: the training matrix and vocabularies (histories are its rows).
        users: training row index of each evaluated customer.
        relevant: (len(users) × items) items bought in the period.
        bought: (len(users) × items) items bought in training (left out of discovery lists).
        relevant_new: ``relevant`` minus ``bought``.
        item_popularity: distinct training customers per item (for popularity bias).
        segments: ``customer_id`` plus one column per segment, aligned with ``users``.
        counts: customers and events kept and dropped.
    """

    train: Interactions
    users: np.ndarray
    relevant: sp.csr_matrix
    bought: sp.csr_matrix
    relevant_new: sp.csr_matrix
    item_popularity: np.ndarray
    segments: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def user_items(self) -> sp.csr_matrix:
        """History rows of the evaluated customers."""
        return self.train.matrix[self.users]


def prepare_evaluation(
    train: Interactions,
    period_events: pl.LazyFrame | pl.DataFrame,
    *,
    bought: sp.csr_matrix | None = None,
    profiles: pl.DataFrame | pl.LazyFrame | None = None,
    config: EvaluationConfig | None = None,
) -> EvaluationTask:
    """Relevant items of the period, aligned with the training matrix.

    Args:
        train: training interactions (the model's input).
        period_events: events of the evaluation period (validation or test).
        bought: training purchases (customers × items, same vocabularies); default every training interaction.
        profiles: customer profiles with ``customer_id`` and segment columns, for the per-segment table.
        config: metrics, segments, sampling.
    """
    config = config or EvaluationConfig()
    lf = period_events.lazy() if isinstance(period_events, pl.DataFrame) else period_events
    purchases = lf.filter(pl.col(EVENT_TYPE) == config.relevant_event).select(CUSTOMER_ID, ITEM_ID).collect()
    cust = purchases[CUSTOMER_ID].to_list()
    item = purchases[ITEM_ID].to_list()
    rows = train.customers.indices(cust)
    cols = train.items.indices(item)
    known = (rows >= 0) & (cols >= 0)
    n_customers_period = purchases[CUSTOMER_ID].n_unique()
    users = np.unique(rows[known])
    if config.max_customers is not None and len(users) > config.max_customers:
        rng = np.random.default_rng(config.seed)
        users = np.sort(rng.choice(users, config.max_customers, replace=False))
    position = np.full(train.matrix.shape[0], -1, dtype=np.int64)
    position[users] = np.arange(len(users))
    keep = known & (position[np.where(rows >= 0, rows, 0)] >= 0)
    shape = (len(users), train.matrix.shape[1])
    relevant = M.relevance_matrix(position[rows[keep]], cols[keep], shape)
    history = sp.csr_matrix(train.matrix if bought is None else bought, dtype=np.float32)
    if history.shape != train.matrix.shape:
        raise ValueError(f"bought has shape {history.shape}; the training matrix {train.matrix.shape}")
    bought_rows = history[users]
    bought_rows = (bought_rows > 0).astype(np.float32).tocsr()
    relevant_new = (relevant - relevant.multiply(bought_rows)).tocsr()
    relevant_new.eliminate_zeros()
    positive = train.matrix > 0
    item_popularity = np.asarray(positive.sum(axis=0)).ravel().astype(np.float64)
    segments = _segments(train, users, profiles, config.segments)
    counts = {
        "customers": len(users),
        "customers_with_new_items": int((M.relevant_counts(relevant_new) > 0).sum()),
        "period_customers": n_customers_period,
        "period_purchases": purchases.height,
        "purchases_dropped_unknown_customer": int((rows < 0).sum()),
        "purchases_dropped_unknown_item": int(((rows >= 0) & (cols < 0)).sum()),
    }
    return EvaluationTask(
        train, users, relevant, bought_rows, relevant_new, item_popularity, segments, counts
    )


def _segments(
    train: Interactions, users: np.ndarray, profiles: pl.DataFrame | pl.LazyFrame | None, wanted: list[str]
) -> pl.DataFrame:
    ids = pl.DataFrame({CUSTOMER_ID: train.customers.lookup(users)}, schema={CUSTOMER_ID: pl.String})
    if profiles is None:
        return ids
    prof = profiles.collect() if isinstance(profiles, pl.LazyFrame) else profiles
    cols = [c for c in wanted if c in prof.columns and c != CUSTOMER_ID]
    if not cols:
        return ids
    seg = prof.select(CUSTOMER_ID, *(pl.col(c).cast(pl.String) for c in cols)).unique(CUSTOMER_ID)
    return ids.join(seg, on=CUSTOMER_ID, how="left", maintain_order="left").with_columns(
        pl.col(c).fill_null(UNKNOWN_SEGMENT) for c in cols
    )


def recommend_in_batches(
    model: Recommender,
    users: np.ndarray,
    user_items: sp.csr_matrix,
    n: int,
    *,
    exclude: sp.csr_matrix | None = None,
    filter_already_liked: bool = False,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "recommending",
) -> np.ndarray:
    """Top-``n`` item indices for every customer (rows of ``user_items``), −1 where fewer exist."""
    out = np.full((len(users), n), MISSING_ID, dtype=np.int64)
    starts = range(0, len(users), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        stop = min(start + batch_size, len(users))
        ids, _ = model.recommend(
            users[start:stop],
            user_items[start:stop],
            n,
            filter_already_liked=filter_already_liked,
            exclude=None if exclude is None else exclude[start:stop],
        )
        out[start:stop, : ids.shape[1]] = ids
    return out


@dataclass
class EvaluationResult:
    """Metrics of one model on one period.

    Attributes:
        metrics: overall values by name (``ndcg_at_10``, ``new_ndcg_at_10``, ``coverage_at_10`` …).
        per_customer: one row per evaluated customer: ``customer_id``, segment columns, list metrics.
        by_segment: tidy table ``segment, segment_value, customers, metric, value`` (``all``/``all`` included).
        counts: customers kept and purchases dropped.
    """

    metrics: dict[str, float]
    per_customer: pl.DataFrame
    by_segment: pl.DataFrame
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: metrics and counts."""
        return {"metrics": dict(self.metrics), "counts": dict(self.counts)}


def evaluate(
    model: Recommender,
    task: EvaluationTask,
    *,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    progress: bool = False,
    batch_size: int = 256,
) -> EvaluationResult:
    """Every metric of ``model`` on the prepared period (see the module docstring)."""
    ks = sorted(set(ks))
    max_k = max(ks)
    user_items = task.user_items
    lists = recommend_in_batches(
        model, task.users, user_items, max_k, batch_size=batch_size, progress=progress, desc="evaluating"
    )
    new_lists = recommend_in_batches(
        model,
        task.users,
        user_items,
        max_k,
        exclude=task.bought,
        batch_size=batch_size,
        progress=progress,
        desc="evaluating discovery",
    )
    n_items = task.train.matrix.shape[1]
    columns: dict[str, np.ndarray] = {}
    overall: dict[str, float] = {}
    for new, recs, relevant in ((False, lists, task.relevant), (True, new_lists, task.relevant_new)):
        hits = M.hit_matrix(recs, relevant)
        n_rel = M.relevant_counts(relevant)
        eligible = n_rel > 0
        for k in ks:
            per = _list_metrics(hits, n_rel, k)
            for kind, values in per.items():
                name = metric_name(kind, k, new=new)
                columns[name] = np.where(eligible, values, np.nan)
                overall[name] = float(values[eligible].mean()) if eligible.any() else 0.0
            bias = M.popularity_bias_at_k(recs, task.item_popularity, k)
            arp = M.arp_at_k(recs, task.item_popularity, k)
            columns[metric_name("popularity_bias", k, new=new)] = bias
            columns[metric_name("arp", k, new=new)] = arp
            overall[metric_name("coverage", k, new=new)] = M.catalogue_coverage(recs, n_items, k)
            overall[metric_name("popularity_bias", k, new=new)] = _nanmean(bias)
            overall[metric_name("arp", k, new=new)] = _nanmean(arp)
    per_customer = task.segments.with_columns(
        pl.Series(name, values, dtype=pl.Float64, nan_to_null=True) for name, values in columns.items()
    )
    by_segment = segment_table(per_customer, [c for c in task.segments.columns if c != CUSTOMER_ID])
    return EvaluationResult(overall, per_customer, by_segment, dict(task.counts))


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else 0.0


def _list_metrics(hits: np.ndarray, n_rel: np.ndarray, k: int) -> dict[str, np.ndarray]:
    return {
        "precision": M.precision_at_k(hits, k),
        "recall": M.recall_at_k(hits, n_rel, k),
        "ndcg": M.ndcg_at_k(hits, n_rel, k),
        "map": M.average_precision_at_k(hits, n_rel, k),
        "hit_rate": M.hit_rate_at_k(hits, k),
    }


def segment_table(per_customer: pl.DataFrame, segments: list[str]) -> pl.DataFrame:
    """Tidy mean of every metric column per segment value: ``segment, segment_value, customers, metric, value``.

    ``customers`` counts the customers the mean is over (discovery metrics only count customers with new
    items). An ``all``/``all`` group comes first.
    """
    metric_cols = [c for c in per_customer.columns if c != CUSTOMER_ID and c not in segments]
    frames = []
    for seg in [None, *segments]:
        key = pl.lit("all") if seg is None else pl.col(seg)
        long = per_customer.select(
            pl.lit("all" if seg is None else seg).alias("segment"),
            key.alias("segment_value"),
            *metric_cols,
        ).unpivot(index=["segment", "segment_value"], variable_name="metric", value_name="value")
        frames.append(
            long.group_by("segment", "segment_value", "metric", maintain_order=True).agg(
                pl.col("value").is_not_null().sum().cast(pl.Int64).alias("customers"),
                pl.col("value").mean().alias("value"),
            )
        )
    return (
        pl.concat(frames)
        .select("segment", "segment_value", "customers", "metric", "value")
        .sort("segment", "segment_value", "metric", maintain_order=True)
    )


def score_metric(model: Recommender, task: EvaluationTask, metric: str = "ndcg_at_10") -> float:
    """One overall list metric, computing only what it needs (for tuning and per-iteration pruning)."""
    kind, k, new = parse_metric_name(metric)
    recs = recommend_in_batches(model, task.users, task.user_items, k, exclude=task.bought if new else None)
    relevant = task.relevant_new if new else task.relevant
    n_rel = M.relevant_counts(relevant)
    if kind in LIST_METRICS:
        hits = M.hit_matrix(recs, relevant)
        eligible = n_rel > 0
        values = _list_metrics(hits, n_rel, k)[kind]
        return float(values[eligible].mean()) if eligible.any() else 0.0
    if kind == "coverage":
        return M.catalogue_coverage(recs, task.train.matrix.shape[1], k)
    fn = M.popularity_bias_at_k if kind == "popularity_bias" else M.arp_at_k
    return _nanmean(fn(recs, task.item_popularity, k))
