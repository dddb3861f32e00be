"""Temporal train / validation / test splits by cut-off date, and a leave-last-out split. Never random."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.features.schema import CUSTOMER_ID, EVENT_TYPE, TIMESTAMP_COL


class SplitError(NextbestError, ValueError):
    """Cut-offs that cannot split the data (out of order, or outside the data's time range)."""


@dataclass(frozen=True)
class Split:
    """Event rows of the three periods.

    Attributes:
        train: ``timestamp < validation_start``.
        validation: ``validation_start <= timestamp < test_start``.
        test: ``timestamp >= test_start``.
    """

    train: pl.LazyFrame
    validation: pl.LazyFrame
    test: pl.LazyFrame
    validation_start: datetime
    test_start: datetime


def temporal_split(events: pl.LazyFrame, *, validation_start: datetime, test_start: datetime) -> Split:
    """Split events at two cut-offs; every event falls in exactly one period.

    Raises:
        SplitError: ``validation_start`` is after ``test_start``.
    """
    if validation_start > test_start:
        raise SplitError(
            f"validation_start {validation_start.isoformat()} is after test_start {test_start.isoformat()}"
        )
    ts = pl.col(TIMESTAMP_COL)
    return Split(
        train=events.filter(ts < validation_start),
        validation=events.filter((ts >= validation_start) & (ts < test_start)),
        test=events.filter(ts >= test_start),
        validation_start=validation_start,
        test_start=test_start,
    )


def default_cutoffs(
    events: pl.LazyFrame, *, validation_days: int = 14, test_days: int = 14
) -> tuple[datetime, datetime]:
    """Cut-offs that leave the last ``test_days`` for test and the ``validation_days`` before for validation.

    Cut-offs fall on midnight so that periods are whole days.

    Raises:
        SplitError: there are no events, or the data spans too few days to leave any training period.
    """
    bounds = events.select(
        pl.col(TIMESTAMP_COL).min().alias("lo"), pl.col(TIMESTAMP_COL).max().alias("hi")
    ).collect()
    lo, hi = bounds["lo"][0], bounds["hi"][0]
    if lo is None or hi is None:
        raise SplitError("no events to split")
    end = datetime(hi.year, hi.month, hi.day) + timedelta(days=1)
    test_start = end - timedelta(days=test_days)
    validation_start = test_start - timedelta(days=validation_days)
    if validation_start <= lo:
        raise SplitError(
            f"events span {lo:%Y-%m-%d}..{hi:%Y-%m-%d}: too short for {validation_days} validation and "
            f"{test_days} test days with a training period before them"
        )
    return validation_start, test_start


def leave_last_out(
    events: pl.LazyFrame, *, n: int = 1, event_type: str = "purchase"
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Hold out each customer's last ``n`` events of ``event_type``; everything at or after the first held-out
    event's time is removed from train too, so nothing from the customer's future leaks into training.

    Returns:
        (train, test) event rows. Customers with ``n`` or fewer such events keep all of them in train.
    """
    if n < 1:
        raise SplitError(f"n must be >= 1, got {n}")
    typed = events.filter(pl.col(EVENT_TYPE) == event_type)
    ranked = typed.with_columns(
        pl.col(TIMESTAMP_COL).rank("ordinal", descending=True).over(CUSTOMER_ID).alias("__rank"),
        pl.len().over(CUSTOMER_ID).alias("__count"),
    )
    test = ranked.filter((pl.col("__rank") <= n) & (pl.col("__count") > n)).drop("__rank", "__count")
    first_held = test.group_by(CUSTOMER_ID).agg(pl.col(TIMESTAMP_COL).min().alias("__cut"))
    train = (
        events.join(first_held, on=CUSTOMER_ID, how="left")
        .filter(pl.col("__cut").is_null() | (pl.col(TIMESTAMP_COL) < pl.col("__cut")))
        .drop("__cut")
    )
    return train, test
