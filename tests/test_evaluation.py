"""Temporal evaluation: a hand-computed case, metric names, segments, and planted worlds where the winner is known."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from nextbest.features.interactions import Interactions
from nextbest.features.schema import Vocabulary
from nextbest.training.evaluation import (
    EvaluationConfig,
    evaluate,
    metric_name,
    parse_metric_name,
    prepare_evaluation,
    score_metric,
)
from nextbest.training.recommenders import ALSConfig, RepeatConfig, make_recommender

T = datetime(2026, 3, 1)


def purchases(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "customer_id": [c for c, _ in pairs],
            "item_id": [i for _, i in pairs],
            "event_type": ["purchase"] * len(pairs),
            "timestamp": [T] * len(pairs),
        }
    )


def tiny_train() -> Interactions:
    # c0 bought items 0 and 1, c1 item 0, c2 item 2; item 3 nobody.
    m = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    return Interactions(m, Vocabulary(("c0", "c1", "c2")), Vocabulary(("i0", "i1", "i2", "i3")))


def test_hand_computed_popularity_evaluation():
    train = tiny_train()
    period = purchases([("c0", "i0"), ("c0", "i3"), ("c1", "i1"), ("c2", "i2"), ("c9", "i0"), ("c0", "iX")])
    profiles = pl.DataFrame({"customer_id": ["c0", "c1", "c2"], "region": ["north", "north", "south"]})
    task = prepare_evaluation(train, period, profiles=profiles, config=EvaluationConfig(ks=[2]))
    assert task.counts == {
        "customers": 3,
        "customers_with_new_items": 2,  # c2 only re-bought item 2
        "period_customers": 4,
        "period_purchases": 6,
        "purchases_dropped_unknown_customer": 1,  # c9
        "purchases_dropped_unknown_item": 1,  # iX
    }
    model = make_recommender("popularity").fit(train.matrix)  # order: i0 (2 customers), i1, i2, i3
    result = evaluate(model, task, ks=[2])
    m = result.metrics
    # Everyone gets [i0, i1]. c0 relevant {i0, i3}: hits 1 0; c1 {i1}: 0 1; c2 {i2}: 0 0
    assert m["precision_at_2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["recall_at_2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["hit_rate_at_2"] == pytest.approx(2 / 3)
    assert m["ndcg_at_2"] == pytest.approx((1 / (1 + 1 / math.log2(3)) + (1 / math.log2(3)) + 0) / 3)
    assert m["coverage_at_2"] == pytest.approx(2 / 4)
    # Discovery lists leave out what was bought: c0 → [i2, i3], c1 → [i1, i2], c2 → [i0, i1].
    # New relevant items: c0 {i3}, c1 {i1}; c2 has none and is not averaged.
    assert m["new_precision_at_2"] == pytest.approx(0.5)
    assert m["new_hit_rate_at_2"] == pytest.approx(1.0)
    assert m["new_ndcg_at_2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert m["new_coverage_at_2"] == pytest.approx(1.0)
    # popularity percentiles of [2, 1, 1, 0]: i0 0.75, i1 and i2 (1 + 0.5)/4, i3 0
    assert m["popularity_bias_at_2"] == pytest.approx((0.75 + 0.375) / 2)
    seg = result.by_segment.filter(pl.col("metric") == "precision_at_2")
    rows = {
        (r["segment"], r["segment_value"]): (r["customers"], r["value"]) for r in seg.iter_rows(named=True)
    }
    assert rows[("region", "north")] == (2, pytest.approx(0.5))
    assert rows[("region", "south")] == (1, pytest.approx(0.0))
    assert rows[("all", "all")] == (3, pytest.approx(1 / 3))
    new = result.by_segment.filter(
        (pl.col("metric") == "new_precision_at_2") & (pl.col("segment") == "region")
    )
    assert dict(zip(new["segment_value"], new["customers"], strict=True)) == {"north": 2, "south": 0}
    assert score_metric(model, task, "new_ndcg_at_2") == pytest.approx(m["new_ndcg_at_2"])


def test_metric_names_are_the_published_ones():
    train = tiny_train()
    task = prepare_evaluation(train, purchases([("c0", "i3"), ("c1", "i1")]))
    result = evaluate(make_recommender("popularity").fit(train.matrix), task)
    for name in (
        "precision_at_10",
        "recall_at_20",
        "ndcg_at_10",
        "map_at_10",
        "hit_rate_at_5",
        "new_ndcg_at_10",
        "new_recall_at_20",
        "coverage_at_10",
        "popularity_bias_at_10",
        "arp_at_10",
    ):
        assert name in result.metrics, name
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values())
    assert set(result.by_segment.columns) == {"segment", "segment_value", "customers", "metric", "value"}
    assert parse_metric_name("new_hit_rate_at_5") == ("hit_rate", 5, True)
    assert metric_name("map", 20, new=True) == "new_map_at_20"
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric_name("auc")


def planted(kind: str, rng: np.random.Generator) -> tuple[Interactions, pl.DataFrame]:
    """Two worlds whose winner is known.

    ``repeat``: every customer keeps buying their own 3 favourites (counts 2-5) and buys them again in the test
    period; popularity is flat. ``copurchase``: 4 groups of 10 items; a customer buys 5 items of their group in
    training and 2 *other* items of the same group in the test period.
    """
    n_users, n_items = 80, 40
    rows, cols, vals, test = [], [], [], []
    for u in range(n_users):
        if kind == "repeat":
            fav = rng.choice(n_items, 3, replace=False)
            for i in fav:
                rows.append(u), cols.append(i), vals.append(float(rng.integers(2, 6)))
            test += [(u, int(i)) for i in rng.choice(fav, 2, replace=False)]
        else:
            group = np.arange(10) + 10 * (u % 4)
            chosen = rng.permutation(group)
            for i in chosen[:5]:
                rows.append(u), cols.append(i), vals.append(1.0)
            test += [(u, int(i)) for i in chosen[5:7]]
    m = sp.csr_matrix((vals, (rows, cols)), shape=(n_users, n_items), dtype=np.float32)
    customers = Vocabulary(tuple(f"c{u:03d}" for u in range(n_users)))
    items = Vocabulary(tuple(f"i{i:03d}" for i in range(n_items)))
    period = purchases([(customers.ids[u], items.ids[i]) for u, i in test])
    return Interactions(m, customers, items), period


def test_repeat_beats_popularity_in_a_repeat_world(rng):
    train, period = planted("repeat", rng)
    task = prepare_evaluation(train, period)
    repeat = evaluate(make_recommender("repeat", RepeatConfig(recency_mix=0)).fit(train.matrix), task)
    popular = evaluate(make_recommender("popularity").fit(train.matrix), task)
    assert repeat.metrics["hit_rate_at_5"] == 1.0  # the favourites are always in the top 3
    assert repeat.metrics["ndcg_at_10"] > 0.8
    assert repeat.metrics["ndcg_at_10"] > 3 * popular.metrics["ndcg_at_10"]


def test_als_beats_popularity_on_discovery_in_a_copurchase_world(rng):
    train, period = planted("copurchase", rng)
    task = prepare_evaluation(train, period)
    assert task.counts["customers_with_new_items"] == 80
    als = make_recommender("als", ALSConfig(factors=4, regularization=0.05, iterations=15), seed=1)
    als_result = evaluate(als.fit(train.matrix), task)
    popular = evaluate(make_recommender("popularity").fit(train.matrix), task)
    itemknn = evaluate(make_recommender("itemknn").fit(train.matrix), task)
    # 2 of the 5 remaining group items are relevant; popularity cannot tell groups apart
    assert als_result.metrics["new_ndcg_at_10"] > 0.5
    assert als_result.metrics["new_ndcg_at_10"] > 2 * popular.metrics["new_ndcg_at_10"]
    assert itemknn.metrics["new_ndcg_at_10"] > 2 * popular.metrics["new_ndcg_at_10"]
    # ALS recommends within the group: the discovery top 5 is the 5 unbought group items
    assert als_result.metrics["new_recall_at_5"] == pytest.approx(1.0)


def test_sampling_and_batches_do_not_change_the_answer(rng):
    train, period = planted("copurchase", rng)
    model = make_recommender("itemknn").fit(train.matrix)
    full = evaluate(model, prepare_evaluation(train, period), batch_size=7)
    again = evaluate(model, prepare_evaluation(train, period), batch_size=1000)
    assert full.metrics == again.metrics
    sample = prepare_evaluation(train, period, config=EvaluationConfig(max_customers=20, seed=3))
    assert len(sample.users) == 20 and sample.relevant.shape == (20, 40)
