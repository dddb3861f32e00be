"""Item popularity overall and per segment (features/popularity.py): known answers on hand-made frames, and the
service's segment popularity pinned to the same rule."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from nextbest.features.popularity import (
    interaction_pairs,
    item_popularity,
    popularity_vector,
    segment_popularity,
    segment_vectors,
)
from nextbest.features.schema import Vocabulary


def pairs_of(rows: list[tuple[str, str, float]]) -> pl.LazyFrame:
    return pl.LazyFrame(
        rows, schema={"customer_id": pl.String, "item_id": pl.String, "weight": pl.Float32}, orient="row"
    )


# Segment a: u1, u2, u3 (three customers). Segment b: u4 only. u5 has no segment (null), u6 no profile row.
# u7 is in segment b but its only weight is 0: it has not interacted, so b keeps one customer.
PAIRS = pairs_of(
    [
        ("u1", "i1", 5.0),
        ("u1", "i2", 1.0),
        ("u1", "i1", 3.0),  # a repeated pair counts the customer once
        ("u2", "i1", 1.0),
        ("u3", "i3", 2.0),
        ("u4", "i3", 1.0),
        ("u5", "i2", 1.0),
        ("u5", "i3", 1.0),
        ("u6", "i3", 4.0),
        ("u7", "i1", 0.0),
    ]
)
SEGMENTS = pl.LazyFrame(
    {
        "customer_id": ["u1", "u2", "u3", "u4", "u5", "u7"],
        "band": ["a", "a", "a", "b", None, "b"],
    }
)


def test_item_popularity_counts_distinct_customers_with_a_positive_weight():
    popular = item_popularity(PAIRS).collect()
    # i3: u3, u4, u5, u6; i1: u1, u2 (u7's weight is 0); i2: u1, u5.
    assert popular.rows() == [("i3", 4), ("i1", 2), ("i2", 2)]


def test_segment_popularity_known_answer_small_segment_falls_back_nulls_dropped():
    table = segment_popularity(PAIRS, SEGMENTS, column="band", min_customers=2).collect()
    assert table.columns == ["segment_value", "item_id", "customers", "segment_customers", "fallback"]
    assert table.rows() == [
        # a has three customers (>= 2): its own counts, items nobody in a touched left out.
        ("a", "i1", 2, 3, False),
        ("a", "i2", 1, 3, False),
        ("a", "i3", 1, 3, False),
        # b has one interacting customer (< 2): the overall counts, u5 and u6 included there.
        ("b", "i3", 4, 1, True),
        ("b", "i1", 2, 1, True),
        ("b", "i2", 2, 1, True),
    ]
    # The null segment is no segment: u5 appears only in the overall counts.
    assert None not in table["segment_value"].to_list()
    # With the default minimum (20) every segment here is too small.
    default = segment_popularity(PAIRS, SEGMENTS, column="band").collect()
    assert default["fallback"].all() and default["segment_value"].unique().sort().to_list() == ["a", "b"]


def test_segment_popularity_of_nothing_is_empty():
    empty = segment_popularity(pairs_of([]), SEGMENTS, column="band").collect()
    assert empty.is_empty() and empty.columns[0] == "segment_value"


def test_vectors_from_a_matrix_round_trip():
    customers, items = Vocabulary(("u1", "u2", "u3")), Vocabulary(("i1", "i2", "i3"))
    matrix = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 3], [4, 0, 0]], dtype=np.float32))
    pairs = interaction_pairs(matrix, customers, items)
    assert sorted(pairs.collect().rows()) == [
        ("u1", "i1", 1.0),
        ("u1", "i3", 2.0),
        ("u2", "i3", 3.0),
        ("u3", "i1", 4.0),
    ]
    assert popularity_vector(item_popularity(pairs).collect(), items).tolist() == [2.0, 0.0, 2.0]
    # u9 has a segment but no row in the matrix: no customer of it (the ids are the matrix's Enum codes).
    segments = pl.LazyFrame({"customer_id": ["u1", "u2", "u3", "u9"], "band": ["x", "x", "y", "y"]})
    table = segment_popularity(pairs, segments, column="band", min_customers=2).collect()
    assert table.filter(pl.col("segment_value") == "y")["segment_customers"].unique().to_list() == [1]
    vectors = segment_vectors(table, items)
    # y (one customer) falls back: the service gives its customers the overall array, so it has none.
    assert list(vectors) == ["x"] and vectors["x"].tolist() == [1.0, 0.0, 2.0]
    assert vectors["x"].dtype == np.float32


def test_the_service_segment_popularity_is_this_rule(tmp_path):
    """Parity: the engine's ServingData (overall and per-segment popularity, minimum 20) equals the vectors of
    this module on the same dataset. Once the engine calls segment_popularity itself this pins the wiring."""
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.interactions import Interactions
    from nextbest.features.pipeline import PROFILES_FILE, build_features
    from nextbest.serving.engine import ServingData

    ds = Dataset.at(tmp_path / "world")
    generate_world(WorldConfig(customers=300, days=60, seed=3), ds)
    build_features(ds)
    data = ServingData.load(ds, segment_column="age_band", min_segment_customers=20)
    inter = Interactions.load(ds.features_dir)
    pairs = interaction_pairs(inter.matrix, inter.customers, inter.items)
    profiles = pl.scan_parquet(ds.features_dir / PROFILES_FILE)
    table = segment_popularity(pairs, profiles, column="age_band", min_customers=20).collect()
    expected = segment_vectors(table, data.item_vocab)
    assert table["fallback"].any() and not table["fallback"].all()  # both sides of the minimum are exercised
    assert sorted(data.segment_popularity) == sorted(expected)
    for value, vector in expected.items():
        np.testing.assert_array_equal(data.segment_popularity[value], vector)
    np.testing.assert_array_equal(
        data.popularity, popularity_vector(item_popularity(pairs).collect(), data.item_vocab)
    )
