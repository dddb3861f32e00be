"""Profiles on the hand-built fixture: preferences, RFM, journey phase, segments, churn; online equals offline."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest

from nextbest.features.identity import resolve_identities
from nextbest.features.profiles import ProfileConfig, build_profiles, journey_phase
from tests.conftest import T0

AS_OF = T0 + timedelta(days=60)


@pytest.fixture
def profiles(tiny_dataset):
    ds = tiny_dataset
    events = resolve_identities(ds.scan("events"), ds.scan("identities"))
    return build_profiles(events, ds.scan("items"), ds.scan("customers"), as_of=AS_OF).collect()


def _row(profiles: pl.DataFrame, cid: str) -> dict:
    return profiles.filter(pl.col("customer_id") == cid).to_dicts()[0]


def test_preferred_attributes_are_the_heaviest_weighted_values(profiles):
    c1 = _row(profiles, "C1")  # I1 (red, running) 1+1+5 = 7; I2 (blue, running) 1+1 = 2
    assert c1["preferred_colour"] == "red"
    assert c1["preferred_colour_share"] == pytest.approx(7 / 9)
    assert c1["preferred_sport"] == "running" and c1["preferred_sport_share"] == pytest.approx(1.0)
    c2 = _row(profiles, "C2")  # blue 5, red 5, green 3: the tie goes to the alphabetically first value
    assert c2["preferred_colour"] == "blue" and c2["preferred_colour_share"] == pytest.approx(5 / 13)
    assert c2["preferred_sport"] == "cycling" and c2["preferred_sport_share"] == pytest.approx(8 / 13)


def test_rfm_and_churn(profiles):
    c1, c2 = _row(profiles, "C1"), _row(profiles, "C2")
    assert c1["recency_days"] == pytest.approx(57) and c1["frequency"] == 1 and c1["monetary"] == 10
    assert c1["usual_interval_days"] is None and c1["churn_risk"] is None and c1["churn_risk_flag"] is False
    assert c2["frequency"] == 2 and c2["monetary"] == 20 and c2["usual_interval_days"] == pytest.approx(1)
    assert c2["churn_risk"] == pytest.approx(54) and c2["churn_risk_flag"] is True
    c3 = _row(profiles, "C3")
    assert c3["frequency"] == 0 and c3["recency_days"] is None and c3["monetary"] == 0


def test_phases_and_segments(profiles):
    c1, c2, c3 = (_row(profiles, c) for c in ("C1", "C2", "C3"))
    assert (c1["journey_phase"], c2["journey_phase"], c3["journey_phase"]) == ("need", "purchase", "need")
    assert (c1["age_band"], c2["age_band"], c3["age_band"]) == ("18-24", "35-44", "65+")
    assert (c1["region"], c3["region"]) == ("north", "unknown")
    assert (c1["lifecycle"], c2["lifecycle"], c3["lifecycle"]) == ("active", "active", "prospect")
    assert (c1["value_tier"], c2["value_tier"], c3["value_tier"]) == ("low", "high", "none")


def test_journey_phase_rules_one_row_each():
    rows = pl.DataFrame(
        {
            "open_cart": [True, False, False, False, False, False, False],
            "recent_items_viewed": [0, 0, 5, 1, 0, 0, 0],
            "recency_days": [50.0, 1.0, 50.0, None, 10.0, 90.0, None],
            "last_purchase": [T0, T0, T0, None, T0, T0, None],
        }
    )
    phases = rows.select(journey_phase(ProfileConfig()))["literal"].to_list()
    assert phases == ["purchase", "purchase", "orientation", "need", "use", "evaluation", "need"]


def test_online_profile_of_one_customer_equals_the_offline_row(tiny_dataset, profiles):
    ds = tiny_dataset
    thresholds = (10.0, 10.0)
    events = resolve_identities(ds.scan("events"), ds.scan("identities"))
    one = build_profiles(
        events.filter(pl.col("customer_id") == "C2"),
        ds.scan("items"),
        ds.scan("customers"),
        as_of=AS_OF,
        value_thresholds=thresholds,
    ).collect()
    assert one.height == 1
    assert one.to_dicts()[0] == _row(profiles, "C2")


def test_monetary_counts_a_purchase_without_a_price_at_its_items_price():
    from nextbest.features.profiles import (
        customer_summary,
        purchase_summary,
        recent_summary,
        summarise_events,
    )

    t = [T0 + timedelta(days=d) for d in (1, 2, 3)]
    events = pl.DataFrame(
        {
            "customer_id": ["A", "A", "A", "B"],
            "item_id": ["I1", "I2", "I2", "I3"],
            "event_type": ["purchase"] * 4,
            "timestamp": [t[0], t[1], t[2], t[0]],
            "session_id": ["s1", "s2", "s3", "s4"],
            "quantity": [2, 1, 3, None],
            # A paid 2 × 10 for I1; I2 was bought twice without a price (catalogue price 4.5); B's I3 has none
            # at all, so it adds nothing.
            "price": [10.0, None, None, None],
        }
    ).lazy()
    items = pl.DataFrame({"item_id": ["I1", "I2", "I3"], "price": [99.0, 4.5, None]}).lazy()
    config = ProfileConfig()
    summarised = summarise_events(events, as_of=AS_OF, config=config)
    with_rows = summarised.with_rows(events)
    recent = recent_summary(with_rows, as_of=AS_OF, config=config, by="__row")

    def monetary(items: pl.LazyFrame) -> dict:
        purchases = purchase_summary(with_rows, items, config=config, by="__row")
        summary = customer_summary(summarised.activity.lazy(), purchases, recent, as_of=AS_OF)
        return dict(summary.collect().select("customer_id", "monetary").iter_rows())

    assert monetary(items) == {"A": pytest.approx(2 * 10 + (1 + 3) * 4.5), "B": 0.0}
    # Without a price column in the items table, unpriced purchases add nothing.
    assert monetary(items.select("item_id")) == {"A": 20.0, "B": 0.0}


def test_orders_are_purchase_sessions_or_purchase_days_without_one():
    from nextbest.features.profiles import purchase_summary

    day = [T0 + timedelta(days=d, hours=h) for d, h in ((1, 9), (1, 17), (2, 9), (2, 10), (3, 9))]
    events = pl.DataFrame(
        {
            "customer_id": ["A", "A", "A", "A", "A", "B"],
            "item_id": ["I1", "I2", "I3", "I1", "I2", "I1"],
            "event_type": ["purchase", "purchase", "purchase", "purchase", "view", "purchase"],
            "timestamp": [day[0], day[1], day[2], day[3], day[4], day[0]],
            # Day 1: two purchases without a session are one order; day 2: one session, and the same session
            # again, one order; a view is no order.
            "session_id": [None, None, "s9", "s9", "s10", "s1"],
        }
    ).lazy()
    items = pl.LazyFrame(schema={"item_id": pl.String})
    summary = purchase_summary(events, items, config=ProfileConfig()).collect()
    orders = dict(summary.select("customer_id", "frequency").iter_rows())
    assert orders == {"A": 2, "B": 1}


def test_recent_window_counts_distinct_browsed_items_and_the_latest_cart():
    from nextbest.features.profiles import recent_summary

    as_of = T0 + timedelta(days=30)
    at = [as_of - timedelta(days=d) for d in (1, 2, 3, 8, 2)]
    events = pl.DataFrame(
        {
            "customer_id": ["A", "A", "A", "A", "B"],
            # I1 viewed twice and clicked once in the window counts once; I3 was viewed before it (8 days ago).
            "item_id": ["I1", "I1", "I2", "I3", "I1"],
            "event_type": ["view", "click", "add_to_cart", "view", "add_to_cart"],
            "timestamp": at,
        }
    ).lazy()
    events = pl.concat([events, events.filter(pl.col("customer_id") == "A").head(1)])
    recent = recent_summary(events, as_of=as_of, config=ProfileConfig()).collect().sort("customer_id")
    assert recent.rows() == [("A", 1, at[2]), ("B", 0, at[4])]


def test_the_age_band_is_one_table_for_a_column_and_for_one_value():
    """``age_band`` (a Polars column, offline) and ``age_band_of`` (one value, the service) band the same ages
    alike: the edges of every band, values between bands, a missing age, and values that are no age at all."""
    import math

    from nextbest.features.profiles import AGE_BANDS, age_band, age_band_of

    ages = [
        None,
        -1.0,
        0.0,
        17.0,
        17.5,
        18.0,
        24.0,
        24.9,
        25.0,
        34.0,
        44.0,
        54.0,
        64.0,
        65.0,
        200.0,
        201.0,
        math.nan,
    ]
    ages += [float(edge) for lo, hi, _ in AGE_BANDS for edge in (lo, hi)]
    column = pl.DataFrame({"age": ages}, schema={"age": pl.Float64}).select(
        age_band(pl.col("age")).replace("unknown", None).alias("band")
    )["band"]
    assert column.to_list() == [age_band_of(a) for a in ages]
    assert [age_band_of(a) for a in (17, 18, 30, 70, True, "30")] == [
        "under-18",
        "18-24",
        "25-34",
        "65+",
        None,
        None,
    ]
