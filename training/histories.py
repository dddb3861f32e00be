"""Customer histories as matrices aligned to a training vocabulary: purchase counts and interaction ages."""

from __future__ import annotations

from datetime import datetime

import polars as pl
import scipy.sparse as sp

from nextbest.features.interactions import WEIGHT, build_interactions
from nextbest.features.schema import CUSTOMER_ID, EVENT_TYPE, ITEM_ID, TIMESTAMP_COL, Vocabulary

PURCHASE = "purchase"
MIN_AGE_DAYS = 1.0 / 86_400.0
"""Ages are floored at one second so that every pair stays a stored (non-zero) entry of the sparse matrix."""


def _frame(events: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    return events.lazy() if isinstance(events, pl.DataFrame) else events


def purchase_matrix(
    events: pl.LazyFrame | pl.DataFrame,
    customers: Vocabulary,
    items: Vocabulary,
    *,
    event_type: str = PURCHASE,
) -> sp.csr_matrix:
    """Number of ``event_type`` events per (customer, item), rows and columns in the given vocabularies.

    Pairs outside the vocabularies are left out.
    """
    counts = (
        _frame(events)
        .filter(pl.col(EVENT_TYPE) == event_type)
        .group_by(CUSTOMER_ID, ITEM_ID)
        .agg(pl.len().cast(pl.Float32).alias(WEIGHT))
    )
    return build_interactions(counts, customers=customers, items=items).matrix


def recency_matrix(
    events: pl.LazyFrame | pl.DataFrame,
    customers: Vocabulary,
    items: Vocabulary,
    *,
    as_of: datetime,
    event_types: list[str] | None = None,
) -> sp.csr_matrix:
    """Age in days, at ``as_of``, of the latest event per (customer, item) (at least one second).

    Args:
        events: event rows (only those before ``as_of`` count).
        customers: row vocabulary.
        items: column vocabulary.
        as_of: the reference time (the training cut-off).
        event_types: which events count (default: all).
    """
    lf = _frame(events).filter(pl.col(TIMESTAMP_COL) <= as_of)
    if event_types is not None:
        lf = lf.filter(pl.col(EVENT_TYPE).is_in(event_types))
    ages = (
        lf.group_by(CUSTOMER_ID, ITEM_ID)
        .agg(pl.col(TIMESTAMP_COL).max().alias("__last"))
        .select(
            CUSTOMER_ID,
            ITEM_ID,
            ((pl.lit(as_of) - pl.col("__last")).dt.total_microseconds() / 86_400e6)
            .clip(lower_bound=MIN_AGE_DAYS)
            .cast(pl.Float32)
            .alias(WEIGHT),
        )
    )
    return build_interactions(ages, customers=customers, items=items).matrix
