"""The split of ``training/propensity_data.py``: old import paths keep working, and the catalogue's reference
prices can be computed once and passed to the activity features (same values as computing them per call)."""

from __future__ import annotations

import importlib
from datetime import datetime, timedelta

import polars as pl
import pytest

import nextbest.training.propensity_data as propensity_data
from nextbest.training.activity import activity_asof, customer_activity, item_reference_prices

T0 = datetime(2026, 1, 1)

MOVED = {
    "nextbest.training.propensity_targets": [
        "PropensityData",
        "build_training_table",
        "derived_action_log",
        "split_table",
        "time_cutoffs",
        "period_cutoffs",
        "profile_snapshots",
        "join_profiles_asof",
    ],
    "nextbest.training.activity": [
        "customer_activity",
        "activity_asof",
        "activity_channels",
        "price_reference_columns",
        "reference_prices",
        "item_reference_prices",
        "CHANNEL_SHARE_PREFIX",
    ],
    "nextbest.training.affinity": [
        "AFFINITY",
        "ActionAffinity",
        "action_target_items",
        "affinity_asof",
        "build_action_affinity",
        "champion_affinity_config",
        "registered_recommender",
    ],
    "nextbest.training.encoder": ["FeatureEncoder", "EncoderState", "EncodedRows", "FeatureSpec"],
    "nextbest.training.propensity_config": [
        "PropensityDataConfig",
        "PropensityDataError",
        "SNAPSHOT_AT",
        "P_TRUE",
    ],
    "nextbest.training.campaign_inputs": ["CAMPAIGN_COLUMNS", "action_targets", "campaign_inputs_asof"],
}


@pytest.mark.parametrize("module", sorted(MOVED))
def test_moved_names_are_the_same_objects_under_the_old_module(module):
    new = importlib.import_module(module)
    for name in MOVED[module]:
        assert getattr(propensity_data, name) is getattr(new, name), name
        assert name in propensity_data.__all__, name


def test_every_name_in_all_exists():
    for name in propensity_data.__all__:
        assert hasattr(propensity_data, name), name


@pytest.fixture
def shop():
    """Two categories: x items cost 10/20/30 (reference 20), y items 100/300 (reference 200)."""
    items = pl.DataFrame(
        {
            "item_id": [f"I{k}" for k in range(10)],
            "category": ["x"] * 5 + ["y"] * 5,
            "colour": ["red", "blue"] * 5,
            "price": [10.0, 20.0, 30.0, 20.0, 20.0, 100.0, 300.0, 200.0, 200.0, 200.0],
        }
    )
    d = lambda hours: T0 + timedelta(hours=hours)  # noqa: E731
    events = pl.DataFrame(
        {
            "customer_id": ["C1", "C1", "C1", "C2"],
            "item_id": ["I2", "I5", "I0", "I6"],
            "event_type": ["purchase"] * 4,
            "timestamp": [d(1), d(2), d(3), d(4)],
            "session_id": ["S1", "S1", "S2", "S3"],
            "channel": ["web", "web", "app", "store"],
            "quantity": [1, 2, 1, 1],
            "price": [None, None, None, 330.0],
        },
        schema_overrides={"timestamp": pl.Datetime("us"), "quantity": pl.Int32},
    )
    return events, items


def test_precomputed_reference_prices_give_the_same_activity(shop):
    events, items = shop
    reference = item_reference_prices(items)
    assert reference.filter(pl.col("item_id") == "I6")["__reference"].item() == pytest.approx(200.0)
    channels = ["web", "app", "store"]
    at = T0 + timedelta(days=1)
    fresh = customer_activity(events, items.lazy(), as_of=at, channels=channels)
    once = customer_activity(events, items.lazy(), as_of=at, channels=channels, reference=reference)
    assert once.equals(fresh)
    c1 = once.row(0, named=True)
    # I2 at 30 (reference 20): 1.5; I5 at 100 (reference 200): 0.5; I0 at 10: 0.5 → mean 2.5 / 3.
    assert c1["relative_price"] == pytest.approx(2.5 / 3)
    assert c1["spend_before"] == pytest.approx(30.0 + 200.0 + 10.0)
    keys = pl.DataFrame({"customer_id": ["C1", "C2"], "timestamp": [at, at]})
    assert activity_asof(keys, events, items.lazy(), channels=channels, reference=reference).equals(
        activity_asof(keys, events, items.lazy(), channels=channels)
    )


def test_reference_prices_of_a_catalogue_without_prices_are_empty(shop):
    events, items = shop
    reference = item_reference_prices(items.drop("price"))
    assert reference.is_empty() and reference.columns == ["item_id", "__item_price", "__reference"]
    at = T0 + timedelta(days=1)
    without = customer_activity(events, items.drop("price").lazy(), as_of=at, channels=["web"])
    assert customer_activity(
        events, items.drop("price").lazy(), as_of=at, channels=["web"], reference=reference
    ).equals(without)
    assert item_reference_prices(None).is_empty()


def test_no_process_global_reference_cache():
    import nextbest.training.activity as activity

    assert not [
        n
        for n in vars(activity)
        if n.isupper() and isinstance(getattr(activity, n), dict) and n != "REFERENCE_SCHEMA"
    ]


def test_a_run_config_file_carries_training_table_settings_and_flags_win():
    from pydantic import ValidationError

    from nextbest.training.propensity_config import PropensityDataConfig
    from nextbest.training.propensity_tuning import split_run_config

    model, data = split_run_config(
        {"epochs": 3, "data": {"campaign_inputs": True, "test_fraction": 0.2, "response_days": 9}},
        PropensityDataConfig(test_fraction=0.3),
    )
    assert model.epochs == 3
    assert (data.campaign_inputs, data.test_fraction, data.response_days) == (True, 0.3, 9)
    assert data.validation_fraction == PropensityDataConfig().validation_fraction
    model, data = split_run_config(None, None)
    assert data == PropensityDataConfig() and not data.campaign_inputs
    with pytest.raises(ValidationError, match="campaign_input"):
        split_run_config({"data": {"campaign_input": True}})
