"""Campaign inputs: target items from an explicit table, point-in-time spend and response history (planted)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from nextbest.features.completejourney import cj_action_catalog, cj_action_targets, cj_actions
from nextbest.features.dataset import Dataset
from nextbest.features.importers import EventImportConfig, import_events
from nextbest.features.schema import TIMESTAMP, validate
from nextbest.training.affinity import action_target_items
from nextbest.training.campaign_inputs import (
    CAMPAIGN_COLUMNS,
    EARLIER_EXPOSURES,
    EARLIER_KIND_EXPOSURES,
    EARLIER_KIND_RESPONSES,
    EARLIER_RESPONSES,
    TARGET_GROUP_SPEND,
    TARGET_PURCHASES,
    TARGET_SPEND,
    action_targets,
    campaign_inputs_asof,
    campaign_inputs_for,
)
from nextbest.training.encoder import FeatureEncoder
from nextbest.training.propensity_config import PropensityDataError

T0 = datetime(2017, 3, 1)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def tiny_world() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(items, catalog, targets, events, action log) with hand-countable answers.

    Campaign ``c1`` (Type A, days 10–20) covers items ``p1`` and ``p2`` (dairy); ``c2`` (Type B, days 30–40)
    covers ``p3`` (bakery). Household ``h1`` buys p1 for 2 × 3.0 on day 5, p2 for 4.0 on day 9, p3 (not a c1
    target, bakery) for 7.0 on day 8, another dairy item p4 for 1.5 on day 2, and p1 again for 100 on day 11
    (after its c1 exposure on day 10: must not count).
    """
    items = pl.DataFrame(
        {
            "item_id": ["p1", "p2", "p3", "p4", "p5"],
            "department": ["dairy", "dairy", "bakery", "dairy", "garden"],
            "brand": ["National", "Private", "National", "National", "National"],
            "price": [3.0, 4.0, 7.0, 1.5, 9.0],
        }
    )
    catalog = pl.DataFrame(
        {
            "action_id": ["c1", "c2", "c3"],
            "kind": ["Type A", "Type B", "Type A"],
            "value": [None, None, None],
            "start_date": [day(10).date(), day(30).date(), day(50).date()],
            "end_date": [day(20).date(), day(40).date(), day(60).date()],
            # Attributes shared with items: explicit targets must win over them.
            "department": ["dairy", "bakery", "garden"],
        },
        schema_overrides={"value": pl.Float64},
    )
    targets = pl.DataFrame({"action_id": ["c1", "c1", "c2"], "item_id": ["p1", "p2", "p3"]})
    events = pl.DataFrame(
        {
            "customer_id": ["h1", "h1", "h1", "h1", "h1", "h2"],
            "item_id": ["p1", "p2", "p3", "p4", "p1", "p1"],
            "event_type": ["purchase"] * 6,
            "timestamp": [day(5), day(9), day(8), day(2), day(11), day(3)],
            "quantity": [2, 1, 1, 1, 1, 1],
            "price": [3.0, None, 7.0, 1.5, 100.0, 3.0],
        },
        schema_overrides={"timestamp": TIMESTAMP, "quantity": pl.Int32},
    )
    log = pl.DataFrame(
        {
            "customer_id": ["h1", "h1", "h1", "h2"],
            "action_id": ["c1", "c2", "c3", "c1"],
            "timestamp": [day(10), day(30), day(50), day(10)],
            "responded": [True, False, False, True],
            # h1 redeemed c1 on day 15 (known from day 16); h2 redeemed c1 on day 45.
            "responded_at": [day(16), None, None, day(45)],
        },
        schema_overrides={"timestamp": TIMESTAMP, "responded_at": TIMESTAMP},
    )
    return items, catalog, targets, events, log


def rows_of(log: pl.DataFrame) -> pl.DataFrame:
    return log.select("customer_id", "action_id", "timestamp")


def test_explicit_targets_win_over_catalogue_attributes():
    items, catalog, targets, *_ = tiny_world()
    by_action = action_target_items(catalog, items, targets)
    assert by_action == {"c1": ["p1", "p2"], "c2": ["p3"], "c3": ["p5"]}  # c3: by its department
    assert action_target_items(catalog, items)["c1"] == ["p1", "p2", "p4"]  # attributes alone: all dairy


def test_spend_on_target_items_counts_only_purchases_before_the_exposure():
    items, catalog, targets, events, log = tiny_world()
    prepared = action_targets(catalog, items, targets)
    out = campaign_inputs_asof(rows_of(log), events, log, prepared)
    assert out.columns == list(CAMPAIGN_COLUMNS)
    h1_c1 = out.row(0, named=True)
    # 2 × 3.0 (day 5) + 1 × 4.0 (day 9, priced from the items table); the day-11 purchase of 100 is later.
    assert h1_c1[TARGET_SPEND] == pytest.approx(10.0)
    assert h1_c1[TARGET_PURCHASES] == 2.0
    # Dairy: p1, p2 and p4 (1.5 on day 2) — the bakery purchase p3 is not in c1's departments.
    assert h1_c1[TARGET_GROUP_SPEND] == pytest.approx(11.5)
    h1_c2 = out.row(1, named=True)
    assert h1_c2[TARGET_SPEND] == pytest.approx(7.0)  # p3 on day 8
    assert h1_c2[TARGET_GROUP_SPEND] == pytest.approx(7.0)
    h2_c1 = out.row(3, named=True)
    assert h2_c1[TARGET_SPEND] == pytest.approx(3.0)


def test_earlier_responses_count_only_once_known():
    items, catalog, targets, events, log = tiny_world()
    out = campaign_inputs_asof(rows_of(log), events, log, action_targets(catalog, items, targets))
    first, second, third, other = out.rows(named=True)
    # The first exposure has no history, and its own response never counts for itself.
    assert (first[EARLIER_EXPOSURES], first[EARLIER_RESPONSES]) == (0.0, 0.0)
    # Day 30: c1 (day 10) was exposed and its redemption known from day 16.
    assert (second[EARLIER_EXPOSURES], second[EARLIER_RESPONSES]) == (1.0, 1.0)
    assert (second[EARLIER_KIND_EXPOSURES], second[EARLIER_KIND_RESPONSES]) == (0.0, 0.0)  # c2 is Type B
    # Day 50 (c3, Type A): two earlier exposures, one response, both of them / it of Type A.
    assert (third[EARLIER_EXPOSURES], third[EARLIER_RESPONSES]) == (2.0, 1.0)
    assert (third[EARLIER_KIND_EXPOSURES], third[EARLIER_KIND_RESPONSES]) == (1.0, 1.0)
    assert other[EARLIER_EXPOSURES] == 0.0


def test_a_response_without_a_date_is_known_at_the_end_of_its_campaign():
    items, catalog, targets, events, log = tiny_world()
    undated = log.drop("responded_at")
    later = pl.DataFrame(
        {"customer_id": ["h1", "h1"], "action_id": ["c2", "c2"], "timestamp": [day(20.5), day(21.5)]},
        schema_overrides={"timestamp": TIMESTAMP},
    )
    out = campaign_inputs_asof(later, events, undated, action_targets(catalog, items, targets))
    # c1 ends on day 20: its response is known from day 21 on, not at day 20.5.
    assert out[EARLIER_RESPONSES].to_list() == [0.0, 1.0]
    no_end = action_targets(catalog.drop("end_date"), items, targets)
    out = campaign_inputs_asof(later, events, undated, no_end, response_days=11)
    assert out[EARLIER_RESPONSES].to_list() == [0.0, 1.0]  # day 10 + 11 = day 21


def test_the_online_path_is_the_frame_path_on_one_customer():
    items, catalog, targets, events, log = tiny_world()
    prepared = action_targets(catalog, items, targets)
    at = day(30)
    online = campaign_inputs_for("h1", ["c1", "c2", "c3"], at, events, log, prepared)
    rows = pl.DataFrame(
        {"customer_id": ["h1"] * 3, "action_id": ["c1", "c2", "c3"], "timestamp": [at] * 3},
        schema_overrides={"timestamp": TIMESTAMP},
    )
    offline = campaign_inputs_asof(rows, events, log, prepared)
    for c in CAMPAIGN_COLUMNS:
        assert list(online[c].values()) == offline[c].to_list(), c
    assert online[TARGET_SPEND]["c1"] == pytest.approx(110.0)  # the day-11 purchase is before day 30


def test_the_encoder_reads_campaign_inputs_as_pair_inputs_online_and_offline():
    catalog = tiny_world()[1]
    rng = np.random.default_rng(0)
    n = 40
    table = pl.DataFrame(
        {
            "exposure_id": [f"e{i}" for i in range(n)],
            "customer_id": [f"h{i % 4}" for i in range(n)],
            "action_id": rng.choice(["c1", "c2", "c3"], n).tolist(),
            "channel": ["mail"] * n,
            "timestamp": [day(10 + i) for i in range(n)],
            "responded": (np.arange(n) % 3 == 0).tolist(),
            "frequency": rng.integers(0, 9, n).astype(float).tolist(),
            TARGET_SPEND: rng.gamma(2.0, 20.0, n).tolist(),
        },
        schema_overrides={"timestamp": TIMESTAMP},
    )
    encoder = FeatureEncoder.fit(table, catalog, ["frequency"], min_count=1)
    assert encoder.spec.pair_numeric == [TARGET_SPEND]
    row = table.row(3, named=True)
    offline = encoder.encode_frame(table[3])
    online = encoder.encode_one(
        {"frequency": row["frequency"]},
        [row["action_id"]],
        "mail",
        row["timestamp"],
        pair_values={TARGET_SPEND: {row["action_id"]: row[TARGET_SPEND]}},
    )
    np.testing.assert_array_equal(online.categorical, offline.categorical)
    np.testing.assert_allclose(online.numeric, offline.numeric, rtol=1e-6)


def test_an_unknown_group_attribute_is_named():
    items, catalog, targets, *_ = tiny_world()
    with pytest.raises(PropensityDataError, match="'aisle' is not a column of the items table"):
        action_targets(catalog, items, targets, group_attribute="aisle")


# --- importers ----------------------------------------------------------------------------------------------


def test_complete_journey_campaigns_record_their_products_departments_and_response_day():
    descriptions = pl.DataFrame(
        {
            "campaign_id": [1, 2],
            "campaign_type": ["Type A", "Type B"],
            "start_date": [datetime(2017, 3, 1), datetime(2017, 4, 1)],
            "end_date": [datetime(2017, 4, 1), datetime(2017, 5, 1)],
        }
    )
    coupons = pl.DataFrame(
        {"coupon_upc": [11, 11, 12, 13], "product_id": [100, 101, 100, 102], "campaign_id": [1, 1, 1, 2]}
    )
    products = pl.DataFrame(
        {
            "product_id": [100, 101, 102],
            "department": ["GROCERY", "GROCERY", "DELI"],
            "brand": ["Private", "National", "National"],
        }
    )
    catalog = cj_action_catalog(descriptions, coupons, products)
    assert catalog.select("action_id", "duration_days", "department", "brand", "n_departments").rows() == [
        ("campaign_1", 31, "GROCERY", "National", 1),  # brand tie: alphabetically first
        ("campaign_2", 30, "DELI", "National", 1),
    ]
    targets = cj_action_targets(coupons)
    assert targets.rows() == [("campaign_1", "100"), ("campaign_1", "101"), ("campaign_2", "102")]
    assert validate(targets, "action_targets", source="coupons.parquet").rows_quarantined == 0
    campaigns = pl.DataFrame({"campaign_id": [1, 1], "household_id": [7, 8]})
    redemptions = pl.DataFrame(
        {
            "household_id": [8, 8],
            "coupon_upc": [11, 12],
            "campaign_id": [1, 1],
            "redemption_date": [datetime(2017, 3, 9), datetime(2017, 3, 5)],
        }
    )
    actions = cj_actions(campaigns, descriptions, redemptions)
    assert actions["responded_at"].to_list() == [None, datetime(2017, 3, 6)]  # the day after the first one


def test_own_export_import_accepts_a_target_items_table(tmp_path):
    (tmp_path / "events.csv").write_text("user,sku,ts,kind\nu1,s1,2024-01-01T10:00:00,purchase\n")
    (tmp_path / "targets.csv").write_text("campaign,sku\nspring,s1\nspring,s2\nspring,s1\n")
    config = EventImportConfig(
        mapping={"customer_id": "user", "item_id": "sku", "timestamp": "ts", "event_type": "kind"},
        action_targets_mapping={"action_id": "campaign", "item_id": "sku"},
    )
    ds = Dataset.at(tmp_path / "ds")
    summary = import_events([tmp_path / "events.csv"], ds, config, action_targets=tmp_path / "targets.csv")
    counts = summary["tables"]["action_targets"]
    assert (counts["rows_in"], counts["rows_accepted"], counts["rows_quarantined"]) == (3, 2, 1)
    assert ds.read("action_targets").select("action_id", "item_id").rows() == [
        ("spring", "s1"),
        ("spring", "s2"),
    ]


def test_own_export_targets_without_an_action_id_are_refused(tmp_path):
    from nextbest.features.importers import ImportMappingError

    (tmp_path / "events.csv").write_text("user,sku,ts,kind\nu1,s1,2024-01-01T10:00:00,purchase\n")
    (tmp_path / "targets.csv").write_text("campaign,sku\nspring,s1\n")
    config = EventImportConfig(
        mapping={"customer_id": "user", "item_id": "sku", "timestamp": "ts", "event_type": "kind"},
        action_targets_mapping={"item_id": "sku"},
    )
    with pytest.raises(ImportMappingError, match=r"targets\.csv: no 'action_id' column"):
        import_events(
            [tmp_path / "events.csv"],
            Dataset.at(tmp_path / "ds"),
            config,
            action_targets=tmp_path / "targets.csv",
        )
