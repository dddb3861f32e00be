"""Identity resolution: the single customer view that maps every source system's id to one customer_id."""

from __future__ import annotations

import polars as pl

from nextbest.features.schema import CUSTOMER_ID, SOURCE_ID, SOURCE_SYSTEM

UNLINKED_SEPARATOR = ":"
"""An unlinked source id becomes its own customer ``<source_system>:<source_id>``, so its events stay usable
(for session-based results) and are never silently dropped."""


def resolve_identities(events: pl.LazyFrame, identities: pl.LazyFrame) -> pl.LazyFrame:
    """Replace source-system ids in events by the canonical customer_id.

    Events whose ``source_system`` is null already carry the canonical id. Events from another system are looked
    up in ``identities`` by (source_system, source_id); a linked id becomes its customer_id (and ``source_system``
    becomes null), an unlinked one becomes ``<system>:<id>`` with its ``source_system`` kept.

    Args:
        events: rows of the events table.
        identities: rows of the identities table.

    Returns:
        the events with the same columns, ids resolved (canonical events first, then resolved ones).
    """
    links = identities.filter(pl.col(CUSTOMER_ID).is_not_null()).select(
        pl.col(SOURCE_SYSTEM).alias("__sys"),
        pl.col(SOURCE_ID).alias("__sid"),
        pl.col(CUSTOMER_ID).alias("__canonical"),
    )
    columns = events.collect_schema().names()
    if SOURCE_SYSTEM not in columns:
        return events
    # Only events logged under another system's id need the join; most carry the canonical id already.
    canonical = events.filter(pl.col(SOURCE_SYSTEM).is_null())
    sourced = events.filter(pl.col(SOURCE_SYSTEM).is_not_null()).join(
        links, left_on=[SOURCE_SYSTEM, CUSTOMER_ID], right_on=["__sys", "__sid"], how="left"
    )
    linked = pl.col("__canonical").is_not_null()
    resolved = sourced.with_columns(
        pl.when(linked)
        .then(pl.col("__canonical"))
        .otherwise(pl.concat_str([pl.col(SOURCE_SYSTEM), pl.lit(UNLINKED_SEPARATOR), pl.col(CUSTOMER_ID)]))
        .alias(CUSTOMER_ID),
        pl.when(linked).then(None).otherwise(pl.col(SOURCE_SYSTEM)).alias(SOURCE_SYSTEM),
    ).select(columns)
    return pl.concat([canonical, resolved])


def linked_ids(identities: pl.LazyFrame, customer_id: str) -> list[str]:
    """Every id that denotes ``customer_id``: the id itself and each source id linked to it."""
    sources = (
        identities.filter(pl.col(CUSTOMER_ID) == customer_id).select(SOURCE_ID).collect()[SOURCE_ID].to_list()
    )
    return sorted({customer_id, *sources})
