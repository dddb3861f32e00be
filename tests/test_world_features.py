"""The feature pipeline on a generated world recovers the planted truth."""

from __future__ import annotations

import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.identity import resolve_identities
from nextbest.features.pipeline import FeatureConfig, build_features


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("world") / "w")
    generate_world(WorldConfig(customers=1200, days=150, seed=11), ds)
    build_features(ds, FeatureConfig())
    return ds


def test_preferred_colour_sport_brand_match_the_truth_for_regular_buyers(world):
    profiles = pl.read_parquet(world.features_dir / "profiles.parquet")
    truth = pl.read_parquet(world.truth_dir / "preferences.parquet")
    events = resolve_identities(world.scan("events"), world.scan("identities"))
    purchases = (
        events.filter(pl.col("event_type") == "purchase").group_by("customer_id").len("purchases").collect()
    )
    joined = profiles.join(truth, on="customer_id").join(purchases, on="customer_id")
    regular = joined.filter(pl.col("purchases") >= 5)
    assert regular.height >= 300
    for attribute in ("colour", "sport", "brand"):
        accuracy = (regular[f"preferred_{attribute}"] == regular[attribute]).mean()
        assert accuracy >= 0.90, f"preferred_{attribute} matches the truth for only {accuracy:.1%}"


def test_identity_resolution_matches_the_truth(world):
    truth = pl.read_parquet(world.truth_dir / "identities.parquet")
    events = world.scan("events").with_row_index("n")
    resolved = resolve_identities(events, world.scan("identities")).collect()
    cookies = events.filter(pl.col("source_system") == "web").collect()
    got = cookies.select("n", pl.col("customer_id").alias("source_id")).join(
        resolved.select("n", pl.col("customer_id").alias("resolved")), on="n"
    )
    got = got.join(truth.filter(pl.col("source_system") == "web"), on="source_id", how="left")
    linked = got.filter(pl.col("linked"))
    assert linked.height > 0 and (linked["resolved"] == linked["customer_id"]).all()
    unlinked = got.filter(~pl.col("linked").fill_null(False))
    assert unlinked.height > 0 and unlinked["resolved"].str.starts_with("web:").all()


def test_manifest_describes_inputs_counts_config_and_splits(world):
    manifest = world.read_manifest()
    rc = manifest["row_counts"]
    assert rc["raw_events"] == world.scan("events").select(pl.len()).collect().item()
    assert rc["personalisation_events"] < rc["retained_events"]  # some customers decline
    assert rc["profiles"] < rc["customers_retained"]
    assert {i["path"] for i in manifest["inputs"]} >= {"raw/events-00000.parquet", "raw/items.parquet"}
    assert FeatureConfig.model_validate(manifest["config"]) == FeatureConfig()
    assert manifest["splits"]["validation_start"] < manifest["splits"]["test_start"]
    assert manifest["code_version"]
