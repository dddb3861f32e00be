"""The numbers the customer dashboard shows: pure functions from profiles, interactions and decision summaries
to tables and series (``serving/dashboard.py`` renders them; ``tests/test_dashboard.py`` checks each)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from nextbest.features.interactions import Interactions
from nextbest.features.popularity import (
    MIN_SEGMENT_CUSTOMERS,
    SEGMENT_VALUE,
    interaction_pairs,
    segment_popularity,
)
from nextbest.features.profiles import AGE_BANDS, JOURNEY_PHASES
from nextbest.features.schema import ACTION_ID, CUSTOMER_ID, ITEM_ID, PRICE, SOURCE_SYSTEM
from nextbest.serving.decision_log import ALL_ACTIONS

if TYPE_CHECKING:
    from nextbest.training.recommender_bundle import RecommenderBundle

PREFERENCE_FIRST: tuple[str, ...] = ("colour", "sport", "brand")
ITEM_COLUMNS: tuple[str, ...] = ("name", "category", "sport", "brand", "colour")
NO_PREFERENCE = "(no preference)"
NOTHING_CHOSEN = "(nothing chosen)"
"""The action of decisions that chose nothing, in :func:`acceptance_table`."""
UNLINKED_IDS = "unlinked ids in events"
"""The source system of the last row of :func:`identity_counts`."""
RECOMMENDATION_LIST_LENGTH = 10
"""Length of the lists sampled per customer when a recommender ranks a segment's top items."""
CHURN_COLUMNS: tuple[str, ...] = (
    CUSTOMER_ID,
    "value_tier",
    "lifecycle",
    "journey_phase",
    "frequency",
    "monetary",
    "recency_days",
    "usual_interval_days",
    "churn_risk",
)
# The natural order of each segment's values (anything else follows, alphabetically).
_VALUE_ORDER: dict[str, tuple[str, ...]] = {
    "journey_phase": JOURNEY_PHASES,
    "age_band": (*(name for _, _, name in AGE_BANDS), "unknown"),
    "value_tier": ("high", "mid", "low", "none"),
    "lifecycle": ("new", "prospect", "active", "lapsing", "lapsed"),
}


def ordered_values(values: Sequence[str], column: str) -> list[str]:
    """``values`` of a profile column in their natural order (journey phases as a journey, age bands by age,
    value tiers high to low, lifecycle from new to lapsed); values outside that order follow alphabetically."""
    order = _VALUE_ORDER.get(column, ())
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _in_natural_order(table: pl.DataFrame, value_column: str, column: str, *then: str) -> pl.DataFrame:
    """``table`` sorted by ``value_column`` in the natural order of profile ``column``, then by ``then``."""
    order = ordered_values(table[value_column].unique().to_list(), column)
    key = pl.col(value_column).replace_strict(order, list(range(len(order))), return_dtype=pl.Int64)
    return table.sort([key, *then], maintain_order=True)


@dataclass(frozen=True)
class OverviewNumbers:
    """The overview's cards: profiled customers, raw events, items and customers at churn risk."""

    customers: int
    events: int
    items: int
    at_risk: int

    @property
    def at_risk_share(self) -> float:
        return self.at_risk / self.customers if self.customers else 0.0


def overview_numbers(
    profiles: pl.DataFrame, row_counts: Mapping[str, Any], items: pl.DataFrame
) -> OverviewNumbers:
    """The overview's numbers from the profiles, the manifest's ``row_counts`` and the items table (the matrix's
    item count when the table is empty)."""
    at_risk = (
        int(profiles["churn_risk_flag"].fill_null(False).sum())
        if "churn_risk_flag" in profiles.columns
        else 0
    )
    return OverviewNumbers(
        customers=profiles.height,
        events=int(row_counts.get("raw_events", 0)),
        items=items.height or int(row_counts.get("interaction_items", 0)),
        at_risk=at_risk,
    )


def identity_counts(identities: pl.DataFrame, unlinked: int | None = None) -> pl.DataFrame:
    """The single customer view: linked ids and the customers they resolve to, per source system.

    Returns:
        ``source_system, ids, customers`` sorted by system; with ``unlinked``, a last row :data:`UNLINKED_IDS`
        holding that many ids (customers null).
    """
    schema = {SOURCE_SYSTEM: pl.String, "ids": pl.Int64, "customers": pl.Int64}
    counts = (
        identities.filter(pl.col(CUSTOMER_ID).is_not_null())
        .group_by(SOURCE_SYSTEM)
        .agg(
            pl.len().cast(pl.Int64).alias("ids"),
            pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias("customers"),
        )
        .sort(SOURCE_SYSTEM)
        .select(pl.col(k).cast(v) for k, v in schema.items())
        if identities.height
        else pl.DataFrame(schema=schema)
    )
    if unlinked is None:
        return counts
    return pl.concat([counts, pl.DataFrame([(UNLINKED_IDS, unlinked, None)], schema=schema, orient="row")])


def segment_counts(profiles: pl.DataFrame, column: str) -> pl.DataFrame:
    """Customers per value of a profile column: ``value, customers, share``, in the column's natural order.

    Nulls count as ``unknown``.
    """
    total = profiles.height
    counts = (
        profiles.select(pl.col(column).cast(pl.String).fill_null("unknown").alias("value"))
        .group_by("value")
        .len("customers")
        .with_columns(
            pl.col("customers").cast(pl.Int64),
            (pl.col("customers") / total if total else pl.lit(0.0)).alias("share"),
        )
    )
    return _in_natural_order(counts, "value", column)


def preference_attributes(profiles: pl.DataFrame) -> list[str]:
    """The attributes A with a ``preferred_<A>`` column: colour, sport and brand first, then the rest."""
    found = [
        c.removeprefix("preferred_")
        for c in profiles.columns
        if c.startswith("preferred_") and not c.endswith("_share")
    ]
    return [a for a in PREFERENCE_FIRST if a in found] + sorted(a for a in found if a not in PREFERENCE_FIRST)


def preference_distribution(profiles: pl.DataFrame, attribute: str) -> pl.DataFrame:
    """Customers per preferred value of ``attribute``: ``value, customers, share, mean_strength``.

    ``mean_strength`` is the mean ``preferred_<attribute>_share`` (how dominant the preferred value is in those
    customers' interactions). Customers without any value of the attribute count as :data:`NO_PREFERENCE`, last.
    Sorted by customers, most first.
    """
    col = f"preferred_{attribute}"
    share_col = f"{col}_share"
    strength = pl.col(share_col).mean() if share_col in profiles.columns else pl.lit(None, dtype=pl.Float64)
    total = profiles.height
    out = (
        profiles.group_by(pl.col(col).cast(pl.String).alias("value"))
        .agg(pl.len().cast(pl.Int64).alias("customers"), strength.cast(pl.Float64).alias("mean_strength"))
        .with_columns((pl.col("customers") / total if total else pl.lit(0.0)).alias("share"))
        .sort(
            [pl.col("value").is_null(), "customers", "value"],
            descending=[False, True, False],
        )
        .with_columns(pl.col("value").fill_null(NO_PREFERENCE))
    )
    return out.select("value", "customers", "share", "mean_strength")


def churn_risk_list(profiles: pl.DataFrame, limit: int | None = 25) -> pl.DataFrame:
    """The customers flagged at churn risk, most valuable (by ``monetary``) first, then by churn risk.

    Returns:
        the :data:`CHURN_COLUMNS` present in ``profiles``; at most ``limit`` rows (all when None).
    """
    if "churn_risk_flag" not in profiles.columns:
        return pl.DataFrame(schema={CUSTOMER_ID: pl.String})
    cols = [c for c in CHURN_COLUMNS if c in profiles.columns]
    keys = [c for c in ("monetary", "churn_risk") if c in cols]
    flagged = profiles.filter(pl.col("churn_risk_flag").fill_null(False)).select(cols)
    flagged = flagged.sort([*keys, CUSTOMER_ID], descending=[True] * len(keys) + [False], nulls_last=True)
    return flagged if limit is None else flagged.head(limit)


def popular_by_segment(
    interactions: Interactions,
    profiles: pl.DataFrame,
    segment: str,
    n: int = 5,
    *,
    min_customers: int = MIN_SEGMENT_CUSTOMERS,
) -> pl.DataFrame:
    """Per segment value, the ``n`` items the most of its customers interacted with: what the service answers
    without a model (:func:`features.popularity.segment_popularity`, the one rule for both).

    Customers whose ``segment`` is null are in no segment; a segment of fewer than ``min_customers`` customers in
    the matrix shows the popularity among all customers (``fallback`` true), as the service does.

    Returns:
        ``segment_value, rank, item_id, customers, segment_customers, fallback``, segments in their natural
        order (:func:`ordered_values`); ties go to the smaller item id; items nobody interacted with are left out.
    """
    pairs = interaction_pairs(interactions.matrix, interactions.customers, interactions.items)
    table = (
        segment_popularity(pairs, profiles.lazy(), column=segment, min_customers=min_customers)
        .collect()
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(SEGMENT_VALUE).alias("rank"))
        .filter(pl.col("rank") <= n)
    )
    columns = [SEGMENT_VALUE, "rank", ITEM_ID, "customers", "segment_customers", "fallback"]
    return _in_natural_order(table, SEGMENT_VALUE, segment, "rank").select(columns)


def recommended_by_segment(
    recommender: RecommenderBundle,
    profiles: pl.DataFrame,
    segment: str,
    n: int = 5,
    *,
    sample: int = 200,
    list_length: int = RECOMMENDATION_LIST_LENGTH,
    seed: int = 0,
) -> pl.DataFrame:
    """Per segment value, the ``n`` items found most often in the recommender's top-``list_length`` lists of a
    seeded sample of at most ``sample`` of its customers.

    Returns:
        ``segment_value, rank, item_id, customers`` (lists holding the item), ``lists`` (lists sampled in the
        segment) and ``mean_rank``; ties go to the better mean rank, then the smaller item id.
    """
    schema = {
        "segment_value": pl.String,
        "rank": pl.Int64,
        ITEM_ID: pl.String,
        "customers": pl.Int64,
        "lists": pl.Int64,
        "mean_rank": pl.Float64,
    }
    seg = profiles.select(CUSTOMER_ID, pl.col(segment).cast(pl.String).fill_null("unknown").alias("value"))
    frames = []
    for value in ordered_values(seg["value"].unique().to_list(), segment):
        ids = seg.filter(pl.col("value") == value)[CUSTOMER_ID].sort()
        if ids.len() > sample:
            ids = ids.sample(sample, seed=seed).sort()
        lists = recommender.recommend(ids.to_list(), list_length)
        if lists.is_empty():
            continue
        frames.append(
            lists.group_by(ITEM_ID)
            .agg(
                pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias("customers"),
                pl.col("rank").mean().cast(pl.Float64).alias("mean_rank"),
            )
            .sort(["customers", "mean_rank", ITEM_ID], descending=[True, False, False])
            .head(n)
            .with_columns(
                pl.lit(value).alias("segment_value"),
                pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"),
                pl.lit(ids.len(), dtype=pl.Int64).alias("lists"),
            )
        )
    if not frames:
        return pl.DataFrame(schema=schema)
    return pl.concat(frames).select(list(schema))


def with_item_details(table: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """``table`` (with ``item_id``) with the items' :data:`ITEM_COLUMNS` and price beside it, where known."""
    cols = [c for c in (*ITEM_COLUMNS, PRICE) if c in items.columns]
    if not cols:
        return table
    return table.join(items.select(ITEM_ID, *cols), on=ITEM_ID, how="left", maintain_order="left")


def acceptance_table(summary: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
    """A decision summary (:func:`serving.decision_log.summarise_decisions`) with each action's ``description``
    from the action catalogue ("" when unknown), and :data:`NOTHING_CHOSEN` for decisions that chose nothing."""
    described: dict[str, Any] = {}
    if "description" in catalog.columns:
        described = dict(zip(catalog[ACTION_ID].to_list(), catalog["description"].to_list(), strict=True))
    return summary.with_columns(
        pl.col(ACTION_ID).fill_null(NOTHING_CHOSEN),
        pl.col(ACTION_ID)
        .replace_strict(described, default="", return_dtype=pl.String)
        .fill_null("")
        .alias("description"),
    )


def acceptance_by_arm(table: pl.DataFrame) -> list[tuple[str, float]]:
    """``(arm, acceptance rate)`` of each arm's total row in :func:`acceptance_table` (0 without offers)."""
    totals = table.filter(pl.col(ACTION_ID) == ALL_ACTIONS)
    return [(arm, rate or 0.0) for arm, rate in totals.select("arm", "acceptance_rate").iter_rows()]


def acceptance_by_action(table: pl.DataFrame, arm: str) -> list[tuple[str, float]]:
    """``(action, acceptance rate)`` of ``arm``'s actions that were offered, in the table's order."""
    offered = table.filter(
        (pl.col("arm") == arm) & (pl.col(ACTION_ID) != ALL_ACTIONS) & (pl.col("offers") > 0)
    )
    return [
        (action, rate or 0.0) for action, rate in offered.select(ACTION_ID, "acceptance_rate").iter_rows()
    ]


def acceptance_scale(table: pl.DataFrame) -> float:
    """The rate of a full-width bar in every acceptance chart (the largest rate, 1 when all are 0), so that bars
    compare across arms."""
    return float(table["acceptance_rate"].fill_null(0.0).max() or 0.0) or 1.0
