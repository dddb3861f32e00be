"""The embedded world generator: determinism, the data contract, and every planted structure recoverable."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from nextbest.features.dataset import Dataset
from nextbest.features.generate import (
    ACTION_KINDS,
    CATEGORIES,
    EXPOSURE_CHANNELS,
    FOLLOW_UPS,
    WorldConfig,
    generate_world,
    planted_propensity,
)
from nextbest.features.identity import resolve_identities
from nextbest.features.privacy import consent_state
from nextbest.features.schema import CONSENT_PURPOSES, TABLE_NAMES, validate

CONFIG = WorldConfig(customers=500, chunk_customers=200, exposures_per_customer=8, seed=42)
WEIGHTS = {"view": 1.0, "click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Dataset, dict]:
    ds = Dataset.at(tmp_path_factory.mktemp("world") / "w")
    return ds, generate_world(CONFIG, ds)


def _truth(ds: Dataset, name: str) -> pl.DataFrame:
    return pl.read_parquet(ds.truth_dir / f"{name}.parquet")


def _resolved_events(ds: Dataset) -> pl.DataFrame:
    """Events with ``cid`` = the true customer (cookies mapped through the truth), anonymous visitors dropped."""
    cookies = _truth(ds, "identities").select(
        pl.col("source_id").alias("customer_id"), pl.col("customer_id").alias("owner")
    )
    return (
        ds.read("events")
        .join(cookies, on="customer_id", how="left")
        .with_columns(
            pl.when(pl.col("source_system").is_null())
            .then(pl.col("customer_id"))
            .otherwise(pl.col("owner"))
            .alias("cid")
        )
        .filter(pl.col("cid").is_not_null())
        .join(ds.read("items").drop("price"), on="item_id")
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- config -------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json_and_derives_the_catalogue_size():
    config = WorldConfig(customers=800, days=30, seed=3, start=dt.date(2025, 6, 1), p_follow=0.3)
    again = WorldConfig.model_validate_json(config.model_dump_json())
    assert again == config
    assert WorldConfig(customers=500).n_items == 300
    assert WorldConfig(customers=8000).n_items == 2000
    assert WorldConfig(customers=1_000_000).n_items == 3000
    assert WorldConfig(customers=500, items=120).n_items == 120
    with pytest.raises(ValidationError, match="customers"):
        WorldConfig(customers=10)
    with pytest.raises(ValidationError, match="days"):
        WorldConfig(days=7)
    with pytest.raises(ValidationError, match="extra"):
        WorldConfig(customer=100)


# --- determinism, chunking, summary -------------------------------------------------------------------------


def test_same_config_gives_identical_files_and_another_seed_differs(world, tmp_path):
    ds, _ = world
    again = Dataset.at(tmp_path / "again")
    generate_world(CONFIG, again, progress=True)
    assert _files(ds.root) == _files(again.root)

    other = Dataset.at(tmp_path / "other")
    generate_world(CONFIG.model_copy(update={"seed": 43}), other)
    first, second = _files(ds.root), _files(other.root)
    assert first.keys() == second.keys()
    for name in ("raw/events-00000.parquet", "raw/items.parquet", "truth/preferences.parquet"):
        assert first[name] != second[name], name


def test_regenerating_replaces_the_previous_world(tmp_path):
    ds = Dataset.at(tmp_path / "w")
    generate_world(CONFIG.model_copy(update={"chunk_customers": 100}), ds)
    assert len(ds.table_files("events")) == 5
    generate_world(CONFIG.model_copy(update={"chunk_customers": 250}), ds)
    assert [p.name for p in ds.table_files("events")] == ["events-00000.parquet", "events-00001.parquet"]
    assert ds.read("customers").height == CONFIG.customers


def test_chunks_become_numbered_parts_with_ids_unique_across_them(world):
    ds, summary = world
    assert [p.name for p in ds.table_files("events")] == [f"events-{k:05d}.parquet" for k in range(3)]
    assert [p.name for p in ds.table_files("actions")] == [f"actions-{k:05d}.parquet" for k in range(3)]
    for table in ("items", "customers", "consent", "identities", "action_catalog"):
        assert [p.name for p in ds.table_files(table)] == [f"{table}.parquet"]
    customers = ds.read("customers")
    assert customers.height == CONFIG.customers
    assert customers["customer_id"].n_unique() == CONFIG.customers
    assert customers["customer_id"].to_list()[:2] == ["C0000001", "C0000002"]
    assert ds.read("actions")["exposure_id"].n_unique() == summary["tables"]["actions"]["rows"]
    # A session id belongs to one actor and one channel, even across parts.
    per_session = (
        ds.read("events")
        .group_by("session_id")
        .agg(pl.col("customer_id").n_unique().alias("actors"), pl.col("channel").n_unique().alias("channels"))
    )
    assert per_session["actors"].max() == 1
    assert per_session["channels"].max() == 1


def test_summary_counts_match_the_files_and_is_json(world):
    ds, summary = world
    json.dumps(summary)
    assert summary["config"] == CONFIG.model_dump(mode="json")
    for table in TABLE_NAMES:
        assert summary["tables"][table]["rows"] == ds.read(table).height, table
    for name in ("preferences", "identities", "consent", "propensity", "followups", "latent"):
        assert summary["truth"][name]["rows"] == _truth(ds, name).height, name
    assert WorldConfig.model_validate_json((ds.truth_dir / "world.json").read_text()) == CONFIG
    assert summary["events_per_second"] > 0


# --- the data contract --------------------------------------------------------------------------------------


def test_every_table_passes_validation_with_its_exact_dtypes(world):
    ds, _ = world
    for table in TABLE_NAMES:
        files = ds.table_files(table)
        assert files, table
        for path in files:
            df = pl.read_parquet(path)
            result = validate(df, table, source=path.name)
            assert result.rows_quarantined == 0, result.quarantined.head()
            assert result.accepted.schema == df.schema, table
            assert result.accepted.equals(df), table


def test_events_are_well_formed_sessions(world):
    ds, _ = world
    ev = ds.read("events")
    start = dt.datetime.combine(CONFIG.start, dt.time())
    assert ev["timestamp"].min() >= start
    assert ev["timestamp"].max() < start + dt.timedelta(days=CONFIG.days)
    # Quantity and price on cart and purchase rows only.
    money = pl.col("event_type").is_in(["add_to_cart", "purchase"])
    assert ev.filter(money & (pl.col("quantity").is_null() | pl.col("price").is_null())).height == 0
    assert ev.filter(~money & (pl.col("quantity").is_not_null() | pl.col("price").is_not_null())).height == 0
    # Cookie ids come from the web system; canonical ids have no source system.
    cookie = pl.col("customer_id").str.starts_with("W")
    assert ev.filter(cookie & (pl.col("source_system") != "web")).height == 0
    assert ev.filter(~cookie & pl.col("source_system").is_not_null()).height == 0
    assert ev.filter(cookie & (pl.col("channel") != "web")).height == 0
    # Store sessions are purchase-only; an online purchase follows an add-to-cart of the item in its session.
    assert ev.filter((pl.col("channel") == "store") & (pl.col("event_type") != "purchase")).height == 0
    online = ev.filter(pl.col("channel") != "store")
    carts = online.filter(pl.col("event_type") == "add_to_cart").select(
        "session_id", "item_id", pl.col("timestamp").alias("cart_at")
    )
    buys = online.filter(pl.col("event_type") == "purchase").with_row_index("r")
    matched = buys.join(carts, on=["session_id", "item_id"]).filter(pl.col("cart_at") < pl.col("timestamp"))
    assert matched["r"].n_unique() == buys.height
    # Most customers with at least five purchases over the period.
    purchases = _resolved_events(ds).filter(pl.col("event_type") == "purchase").group_by("cid").len()
    assert (purchases["len"] >= 5).sum() > CONFIG.customers / 2


def test_catalogue_covers_every_sport_and_category_and_prices_follow_categories(world):
    ds, _ = world
    items = ds.read("items")
    assert items.height == CONFIG.n_items
    assert items["item_id"].to_list()[0] == "I00001"
    pairs = set(items.select("sport", "category").unique().iter_rows())
    assert pairs == {(s, c) for s, cats in CATEGORIES.items() for c in cats}
    assert items["colour"].n_unique() == 8
    assert 8 <= items["brand"].n_unique() <= 12
    median = dict(items.group_by("category").agg(pl.col("price").median()).iter_rows())
    assert median["socks"] < median["apparel"] < median["shoes"]
    bikes = items.filter((pl.col("sport") == "cycling") & (pl.col("category") == "equipment"))[
        "price"
    ].median()
    assert bikes > 3 * median["shoes"]


def test_action_catalogue_has_the_described_actions(world):
    ds, _ = world
    catalog = ds.read("action_catalog")
    kinds = catalog.group_by("kind").len()
    assert set(kinds["kind"].to_list()) == set(ACTION_KINDS)
    discounts = catalog.filter(pl.col("kind") == "discount")
    assert 3 <= discounts.height <= 4
    assert discounts["brand"].null_count() == 0
    assert discounts["discount_pct"].min() > 0
    assert catalog.filter(pl.col("kind") == "bundle")["sport"].null_count() == 0
    no_action = catalog.filter(pl.col("action_id") == "no_action").row(0, named=True)
    assert (no_action["kind"], no_action["value"], no_action["marketing"]) == ("none", 0.0, False)
    call = catalog.filter(pl.col("action_id") == "retention_call").row(0, named=True)
    assert (call["channel"], call["channels"]) == ("call", "call")
    assert {"free_shipping", "newsletter"} <= set(catalog["action_id"].to_list())


# --- planted structure --------------------------------------------------------------------------------------


def test_preferences_are_recoverable_from_behaviour_but_not_perfectly(world):
    ds, _ = world
    ev = _resolved_events(ds).with_columns(pl.col("event_type").replace_strict(WEIGHTS).alias("w"))
    buyers = ev.filter(pl.col("event_type") == "purchase").group_by("cid").len().filter(pl.col("len") >= 5)
    assert buyers.height > 200
    truth = _truth(ds, "preferences").rename({"customer_id": "cid"})
    accuracy = {}
    for attr in ("colour", "sport", "brand"):
        top = (
            ev.join(buyers.select("cid"), on="cid")
            .group_by("cid", attr)
            .agg(pl.col("w").sum())
            .group_by("cid")
            .agg(pl.col(attr).sort_by(["w", attr], descending=[True, False]).first().alias("top"))
            .join(truth.select("cid", attr), on="cid")
        )
        assert top.height == buyers.height
        accuracy[attr] = (top["top"] == top[attr]).mean()
    assert min(accuracy.values()) >= 0.95, accuracy
    assert min(accuracy.values()) < 1.0, accuracy


def test_follow_up_purchases_come_after_their_triggers(world):
    ds, _ = world
    rules = _truth(ds, "followups")
    assert rules.height == len(FOLLOW_UPS)
    assert (rules["p_follow"] == CONFIG.p_follow).all()
    bought = (
        _resolved_events(ds)
        .filter(pl.col("event_type") == "purchase")
        .select("cid", "timestamp", "sport", "category")
    )
    later = bought.select("cid", "sport", pl.col("category").alias("target"), pl.col("timestamp").alias("t2"))

    def rate(starts: pl.DataFrame) -> float:
        hits = (
            starts.with_row_index("r")
            .join(later, on=["cid", "sport", "target"], how="left")
            .with_columns(
                (
                    (pl.col("t2") > pl.col("timestamp"))
                    & (pl.col("t2") <= pl.col("timestamp") + pl.duration(days=21))
                )
                .fill_null(False)
                .alias("hit")
            )
            .group_by("r")
            .agg(pl.col("hit").any())
        )
        return hits["hit"].mean()

    targets = rules.select("sport", pl.col("follow_up_category").alias("target"))
    triggered = bought.join(
        rules.select("sport", "category", pl.col("follow_up_category").alias("target")),
        on=["sport", "category"],
    )
    # Base rate: the same follow-up categories after purchases that trigger nothing.
    other = bought.join(rules.select("sport", "category"), on=["sport", "category"], how="anti")
    other = other.join(targets, on="sport").filter(pl.col("category") != pl.col("target"))
    after_trigger, base = rate(triggered), rate(other)
    assert triggered.height > 200
    assert after_trigger > 0.35
    assert after_trigger > 2 * base, (after_trigger, base)


def test_consent_shares_follow_the_config_and_the_later_record_wins(world):
    ds, _ = world
    truth = _truth(ds, "consent")
    assert truth.height == CONFIG.customers * len(CONSENT_PURPOSES)
    declined = dict(truth.group_by("purpose").agg((~pl.col("granted")).mean()).iter_rows())
    for purpose, share in CONFIG.decline_shares().items():
        assert abs(declined[purpose] - share) < 0.06, (purpose, declined[purpose])
    records = ds.read("consent")
    twice = records.group_by("customer_id", "purpose").len().filter(pl.col("len") == 2)
    assert twice.height > 0
    flips = (
        records.group_by("customer_id", "purpose")
        .agg(pl.col("granted").n_unique().alias("n"))
        .filter(pl.col("n") == 2)
    )
    assert flips.height > 0
    state = consent_state(records.lazy()).collect()
    expected = truth.pivot(on="purpose", index="customer_id", values="granted")
    joined = state.join(expected, on="customer_id", suffix="_truth")
    assert joined.height == CONFIG.customers
    for purpose in CONSENT_PURPOSES:
        assert (joined[purpose] == joined[f"{purpose}_truth"]).all(), purpose


def test_identities_link_most_cookies_to_their_true_customer(world):
    ds, _ = world
    identities = ds.read("identities")
    truth = _truth(ds, "identities")
    customers = ds.read("customers")["customer_id"]
    crm = identities.filter(pl.col("source_system") == "crm")
    assert crm.height == customers.len()
    assert (crm["source_id"] == crm["customer_id"]).all()
    emails = identities.filter(pl.col("source_system") == "email")
    assert abs(emails.height / customers.len() - CONFIG.email_share) < 0.06
    assert emails["source_id"].str.starts_with("E").all()

    web = identities.filter(pl.col("source_system") == "web")
    linked = web.join(truth, on=["source_system", "source_id"], suffix="_truth")
    assert linked.height == web.height
    assert (linked["customer_id"] == linked["customer_id_truth"]).all()
    customer_cookies = truth.filter(pl.col("customer_id").is_not_null())
    unlinked = customer_cookies.filter(~pl.col("linked"))
    assert unlinked.height > 0
    assert abs(unlinked.height / customer_cookies.height - CONFIG.unlinked_cookie_share) < 0.06
    anonymous = truth.filter(pl.col("customer_id").is_null())
    assert anonymous.height > 0 and not anonymous["linked"].any()
    # Every cookie in events is in the truth; the unlinked ones have no identities row.
    events = ds.read("events")
    seen = events.filter(pl.col("source_system") == "web")["customer_id"].unique()
    assert set(seen.to_list()) == set(truth["source_id"].to_list())
    assert not set(unlinked["source_id"].to_list()) & set(web["source_id"].to_list())
    # A cookie share of web sessions, as configured.
    web_sessions = (
        events.filter(pl.col("channel") == "web")
        .group_by("session_id")
        .agg(pl.col("source_system").first().is_not_null().alias("cookie"))
    )
    assert 0.3 < web_sessions["cookie"].mean() < 0.5
    # Identity resolution turns linked cookies into their customer and keeps unlinked ones apart.
    resolved = resolve_identities(events.lazy(), identities.lazy()).collect()
    assert resolved.filter(pl.col("source_system").is_null())["customer_id"].is_in(customers.implode()).all()
    assert resolved.filter(pl.col("source_system") == "web")["customer_id"].str.starts_with("web:").all()


def test_planted_propensity_has_the_documented_values():
    kind = np.array(
        [
            ACTION_KINDS.index(k)
            for k in (
                "discount",
                "discount",
                "discount",
                "bundle",
                "free_shipping",
                "retention",
                "retention",
                "newsletter",
                "none",
            )
        ]
    )
    app, email, web, call = (EXPOSURE_CHANNELS.index(c) for c in ("app", "email", "web", "call"))
    p = planted_propensity(
        kind=kind,
        brand_match=np.array([True, True, False, False, False, False, False, False, False]),
        sport_match=np.array([False, False, False, True, False, False, False, False, False]),
        discount_pct=np.array([20.0, 20.0, 20.0, 0, 0, 0, 0, 0, 0]),
        channel=np.array([app, email, app, web, app, call, call, email, web]),
        age=np.array([30, 30, 30, 30, 30, 60, 60, 40, 30]),
        app_user=np.array([False, False, False, False, True, False, False, False, False]),
        price_sensitive=np.array([True, False, True, False, False, False, False, False, False]),
        recency_days=np.array([5.0, 60.0, 5.0, 5.0, 5.0, 50.0, 3.0, 10.0, np.inf]),
        frequency_90d=np.array([1, 5, 1, 3, 1, 0, 6, 1, 0]),
        monetary=np.array([50.0, 900.0, 50.0, 80.0, 10.0, 400.0, 900.0, 30.0, 0.0]),
    )
    expected = [0.70, 0.80 * 0.70, 0.025, 0.55, 0.55, 0.60, 0.005, 0.80 * 0.30, 0.015]
    np.testing.assert_allclose(p, expected)


def test_responses_follow_p_true_with_a_strong_oracle(world):
    ds, _ = world
    actions = ds.read("actions").join(_truth(ds, "propensity"), on="exposure_id")
    assert actions.height == ds.read("actions").height
    assert actions.group_by("customer_id").len()["len"].mean() > 5
    y, p = actions["responded"].to_numpy(), actions["p_true"].to_numpy()
    assert 0.08 <= p.mean() <= 0.15
    se = np.sqrt(p.mean() * (1 - p.mean()) / p.size)
    assert abs(y.mean() - p.mean()) < 3 * se
    assert 0.80 <= roc_auc_score(y, p) <= 0.92
    by_action = dict(actions.group_by("action_id").agg(pl.col("p_true").mean()).iter_rows())
    assert by_action["no_action"] < 0.05
    # Marketing actions reach only customers who granted marketing at that moment (final state as a proxy:
    # nobody who declined for good and never changed gets one).
    catalog = ds.read("action_catalog")
    marketing = set(catalog.filter(pl.col("marketing"))["action_id"].to_list())
    records = ds.read("consent").filter(pl.col("purpose") == "marketing")
    never = (
        records.group_by("customer_id").agg(pl.col("granted").any()).filter(~pl.col("granted"))["customer_id"]
    )
    assert (
        actions.filter(
            pl.col("customer_id").is_in(never.implode()) & pl.col("action_id").is_in(list(marketing))
        ).height
        == 0
    )


def test_a_linear_model_on_plain_features_falls_clearly_short_of_the_oracle(world):
    ds, _ = world
    actions = ds.read("actions").join(_truth(ds, "propensity"), on="exposure_id")
    ev = _resolved_events(ds)
    behaviour = ev.group_by("cid").agg(
        (pl.col("event_type") == "purchase").sum().alias("frequency"),
        (pl.col("price") * pl.col("quantity"))
        .filter(pl.col("event_type") == "purchase")
        .sum()
        .alias("monetary"),
        (pl.col("channel") == "app").mean().alias("app_share"),
    )
    x = (
        actions.join(ds.read("customers"), on="customer_id")
        .join(behaviour.rename({"cid": "customer_id"}), on="customer_id", how="left")
        .fill_null(0)
    )
    onehot = OneHotEncoder(handle_unknown="ignore").fit_transform(
        x.select("action_id", "channel", "gender", "region").to_numpy()
    )
    raw = StandardScaler().fit_transform(
        x.select("age", "frequency", "monetary", "app_share").to_numpy().astype(float)
    )
    features = np.hstack([onehot.toarray(), raw])
    y = x["responded"].to_numpy()
    # Scored in-sample, which flatters the linear model: it still cannot express "brand = preferred brand".
    linear = roc_auc_score(
        y, LogisticRegression(max_iter=2000).fit(features, y).predict_proba(features)[:, 1]
    )
    oracle = roc_auc_score(y, x["p_true"].to_numpy())
    assert linear < oracle - 0.08, (linear, oracle)
