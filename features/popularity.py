"""Item popularity among customers, overall and per segment: the one rule behind the "popular" fallback.

A customer counts once for an item they have any positive interaction weight with. A segment is a value of a
profile column (the service uses ``age_band``); customers whose value is null belong to no segment. A segment
of fewer than :data:`MIN_SEGMENT_CUSTOMERS` interacting customers is too small to say what it likes, so it falls
back to the popularity among all customers.

The service's segment fallback (``serving/serving_data.py``, ``ServingData.load``) and the dashboard's
per-segment table (``serving/dashboard_data.py``, ``popular_by_segment``) both compute it here: the rule was once
written twice and the copies drifted apart (the dashboard counted null segments as ``unknown`` and had no
minimum). ``tests/test_popularity.py`` feeds the same customers through the service's path and this one.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from nextbest.features.interactions import WEIGHT
from nextbest.features.schema import CUSTOMER_ID, ITEM_ID, Vocabulary

MIN_SEGMENT_CUSTOMERS = 20
"""Segments with fewer interacting customers use the popularity among all customers."""
SEGMENT_VALUE = "segment_value"
CUSTOMERS = "customers"
SEGMENT_CUSTOMERS = "segment_customers"
FALLBACK = "fallback"


def interaction_pairs(matrix: sp.spmatrix, customers: Vocabulary, items: Vocabulary) -> pl.LazyFrame:
    """The stored entries of a customers × items matrix as ``customer_id, item_id, weight`` rows.

    The ids are Enums of the vocabularies (:meth:`Vocabulary.enum`): counting distinct customers on their codes
    is several times faster than on text, which matters at the service's scale.

    Args:
        matrix: rows are ``customers``, columns ``items`` (an interaction matrix).
        customers: the row vocabulary.
        items: the column vocabulary.
    """
    coo = sp.coo_matrix(matrix)
    return pl.LazyFrame(
        {
            CUSTOMER_ID: _coded(customers, coo.row),
            ITEM_ID: _coded(items, coo.col),
            WEIGHT: coo.data.astype(np.float32),
        }
    )


def _coded(vocabulary: Vocabulary, indices: np.ndarray) -> pl.Series:
    return pl.Series(vocabulary.ids, dtype=pl.String).cast(vocabulary.enum()).gather(indices.astype(np.int64))


def item_popularity(pairs: pl.LazyFrame) -> pl.LazyFrame:
    """Distinct customers per item among all customers of ``pairs``.

    Args:
        pairs: ``customer_id, item_id, weight`` rows (:func:`interaction_pairs`); weights of 0 or less count as
            no interaction.

    Returns:
        ``item_id`` (text), ``customers`` (Int64) for the items with at least one customer; most customers
        first, ties to the smaller item id.
    """
    return (
        pairs.filter(pl.col(WEIGHT) > 0)
        .group_by(ITEM_ID)
        .agg(pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias(CUSTOMERS))
        .with_columns(pl.col(ITEM_ID).cast(pl.String))
        .sort([CUSTOMERS, ITEM_ID], descending=[True, False])
    )


def segment_popularity(
    pairs: pl.LazyFrame,
    segments: pl.LazyFrame,
    *,
    column: str,
    min_customers: int = MIN_SEGMENT_CUSTOMERS,
) -> pl.LazyFrame:
    """Distinct customers per item within each segment, or among everyone where the segment is too small.

    A segment's customers are the customers of ``pairs`` with at least one positive weight whose ``column`` in
    ``segments`` is that value; customers without a value (null, or absent from ``segments``) are in no segment
    but still count in the overall popularity that small segments fall back to.

    Args:
        pairs: ``customer_id, item_id, weight`` rows (:func:`interaction_pairs`).
        segments: ``customer_id`` and ``column``, one row per customer (the profiles).
        column: the column whose values are the segments (cast to text).
        min_customers: a segment with fewer customers falls back to :func:`item_popularity`.

    Returns:
        ``segment_value, item_id, customers, segment_customers, fallback``: per segment, the items with at
        least one customer, most customers first, ties to the smaller item id; ``fallback`` is true where the
        counts are the overall ones (``segment_customers < min_customers``). Sorted by segment value.
    """
    active = pairs.filter(pl.col(WEIGHT) > 0)
    # The segments' ids in the pairs' type (Enum codes from interaction_pairs); ids outside it are no customer.
    key = pairs.collect_schema()[CUSTOMER_ID]
    members = (
        segments.select(
            pl.col(CUSTOMER_ID).cast(key, strict=False), pl.col(column).cast(pl.String).alias(SEGMENT_VALUE)
        )
        .filter(pl.col(CUSTOMER_ID).is_not_null() & pl.col(SEGMENT_VALUE).is_not_null())
        .join(active.select(CUSTOMER_ID).unique(), on=CUSTOMER_ID, how="semi")
    )
    sizes = members.group_by(SEGMENT_VALUE).agg(
        pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias(SEGMENT_CUSTOMERS)
    )
    own = (
        active.join(members, on=CUSTOMER_ID, how="inner")
        .group_by(SEGMENT_VALUE, ITEM_ID)
        .agg(pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias(CUSTOMERS))
        .with_columns(pl.col(ITEM_ID).cast(pl.String))
        .join(sizes.filter(pl.col(SEGMENT_CUSTOMERS) >= min_customers), on=SEGMENT_VALUE, how="inner")
        .with_columns(pl.lit(False).alias(FALLBACK))
    )
    overall = (
        sizes.filter(pl.col(SEGMENT_CUSTOMERS) < min_customers)
        .join(item_popularity(pairs), how="cross")
        .with_columns(pl.lit(True).alias(FALLBACK))
    )
    columns = [SEGMENT_VALUE, ITEM_ID, CUSTOMERS, SEGMENT_CUSTOMERS, FALLBACK]
    return pl.concat([own.select(columns), overall.select(columns)]).sort(
        [SEGMENT_VALUE, CUSTOMERS, ITEM_ID], descending=[False, True, False]
    )


def popularity_vector(popularity: pl.DataFrame, items: Vocabulary) -> np.ndarray:
    """``item_id, customers`` rows (:func:`item_popularity`) as a float32 array over ``items`` (0 elsewhere;
    items outside the vocabulary are left out)."""
    out = np.zeros(len(items), dtype=np.float32)
    index = items.indices(popularity[ITEM_ID].to_list())
    known = index >= 0
    out[index[known]] = popularity[CUSTOMERS].to_numpy()[known]
    return out


def segment_vectors(table: pl.DataFrame, items: Vocabulary) -> dict[str, np.ndarray]:
    """The segments of :func:`segment_popularity` that have their own counts, as :func:`popularity_vector`
    arrays by segment value: a segment that falls back is left out (its customers get the overall array)."""
    own = table.filter(~pl.col(FALLBACK))
    return {
        str(value): popularity_vector(part, items)
        for (value,), part in own.group_by(SEGMENT_VALUE, maintain_order=True)
    }
