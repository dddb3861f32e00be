"""Propensity training rows: exposures (the action log, or derived follow-up purchase targets) with as-of
customer profiles and activity, split by time.

A training row is one exposure: a customer was shown an action at a time on a channel, and responded or not.
Its customer features are the customer's profile built from events *strictly before* a snapshot time at or
before the exposure (profiles are rebuilt every ``snapshot_days``), so no row sees its own future. Datasets
without an action log get derived targets instead: at each snapshot, every recently active customer is
"exposed" to "buy a product of <attribute> = c", and responds if they do within the next ``horizon_days``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from nextbest.features.profiles import ProfileConfig, build_profiles
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    EXPOSURE_ID,
    ITEM_ID,
    KIND,
    RESPONDED,
    TIMESTAMP,
    TIMESTAMP_COL,
    VALUE,
)
from nextbest.features.splits import temporal_split
from nextbest.training.activity import activity_asof, activity_channels
from nextbest.training.propensity_config import P_TRUE, SNAPSHOT_AT, PropensityDataConfig, PropensityDataError

if TYPE_CHECKING:
    from nextbest.training.affinity import ActionAffinity

DERIVED_KIND = "follow_up_purchase"


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
