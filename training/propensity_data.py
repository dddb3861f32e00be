"""Propensity training tables (exposures with as-of customer features) and the encoder shared with serving.

A training row is one exposure: a customer was shown an action at a time on a channel, and responded or not.
Its customer features are the customer's profile built from events *strictly before* a snapshot time at or
before the exposure (profiles are rebuilt every ``snapshot_days``), so no row sees its own future. Datasets
without an action log get derived targets instead: at each snapshot, every recently active customer is
"exposed" to "buy a product of <attribute> = c", and responds if they do within the next ``horizon_days``.

The :class:`FeatureEncoder` turns rows into model inputs in one place for both paths: a whole frame offline
(:meth:`FeatureEncoder.encode_frame`) and one customer against many actions online
(:meth:`FeatureEncoder.encode_one`). Only reading values differs between the two (Polars columns versus a
dict); every derived feature (days since a date, hour and weekday, customer–action matches, normalisation) is
computed by the same NumPy code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset, DatasetError
from nextbest.features.interactions import InteractionConfig
from nextbest.features.pipeline import FeatureConfig, clean_events, data_as_of
from nextbest.features.privacy import consent_granted, consent_state
from nextbest.features.profiles import DEMOGRAPHICS, SEGMENT_FEATURES, ProfileConfig, age_band, build_profiles
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    EXPOSURE_ID,
    ITEM_ID,
    KIND,
    PRICE,
    QUANTITY,
    RESPONDED,
    SESSION_ID,
    TIMESTAMP,
    TIMESTAMP_COL,
    VALUE,
)
from nextbest.features.splits import temporal_split
from nextbest.training.recommenders import ALSConfig

SNAPSHOT_AT = "snapshot_at"
"""The time of the profile snapshot a training row's customer features come from (events strictly before it)."""
P_TRUE = "p_true"
"""The planted response probability of an exposure (``truth/propensity.parquet``, generated data only)."""
DERIVED_KIND = "follow_up_purchase"
HOUR = "hour"
WEEKDAY = "weekday"
ACTION_PREFIX = "action."
UNKNOWN_INDEX = 0
"""Index 0 of every categorical vocabulary: missing, unseen or too rare a value."""

EXPOSURE_COLUMNS = frozenset({EXPOSURE_ID, CUSTOMER_ID, ACTION_ID, CHANNEL, TIMESTAMP_COL, RESPONDED})
EXCLUDED_CUSTOMER_COLUMNS = frozenset({CUSTOMER_ID, SNAPSHOT_AT, "recency_days"})
"""Profile columns that are not model inputs: ids, and ``recency_days``, which is relative to the snapshot;
the model derives the exact recency at the exposure time from ``last_purchase`` instead."""
_EPOCH = datetime(1970, 1, 1)
_DAY_SECONDS = 86_400.0
_LOG_ABOVE = 10.0
"""Non-negative numeric features whose training maximum exceeds this are log1p-transformed (counts, money, days)."""
_CLIP = 5.0


class PropensityDataError(ValueError):
    """The dataset cannot give a propensity training table (no exposures, no attribute to derive targets, …)."""


class PropensityDataConfig(BaseModel):
    """How the propensity training table is built. Round-trips through JSON.

    Attributes:
        target: ``actions`` (the action log), ``derived`` (follow-up purchases) or ``auto`` (the action log when
            the dataset has one).
        snapshot_days: profiles are rebuilt every this many days; a row uses the latest snapshot at or before
            its exposure (smaller is more exact and slower).
        validation_fraction: share of exposures (by time) in the validation period when no cut-off is given.
        test_fraction: share of exposures (by time) in the test period when no cut-off is given.
        validation_start: explicit first time of the validation period.
        test_start: explicit first time of the test period.
        derived_attribute: item attribute of the derived targets; default ``category``, else ``brand``, else the
            first text attribute of the items table.
        horizon_days: derived targets: a purchase within this many days after the snapshot is a response.
        derived_values: derived targets: the most purchased values of the attribute that become actions.
        active_days: derived targets: customers with an event in this many days before a snapshot are exposed.
        max_rows: derived targets: customers are sampled per snapshot to keep at most about this many rows.
        seed: seed of that sampling (and of the affinity's ALS fit).
        affinity: add the customer–action affinity from a collaborative-filtering model as an input
            (:class:`ActionAffinity`); off leaves the table as before.
        affinity_source: ``auto`` uses the recommender passed to :func:`load_propensity_data` (the registered
            champion) when it can fold customers in and was trained on this dataset, else fits ALS on the
            training period's interactions; ``fit`` always fits.
        affinity_aggregate: ``mean`` or ``max`` of the action's target items' standardised scores (``mean``
            was better on validation on the generated world).
        affinity_als: the ALS fitted when no registered model is used.
    """

    model_config = ConfigDict(extra="forbid")

    target: Literal["auto", "actions", "derived"] = "auto"
    snapshot_days: int = Field(7, ge=1)
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    validation_start: datetime | None = None
    test_start: datetime | None = None
    derived_attribute: str | None = None
    horizon_days: int = Field(14, ge=1)
    derived_values: int = Field(20, ge=1)
    active_days: int = Field(60, ge=1)
    max_rows: int | None = Field(1_000_000, ge=1)
    seed: int = 0
    affinity: bool = True
    affinity_source: Literal["auto", "fit"] = "auto"
    affinity_aggregate: Literal["mean", "max"] = "mean"
    affinity_als: ALSConfig = Field(default_factory=lambda: ALSConfig(factors=32))

    @model_validator(mode="after")
    def _fractions_leave_training(self) -> PropensityDataConfig:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"validation_fraction + test_fraction must leave at least 10% for training, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        return self


# --- as-of profiles ----------------------------------------------------------------------------------------


def _midnight(ts: datetime) -> datetime:
    return datetime(ts.year, ts.month, ts.day)


def snapshot_times(start: datetime, end: datetime, every_days: int) -> list[datetime]:
    """Snapshot times from midnight of ``start`` every ``every_days`` days, up to and including ``end``."""
    if every_days < 1:
        raise ValueError(f"every_days must be >= 1, got {every_days}")
    out: list[datetime] = []
    s = _midnight(start)
    while s <= end:
        out.append(s)
        s += timedelta(days=every_days)
    return out


def profile_snapshots(
    events: pl.DataFrame,
    items: pl.LazyFrame,
    customers: pl.LazyFrame,
    snapshots: Sequence[datetime],
    *,
    needed: Mapping[datetime, Sequence[str]] | None = None,
    config: ProfileConfig | None = None,
    progress: bool = False,
) -> pl.DataFrame:
    """Customer profiles at each snapshot time, each built only from events strictly before it.

    Args:
        events: clean events (identity-resolved, consented for profiling).
        items: the items table.
        customers: the customers table.
        snapshots: snapshot times.
        needed: if given, only these customers' profiles are kept per snapshot (they are still built over
            everyone, so segment thresholds do not depend on who was exposed).
        config: profile definitions.
        progress: show a progress bar.

    Returns:
        the profile columns plus ``snapshot_at``; one row per (customer with earlier events, snapshot).
    """
    frames: list[pl.DataFrame] = []
    ts = pl.col(TIMESTAMP_COL)
    for s in tqdm(snapshots, desc="profile snapshots", disable=not progress, unit="snapshot"):
        keep = None if needed is None else needed.get(s)
        if keep is not None and len(keep) == 0:
            continue
        before = events.filter(ts < s)
        if before.is_empty():
            continue
        prof = build_profiles(before.lazy(), items, customers, as_of=s, config=config)
        if keep is not None:
            prof = prof.filter(pl.col(CUSTOMER_ID).is_in(list(keep)))
        frames.append(prof.collect().with_columns(pl.lit(s).cast(TIMESTAMP).alias(SNAPSHOT_AT)))
    if not frames:
        return pl.DataFrame(schema={CUSTOMER_ID: pl.String, SNAPSHOT_AT: TIMESTAMP})
    return pl.concat(frames, how="diagonal_relaxed")


def join_profiles_asof(exposures: pl.DataFrame, profiles: pl.DataFrame) -> pl.DataFrame:
    """Attach to each exposure the customer's latest profile snapshot taken at or before the exposure time.

    The snapshot at ``s`` was built from events strictly before ``s`` <= exposure time, so no exposure sees
    events at or after its own time. Exposures of customers without any earlier snapshot get null profiles.
    """
    left = exposures.with_columns(pl.col(TIMESTAMP_COL).cast(TIMESTAMP)).sort(TIMESTAMP_COL)
    right = profiles.with_columns(pl.col(SNAPSHOT_AT).cast(TIMESTAMP)).sort(SNAPSHOT_AT)
    clash = [c for c in right.columns if c in left.columns and c != CUSTOMER_ID]
    if clash:
        right = right.drop(clash)
    return left.join_asof(
        right,
        left_on=TIMESTAMP_COL,
        right_on=SNAPSHOT_AT,
        by=CUSTOMER_ID,
        strategy="backward",
        check_sortedness=False,
    )


def exposure_snapshots(exposures: pl.DataFrame, every_days: int) -> dict[datetime, list[str]]:
    """The snapshot each exposure falls after, as {snapshot time: customers exposed before the next one}."""
    if exposures.is_empty():
        return {}
    start = _midnight(exposures[TIMESTAMP_COL].min())
    step = timedelta(days=every_days)
    snap = pl.lit(start) + (
        (pl.col(TIMESTAMP_COL) - pl.lit(start)).dt.total_seconds() // step.total_seconds()
    ).cast(pl.Int64) * pl.duration(days=every_days)
    grouped = (
        exposures.select(snap.cast(TIMESTAMP).alias(SNAPSHOT_AT), CUSTOMER_ID)
        .unique()
        .group_by(SNAPSHOT_AT)
        .agg(pl.col(CUSTOMER_ID).sort())
        .sort(SNAPSHOT_AT)
    )
    return dict(zip(grouped[SNAPSHOT_AT].to_list(), grouped[CUSTOMER_ID].to_list(), strict=True))


def build_training_table(
    exposures: pl.DataFrame,
    events: pl.DataFrame,
    items: pl.LazyFrame,
    customers: pl.LazyFrame,
    *,
    snapshot_days: int = 7,
    channels: Sequence[str] | None = None,
    config: ProfileConfig | None = None,
    progress: bool = False,
) -> pl.DataFrame:
    """One row per exposure with the customer's as-of profile (see :func:`join_profiles_asof`) and exact as-of
    activity (see :func:`activity_asof`).

    Args:
        exposures: rows of the actions table (``exposure_id, customer_id, action_id, channel, timestamp,
            responded``).
        events: clean events.
        items: the items table.
        customers: the customers table.
        snapshot_days: days between profile snapshots.
        channels: event channels whose shares become features (default :func:`activity_channels`).
        config: profile definitions.
        progress: show a progress bar.

    Returns:
        the exposures (sorted by time) with profile columns, ``snapshot_at`` and activity columns.
    """
    needed = exposure_snapshots(exposures, snapshot_days)
    profiles = profile_snapshots(
        events, items, customers, sorted(needed), needed=needed, config=config, progress=progress
    )
    table = join_profiles_asof(exposures, profiles)
    channels = activity_channels(events) if channels is None else channels
    activity = activity_asof(table.select(CUSTOMER_ID, TIMESTAMP_COL), events, items, channels=channels)
    return pl.concat([table.drop(activity.columns, strict=False), activity], how="horizontal")


# --- derived targets ---------------------------------------------------------------------------------------


def default_derived_attribute(items: pl.LazyFrame) -> str:
    """``category``, else ``brand``, else the first text attribute of the items table.

    Raises:
        PropensityDataError: the items table has no text attribute.
    """
    schema = items.collect_schema()
    text = [n for n, t in schema.items() if t == pl.String and n not in {ITEM_ID, "name", "title"}]
    for preferred in ("category", "brand"):
        if preferred in text:
            return preferred
    if not text:
        raise PropensityDataError(
            "the dataset has no action log and its items table has no text attribute to derive "
            "follow-up purchase targets from (e.g. category or brand)"
        )
    return text[0]


def derived_action_id(attribute: str, value: str) -> str:
    """The action id of the derived target "buy an item with ``attribute`` = ``value``"."""
    return f"buy:{attribute}:{value}"


def derived_action_log(
    events: pl.DataFrame,
    items: pl.LazyFrame,
    *,
    attribute: str,
    horizon_days: int = 14,
    every_days: int = 7,
    values: int = 20,
    active_days: int = 60,
    purchase_event: str = "purchase",
    max_rows: int | None = None,
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Follow-up purchase targets as an action log: "purchases in ``attribute`` = c within the next H days".

    At each snapshot ``s`` (every ``every_days`` from one period after the first event, while ``s + H`` is
    within the data), each customer with an event in ``[s - active_days, s)`` gets one row per value c of the
    ``values`` most purchased values; it responded if the customer bought an item with that value in
    ``[s, s + H)``. Snapshots whose window runs past the last event are left out (their labels are incomplete).

    Returns:
        (actions, action_catalog): the exposures in the actions-table layout (``channel`` null), and one catalog
        row per value (``action_id``, ``kind`` = ``follow_up_purchase``, ``value`` null, ``<attribute>`` = c),
        so the customer's ``preferred_<attribute>`` meets the action's value in the encoder.

    Raises:
        PropensityDataError: the attribute is not an items column, or nothing was purchased.
    """
    if attribute not in items.collect_schema().names():
        raise PropensityDataError(f"items table has no column {attribute!r} to derive targets from")
    ts = pl.col(TIMESTAMP_COL)
    purchases = (
        events.lazy()
        .filter(pl.col(EVENT_TYPE) == purchase_event)
        .join(items.select(ITEM_ID, pl.col(attribute).cast(pl.String)), on=ITEM_ID, how="inner")
        .filter(pl.col(attribute).is_not_null())
        .select(CUSTOMER_ID, TIMESTAMP_COL, attribute)
        .collect()
    )
    if purchases.is_empty():
        raise PropensityDataError(
            f"no {purchase_event} events with a known {attribute!r}: nothing to predict"
        )
    top = (
        purchases.group_by(attribute)
        .len()
        .sort(["len", attribute], descending=[True, False])
        .head(values)
        .select(attribute)
    )
    lo, hi = events[TIMESTAMP_COL].min(), events[TIMESTAMP_COL].max()
    horizon = timedelta(days=horizon_days)
    starts = [
        s
        for s in snapshot_times(_midnight(lo) + timedelta(days=every_days), hi, every_days)
        if s + horizon <= hi
    ]
    if not starts:
        raise PropensityDataError(
            f"events span {lo:%Y-%m-%d}..{hi:%Y-%m-%d}: too short for {every_days}-day snapshots with a "
            f"{horizon_days}-day horizon"
        )
    per_snapshot = None
    if max_rows is not None:
        per_snapshot = max(1, max_rows // (len(starts) * top.height))
    rng = np.random.default_rng(seed)
    frames = []
    for s in starts:
        active = (
            events.filter((ts < s) & (ts >= s - timedelta(days=active_days)))
            .select(CUSTOMER_ID)
            .unique()
            .sort(CUSTOMER_ID)
        )
        if per_snapshot is not None and active.height > per_snapshot:
            chosen = np.sort(rng.choice(active.height, size=per_snapshot, replace=False))
            active = active[chosen]
        bought = (
            purchases.filter((ts >= s) & (ts < s + horizon))
            .select(CUSTOMER_ID, attribute)
            .unique()
            .with_columns(pl.lit(True).alias(RESPONDED))
        )
        rows = (
            active.join(top, how="cross")
            .join(bought, on=[CUSTOMER_ID, attribute], how="left")
            .with_columns(pl.col(RESPONDED).fill_null(False), pl.lit(s).cast(TIMESTAMP).alias(TIMESTAMP_COL))
        )
        frames.append(rows)
    action = pl.format("buy:{}:{}", pl.lit(attribute), pl.col(attribute))
    actions = (
        pl.concat(frames)
        .select(
            pl.format("{}|{}|{}", pl.col(CUSTOMER_ID), action, ts.dt.strftime("%Y-%m-%d")).alias(EXPOSURE_ID),
            CUSTOMER_ID,
            action.alias(ACTION_ID),
            pl.lit(None, dtype=pl.String).alias(CHANNEL),
            TIMESTAMP_COL,
            RESPONDED,
        )
        .sort(TIMESTAMP_COL, CUSTOMER_ID, ACTION_ID)
    )
    catalog = top.select(
        action.alias(ACTION_ID),
        pl.lit(DERIVED_KIND).alias(KIND),
        pl.lit(None, dtype=pl.Float64).alias(VALUE),
        pl.col(attribute),
    )
    return actions, catalog


# --- exact as-of activity ----------------------------------------------------------------------------------

ACTIVITY_WINDOWS: tuple[int, ...] = (30, 90)
"""Purchase-count windows (days before the exposure) of the activity features."""
RECENT_EVENT_DAYS = 7
CHANNEL_SHARE_PREFIX = "channel_share_"
SESSIONS_PREFIX = "sessions_"


def activity_channels(events: pl.DataFrame, *, limit: int = 6) -> list[str]:
    """The most frequent event channels (most frequent first), whose shares become activity features."""
    if CHANNEL not in events.columns:
        return []
    counts = (
        events.select(pl.col(CHANNEL).drop_nulls())
        .group_by(CHANNEL)
        .len()
        .sort(["len", CHANNEL], descending=[True, False])
    )
    return counts[CHANNEL].head(limit).to_list()


def price_reference_columns(
    items: pl.LazyFrame | pl.DataFrame,
    *,
    max_columns: int = 2,
    min_gain: float = 0.25,
    min_group_items: int = 5,
) -> list[str]:
    """The item attributes whose groups define an item's reference price (see :func:`reference_prices`).

    Chosen greedily from the text attributes of the items table (``name``/``title``/``description`` aside): first
    the attribute whose groups leave the least variance of log price, then, while fewer than ``max_columns``, the
    attribute that cuts the variance left by at least ``min_gain`` of it, as long as the median group keeps at least
    ``min_group_items`` items. In a sporting-goods catalogue that is category, then sport (equipment is a bike in
    cycling and a mat in yoga); colour or brand explain too little to be picked. Deterministic for a given items
    table, so training and serving agree.
    """
    frame = items.collect() if isinstance(items, pl.LazyFrame) else items
    if PRICE not in frame.columns:
        return []
    text = [
        c
        for c, t in frame.schema.items()
        if t == pl.String and c not in {ITEM_ID, "name", "title", "description"}
    ]
    # The online path asks once per customer refresh: remember the answer per catalogue content.
    key = (
        int(frame.select(ITEM_ID, PRICE, *text).hash_rows().sum()) if ITEM_ID in frame.columns else None,
        frame.height,
        tuple(text),
        max_columns,
        min_gain,
        min_group_items,
    )
    if key[0] is not None and key in _REFERENCE_COLUMNS:
        return list(_REFERENCE_COLUMNS[key])
    chosen = _choose_reference_columns(frame, text, max_columns, min_gain, min_group_items)
    if key[0] is not None:
        if len(_REFERENCE_COLUMNS) >= 8:
            _REFERENCE_COLUMNS.clear()
        _REFERENCE_COLUMNS[key] = tuple(chosen)
    return chosen


_REFERENCE_COLUMNS: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _choose_reference_columns(
    frame: pl.DataFrame, text: list[str], max_columns: int, min_gain: float, min_group_items: int
) -> list[str]:
    priced = frame.filter(pl.col(PRICE).is_not_null() & (pl.col(PRICE) > 0)).with_columns(
        pl.col(PRICE).log().alias("__log_price")
    )
    if priced.height < 2 or not text:
        return []

    def spread(columns: list[str]) -> tuple[float, float]:
        grouped = priced.select(
            ((pl.col("__log_price") - pl.col("__log_price").mean().over(columns)) ** 2).mean().alias("v"),
            pl.len().over(columns).median().alias("m"),
        )
        return float(grouped["v"][0]), float(grouped["m"][0])

    chosen: list[str] = []
    left = float(priced["__log_price"].var(ddof=0))
    while len(chosen) < max_columns:
        best: tuple[float, str] | None = None
        for c in text:
            if c in chosen:
                continue
            v, median_size = spread([*chosen, c])
            if median_size >= min_group_items and (best is None or v < best[0]):
                best = (v, c)
        if best is None or best[0] > (1.0 - min_gain) * left:
            break
        left = best[0]
        chosen.append(best[1])
    return chosen


def reference_prices(items: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Each item's list price and reference price: the median price of the items of its group (the attributes of
    :func:`price_reference_columns`; the whole catalogue when none qualifies). Columns ``item_id``,
    ``__item_price``, ``__reference``."""
    lazy = items.lazy() if isinstance(items, pl.DataFrame) else items
    group = price_reference_columns(lazy)
    median = pl.col(PRICE).median()
    return lazy.select(
        ITEM_ID,
        pl.col(PRICE).cast(pl.Float64).alias("__item_price"),
        (median.over(group) if group else median).cast(pl.Float64).alias("__reference"),
    )


def _session_key(names: Sequence[str]) -> pl.Expr:
    # Events without a session id (live events posted without one) count as one session per channel and day.
    day = pl.col(TIMESTAMP_COL).dt.strftime("%Y-%m-%d")
    channel = pl.col(CHANNEL).fill_null("") if CHANNEL in names else pl.lit("")
    fallback = pl.format("{}|{}", channel, day)
    return pl.coalesce(pl.col(SESSION_ID), fallback) if SESSION_ID in names else fallback


def _session_starts(events: pl.DataFrame) -> pl.DataFrame:
    """``customer_id, timestamp, channel`` of each event, sorted by customer and time, with ``__start``: 1.0 on
    the first event of each of the customer's sessions (the session counts for that event's channel)."""
    names = events.columns
    return (
        events.select(
            CUSTOMER_ID,
            pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
            (pl.col(CHANNEL) if CHANNEL in names else pl.lit(None, dtype=pl.String)).alias(CHANNEL),
            _session_key(names).alias("__session"),
        )
        .sort(CUSTOMER_ID, TIMESTAMP_COL, maintain_order=True)
        .with_columns(
            pl.struct(CUSTOMER_ID, "__session").is_first_distinct().cast(pl.Float64).alias("__start")
        )
        .drop("__session")
    )


def _funnel_rows(
    events: pl.DataFrame, items: pl.LazyFrame, purchase_event: str, cart_event: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Purchases and add-to-carts, priced against their item's reference price (:func:`reference_prices`).

    Returns:
        (purchases, carts). Purchases: ``customer_id, timestamp, __amount`` (price × quantity), ``__relative``
        (price over reference), ``__above`` (1.0 above the reference, 0.0 at or below it, null unpriced) and
        ``__carted`` (1.0 when an add-to-cart of the same item in the same session came at or before it).
        Carts: ``customer_id, timestamp, __above``.
    """
    names = events.columns
    item_cols = items.collect_schema().names()
    funnel = events.lazy().filter(pl.col(EVENT_TYPE).is_in([purchase_event, cart_event]))
    price = pl.col(PRICE) if PRICE in names else pl.lit(None, dtype=pl.Float64)
    reference = pl.lit(None, dtype=pl.Float64)
    if PRICE in item_cols:
        funnel = funnel.join(reference_prices(items), on=ITEM_ID, how="left")
        price = pl.coalesce(price, pl.col("__item_price"))
        reference = pl.col("__reference")
    qty = pl.col(QUANTITY).fill_null(1) if QUANTITY in names else pl.lit(1)
    rows = (
        funnel.select(
            CUSTOMER_ID,
            pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
            ITEM_ID,
            pl.col(EVENT_TYPE),
            _session_key(names).alias("__session"),
            (price * qty).fill_null(0.0).cast(pl.Float64).alias("__amount"),
            (price / reference).cast(pl.Float64).alias("__relative"),
        )
        .with_columns((pl.col("__relative") > 1.0).cast(pl.Float64).alias("__above"))
        .collect()
    )
    carts = rows.filter(pl.col(EVENT_TYPE) == cart_event).select(CUSTOMER_ID, TIMESTAMP_COL, "__above")
    key = [CUSTOMER_ID, ITEM_ID, "__session"]
    cart_times = (
        rows.filter(pl.col(EVENT_TYPE) == cart_event)
        .select(*key, pl.col(TIMESTAMP_COL).alias("__cart_at"))
        .sort("__cart_at")
    )
    purchases = (
        rows.filter(pl.col(EVENT_TYPE) == purchase_event)
        .sort(TIMESTAMP_COL)
        .join_asof(
            cart_times,
            left_on=TIMESTAMP_COL,
            right_on="__cart_at",
            by=key,
            strategy="backward",
            check_sortedness=False,
        )
        .select(
            CUSTOMER_ID,
            TIMESTAMP_COL,
            "__amount",
            "__relative",
            "__above",
            pl.col("__cart_at").is_not_null().cast(pl.Float64).alias("__carted"),
        )
    )
    return purchases, carts


def _conversion(carted: pl.Expr, carts: pl.Expr) -> pl.Expr:
    # A cart can be bought twice (multi-unit items bought again in the session): a rate never exceeds 1.
    return pl.when(carts > 0).then(pl.min_horizontal(carted / carts, pl.lit(1.0))).otherwise(None)


def customer_activity(
    events: pl.DataFrame | pl.LazyFrame,
    items: pl.LazyFrame,
    *,
    as_of: datetime,
    channels: Sequence[str],
    purchase_event: str = "purchase",
    cart_event: str = "add_to_cart",
) -> pl.DataFrame:
    """Activity features per customer from events strictly before ``as_of`` (the online path).

    Columns: ``events_before``, ``events_7d``, ``channel_share_<c>`` (share of events) and ``sessions_<c>``
    (sessions started on the channel; the channel habit shows more reliably in sessions, since a browsing
    session has many events and a store visit few) per channel, ``purchases_before``, ``purchases_30d``,
    ``purchases_90d``, ``spend_before``, ``relative_price`` (mean price of purchases over their reference price,
    :func:`reference_prices`), price sensitivity as ``carts_above_reference`` (add-to-carts of items priced above
    their reference) and ``cart_conversion_above_reference`` / ``cart_conversion_below_reference`` (the share of
    those add-to-carts, and of the ones at or below the reference, bought in the same session), and
    ``last_purchase_at``. Customers without events get no row. :func:`activity_asof` computes the same values
    for every exposure at once.
    """
    ts = pl.col(TIMESTAMP_COL)
    ev = events.lazy().filter(ts < as_of).collect()
    if ev.is_empty():
        return pl.DataFrame(schema={CUSTOMER_ID: pl.String, **_activity_schema(channels)})
    starts = _session_starts(ev)
    base = starts.group_by(CUSTOMER_ID).agg(
        pl.len().cast(pl.Float64).alias("events_before"),
        (ts >= as_of - timedelta(days=RECENT_EVENT_DAYS)).sum().cast(pl.Float64).alias("events_7d"),
        *[
            ((pl.col(CHANNEL) == c).fill_null(False).sum() / pl.len())
            .cast(pl.Float64)
            .alias(CHANNEL_SHARE_PREFIX + c)
            for c in channels
        ],
        *[
            (pl.col("__start") * (pl.col(CHANNEL) == c).fill_null(False).cast(pl.Float64))
            .sum()
            .alias(SESSIONS_PREFIX + c)
            for c in channels
        ],
    )
    p, carts = _funnel_rows(ev, items, purchase_event, cart_event)
    bought = p.group_by(CUSTOMER_ID).agg(
        pl.len().cast(pl.Float64).alias("purchases_before"),
        *[
            (ts >= as_of - timedelta(days=w)).sum().cast(pl.Float64).alias(f"purchases_{w}d")
            for w in ACTIVITY_WINDOWS
        ],
        pl.col("__amount").sum().alias("spend_before"),
        pl.col("__relative").mean().alias("relative_price"),
        ts.max().alias("last_purchase_at"),
        (pl.col("__carted") * pl.col("__above")).sum().alias("__bought_above"),
        (pl.col("__carted") * (1.0 - pl.col("__above"))).sum().alias("__bought_below"),
    )
    carted = carts.group_by(CUSTOMER_ID).agg(
        pl.col("__above").sum().alias("carts_above_reference"),
        (1.0 - pl.col("__above")).sum().alias("__carts_below"),
    )
    counts = [
        "purchases_before",
        *(f"purchases_{w}d" for w in ACTIVITY_WINDOWS),
        "spend_before",
        "carts_above_reference",
        "__carts_below",
        "__bought_above",
        "__bought_below",
    ]
    return (
        base.join(bought, on=CUSTOMER_ID, how="left")
        .join(carted, on=CUSTOMER_ID, how="left")
        .with_columns(pl.col(c).fill_null(0.0) for c in counts)
        .with_columns(
            _conversion(pl.col("__bought_above"), pl.col("carts_above_reference")).alias(
                "cart_conversion_above_reference"
            ),
            _conversion(pl.col("__bought_below"), pl.col("__carts_below")).alias(
                "cart_conversion_below_reference"
            ),
        )
        .select(CUSTOMER_ID, *_activity_schema(channels))
        .cast(_activity_schema(channels))
        .sort(CUSTOMER_ID)
    )


def _activity_schema(channels: Sequence[str]) -> dict[str, pl.DataType]:
    return {
        "events_before": pl.Float64(),
        "events_7d": pl.Float64(),
        **{CHANNEL_SHARE_PREFIX + c: pl.Float64() for c in channels},
        **{SESSIONS_PREFIX + c: pl.Float64() for c in channels},
        "purchases_before": pl.Float64(),
        **{f"purchases_{w}d": pl.Float64() for w in ACTIVITY_WINDOWS},
        "spend_before": pl.Float64(),
        "relative_price": pl.Float64(),
        "carts_above_reference": pl.Float64(),
        "cart_conversion_above_reference": pl.Float64(),
        "cart_conversion_below_reference": pl.Float64(),
        "last_purchase_at": TIMESTAMP,
    }


def _cumulative_asof(
    keys: pl.DataFrame,
    rows: pl.DataFrame,
    columns: Sequence[str],
    *,
    shift_days: float = 0.0,
    suffix: str = "",
) -> pl.DataFrame:
    """For each key (customer, time t), the running totals of ``rows`` over the customer's rows strictly before
    ``t − shift_days`` (nulls when there are none)."""
    left = keys.select(
        "__row", CUSTOMER_ID, (pl.col(TIMESTAMP_COL) - timedelta(days=shift_days)).alias("__t")
    )
    right = rows.select(CUSTOMER_ID, pl.col(TIMESTAMP_COL).alias("__t"), *columns)
    joined = left.sort("__t").join_asof(
        right.sort("__t"),
        on="__t",
        by=CUSTOMER_ID,
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    )
    return joined.select("__row", *(pl.col(c).alias(c + suffix) for c in columns))


def activity_asof(
    keys: pl.DataFrame,
    events: pl.DataFrame,
    items: pl.LazyFrame,
    *,
    channels: Sequence[str],
    purchase_event: str = "purchase",
    cart_event: str = "add_to_cart",
) -> pl.DataFrame:
    """The :func:`customer_activity` features of each (customer, timestamp) row, each from events strictly
    before its own time (exact, no snapshot staleness), by as-of joins on running totals.

    Returns:
        the activity columns, one row per row of ``keys``, in the same order.
    """
    keys = keys.select(CUSTOMER_ID, pl.col(TIMESTAMP_COL).cast(TIMESTAMP)).with_row_index("__row")
    channel_of = [(pl.col(CHANNEL) == c).fill_null(False).cast(pl.Float64) for c in channels]
    ev = _session_starts(events).with_columns(
        pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Float64).alias("__events"),
        *[is_c.cum_sum().over(CUSTOMER_ID).alias(f"__ch{i}") for i, is_c in enumerate(channel_of)],
        *[
            (pl.col("__start") * is_c).cum_sum().over(CUSTOMER_ID).alias(f"__se{i}")
            for i, is_c in enumerate(channel_of)
        ],
    )
    ch_cols = [f"__ch{i}" for i in range(len(channels))]
    se_cols = [f"__se{i}" for i in range(len(channels))]
    purchases, carts = _funnel_rows(events, items, purchase_event, cart_event)
    p = purchases.sort(CUSTOMER_ID, TIMESTAMP_COL).with_columns(
        pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Float64).alias("__purchases"),
        pl.col("__amount").cum_sum().over(CUSTOMER_ID).alias("__spend"),
        pl.col("__relative").fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__rel_sum"),
        pl.col("__relative").is_not_null().cast(pl.Float64).cum_sum().over(CUSTOMER_ID).alias("__rel_n"),
        (pl.col("__carted") * pl.col("__above"))
        .fill_null(0.0)
        .cum_sum()
        .over(CUSTOMER_ID)
        .alias("__b_above"),
        (pl.col("__carted") * (1.0 - pl.col("__above")))
        .fill_null(0.0)
        .cum_sum()
        .over(CUSTOMER_ID)
        .alias("__b_below"),
        pl.col(TIMESTAMP_COL).alias("__last"),
    )
    c = carts.sort(CUSTOMER_ID, TIMESTAMP_COL).with_columns(
        pl.col("__above").fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__c_above"),
        (1.0 - pl.col("__above")).fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__c_below"),
    )
    out = keys.select("__row")
    parts = [
        _cumulative_asof(keys, ev, ["__events", *ch_cols, *se_cols]),
        _cumulative_asof(keys, ev, ["__events"], shift_days=RECENT_EVENT_DAYS, suffix="_recent"),
        _cumulative_asof(
            keys, p, ["__purchases", "__spend", "__rel_sum", "__rel_n", "__b_above", "__b_below", "__last"]
        ),
        _cumulative_asof(keys, c, ["__c_above", "__c_below"]),
        *[_cumulative_asof(keys, p, ["__purchases"], shift_days=w, suffix=f"_{w}") for w in ACTIVITY_WINDOWS],
    ]
    for part in parts:
        out = out.join(part, on="__row", how="left")
    seen = pl.col("__events").is_not_null()
    bought = pl.col("__purchases").fill_null(0.0)

    def when_seen(expr: pl.Expr) -> pl.Expr:
        return pl.when(seen).then(expr).otherwise(None)

    return (
        out.sort("__row")
        .select(
            pl.col("__events").alias("events_before"),
            when_seen(pl.col("__events") - pl.col("__events_recent").fill_null(0.0)).alias("events_7d"),
            *[
                (pl.col(f"__ch{i}") / pl.col("__events")).alias(CHANNEL_SHARE_PREFIX + ch)
                for i, ch in enumerate(channels)
            ],
            *[pl.col(f"__se{i}").alias(SESSIONS_PREFIX + ch) for i, ch in enumerate(channels)],
            when_seen(bought).alias("purchases_before"),
            *[
                when_seen(bought - pl.col(f"__purchases_{w}").fill_null(0.0)).alias(f"purchases_{w}d")
                for w in ACTIVITY_WINDOWS
            ],
            when_seen(pl.col("__spend").fill_null(0.0)).alias("spend_before"),
            pl.when(pl.col("__rel_n") > 0)
            .then(pl.col("__rel_sum") / pl.col("__rel_n"))
            .otherwise(None)
            .alias("relative_price"),
            when_seen(pl.col("__c_above").fill_null(0.0)).alias("carts_above_reference"),
            when_seen(
                _conversion(pl.col("__b_above").fill_null(0.0), pl.col("__c_above").fill_null(0.0))
            ).alias("cart_conversion_above_reference"),
            when_seen(
                _conversion(pl.col("__b_below").fill_null(0.0), pl.col("__c_below").fill_null(0.0))
            ).alias("cart_conversion_below_reference"),
            pl.col("__last").alias("last_purchase_at"),
        )
        .cast(_activity_schema(channels))
    )


# --- customer–action affinity from a collaborative-filtering model -----------------------------------------

AFFINITY = "cf_affinity"
"""The per (customer, action) input: how well the action's items match the customer's taste (see
:class:`ActionAffinity`). Null for actions without target items and customers without history."""
PAIR_NUMERIC_COLUMNS: tuple[str, ...] = (AFFINITY,)
"""Training-table columns that vary by customer *and* action (not customer columns: see :class:`FeatureSpec`)."""
AFFINITY_FILE = "affinity.npz"
AFFINITY_META_FILE = "affinity.json"
_NOT_ITEM_ATTRIBUTES = frozenset(
    {ITEM_ID, ACTION_ID, KIND, CHANNEL, "name", "title", "description", "channels"}
)


def action_target_items(catalog: pl.DataFrame, items: pl.DataFrame) -> dict[str, list[str]]:
    """Each action's target items: the items matching every attribute the action sets.

    An attribute is a text column of both the catalogue and the items table (``brand`` of a brand discount,
    ``sport`` of a bundle, the attribute of a derived "buy an item with A = c" action). An action that sets
    none of them (free shipping, a newsletter, no action) has no target items.

    Returns:
        action id → item ids (sorted), in catalogue order.
    """
    shared = [
        c
        for c, t in catalog.schema.items()
        if c in items.columns
        and c not in _NOT_ITEM_ATTRIBUTES
        and t == pl.String
        and items.schema[c] == pl.String
    ]
    out: dict[str, list[str]] = {}
    for row in catalog.select(ACTION_ID, *shared).iter_rows(named=True):
        wanted = {c: row[c] for c in shared if row[c] is not None}
        if not wanted:
            out[row[ACTION_ID]] = []
            continue
        match = pl.all_horizontal([pl.col(c) == v for c, v in wanted.items()])
        out[row[ACTION_ID]] = sorted(items.filter(match)[ITEM_ID].to_list())
    return out


class ActionAffinity:
    """Customer–action affinity from a factor model's item factors (ALS), for training rows and online alike.

    A customer's factor is folded in from their interaction weights alone, against fixed item factors, by
    the ALS least-squares step (``implicit``'s ``recalculate_user``: ``x = (YᵀY + Yᵀ(C − I)Y + λI)⁻¹ YᵀCp``,
    ``C = alpha · weight``), so it can be computed from any point-in-time history. The customer's scores over
    all items ``s_i = x·y_i`` are standardised per customer (minus their mean, over their standard deviation),
    which makes them comparable across customers; the affinity of an action is the ``mean`` (or ``max``) of the
    standardised scores of its target items (:func:`action_target_items`). NaN when the action has no target
    items or the customer no history among the model's items.

    Learned state (saved beside the propensity model by :meth:`save`, no pickle): the item vocabulary and
    factors, the fold-in's regularisation and alpha, the target item indices per action, the aggregate and
    a JSON description of where the factors come from.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        item_factors: np.ndarray,
        *,
        regularization: float,
        alpha: float,
        targets: Mapping[str, Sequence[str]],
        aggregate: Literal["mean", "max"] = "mean",
        source: Mapping[str, Any] | None = None,
    ) -> None:
        from nextbest.features.schema import Vocabulary

        self.items = Vocabulary(tuple(str(i) for i in item_ids))
        y = np.asarray(item_factors, dtype=np.float64)
        if y.ndim != 2 or y.shape[0] != len(self.items):
            raise PropensityDataError(
                f"item factors have shape {y.shape}, expected ({len(self.items)}, factors)"
            )
        if aggregate not in ("mean", "max"):
            raise PropensityDataError(f"affinity aggregate {aggregate!r} is not one of mean, max")
        self.item_factors = y
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.aggregate: Literal["mean", "max"] = aggregate
        self.source = dict(source or {})
        self.action_ids = list(targets)
        self.targets = [np.unique(self.items.indices([str(i) for i in targets[a]])) for a in self.action_ids]
        self.targets = [t[t >= 0] for t in self.targets]
        k = y.shape[1]
        self._base = y.T @ y + self.regularization * np.eye(k)
        self._mean = y.mean(axis=0)
        centred = y - self._mean
        self._cov = centred.T @ centred / max(len(y), 1)
        self._has_targets = np.array([t.size > 0 for t in self.targets], dtype=bool)
        self._centroids = (
            np.stack([y[t].mean(axis=0) if t.size else np.zeros(k) for t in self.targets])
            if self.targets
            else np.zeros((0, k))
        )

    @property
    def n_factors(self) -> int:
        return int(self.item_factors.shape[1])

    def action_index(self) -> dict[str, int]:
        return {a: j for j, a in enumerate(self.action_ids)}

    # -- computing ------------------------------------------------------------------------------------------

    def user_factors(self, user_items: sp.csr_matrix, *, chunk: int = 1024) -> np.ndarray:
        """Folded-in customer factors, one per row of ``user_items`` (customers × this model's items)."""
        m = sp.csr_matrix(user_items, dtype=np.float64)
        if m.shape[1] != len(self.items):
            raise PropensityDataError(
                f"user_items has {m.shape[1]} columns, the model {len(self.items)} items"
            )
        y = self.item_factors
        k = y.shape[1]
        out = np.zeros((m.shape[0], k))
        for start in range(0, m.shape[0], chunk):
            stop = min(start + chunk, m.shape[0])
            a = np.broadcast_to(self._base, (stop - start, k, k)).copy()
            b = np.zeros((stop - start, k))
            has = np.zeros(stop - start, dtype=bool)
            for r in range(start, stop):
                lo, hi = m.indptr[r], m.indptr[r + 1]
                idx, w = m.indices[lo:hi], m.data[lo:hi]
                keep = w > 0
                if not keep.any():
                    continue
                yi, c = y[idx[keep]], self.alpha * w[keep]
                a[r - start] += (yi.T * (c - 1.0)) @ yi
                b[r - start] = c @ yi
                has[r - start] = True
            if has.any():
                out[start:stop][has] = np.linalg.solve(a[has], b[has][..., None])[..., 0]
        return out

    def from_user_factors(self, x: np.ndarray) -> np.ndarray:
        """Affinities (customers × actions) of customer factors ``x``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.n_factors)
        mean = x @ self._mean
        sd = np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", x, self._cov, x), 0.0))
        if self.aggregate == "mean":
            raw = x @ self._centroids.T
        else:
            raw = np.full((x.shape[0], len(self.targets)), np.nan)
            for j, t in enumerate(self.targets):
                if t.size:
                    raw[:, j] = (x @ self.item_factors[t].T).max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (raw - mean[:, None]) / sd[:, None]
        out[:, ~self._has_targets] = np.nan
        out[sd <= 1e-12 * max(1.0, float(np.abs(self.item_factors).max(initial=0.0))), :] = np.nan
        return out

    def score_matrix(self, user_items: sp.csr_matrix) -> np.ndarray:
        """Affinities (customers × actions, in :attr:`action_ids` order) of interaction rows."""
        return self.from_user_factors(self.user_factors(user_items))

    def interaction_matrix(self, weights: pl.DataFrame, customers: Sequence[str]) -> sp.csr_matrix:
        """``customer_id, item_id, weight`` rows as a matrix over ``customers`` × this model's items (items it
        does not know are left out)."""
        from nextbest.features.interactions import WEIGHT, build_interactions
        from nextbest.features.schema import Vocabulary

        built = build_interactions(
            weights.select(CUSTOMER_ID, ITEM_ID, WEIGHT),
            customers=Vocabulary(tuple(customers)),
            items=self.items,
        )
        return built.matrix

    def score_items(self, item_weights: Mapping[str, float]) -> dict[str, float]:
        """One customer's affinities from their interaction weights by item id (the online path).

        Returns:
            action id → affinity (NaN when unknown), for every action of the model.
        """
        idx = self.items.indices([str(i) for i in item_weights])
        w = np.fromiter((float(v) for v in item_weights.values()), dtype=np.float64, count=len(item_weights))
        return self.score_indexed(idx, w)

    def score_indexed(self, item_index: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """One customer's affinities from their weights over this model's item indices (−1: unknown, skipped)."""
        idx = np.asarray(item_index, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        keep = idx >= 0
        row = sp.csr_matrix(
            (w[keep], (np.zeros(int(keep.sum()), np.int64), idx[keep])), shape=(1, len(self.items))
        )
        values = self.score_matrix(row)[0]
        return dict(zip(self.action_ids, values.tolist(), strict=True))

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_recommender(
        cls,
        model: Any,
        item_ids: Sequence[str],
        targets: Mapping[str, Sequence[str]],
        *,
        aggregate: Literal["mean", "max"] = "mean",
        source: Mapping[str, Any] | None = None,
    ) -> ActionAffinity:
        """From a fitted ALS recommender (or a blend whose CF part is ALS) of ``training.recommenders``.

        Raises:
            PropensityDataError: the model cannot fold customers in (BPR, item-kNN, popularity, repeat).
        """
        als = foldable_factor_model(model)
        if als is None:
            raise PropensityDataError(
                f"a {getattr(model, 'name', type(model).__name__)} model cannot fold a customer's history in: "
                "the customer–action affinity needs ALS (or a blend whose CF part is ALS)"
            )
        implicit_model = als.implicit_model
        return cls(
            item_ids,
            np.asarray(implicit_model.item_factors),
            regularization=float(implicit_model.regularization),
            alpha=float(getattr(implicit_model, "alpha", 1.0)),
            targets=targets,
            aggregate=aggregate,
            source=source,
        )

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``affinity.npz`` (factors, target indices) and ``affinity.json`` (the rest) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        lengths = np.array([t.size for t in self.targets], dtype=np.int64)
        flat = np.concatenate(self.targets) if self.targets else np.zeros(0, np.int64)
        np.savez(
            out / AFFINITY_FILE,
            item_factors=self.item_factors.astype(np.float32),
            target_index=flat.astype(np.int64),
            target_lengths=lengths,
        )
        meta = {
            "item_ids": list(self.items.ids),
            "action_ids": self.action_ids,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "aggregate": self.aggregate,
            "source": self.source,
        }
        (out / AFFINITY_META_FILE).write_text(json.dumps(meta, default=str) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ActionAffinity | None:
        """Read what :meth:`save` wrote; None when ``directory`` holds no affinity."""
        src = Path(directory)
        if not (src / AFFINITY_META_FILE).exists():
            return None
        meta = json.loads((src / AFFINITY_META_FILE).read_text())
        with np.load(src / AFFINITY_FILE, allow_pickle=False) as arrays:
            factors = arrays["item_factors"]
            flat = arrays["target_index"]
            lengths = arrays["target_lengths"]
        ids = meta["item_ids"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        targets = {
            a: [ids[i] for i in flat[bounds[j] : bounds[j + 1]].tolist()]
            for j, a in enumerate(meta["action_ids"])
        }
        return cls(
            ids,
            factors,
            regularization=meta["regularization"],
            alpha=meta["alpha"],
            targets=targets,
            aggregate=meta["aggregate"],
            source=meta.get("source"),
        )


def foldable_factor_model(model: Any) -> Any | None:
    """The ALS part of a recommender that can fold customers in (ALS itself, or a blend's ALS), else None."""
    name = getattr(model, "name", "")
    if name == "blend":
        return foldable_factor_model(getattr(model, "cf", None))
    if name == "als" and getattr(model, "implicit_model", None) is not None:
        return model
    return None


def fit_affinity_als(
    events: pl.DataFrame,
    *,
    before: datetime,
    interactions: InteractionConfig,
    als: ALSConfig | None = None,
    seed: int = 0,
) -> tuple[Any, list[str]]:
    """An ALS recommender fitted on the interactions of events strictly before ``before`` (the propensity
    training period), with its item ids.

    Raises:
        PropensityDataError: no interaction before ``before``.
    """
    from nextbest.features.interactions import build_interactions, interaction_weights
    from nextbest.training.recommenders import ALSRecommender

    past = events.lazy().filter(pl.col(TIMESTAMP_COL) < before)
    built = build_interactions(interaction_weights(past, interactions, as_of=before))
    if built.matrix.nnz == 0:
        raise PropensityDataError(
            f"no interactions before {before.isoformat()} to fit the affinity's ALS model on"
        )
    model = ALSRecommender(als or ALSConfig(), seed=seed, threads=1).fit(built.matrix)
    return model, list(built.items.ids)


def build_action_affinity(
    events: pl.DataFrame,
    items: pl.DataFrame,
    catalog: pl.DataFrame,
    config: PropensityDataConfig,
    *,
    interactions: InteractionConfig,
    before: datetime,
    dataset: Dataset | None = None,
    recommender: Any | None = None,
    recommender_label: str | None = None,
) -> ActionAffinity | None:
    """The affinity model of a propensity table: the given recommender's item factors when
    ``config.affinity_source`` is ``auto`` and it can fold customers in (ALS, or a blend's ALS) and was trained on
    this dataset; else ALS fitted on the interactions strictly before ``before`` (the validation start). None
    when no action has target items (nothing to compare a taste with)."""
    targets = action_target_items(catalog, items)
    if not any(targets.values()):
        return None
    aggregate = config.affinity_aggregate
    model = getattr(recommender, "model", None)
    trained_on = (getattr(recommender, "metadata", None) or {}).get("dataset")
    same_data = dataset is None or trained_on is None or Path(trained_on) == dataset.root.resolve()
    if (
        config.affinity_source == "auto"
        and model is not None
        and foldable_factor_model(model) is not None
        and same_data
    ):
        meta = recommender.metadata or {}
        source = {
            "from": "registry",
            "registered_model": recommender_label,
            "model": meta.get("model", getattr(model, "name", None)),
            "trained_until": meta.get("trained_until"),
            "aggregate": aggregate,
        }
        return ActionAffinity.from_recommender(
            model, list(recommender.history.items.ids), targets, aggregate=aggregate, source=source
        )
    fitted, item_ids = fit_affinity_als(
        events, before=before, interactions=interactions, als=config.affinity_als, seed=config.seed
    )
    source = {
        "from": "fit",
        "model": "als",
        "trained_until": before.isoformat(),
        "config": config.affinity_als.model_dump(mode="json"),
        "config_from": recommender_label if recommender is None else None,
        "aggregate": aggregate,
    }
    return ActionAffinity.from_recommender(fitted, item_ids, targets, aggregate=aggregate, source=source)


def champion_affinity_config(
    ds: Dataset, config: PropensityDataConfig, *, tracking_uri: str | None = None
) -> tuple[PropensityDataConfig, str | None]:
    """``config`` with ``affinity_als`` set to the registered champion recommender's ALS hyperparameters (an
    ALS model, or a blend's ALS part, trained on ``ds``), and the champion's ``name/version``; ``config``
    unchanged and None when there is none, or the affinity is off or set to ``fit``.

    The affinity's ALS is then refitted on the propensity training period with those hyperparameters rather
    than taking the champion's item factors, which were fitted on later purchases too (responses to the
    validation and test exposures could leak into their features).
    """
    if not config.affinity or config.affinity_source != "auto":
        return config, None
    found = registered_recommender(ds, tracking_uri=tracking_uri)
    if found is None:
        return config, None
    bundle, label = found
    als = foldable_factor_model(bundle.model)
    if als is None or not isinstance(als.config, ALSConfig):
        return config, None
    return config.model_copy(update={"affinity_als": als.config}), label


def registered_recommender(
    ds: Dataset,
    *,
    tracking_uri: str | None = None,
    name: str = "nextbest-recommender",
    alias: str = "champion",
) -> tuple[Any, str] | None:
    """The registered recommender ``name@alias`` as a bundle with its ``name/version`` label, when the registry
    has one trained on ``ds`` whose model can fold customers in; None otherwise (no registry, no such version,
    another dataset, a model without item factors)."""
    import mlflow
    from mlflow import MlflowClient

    from nextbest.training.recommender_bundle import find_bundle
    from nextbest.training.tracking import quiet_mlflow, resolve_tracking_uri, sqlite_path, version_by_alias

    uri = tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    version = version_by_alias(MlflowClient(uri, uri), name, alias)
    if version is None:
        return None
    tags = dict(version.tags or {})
    if tags.get("dataset") and Path(tags["dataset"]) != ds.root.resolve():
        return None
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(uri)
        with quiet_mlflow():
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}"))
    finally:
        mlflow.set_tracking_uri(previous)
    bundle = find_bundle(root)
    if bundle is None or foldable_factor_model(bundle.model) is None:
        return None
    trained_on = bundle.metadata.get("dataset")
    if trained_on is not None and Path(trained_on) != ds.root.resolve():
        return None
    return bundle, f"{name}/{version.version}"


def affinity_asof(
    rows: pl.DataFrame,
    events: pl.DataFrame,
    affinity: ActionAffinity,
    interactions: InteractionConfig,
    *,
    progress: bool = False,
) -> pl.Series:
    """The affinity of each row's (customer, action) at the row's ``snapshot_at``, from the customer's
    interactions strictly before it (null where ``snapshot_at`` is null, the action has no target items or the
    customer no history).

    Args:
        rows: ``customer_id``, ``action_id``, ``snapshot_at``.
        events: clean events.
        affinity: the affinity model.
        interactions: event weights (as the CF model was fitted with).
        progress: show a progress bar over snapshots.

    Returns:
        a Float64 series named :data:`AFFINITY`, one value per row, in order.
    """
    from nextbest.features.interactions import interaction_weights

    keyed = rows.select(CUSTOMER_ID, ACTION_ID, pl.col(SNAPSHOT_AT).cast(TIMESTAMP)).with_row_index("__row")
    snaps = keyed.filter(pl.col(SNAPSHOT_AT).is_not_null()).select(SNAPSHOT_AT, CUSTOMER_ID).unique()
    ts = pl.col(TIMESTAMP_COL)
    parts: list[pl.DataFrame] = []
    grouped = snaps.group_by(SNAPSHOT_AT).agg(pl.col(CUSTOMER_ID).sort()).sort(SNAPSHOT_AT)
    for s, customers in tqdm(
        grouped.iter_rows(), total=grouped.height, desc="affinity", disable=not progress, unit="snapshot"
    ):
        past = events.lazy().filter((ts < s) & pl.col(CUSTOMER_ID).is_in(customers))
        weights = interaction_weights(past, interactions, as_of=s).collect()
        values = affinity.score_matrix(affinity.interaction_matrix(weights, customers))
        parts.append(
            pl.DataFrame(
                {
                    CUSTOMER_ID: [c for c in customers for _ in affinity.action_ids],
                    ACTION_ID: affinity.action_ids * len(customers),
                    AFFINITY: values.ravel(),
                },
                schema={CUSTOMER_ID: pl.String, ACTION_ID: pl.String, AFFINITY: pl.Float64},
            ).with_columns(pl.lit(s).cast(TIMESTAMP).alias(SNAPSHOT_AT))
        )
    if not parts:
        return pl.Series(AFFINITY, [None] * rows.height, dtype=pl.Float64)
    table = pl.concat(parts).with_columns(pl.col(AFFINITY).fill_nan(None))
    joined = keyed.join(table, on=[CUSTOMER_ID, ACTION_ID, SNAPSHOT_AT], how="left").sort("__row")
    return joined[AFFINITY]


# --- splits and loading ------------------------------------------------------------------------------------


def time_cutoffs(
    timestamps: pl.Series, *, validation_fraction: float, test_fraction: float
) -> tuple[datetime, datetime]:
    """Cut-offs that leave about the last ``test_fraction`` of rows (by time) for test and the
    ``validation_fraction`` before them for validation. Rows at one time stay together.

    Raises:
        PropensityDataError: the rows span too few distinct times for three periods.
    """
    ts = timestamps.drop_nulls().sort()
    distinct = ts.unique().sort()
    if distinct.len() < 3:
        raise PropensityDataError(
            f"exposures fall at {distinct.len()} distinct time(s): too few for train, validation and test periods"
        )
    n = ts.len()
    test_start = ts[min(n - 1, math.floor(n * (1 - test_fraction)))]
    validation_start = ts[min(n - 1, math.floor(n * (1 - test_fraction - validation_fraction)))]
    # Many rows may share a timestamp (campaign start dates): keep at least two distinct times before the
    # test period, and the validation cut-off strictly between the first time and the test cut-off.
    if test_start <= distinct[1]:
        test_start = distinct[-1]
    before = distinct.filter(distinct < test_start)
    if validation_start <= before[0] or validation_start >= test_start:
        validation_start = before[-1]
    return validation_start, test_start


@dataclass
class PropensityData:
    """A propensity training table split by time, with the action catalogue.

    Attributes:
        train: exposures before ``validation_start`` with as-of profiles.
        validation: exposures in ``[validation_start, test_start)`` (early stopping and calibration).
        test: exposures at or after ``test_start`` (the held-out later period).
        catalog: the action catalogue (``action_id`` plus attribute columns).
        customer_columns: the profile columns joined onto the rows.
        validation_start: first time of the validation period.
        test_start: first time of the test period.
        target: ``actions`` or ``derived:<attribute>:<H>d``.
        has_truth: whether rows carry the planted ``p_true``.
        affinity: the customer–action affinity model whose values the rows' ``cf_affinity`` holds (None: off).
    """

    train: pl.DataFrame
    validation: pl.DataFrame
    test: pl.DataFrame
    catalog: pl.DataFrame
    customer_columns: list[str]
    validation_start: datetime
    test_start: datetime
    target: str = "actions"
    has_truth: bool = False
    affinity: ActionAffinity | None = None

    def summary(self) -> dict[str, Any]:
        """Row counts, response rates and cut-offs."""

        def rate(df: pl.DataFrame) -> float:
            return float(df[RESPONDED].mean()) if df.height else float("nan")

        return {
            "target": self.target,
            "rows_train": self.train.height,
            "rows_validation": self.validation.height,
            "rows_test": self.test.height,
            "positive_rate_train": rate(self.train),
            "positive_rate_validation": rate(self.validation),
            "positive_rate_test": rate(self.test),
            "actions": self.catalog.height,
            "validation_start": self.validation_start.isoformat(),
            "test_start": self.test_start.isoformat(),
            "affinity": None if self.affinity is None else self.affinity.source,
        }


def period_cutoffs(timestamps: pl.Series, config: PropensityDataConfig) -> tuple[datetime, datetime]:
    """(validation_start, test_start): the config's explicit cut-offs, else :func:`time_cutoffs` of the
    exposure times."""
    if config.validation_start and config.test_start:
        return config.validation_start, config.test_start
    auto_val, auto_test = time_cutoffs(
        timestamps, validation_fraction=config.validation_fraction, test_fraction=config.test_fraction
    )
    return config.validation_start or auto_val, config.test_start or auto_test


def split_table(
    table: pl.DataFrame,
    catalog: pl.DataFrame,
    customer_columns: Sequence[str],
    config: PropensityDataConfig,
    *,
    target: str = "actions",
    label_days: int | None = None,
    affinity: ActionAffinity | None = None,
) -> PropensityData:
    """Split a training table by exposure time (explicit cut-offs, else by row fractions).

    Args:
        table: the training table.
        catalog: the action catalogue.
        customer_columns: the profile columns of ``table``.
        config: cut-offs or fractions.
        target: the target's name.
        affinity: the affinity model behind the table's ``cf_affinity`` column, if any.
        label_days: for targets observed over a window after the exposure (derived targets), its length: rows
            whose window runs past the start of the next period are left out, so no label of an earlier period
            is an outcome of a later one.

    Raises:
        PropensityDataError: a period is empty.
    """
    validation_start, test_start = period_cutoffs(table[TIMESTAMP_COL], config)
    split = temporal_split(table.lazy(), validation_start=validation_start, test_start=test_start)
    train, validation, test = split.train.collect(), split.validation.collect(), split.test.collect()
    if label_days is not None:
        window = timedelta(days=label_days)
        train = train.filter(pl.col(TIMESTAMP_COL) + window <= validation_start)
        validation = validation.filter(pl.col(TIMESTAMP_COL) + window <= test_start)
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if part.is_empty():
            raise PropensityDataError(
                f"the {name} period is empty (validation_start {validation_start.isoformat()}, "
                f"test_start {test_start.isoformat()}, exposures {table[TIMESTAMP_COL].min()}.."
                f"{table[TIMESTAMP_COL].max()})"
            )
        if part[RESPONDED].n_unique() < 2 and name != "test":
            raise PropensityDataError(
                f"the {name} period has only one outcome: responded = {part[RESPONDED][0]}"
            )
    return PropensityData(
        train=train,
        validation=validation,
        test=test,
        catalog=catalog,
        customer_columns=list(customer_columns),
        validation_start=validation_start,
        test_start=test_start,
        target=target,
        has_truth=P_TRUE in table.columns,
        affinity=affinity,
    )


def model_view(
    table: pl.DataFrame,
    customer_columns: Sequence[str],
    customers: pl.DataFrame | None,
    state: pl.DataFrame,
    *,
    default: bool,
) -> pl.DataFrame:
    """Apply to training rows the rule the service applies to a request (``Engine._model_features``), so that
    the model learns from what it will be shown:

    * personalisation granted: the profile (present only with profiling consent and earlier events) with the
      customer's demographics (:data:`DEMOGRAPHICS` from the customers table) filling what it lacks — a new
      customer without events still has an age;
    * personalisation declined: only the segment (:data:`SEGMENT_FEATURES`, the age band derived from the age
      where the profile has none); every other customer column is null;
    * the customer–action affinity needs both personalisation and profiling consent.

    Args:
        table: training rows (``customer_id`` plus ``customer_columns``).
        customer_columns: the model's customer columns.
        customers: the customers table (None: there is none).
        state: the consent in force (:func:`features.privacy.consent_state`).
        default: consent assumed without a record (the feature config's ``consent_default``).

    Returns:
        ``table`` with its customer columns replaced, rows and order unchanged.
    """
    columns = set(customer_columns)
    known = set() if customers is None else set(customers.columns)
    demo = [c for c in DEMOGRAPHICS if c in columns and c in known]
    # The age is read for the age band of a customer without personalisation even when it is not an input.
    loaded = [*demo, *(["age"] if "age" in known and "age" not in demo and "age_band" in columns else [])]
    work = table.join(
        state.select(CUSTOMER_ID, "personalisation", "profiling"),
        on=CUSTOMER_ID,
        how="left",
        maintain_order="left",
    )
    if loaded:
        renamed = customers.select(CUSTOMER_ID, *[pl.col(c).alias(f"__demo_{c}") for c in loaded]).unique(
            CUSTOMER_ID, keep="last"
        )
        work = work.join(renamed, on=CUSTOMER_ID, how="left", maintain_order="left")
    personal = consent_granted("personalisation", default=default)
    profiled = consent_granted("profiling", default=default)
    filled = {
        c: (pl.coalesce(pl.col(c), pl.col(f"__demo_{c}").cast(table.schema[c])) if c in demo else pl.col(c))
        for c in customer_columns
    }
    segment: dict[str, pl.Expr] = {}
    for c in customer_columns:
        if c == "age_band" and "age" in loaded:
            band = age_band(pl.col("__demo_age")).replace("unknown", None)
            segment[c] = pl.coalesce(pl.col(c), band.cast(table.schema[c]))
        elif c in SEGMENT_FEATURES:
            segment[c] = filled[c]
        else:
            segment[c] = pl.lit(None, dtype=table.schema[c])
    exprs = []
    for c in customer_columns:
        value = pl.when(personal).then(filled[c]).otherwise(segment[c])
        if c == AFFINITY:
            value = pl.when(personal & profiled).then(pl.col(c)).otherwise(None)
        exprs.append(value.alias(c))
    return work.with_columns(exprs).select(table.columns)


def load_propensity_data(
    ds: Dataset,
    config: PropensityDataConfig | None = None,
    *,
    feature_config: FeatureConfig | None = None,
    progress: bool = False,
    recommender: Any | None = None,
    recommender_label: str | None = None,
) -> PropensityData:
    """The propensity training table of a dataset, split by time.

    Uses the action log (``raw/actions`` and ``raw/action_catalog``) when there is one (or ``config.target``
    says so), otherwise derived follow-up purchase targets. Profiles and activity come from events consented
    for profiling, cleaned with ``feature_config`` (default: the config of the dataset's feature build, from its
    manifest, else the defaults). On generated data the planted ``p_true`` of ``truth/propensity.parquet`` is joined by ``exposure_id``.

    With ``config.affinity`` (the default) each row also gets ``cf_affinity``, the customer–action affinity at
    the row's profile snapshot (see :func:`build_action_affinity` for which CF model gives it).

    Args:
        ds: the dataset.
        config: how the table is built and split.
        feature_config: event cleaning and profile definitions.
        progress: show progress bars.
        recommender: a fitted recommender bundle (the registered champion, see
            :func:`registered_recommender`) to take the affinity's item factors from.
        recommender_label: its registry name and version (recorded with the affinity).

    Raises:
        DatasetError: a required table is missing.
        PropensityDataError: the data cannot be split or has nothing to predict.
    """
    config = config or PropensityDataConfig()
    ds.require()
    if feature_config is None:
        # The settings the dataset's features were built with (consent default, retention, profile rules).
        built = ds.read_manifest().get("config") if ds.manifest_path.exists() else None
        feature_config = FeatureConfig.model_validate(built) if built else FeatureConfig()
    target = config.target
    if target == "auto":
        target = "actions" if ds.has_table("actions") else "derived"
    steps = tqdm(total=3, desc="propensity data", disable=not progress, unit="step")
    steps.set_postfix_str("events")
    # The data's "now", as the feature build takes it (identity resolution never changes timestamps, so the raw
    # files' statistics give it): the events' retention and the consent in force are both read at it.
    as_of = feature_config.as_of or data_as_of(ds)
    events = clean_events(ds, feature_config, purpose="profiling", as_of=as_of).collect()
    items = ds.scan("items", required=False)
    customers = ds.scan("customers", required=False)
    steps.update()
    steps.set_postfix_str("exposures")
    if target == "actions":
        if not ds.has_table("action_catalog"):
            raise DatasetError(f"{ds.raw_dir} has an action log but no action_catalog table")
        exposures = ds.read("actions").select(
            EXPOSURE_ID, CUSTOMER_ID, ACTION_ID, CHANNEL, TIMESTAMP_COL, RESPONDED
        )
        catalog = ds.read("action_catalog")
        target_name = "actions"
    else:
        attribute = config.derived_attribute or default_derived_attribute(items)
        exposures, catalog = derived_action_log(
            events,
            items,
            attribute=attribute,
            horizon_days=config.horizon_days,
            every_days=config.snapshot_days,
            values=config.derived_values,
            active_days=config.active_days,
            max_rows=config.max_rows,
            seed=config.seed,
        )
        target_name = f"derived:{attribute}:{config.horizon_days}d"
    if exposures.is_empty():
        raise PropensityDataError(f"{ds.root}: no exposures to learn from")
    steps.update()
    steps.set_postfix_str("as-of profiles")
    table = build_training_table(
        exposures,
        events,
        items,
        customers,
        snapshot_days=config.snapshot_days,
        config=feature_config.profiles,
        progress=False,
    )
    truth_path = ds.truth_dir / "propensity.parquet"
    if target == "actions" and truth_path.exists():
        truth = pl.read_parquet(truth_path).select(EXPOSURE_ID, pl.col(P_TRUE).cast(pl.Float64))
        table = table.join(truth, on=EXPOSURE_ID, how="left", maintain_order="left")
    affinity = None
    if config.affinity and items is not None:
        validation_start, _ = period_cutoffs(table[TIMESTAMP_COL], config)
        affinity = build_action_affinity(
            events,
            items.collect(),
            catalog,
            config,
            interactions=feature_config.interactions,
            before=validation_start,
            dataset=ds,
            recommender=recommender,
            recommender_label=recommender_label,
        )
        if affinity is not None:
            table = table.with_columns(
                affinity_asof(table, events, affinity, feature_config.interactions, progress=progress)
            )
    steps.update()
    steps.close()
    customer_columns = [
        c
        for c in table.columns
        if c not in EXPOSURE_COLUMNS and c not in {SNAPSHOT_AT, P_TRUE, *PAIR_NUMERIC_COLUMNS}
    ]
    customer_columns = [c for c in customer_columns if c not in exposures.columns]
    # What the service would show the model for each row's customer (consent, demographics of new customers).
    table = model_view(
        table,
        customer_columns,
        None if customers is None else customers.collect(),
        consent_state(ds.scan("consent", required=False), as_of=as_of).collect(),
        default=feature_config.consent_default,
    )
    return split_table(
        table,
        catalog,
        customer_columns,
        config,
        target=target_name,
        label_days=config.horizon_days if target == "derived" else None,
        affinity=affinity,
    )


# --- the feature encoder -----------------------------------------------------------------------------------


def _kind_of(dtype: pl.DataType) -> str | None:
    if dtype in (pl.String, pl.Boolean) or isinstance(dtype, pl.Categorical | pl.Enum):
        return "categorical"
    if isinstance(dtype, pl.Datetime) or dtype == pl.Date:
        return "date"
    if dtype.is_numeric():
        return "numeric"
    return None


class MatchPair(BaseModel):
    """A customer preference and the action attribute it is compared with (``preferred_brand`` vs ``brand``).

    Attributes:
        customer: the customer's categorical column.
        action: the action catalogue column.
        share: the customer's share column of that preference, if any.
    """

    model_config = ConfigDict(extra="forbid")

    customer: str
    action: str
    share: str | None = None


class FeatureSpec(BaseModel):
    """Which columns feed the model, and how. Inferred from the data at training time, stored with the model.

    Categorical inputs are, in order: customer categoricals, ``action_id``, action categoricals, ``channel``,
    ``hour``, ``weekday``. Numeric inputs are, in order: customer numerics, days since each customer date, action
    numerics, days until each action date, one match flag per pair, one matched share per pair with a share, and
    the per (customer, action) numerics (``cf_affinity``).
    """

    model_config = ConfigDict(extra="forbid")

    customer_categorical: list[str] = Field(default_factory=list)
    customer_numeric: list[str] = Field(default_factory=list)
    customer_dates: list[str] = Field(default_factory=list)
    action_categorical: list[str] = Field(default_factory=list)
    action_numeric: list[str] = Field(default_factory=list)
    action_dates: list[str] = Field(default_factory=list)
    pairs: list[MatchPair] = Field(default_factory=list)
    pair_numeric: list[str] = Field(default_factory=list)
    """Numerics that vary by customer and action (:data:`PAIR_NUMERIC_COLUMNS`): a column offline, a value per
    action online (:meth:`FeatureEncoder.encode_one`'s ``affinities``)."""
    skipped: list[str] = Field(default_factory=list)
    """Columns left out because their type is not usable (lists, structs)."""

    @property
    def categorical_names(self) -> list[str]:
        return [
            *self.customer_categorical,
            ACTION_ID,
            *(ACTION_PREFIX + c for c in self.action_categorical),
            CHANNEL,
            HOUR,
            WEEKDAY,
        ]

    @property
    def numeric_names(self) -> list[str]:
        """Names of the raw numeric inputs (before missing-value indicators are appended)."""
        return [
            *self.customer_numeric,
            *(f"days_since_{c}" for c in self.customer_dates),
            *(ACTION_PREFIX + c for c in self.action_numeric),
            *(f"{ACTION_PREFIX}days_until_{c}" for c in self.action_dates),
            *(f"match_{p.action}" for p in self.pairs),
            *(f"match_{p.action}_share" for p in self.pairs if p.share),
            *self.pair_numeric,
        ]


def infer_feature_spec(
    table_schema: pl.Schema, customer_columns: Sequence[str], catalog: pl.DataFrame
) -> FeatureSpec:
    """The feature spec of a training table: each column's role from its dtype.

    Text and boolean columns are categorical, numbers numeric, dates and datetimes become day differences to
    the exposure time; a customer column ``preferred_<A>`` and a catalogue column ``<A>`` form a match pair.
    """
    spec = FeatureSpec()
    spec.pair_numeric = [c for c in PAIR_NUMERIC_COLUMNS if c in table_schema]
    for c in customer_columns:
        if c in EXCLUDED_CUSTOMER_COLUMNS or c in PAIR_NUMERIC_COLUMNS or c not in table_schema:
            continue
        kind = _kind_of(table_schema[c])
        target = {
            "categorical": spec.customer_categorical,
            "numeric": spec.customer_numeric,
            "date": spec.customer_dates,
        }.get(kind or "")
        (target if target is not None else spec.skipped).append(c)
    for c, dtype in catalog.schema.items():
        if c == ACTION_ID:
            continue
        kind = _kind_of(dtype)
        target = {
            "categorical": spec.action_categorical,
            "numeric": spec.action_numeric,
            "date": spec.action_dates,
        }.get(kind or "")
        if target is not None:
            target.append(c)
        else:
            spec.skipped.append(ACTION_PREFIX + c)
    for a in spec.action_categorical:
        pref = f"preferred_{a}"
        if pref in spec.customer_categorical:
            share = f"{pref}_share"
            spec.pairs.append(
                MatchPair(customer=pref, action=a, share=share if share in spec.customer_numeric else None)
            )
    return spec


class NumericStat(BaseModel):
    """How one raw numeric input is normalised: optional log1p, then standardised; NaN becomes 0 (the mean)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    log: bool = False
    mean: float = 0.0
    std: float = 1.0
    missing_indicator: bool = False
    """Whether a 0/1 "was missing" input is appended (the column had missing values in training)."""


class EncoderState(BaseModel):
    """The learned state of a :class:`FeatureEncoder` (JSON; the action catalogue is stored beside it)."""

    model_config = ConfigDict(extra="forbid")

    spec: FeatureSpec
    vocabularies: dict[str, list[str]]
    """Known values per categorical input (index = position + 1; 0 is unknown)."""
    numeric: list[NumericStat]


@dataclass
class EncodedRows:
    """Model inputs: categorical indices (int64, rows × categorical inputs) and numerics (float32)."""

    categorical: np.ndarray
    numeric: np.ndarray

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def take(self, index: np.ndarray) -> EncodedRows:
        return EncodedRows(self.categorical[index], self.numeric[index])


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _to_float(value: Any) -> float:
    if value is None or isinstance(value, str):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _to_epoch_seconds(value: Any) -> float:
    """Seconds since 1970 of a naive-UTC datetime, date or ISO string; NaN when absent or unreadable."""
    if value is None:
        return float("nan")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return float("nan")
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return (value - _EPOCH).total_seconds()
    if isinstance(value, date):
        return (datetime(value.year, value.month, value.day) - _EPOCH).total_seconds()
    return float("nan")


def _epoch_column(series: pl.Series) -> np.ndarray:
    s = series.cast(TIMESTAMP) if series.dtype == pl.Date else series
    if isinstance(s.dtype, pl.Datetime) and s.dtype.time_zone is not None:
        s = s.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return (s.dt.epoch("ms").cast(pl.Float64) / 1000.0).fill_null(float("nan")).to_numpy()


def _float_column(series: pl.Series) -> np.ndarray:
    return series.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()


def _broadcast(block: np.ndarray, n: int) -> np.ndarray:
    return block if block.shape[0] == n else np.broadcast_to(block, (n, block.shape[1]))


class FeatureEncoder:
    """Turns exposure rows (customer profile, action, channel, time) into model inputs; fitted on training rows.

    Build with :meth:`fit`; restore with :meth:`from_state`. The action catalogue is part of the encoder: rows
    name an ``action_id`` and the encoder supplies the action's attributes.
    """

    def __init__(self, state: EncoderState, catalog: pl.DataFrame) -> None:
        self.state = state
        self.spec = state.spec
        self.catalog = catalog
        self._maps = {c: {v: i + 1 for i, v in enumerate(vals)} for c, vals in state.vocabularies.items()}
        cust_cat = self.spec.customer_categorical
        act_cat = [ACTION_ID, *(ACTION_PREFIX + c for c in self.spec.action_categorical)]
        self._pair_customer = np.array([cust_cat.index(p.customer) for p in self.spec.pairs], dtype=np.int64)
        self._pair_action = np.array(
            [act_cat.index(ACTION_PREFIX + p.action) for p in self.spec.pairs], dtype=np.int64
        )
        self._pair_share = np.array(
            [self.spec.customer_numeric.index(p.share) for p in self.spec.pairs if p.share], dtype=np.int64
        )
        self._pair_has_share = np.array([p.share is not None for p in self.spec.pairs], dtype=bool)
        stats = state.numeric
        self._log = np.array([s.log for s in stats], dtype=bool)
        self._mean = np.array([s.mean for s in stats], dtype=np.float64)
        self._std = np.array([s.std for s in stats], dtype=np.float64)
        self._indicators = np.array([s.missing_indicator for s in stats], dtype=bool)
        # The action block is encoded once; row 0 stands for an action the catalogue does not know.
        ids = catalog[ACTION_ID].to_list()
        self._action_row = {a: i + 1 for i, a in enumerate(ids)}
        self._all_rows = np.arange(1, len(ids) + 1, dtype=np.int64)
        a_cat = np.column_stack(
            [self._codes(catalog[ACTION_ID], ACTION_ID)]
            + [self._codes(catalog[c], ACTION_PREFIX + c) for c in self.spec.action_categorical]
        )
        a_num = self._floats([catalog[c] for c in self.spec.action_numeric], catalog.height)
        a_dates = self._epochs([catalog[c] for c in self.spec.action_dates], catalog.height)
        self._act_cat = np.vstack([np.zeros((1, a_cat.shape[1]), np.int64), a_cat])
        self._act_num = np.vstack([np.full((1, a_num.shape[1]), np.nan), a_num])
        self._act_dates = np.vstack([np.full((1, a_dates.shape[1]), np.nan), a_dates])

    # -- fitting --------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        catalog: pl.DataFrame,
        customer_columns: Sequence[str],
        *,
        min_count: int = 5,
    ) -> FeatureEncoder:
        """Learn vocabularies and normalisation from training rows.

        Args:
            train: training rows (exposure columns plus customer profile columns).
            catalog: the action catalogue.
            customer_columns: the profile columns of ``train``.
            min_count: categorical values (action ids included) seen fewer times in training are treated as
                unknown; the catalogue's attribute values are always kept.
        """
        spec = infer_feature_spec(train.schema, customer_columns, catalog)
        vocab: dict[str, list[str]] = {}

        def frequent(series: pl.Series) -> set[str]:
            counts = series.cast(pl.String).drop_nulls().value_counts()
            return set(counts.filter(pl.col("count") >= min_count)[series.name].to_list())

        for c in spec.customer_categorical:
            vocab[c] = sorted(frequent(train[c]))
        # Actions without enough training exposures (new campaigns) share the unknown index, which training
        # teaches by hiding some rows' action ids (PropensityConfig.action_dropout); their attributes still count.
        vocab[ACTION_ID] = sorted(
            set(catalog[ACTION_ID].cast(pl.String).drop_nulls().to_list()) & frequent(train[ACTION_ID])
        )
        for c in spec.action_categorical:
            vocab[ACTION_PREFIX + c] = sorted(set(catalog[c].cast(pl.String).drop_nulls().to_list()))
        for p in spec.pairs:
            # One vocabulary for both sides, so that equal values get equal indices and can be matched.
            shared = sorted(set(vocab[p.customer]) | set(vocab[ACTION_PREFIX + p.action]))
            vocab[p.customer] = vocab[ACTION_PREFIX + p.action] = shared
        vocab[CHANNEL] = sorted(frequent(train[CHANNEL])) if CHANNEL in train.columns else []
        vocab[HOUR] = [f"{h:02d}" for h in range(24)]
        vocab[WEEKDAY] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        provisional = EncoderState(
            spec=spec,
            vocabularies=vocab,
            numeric=[NumericStat(name=n) for n in spec.numeric_names],
        )
        raw = cls(provisional, catalog)._raw_frame(train)[1]
        stats = []
        for j, name in enumerate(spec.numeric_names):
            col = raw[:, j]
            finite = col[np.isfinite(col)]
            log = bool(finite.size and finite.min() >= 0 and finite.max() > _LOG_ABOVE)
            values = np.log1p(finite) if log else finite
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 1.0
            stats.append(
                NumericStat(
                    name=name,
                    log=log,
                    mean=mean,
                    std=std if std > 1e-9 else 1.0,
                    missing_indicator=bool(finite.size < col.size),
                )
            )
        return cls(EncoderState(spec=spec, vocabularies=vocab, numeric=stats), catalog)

    @classmethod
    def from_state(cls, state: EncoderState | Mapping[str, Any], catalog: pl.DataFrame) -> FeatureEncoder:
        """Restore an encoder from its saved state and catalogue."""
        if not isinstance(state, EncoderState):
            state = EncoderState.model_validate(state)
        return cls(state, catalog)

    # -- shapes ---------------------------------------------------------------------------------------------

    @property
    def cardinalities(self) -> list[int]:
        """Vocabulary size (unknown included) of each categorical input, in input order."""
        return [len(self.state.vocabularies[c]) + 1 for c in self.spec.categorical_names]

    @property
    def n_numeric(self) -> int:
        """Number of numeric inputs (normalised values plus missing-value indicators)."""
        return len(self.state.numeric) + int(self._indicators.sum())

    @property
    def numeric_input_names(self) -> list[str]:
        return [s.name for s in self.state.numeric] + [
            f"{s.name}_missing" for s in self.state.numeric if s.missing_indicator
        ]

    @property
    def activity_channels(self) -> list[str]:
        """The event channels whose shares are inputs (pass them to :func:`customer_activity` when serving)."""
        return [
            c.removeprefix(CHANNEL_SHARE_PREFIX)
            for c in self.spec.customer_numeric
            if c.startswith(CHANNEL_SHARE_PREFIX)
        ]

    @property
    def action_id_position(self) -> int:
        """Column of ``action_id`` among the categorical inputs."""
        return len(self.spec.customer_categorical)

    @property
    def action_ids(self) -> list[str]:
        return self.catalog[ACTION_ID].to_list()

    # -- reading values -------------------------------------------------------------------------------------

    def _codes(self, series: pl.Series, vocab: str) -> np.ndarray:
        mapping = self._maps[vocab]
        return (
            series.cast(pl.String)
            .replace_strict(mapping, default=UNKNOWN_INDEX, return_dtype=pl.Int64)
            .fill_null(UNKNOWN_INDEX)
            .to_numpy()
        )

    @staticmethod
    def _floats(columns: Sequence[pl.Series], n: int) -> np.ndarray:
        if not columns:
            return np.zeros((n, 0))
        return np.column_stack([_float_column(c) for c in columns])

    @staticmethod
    def _epochs(columns: Sequence[pl.Series], n: int) -> np.ndarray:
        if not columns:
            return np.zeros((n, 0))
        return np.column_stack([_epoch_column(c) for c in columns])

    def known_actions(self, action_ids: Sequence[str]) -> list[str]:
        """The ids among ``action_ids`` that the catalogue holds, in order."""
        rows = self._action_row
        return [a for a in action_ids if a in rows]

    def action_rows(self, action_ids: Sequence[str] | None) -> np.ndarray:
        """Rows of the encoded catalogue for ``action_ids`` (0 for unknown ids; None: every action)."""
        if action_ids is None:
            return self._all_rows
        get = self._action_row.get
        return np.fromiter((get(a, 0) for a in action_ids), dtype=np.int64, count=len(action_ids))

    def _raw_frame(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        n = frame.height
        missing = [c for c in (ACTION_ID, TIMESTAMP_COL) if c not in frame.columns]
        if missing:
            raise PropensityDataError(f"rows to encode lack column(s) {', '.join(missing)}")

        def column(c: str, dtype: pl.DataType) -> pl.Series:
            return frame[c] if c in frame.columns else pl.Series(c, [None] * n, dtype=dtype)

        cust_cat = (
            np.column_stack([self._codes(column(c, pl.String), c) for c in spec.customer_categorical])
            if spec.customer_categorical
            else np.zeros((n, 0), np.int64)
        )
        cust_num = self._floats([column(c, pl.Float64) for c in spec.customer_numeric], n)
        cust_dates = self._epochs([column(c, TIMESTAMP) for c in spec.customer_dates], n)
        rows = self._action_row
        act_rows = (
            frame[ACTION_ID]
            .cast(pl.String)
            .replace_strict(rows, default=0, return_dtype=pl.Int64)
            .fill_null(0)
            .to_numpy()
        )
        channel = self._codes(column(CHANNEL, pl.String), CHANNEL)
        at = _epoch_column(frame[TIMESTAMP_COL])
        pair = self._floats([column(c, pl.Float64) for c in spec.pair_numeric], n)
        return self._assemble(cust_cat, cust_num, cust_dates, act_rows, channel, at, pair, normalise=False)

    # -- the one shared derivation --------------------------------------------------------------------------

    def _assemble(
        self,
        cust_cat: np.ndarray,
        cust_num: np.ndarray,
        cust_dates: np.ndarray,
        act_rows: np.ndarray,
        channel: np.ndarray,
        at_seconds: np.ndarray,
        pair_num: np.ndarray,
        *,
        normalise: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Combine customer blocks (one row, or one per action row) with action rows, per (customer, action)
        numerics (one row per action row) and context."""
        n = act_rows.shape[0]
        a_cat = self._act_cat[act_rows]
        a_num = self._act_num[act_rows]
        a_dates = self._act_dates[act_rows]
        at = np.broadcast_to(at_seconds.reshape(-1, 1), (n, 1))
        at_known = np.isfinite(at)
        safe_at = np.where(at_known, at, 0.0)
        hour = np.where(at_known, (safe_at // 3600) % 24 + 1, UNKNOWN_INDEX).astype(np.int64)
        # 1970-01-01 was a Thursday: (days + 3) % 7 counts from Monday.
        weekday = np.where(at_known, (safe_at // _DAY_SECONDS + 3) % 7 + 1, UNKNOWN_INDEX).astype(np.int64)
        cust_cat = _broadcast(cust_cat, n)
        categorical = np.concatenate(
            [cust_cat, a_cat, _broadcast(channel.reshape(-1, 1), n), hour, weekday], axis=1
        )
        cust_num = _broadcast(cust_num, n)
        days_since = (at - _broadcast(cust_dates, n)) / _DAY_SECONDS
        days_until = (a_dates - at) / _DAY_SECONDS
        pref = cust_cat[:, self._pair_customer]
        match = ((pref == a_cat[:, self._pair_action]) & (pref != UNKNOWN_INDEX)).astype(np.float64)
        shares = np.nan_to_num(cust_num[:, self._pair_share], nan=0.0)
        matched_share = match[:, self._pair_has_share] * shares
        raw = np.concatenate(
            [cust_num, days_since, a_num, days_until, match, matched_share, pair_num], axis=1
        )
        if not normalise:
            return categorical, raw
        return categorical, self._normalise(raw)

    def _normalise(self, raw: np.ndarray) -> np.ndarray:
        x = np.array(raw, dtype=np.float64)
        missing = ~np.isfinite(x)
        if self._log.any():
            logged = x[:, self._log]
            x[:, self._log] = np.log1p(np.clip(logged, 0.0, None))
        x = (x - self._mean) / self._std
        x[missing] = 0.0
        np.clip(x, -_CLIP, _CLIP, out=x)
        out = np.concatenate([x, missing[:, self._indicators].astype(np.float64)], axis=1)
        return out.astype(np.float32)

    # -- public encoding ------------------------------------------------------------------------------------

    def encode_frame(self, frame: pl.DataFrame) -> EncodedRows:
        """Encode rows with ``action_id``, ``timestamp``, optional ``channel`` and the customer profile columns
        (absent profile columns count as missing)."""
        categorical, raw = self._raw_frame(frame)
        return EncodedRows(categorical, self._normalise(raw))

    def encode_one(
        self,
        customer: Mapping[str, Any],
        action_ids: Sequence[str] | None,
        channel: str | None,
        at: datetime,
        *,
        affinities: Mapping[str, float] | None = None,
    ) -> EncodedRows:
        """Encode one customer against many actions (the online path).

        Args:
            customer: the customer's profile row (as in ``profiles.parquet``; missing keys count as missing).
            action_ids: the actions to score; None for the whole catalogue.
            channel: the channel of the request.
            at: the time of the request (naive UTC, or aware).
            affinities: action id → the customer's ``cf_affinity`` (:meth:`ActionAffinity.score_items`);
                absent actions and None count as missing.
        """
        spec = self.spec
        maps = self._maps
        get = customer.get
        cust_cat = np.array(
            [[maps[c].get(_to_text(get(c)), UNKNOWN_INDEX) for c in spec.customer_categorical]],
            dtype=np.int64,
        ).reshape(1, -1)
        cust_num = np.array([[_to_float(get(c)) for c in spec.customer_numeric]], dtype=np.float64).reshape(
            1, -1
        )
        cust_dates = np.array(
            [[_to_epoch_seconds(get(c)) for c in spec.customer_dates]], dtype=np.float64
        ).reshape(1, -1)
        rows = self.action_rows(action_ids)
        chan = np.array([maps[CHANNEL].get(channel, UNKNOWN_INDEX) if channel else UNKNOWN_INDEX])
        at_seconds = np.array([_to_epoch_seconds(at)])
        pair = np.full((rows.shape[0], len(spec.pair_numeric)), np.nan)
        if affinities and AFFINITY in spec.pair_numeric:
            ids = self.action_ids if action_ids is None else action_ids
            pair[:, spec.pair_numeric.index(AFFINITY)] = [_to_float(affinities.get(a)) for a in ids]
        categorical, numeric = self._assemble(cust_cat, cust_num, cust_dates, rows, chan, at_seconds, pair)
        return EncodedRows(categorical, numeric)

    def one_hot_matrix(self, rows: EncodedRows) -> Any:
        """The same inputs as a sparse design matrix (one-hot categoricals, then numerics) for linear models."""
        import scipy.sparse as sp

        cards = np.array(self.cardinalities, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
        n, k = rows.categorical.shape
        cols = (rows.categorical + offsets).ravel()
        indptr = np.arange(0, n * k + 1, k)
        onehot = sp.csr_matrix((np.ones(n * k, np.float32), cols, indptr), shape=(n, int(cards.sum())))
        return sp.hstack([onehot, sp.csr_matrix(rows.numeric)], format="csr")
