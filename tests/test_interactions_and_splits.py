"""The interaction matrix on a hand-computed fixture, and splits that never leak the future."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextbest.features.interactions import (
    InteractionConfig,
    Interactions,
    build_interactions,
    interaction_weights,
)
from nextbest.features.schema import Vocabulary
from nextbest.features.splits import SplitError, default_cutoffs, leave_last_out, temporal_split
from tests.conftest import T0, events_frame


def test_csr_weights_hand_computed():
    ev = events_frame(
        [
            ("A", "x", "view", 0),  # A·x = 1 + 5 = 6
            ("A", "x", "purchase", 1),
            ("B", "x", "view", 0),  # B·x = 1
            ("B", "y", "add_to_cart", 0),  # B·y = 3 + 1 = 4
            ("B", "y", "click", 2),
            ("C", "z", "view", 0),  # weight 0 below: C and z vanish from the default vocabularies
        ]
    )
    cfg = InteractionConfig(weights={"view": 1, "click": 1, "add_to_cart": 3, "purchase": 5})
    inter = build_interactions(interaction_weights(ev.lazy(), cfg))
    assert inter.customers.ids == ("A", "B", "C")
    assert inter.items.ids == ("x", "y", "z")
    assert inter.matrix.dtype == np.float32
    np.testing.assert_array_equal(inter.matrix.toarray(), [[6, 0, 0], [1, 4, 0], [0, 0, 1]])
    cfg2 = InteractionConfig(weights={"view": 0, "click": 1, "add_to_cart": 3, "purchase": 5})
    inter2 = build_interactions(interaction_weights(ev.lazy(), cfg2))
    assert inter2.customers.ids == ("A", "B")
    np.testing.assert_array_equal(inter2.matrix.toarray(), [[5, 0], [0, 4]])


def test_time_decay_halves_weight_per_half_life():
    ev = events_frame([("A", "x", "purchase", 0), ("A", "y", "purchase", 10)])
    cfg = InteractionConfig(weights={"purchase": 4}, half_life_days=10)
    w = interaction_weights(ev.lazy(), cfg, as_of=T0 + timedelta(days=10)).collect().sort("item_id")
    assert w["weight"].to_list() == pytest.approx([2.0, 4.0])
    with pytest.raises(ValueError, match="as_of is required"):
        interaction_weights(ev.lazy(), cfg)


def test_config_rejects_bad_weights_and_round_trips():
    with pytest.raises(ValueError, match="finite and >= 0"):
        InteractionConfig(weights={"view": -1})
    cfg = InteractionConfig(weights={"view": 2}, half_life_days=7)
    assert InteractionConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_given_vocabularies_project_and_drop_unknown_ids(tmp_path):
    w = pl.DataFrame({"customer_id": ["A", "B", "Z"], "item_id": ["x", "q", "x"], "weight": [1.0, 2.0, 3.0]})
    inter = build_interactions(w, customers=Vocabulary(("A", "B")), items=Vocabulary(("x", "y")))
    np.testing.assert_array_equal(inter.matrix.toarray(), [[1, 0], [0, 0]])
    inter.save(tmp_path)
    back = Interactions.load(tmp_path)
    assert back.customers == inter.customers and back.items == inter.items
    assert (back.matrix != inter.matrix).nnz == 0
    assert back.row("nobody").nnz == 0 and back.row("A").toarray().tolist() == [[1.0, 0.0]]


def test_temporal_split_partitions_without_leakage():
    ev = events_frame([("A", "x", "view", d) for d in range(30)])
    vs, ts = T0 + timedelta(days=10), T0 + timedelta(days=20)
    split = temporal_split(ev.lazy(), validation_start=vs, test_start=ts)
    train, val, test = (f.collect() for f in (split.train, split.validation, split.test))
    assert train.height + val.height + test.height == ev.height
    assert train["timestamp"].max() < vs <= val["timestamp"].min()
    assert val["timestamp"].max() < ts <= test["timestamp"].min()
    with pytest.raises(SplitError, match="after test_start"):
        temporal_split(ev.lazy(), validation_start=ts, test_start=vs)


def test_default_cutoffs_are_midnights_counted_from_the_last_day():
    ev = events_frame([("A", "x", "view", d + 0.5) for d in range(60)])
    vs, ts = default_cutoffs(ev.lazy(), validation_days=7, test_days=14)
    last_day = datetime(2026, 3, 1)  # day 59.5 → 2026-03-01 12:00
    assert ts == last_day + timedelta(days=1) - timedelta(days=14)
    assert vs == ts - timedelta(days=7)
    with pytest.raises(SplitError, match="too short"):
        default_cutoffs(ev.lazy(), validation_days=40, test_days=40)


def test_leave_last_out_holds_out_last_purchase_and_its_future():
    ev = events_frame(
        [
            ("A", "x", "purchase", 1),
            ("A", "y", "view", 2),
            ("A", "y", "purchase", 3),
            ("A", "z", "view", 4),  # after the held-out purchase: must not stay in train
            ("B", "x", "purchase", 1),  # a single purchase: B keeps it in train
        ]
    )
    train, test = (f.collect() for f in leave_last_out(ev.lazy(), n=1))
    assert test.select("customer_id", "item_id").rows() == [("A", "y")]
    assert sorted(train.select("customer_id", "item_id", "event_type").rows()) == [
        ("A", "x", "purchase"),
        ("A", "y", "view"),
        ("B", "x", "purchase"),
    ]


@settings(max_examples=30, deadline=None)
@given(
    days=st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=40),
    v=st.integers(0, 100),
    gap=st.integers(0, 50),
)
def test_temporal_split_property_every_event_in_exactly_one_period(days, v, gap):
    ev = events_frame([("A", "x", "view", d) for d in days])
    split = temporal_split(
        ev.lazy(), validation_start=T0 + timedelta(days=v), test_start=T0 + timedelta(days=v + gap)
    )
    sizes = [f.select(pl.len()).collect().item() for f in (split.train, split.validation, split.test)]
    assert sum(sizes) == len(days)


def test_the_datas_now_is_the_latest_event_with_or_without_file_statistics(tmp_path):
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import data_as_of, event_time_span

    ds = Dataset.at(tmp_path / "d").ensure()
    ds.write_table("events", events_frame([]).clear())
    with pytest.raises(ValueError, match="no events"):
        data_as_of(ds)
    latest = T0 + timedelta(days=7, hours=3, microseconds=5)
    # Two files; the latest event sits in the second, in the middle of its rows.
    first = events_frame([("A", "x", "view", 1), ("B", "y", "view", 2)])
    second = events_frame(
        [("C", "x", "view", 3), ("C", "x", "view", 7.125 + 5e-6 / 86_400), ("D", "y", "view", 5)]
    )
    assert second["timestamp"].max() == latest
    for statistics in (True, False):  # from the row groups' statistics, or (without them) from the events
        for f in ds.raw_dir.glob("events*.parquet"):
            f.unlink()
        first.write_parquet(ds.raw_dir / "events-00000.parquet", statistics=statistics)
        second.write_parquet(ds.raw_dir / "events-00001.parquet", statistics=statistics, row_group_size=1)
        assert data_as_of(ds) == latest
        # The span the statistics show decides whether the build must filter events by retention at all.
        assert event_time_span(ds) == ((T0 + timedelta(days=1), latest) if statistics else None)
