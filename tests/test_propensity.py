"""The propensity model: metrics on hand-computed fixtures, learning a planted non-linear propensity, calibration,
determinism, save/load, the online scorer, as-of features without leakage, derived targets and a generated world."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from nextbest.features.dataset import Dataset
from nextbest.features.schema import validate
from nextbest.training.device import DeviceError, cuda_available, select_device
from nextbest.training.propensity import (
    Calibration,
    PropensityConfig,
    PropensityModel,
    PropensityModelError,
    fit_calibration,
    fit_platt,
    fit_propensity,
)
from nextbest.training.propensity_data import (
    SNAPSHOT_AT,
    ActionAffinity,
    FeatureEncoder,
    PropensityDataConfig,
    PropensityDataError,
    action_target_items,
    activity_asof,
    affinity_asof,
    build_training_table,
    customer_activity,
    derived_action_log,
    price_reference_columns,
    reference_prices,
    split_table,
    time_cutoffs,
)
from nextbest.training.propensity_eval import BaseRateBaseline, evaluate_propensity, reliability_plot
from nextbest.training.propensity_metrics import (
    brier_score,
    classification_metrics,
    expected_calibration_error,
    log_loss,
    per_action_metrics,
    reliability_table,
    roc_auc,
)
from nextbest.training.propensity_scorer import PropensityScorer

T0 = datetime(2026, 1, 1)

# --- a synthetic exposure log with a planted non-linear propensity -------------------------------------------

BRANDS = ("alpha", "bravo", "charlie", "delta")
SPORTS = ("running", "cycling", "tennis")
KINDS = ("discount", "content", "new_arrival")
TIERS = ("low", "mid", "high")
CUSTOMER_COLUMNS = [
    "preferred_brand",
    "preferred_brand_share",
    "preferred_sport",
    "preferred_sport_share",
    "age",
    "value_tier",
    "frequency",
    "monetary",
    "last_purchase_at",
]


def synthetic_catalog() -> pl.DataFrame:
    """36 actions: every brand × sport × kind; discounts carry a discount."""
    rows = []
    for b in BRANDS:
        for s in SPORTS:
            for kind in KINDS:
                k = len(rows)
                rows.append(
                    {
                        "action_id": f"A{k:02d}",
                        "kind": kind,
                        "value": 5.0 + 3 * (k % 5),
                        "brand": b,
                        "sport": s,
                        "discount_pct": 30.0 if kind == "discount" else 0.0,
                    }
                )
    return pl.DataFrame(rows)


def planted_logit(c: dict, a: dict, channel: np.ndarray, days_since_purchase: np.ndarray) -> np.ndarray:
    """AND-of-conditions a linear model cannot express: preference matches, age bands by kind, a recency bump,
    discount × value tier, channel × kind."""
    z = np.full(channel.shape, -3.2)
    z += 2.0 * (c["preferred_brand"] == a["brand"]) * c["preferred_brand_share"]
    z += 0.8 * (c["preferred_sport"] == a["sport"])
    young, old = c["age"] < 30, c["age"] >= 55
    z += np.where(a["kind"] == "discount", 1.2 * young - 0.6 * old, 0.0)
    z += np.where(a["kind"] == "content", 1.2 * old - 0.4 * young, 0.0)
    z += 1.0 * ((days_since_purchase > 5) & (days_since_purchase < 25))
    z += np.where((a["kind"] == "discount") & (c["value_tier"] == "low"), 1.0, 0.0)
    z += np.where((channel == "email") & (a["kind"] == "new_arrival"), 0.7, 0.0)
    return z


def synthetic_table(
    customers: int = 1200, per_customer: int = 20, days: int = 60, seed: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """(training table with p_true, catalogue, customer columns) of customers exposed to random actions."""
    rng = np.random.default_rng(seed)
    catalog = synthetic_catalog()
    cust = pl.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(customers)],
            "preferred_brand": rng.choice(BRANDS, customers),
            "preferred_brand_share": rng.uniform(0.3, 1.0, customers),
            "preferred_sport": rng.choice(SPORTS, customers),
            "preferred_sport_share": rng.uniform(0.3, 1.0, customers),
            "age": rng.integers(18, 80, customers).astype(np.int32),
            "value_tier": rng.choice(TIERS, customers),
            "frequency": rng.poisson(3, customers).astype(np.int32),
            "monetary": rng.gamma(2.0, 50.0, customers),
        }
    )
    n = customers * per_customer
    who = rng.permutation(np.repeat(np.arange(customers), per_customer))
    action = rng.integers(0, catalog.height, n)
    t_days = np.sort(rng.uniform(0, days, n))
    channel = rng.choice(["email", "web", "app"], n)
    since = rng.uniform(0, 60, n)
    c = {k: v.to_numpy() for k, v in cust[who].to_dict().items()}
    a = {k: v.to_numpy() for k, v in catalog[action].to_dict().items()}
    p = 1 / (1 + np.exp(-planted_logit(c, a, channel, since)))
    ts = pl.Series([T0 + timedelta(days=float(d)) for d in t_days], dtype=pl.Datetime("us"))
    table = pl.DataFrame(
        {
            "exposure_id": [f"E{i:07d}" for i in range(n)],
            "customer_id": c["customer_id"],
            "action_id": a["action_id"],
            "channel": channel,
            "timestamp": ts,
            "responded": rng.uniform(size=n) < p,
            "p_true": p,
        }
    ).with_columns(
        cust[who].drop("customer_id"),
        last_purchase_at=pl.Series(
            [T0 + timedelta(days=float(d - s)) for d, s in zip(t_days, since, strict=True)],
            dtype=pl.Datetime("us"),
        ),
    )
    return table, catalog, CUSTOMER_COLUMNS


FAST = PropensityConfig(epochs=15, patience=3, batch_size=512, seed=0)


@pytest.fixture(scope="module")
def synthetic():
    table, catalog, columns = synthetic_table()
    return split_table(table, catalog, columns, PropensityDataConfig())


@pytest.fixture(scope="module")
def trained(synthetic):
    fit = fit_propensity(synthetic, FAST, device="cpu")
    return fit, evaluate_propensity(fit, synthetic)


# --- metrics -----------------------------------------------------------------------------------------------


def test_auc_counts_pairs_and_ties():
    # Pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes → 3/4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.1]) == pytest.approx(0.625)  # (0.5 + 1 + 1 + 0) / 4
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_log_loss_and_brier_by_hand():
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert brier_score([1, 0, 1], [0.8, 0.4, 0.5]) == pytest.approx((0.04 + 0.16 + 0.25) / 3)
    assert math.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped, not infinite


def test_ece_and_reliability_table_by_hand():
    y = [0, 1, 1, 0, 1]
    p = [0.05, 0.15, 0.95, 0.95, 1.0]
    # bin 0: |0 − 0.05|·1; bin 1: |1 − 0.15|·1; bin 9 (1.0 included): |2 − 2.9| → (0.05 + 0.85 + 0.9) / 5
    assert expected_calibration_error(y, p) == pytest.approx(0.36)
    table = reliability_table(y, p)
    assert table["n"].to_list() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    assert table["observed_rate"][9] == pytest.approx(2 / 3)
    assert table["mean_predicted"][9] == pytest.approx(2.9 / 3)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_classification_and_per_action_metrics():
    m = classification_metrics([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.1])
    assert m["auc"] == 1.0 and m["n"] == 4 and m["positive_rate"] == 0.5
    assert m["mean_predicted"] == pytest.approx(0.4)
    table = per_action_metrics(
        ["a", "a", "a", "b", "b"], [1, 0, 0, 1, 1], {"model": [0.9, 0.1, 0.2, 0.5, 0.5]}
    )
    assert table["action_id"].to_list() == ["a", "b"]  # largest first
    a, b = table.to_dicts()
    assert (a["n"], a["responses"], a["model_auc"]) == (3, 1, 1.0)
    assert b["response_rate"] == 1.0 and math.isnan(b["model_auc"])
    assert b["model_brier"] == pytest.approx(0.25)


def test_base_rate_baseline_shrinks_small_actions():
    base = BaseRateBaseline.fit(["a"] * 10 + ["b"] * 2, np.array([1] * 5 + [0] * 5 + [1, 1]), prior_rows=10)
    overall = 7 / 12
    assert base.overall == pytest.approx(overall)
    assert base.predict(["a"])[0] == pytest.approx((5 + 10 * overall) / 20)
    assert base.predict(["b"])[0] == pytest.approx((2 + 10 * overall) / 12)
    assert base.predict(["unseen"])[0] == pytest.approx(overall)


# --- calibration -------------------------------------------------------------------------------------------


def test_platt_recovers_a_planted_scale_and_shift(rng):
    z = rng.normal(0, 2, 40_000)
    y = rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    scale, bias = fit_platt(z, y)
    assert scale == pytest.approx(0.5, abs=0.04) and bias == pytest.approx(-1.0, abs=0.06)
    t_scale, t_bias = fit_platt(z, y, fit_bias=False)
    assert t_bias == 0.0 and 0 < t_scale < 1
    calibrated = Calibration(method="platt", scale=scale, bias=bias).apply(z)
    assert (
        expected_calibration_error(y, calibrated) < 0.01 < expected_calibration_error(y, 1 / (1 + np.exp(-z)))
    )


def test_isotonic_calibration_is_monotone_and_round_trips(rng):
    z = rng.normal(0, 2, 5000)
    y = rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    cal = fit_calibration(z, y, "isotonic")
    grid = np.linspace(-6, 6, 200)
    p = cal.apply(grid)
    assert np.all(np.diff(p) >= 0) and p.min() > 0 and p.max() < 1
    again = Calibration.model_validate_json(cal.model_dump_json())
    np.testing.assert_array_equal(again.apply(grid), p)
    with pytest.raises(ValueError, match="calibration"):
        fit_calibration(z, y, "magic")


# --- learning the planted propensity -------------------------------------------------------------------------


def test_learns_the_planted_nonlinear_propensity(trained):
    _, report = trained
    m = report.metrics
    # Measured: AUC ≈ 0.74 against an oracle of ≈ 0.76 and a logistic regression of ≈ 0.69.
    assert m["auc"] >= m["oracle_auc"] - 0.04
    assert m["auc"] >= m["baseline_auc_logreg"] + 0.02
    assert m["auc"] > m["baseline_auc_base_rate"] + 0.1
    assert m["log_loss"] < m["baseline_log_loss_logreg"] < m["baseline_log_loss_base_rate"]


def test_calibration_on_validation_holds_on_the_later_test_period(trained):
    fit, report = trained
    m = report.metrics
    assert fit.pos_weight > 1  # the loss up-weights responses …
    assert m["uncalibrated_ece"] > 0.05  # … which inflates raw probabilities,
    assert m["ece"] < 0.03 and m["ece"] < m["uncalibrated_ece"] / 2  # and calibration brings them back.
    assert m["test_mean_predicted"] == pytest.approx(m["test_positive_rate"], abs=0.02)


def test_early_stopping_keeps_the_best_epoch(trained):
    fit, _ = trained
    losses = [h["val_loss"] for h in fit.history]
    assert fit.best_epoch == int(np.argmin(losses)) + 1
    assert len(fit.history) <= FAST.epochs
    assert len(fit.history) == FAST.epochs or len(fit.history) - fit.best_epoch == FAST.patience


def test_same_seed_same_predictions_other_seed_differs(synthetic):
    small = split_table(
        synthetic.train.head(3000).vstack(synthetic.validation.head(600)).vstack(synthetic.test.head(600)),
        synthetic.catalog,
        synthetic.customer_columns,
        PropensityDataConfig(validation_start=synthetic.validation_start, test_start=synthetic.test_start),
    )
    config = PropensityConfig(epochs=2, batch_size=256, dropout=0.1, seed=7)
    a = fit_propensity(small, config, device="cpu").model.predict_proba(small.test)
    b = fit_propensity(small, config, device="cpu").model.predict_proba(small.test)
    c = fit_propensity(small, config.model_copy(update={"seed": 8}), device="cpu").model.predict_proba(
        small.test
    )
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training


def test_config_round_trips_through_json(tmp_path):
    config = PropensityConfig(hidden_sizes=[32], embedding_dim=4, cross_layers=1, calibration="isotonic")
    assert PropensityConfig.model_validate_json(config.model_dump_json()) == config
    config.save(tmp_path / "c.json")
    assert PropensityConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="imbalance"):
        PropensityConfig(imbalance="whatever")  # type: ignore[arg-type]
    assert json.loads(PropensityDataConfig().model_dump_json())["snapshot_days"] == 7


# --- save, load and the online scorer ------------------------------------------------------------------------


def test_save_load_round_trip_without_pickle(trained, synthetic, tmp_path):
    fit, _ = trained
    path = fit.model.save(tmp_path / "model")
    state = torch.load(path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded = PropensityModel.load(path)
    np.testing.assert_allclose(
        loaded.predict_proba(synthetic.test), fit.model.predict_proba(synthetic.test), rtol=0, atol=1e-7
    )
    assert loaded.config == fit.model.config and loaded.calibration == fit.model.calibration
    meta = json.loads((path / "model.json").read_text())
    meta["format_version"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PropensityModelError, match="format_version"):
        PropensityModel.load(path)
    with pytest.raises(PropensityModelError, match=r"model\.pt"):
        PropensityModel.load(tmp_path)


def test_scorer_online_equals_offline_and_skips_unknown_actions(trained, synthetic):
    fit, _ = trained
    scorer = PropensityScorer(fit.model)
    rows = synthetic.test.head(40)
    offline = scorer.score_frame(rows)
    for k, row in enumerate(rows.iter_rows(named=True)):
        customer = {c: row[c] for c in synthetic.customer_columns}
        online = scorer.score(customer, [row["action_id"]], row["channel"], now=row["timestamp"])
        assert online[row["action_id"]] == pytest.approx(offline[k], abs=1e-6)
    customer = {c: rows.row(0, named=True)[c] for c in synthetic.customer_columns}
    everything = scorer.score(customer, None, "web", now=T0)
    assert list(everything) == synthetic.catalog["action_id"].to_list()
    assert all(0 < p < 1 for p in everything.values())
    assert list(scorer.score(customer, ["A03", "nope", "A01"], "web", now=T0)) == ["A03", "A01"]
    assert scorer.score({}, ["A00"], None, now=T0)["A00"] > 0  # an unknown customer still gets a probability


def test_reliability_plot_is_a_png(trained, tmp_path):
    _, report = trained
    path = reliability_plot(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- features ------------------------------------------------------------------------------------------------


def test_encoder_vocabularies_matches_and_missing_values(synthetic):
    enc = FeatureEncoder.fit(synthetic.train, synthetic.catalog, synthetic.customer_columns, min_count=5)
    spec = enc.spec
    assert [(p.customer, p.action, p.share) for p in spec.pairs] == [
        ("preferred_brand", "brand", "preferred_brand_share"),
        ("preferred_sport", "sport", "preferred_sport_share"),
    ]
    # One vocabulary per pair, so equal values get equal indices.
    assert (
        enc.state.vocabularies["preferred_brand"] == enc.state.vocabularies["action.brand"] == sorted(BRANDS)
    )
    stats = {s.name: s for s in enc.state.numeric}
    assert stats["monetary"].log and not stats["preferred_brand_share"].log
    assert stats["days_since_last_purchase_at"].log
    row = {"preferred_brand": "alpha", "preferred_brand_share": 0.5, "value_tier": "never-seen"}
    one = enc.encode_one(row, ["A00", "A03"], "web", T0)  # A00: alpha; A03: alpha too (brand-major order)
    names = enc.numeric_input_names
    match = one.numeric[:, spec.numeric_names.index("match_brand")]
    assert enc.catalog["brand"][0] == "alpha" and match[0] > 0
    tier = spec.categorical_names.index("value_tier")
    assert one.categorical[0, tier] == 0  # unknown value → index 0
    assert len(names) == one.numeric.shape[1] == enc.n_numeric
    assert np.isfinite(one.numeric).all()


def test_time_cutoffs_leave_three_periods_even_with_ties():
    def cutoffs(days: list[int]) -> tuple[int, int]:
        ts = pl.Series([T0 + timedelta(days=d) for d in days])
        v, t = time_cutoffs(ts, validation_fraction=0.15, test_fraction=0.15)
        return (v - T0).days, (t - T0).days

    # Row 85 (test) falls on day 2 and row 70 (validation) on day 1; rows of one day stay together.
    assert cutoffs([0] * 50 + [1] * 30 + [2] * 10 + [3] * 10) == (1, 2)
    # Rows 70 and 85 both fall on day 0: the last two days become validation and test.
    assert cutoffs([0] * 90 + [1] * 5 + [2] * 5) == (1, 2)
    all_tied = pl.Series([T0] * 10 + [T0 + timedelta(days=1)] * 10)
    with pytest.raises(PropensityDataError, match="distinct"):
        time_cutoffs(all_tied, validation_fraction=0.15, test_fraction=0.15)


def _write(ds: Dataset, table: str, df: pl.DataFrame) -> None:
    result = validate(df, table, source=f"{table}.fixture")
    assert result.rows_quarantined == 0, result.quarantined
    ds.write_table(table, result.accepted)


@pytest.fixture
def leak_world(tmp_path):
    """C1 buys brand A before exposure X1 and brand B at and after it; X2 comes after the B purchases."""
    ds = Dataset.at(tmp_path / "leak").ensure()
    _write(
        ds,
        "items",
        pl.DataFrame(
            {
                "item_id": ["I1", "I2", "I3"],
                "brand": ["A", "B", "B"],
                "category": ["shoes", "shoes", "socks"],
                "price": [10.0, 30.0, 5.0],
            }
        ),
    )
    _write(ds, "customers", pl.DataFrame({"customer_id": ["C1", "C2"], "age": [30, 50]}))
    d = lambda days, hours=0: T0 + timedelta(days=days, hours=hours)  # noqa: E731
    rows = [
        ("C1", "I1", "purchase", d(1), "web"),
        ("C1", "I1", "view", d(2), "app"),
        ("C1", "I2", "purchase", d(10, 12), "app"),  # exactly at X1: not before it
        ("C1", "I2", "purchase", d(11), "app"),
        ("C1", "I2", "purchase", d(12), "app"),
        ("C1", "I2", "purchase", d(13), "app"),
        ("C2", "I3", "view", d(3), "web"),
        ("C2", "I3", "purchase", d(20), "web"),
    ]
    events = pl.DataFrame(
        [(c, i, e, t, ch, 1 if e == "purchase" else None) for c, i, e, t, ch in rows],
        schema=["customer_id", "item_id", "event_type", "timestamp", "channel", "quantity"],
        orient="row",
    )
    _write(ds, "events", events)
    exposures = pl.DataFrame(
        {
            "exposure_id": ["X1", "X2", "X3"],
            "customer_id": ["C1", "C1", "C2"],
            "action_id": ["a", "a", "a"],
            "channel": ["email"] * 3,
            "timestamp": [d(10, 12), d(16), d(5)],
            "responded": [True, False, False],
        }
    )
    return ds, exposures


def test_as_of_join_sees_only_the_past(leak_world):
    ds, exposures = leak_world
    events = ds.read("events")
    table = build_training_table(
        exposures, events, ds.scan("items"), ds.scan("customers"), snapshot_days=7, channels=["web", "app"]
    )
    rows = {r["exposure_id"]: r for r in table.iter_rows(named=True)}
    x1, x2, x3 = rows["X1"], rows["X2"], rows["X3"]
    for r in rows.values():
        assert r[SNAPSHOT_AT] <= r["timestamp"]
        assert r["last_seen"] is None or r["last_seen"] < r[SNAPSHOT_AT]
        assert r["last_purchase_at"] is None or r["last_purchase_at"] < r["timestamp"]
    # X1: only the brand-A purchase of day 1 (the purchase at exactly X1's time is not "before").
    assert x1["preferred_brand"] == "A" and x1["frequency"] == 1
    assert x1["purchases_before"] == 1 and x1["spend_before"] == 10.0
    assert x1["last_purchase_at"] == T0 + timedelta(days=1)
    assert x1["channel_share_web"] == pytest.approx(0.5) and x1["channel_share_app"] == pytest.approx(0.5)
    # X2: its snapshot (day 12) sees B overtaking A; its exact activity sees all five purchases.
    assert x2["preferred_brand"] == "B"
    assert x2["purchases_before"] == 5 and x2["purchases_30d"] == 5
    assert x2["last_purchase_at"] == T0 + timedelta(days=13)
    assert x2["events_7d"] == 4  # days 10.5, 11, 12, 13
    # X3: C2 has only viewed (day 3), its purchase on day 20 is in the future.
    assert x3["purchases_before"] == 0 and x3["events_before"] == 1 and x3["last_purchase_at"] is None
    assert x3["relative_price"] is None


def test_exact_activity_equals_the_online_computation(leak_world):
    ds, exposures = leak_world
    events = ds.read("events")
    items = ds.scan("items")
    channels = ["web", "app"]
    offline = activity_asof(exposures, events, items, channels=channels)
    for k, row in enumerate(exposures.iter_rows(named=True)):
        online = customer_activity(events, items, as_of=row["timestamp"], channels=channels).filter(
            pl.col("customer_id") == row["customer_id"]
        )
        assert online.drop("customer_id").row(0, named=True) == offline.row(k, named=True)
    none_yet = customer_activity(events, items, as_of=T0, channels=channels)
    assert none_yet.is_empty() and set(offline.columns) <= set(none_yet.columns)


def test_price_reference_groups_follow_what_explains_price():
    """Equipment costs 800 in cycling and 40 in yoga, socks 10 everywhere; colour says nothing about price."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(120):
        sport = ("cycling", "yoga")[k % 2]
        category = ("equipment", "socks")[(k // 2) % 2]
        base = {("cycling", "equipment"): 800.0, ("yoga", "equipment"): 40.0}.get((sport, category), 10.0)
        colour = ("red", "blue", "green")[k % 3]
        rows.append((f"I{k}", sport, category, colour, base * float(rng.lognormal(0.0, 0.1))))
    items = pl.DataFrame(rows, schema=["item_id", "sport", "category", "colour", "price"], orient="row")
    assert price_reference_columns(items) == ["category", "sport"]
    refs = reference_prices(items).collect().join(items, on="item_id")
    for (sport, category), base in {("cycling", "equipment"): 800, ("yoga", "equipment"): 40}.items():
        group = refs.filter((pl.col("sport") == sport) & (pl.col("category") == category))
        assert group["__reference"].n_unique() == 1
        assert group["__reference"][0] == pytest.approx(group["price"].median())
        assert group["__reference"][0] == pytest.approx(base, rel=0.1)
    # Too few items per group: one reference for the whole catalogue.
    tiny = items.head(6)
    assert price_reference_columns(tiny) == []
    assert reference_prices(tiny).collect()["__reference"].n_unique() == 1
    assert price_reference_columns(items.drop("price")) == []


@pytest.fixture
def funnel_events():
    """C1 on a catalogue whose reference price is 20 (I1 10, I2 20, I3 30):

    S1 web:   cart I3 (above), bought      S2 app: cart I3 (above), abandoned
    S3 app:   cart I1 (below), bought      S4 store: I2 bought without a cart (no funnel)
    no session id, app, one day: two views (one fallback session)
    """
    items = pl.DataFrame({"item_id": ["I1", "I2", "I3"], "category": ["x"] * 3, "price": [10.0, 20.0, 30.0]})
    d = lambda hours: T0 + timedelta(hours=hours)  # noqa: E731
    rows = [
        ("I3", "view", d(1), "S1", "web"),
        ("I3", "add_to_cart", d(1.1), "S1", "web"),
        ("I3", "purchase", d(1.2), "S1", "web"),
        ("I3", "add_to_cart", d(5), "S2", "app"),
        ("I1", "add_to_cart", d(9), "S3", "app"),
        ("I1", "purchase", d(9.1), "S3", "app"),
        ("I2", "purchase", d(30), "S4", "store"),
        ("I1", "view", d(50), None, "app"),
        ("I2", "view", d(51), None, "app"),
    ]
    events = pl.DataFrame(
        [("C1", i, e, t, s, ch, 1 if e != "view" else None, None) for i, e, t, s, ch in rows],
        schema={
            "customer_id": pl.String,
            "item_id": pl.String,
            "event_type": pl.String,
            "timestamp": pl.Datetime("us"),
            "session_id": pl.String,
            "channel": pl.String,
            "quantity": pl.Int32,
            "price": pl.Float64,
        },
        orient="row",
    )
    return events, items.lazy()


def test_sessions_per_channel_and_cart_conversion_by_price(funnel_events):
    events, items = funnel_events
    channels = ["web", "app", "store"]
    at = [T0 + timedelta(hours=h) for h in (1.2, 6, 100)]
    keys = pl.DataFrame({"customer_id": ["C1"] * 3, "timestamp": at})
    offline = activity_asof(keys, events, items, channels=channels)
    expected = [
        # At the S1 purchase itself: its cart is seen, the purchase is not (strictly before).
        dict(
            sessions_web=1,
            sessions_app=0,
            sessions_store=0,
            carts_above_reference=1,
            cart_conversion_above_reference=0.0,
            cart_conversion_below_reference=None,
            relative_price=None,
        ),
        dict(
            sessions_web=1,
            sessions_app=1,
            sessions_store=0,
            carts_above_reference=2,
            cart_conversion_above_reference=0.5,
            cart_conversion_below_reference=None,
            relative_price=1.5,
        ),
        dict(
            sessions_web=1,
            sessions_app=3,
            sessions_store=1,
            carts_above_reference=2,
            cart_conversion_above_reference=0.5,
            cart_conversion_below_reference=1.0,
            relative_price=1.0,
        ),
    ]
    for k, want in enumerate(expected):
        got = offline.row(k, named=True)
        online = customer_activity(events, items, as_of=at[k], channels=channels).row(0, named=True)
        assert {c: got[c] for c in want} == pytest.approx(want), k
        assert {c: online[c] for c in offline.columns} == got
    assert offline["channel_share_app"][2] == pytest.approx(5 / 9)


def test_derived_follow_up_targets(leak_world):
    ds, _ = leak_world
    actions, catalog = derived_action_log(
        ds.read("events"),
        ds.scan("items"),
        attribute="category",
        horizon_days=5,
        every_days=7,
        active_days=60,
    )
    assert sorted(catalog["action_id"].to_list()) == ["buy:category:shoes", "buy:category:socks"]
    assert catalog["kind"].unique().to_list() == ["follow_up_purchase"]
    # Snapshots every 7 days from a week after the first event's midnight (day 1): days 8 and 15; day 22 is left
    # out because its 5-day window would run past the last event (day 20).
    assert sorted(actions["timestamp"].unique().to_list()) == [
        T0 + timedelta(days=8),
        T0 + timedelta(days=15),
    ]
    positives = actions.filter(pl.col("responded"))
    # Day 8: C1 buys shoes on days 10.5–13, inside [8, 13). Day 15: C2 buys socks on day 20, just outside
    # [15, 20), and C1 bought nothing then.
    assert positives.select("customer_id", "action_id", "timestamp").rows() == [
        ("C1", "buy:category:shoes", T0 + timedelta(days=8))
    ]
    assert actions.height == 2 * 2 * 2  # 2 snapshots × 2 active customers × 2 values
    assert actions["exposure_id"].n_unique() == actions.height
    with pytest.raises(PropensityDataError, match="colour"):
        derived_action_log(ds.read("events"), ds.scan("items"), attribute="colour")


def test_derived_labels_do_not_reach_into_the_next_period():
    days = [d for d in range(10) for _ in range(2)]
    table = pl.DataFrame(
        {
            "exposure_id": [f"E{i}" for i in range(20)],
            "customer_id": ["C1"] * 20,
            "action_id": ["a"] * 20,
            "channel": [None] * 20,
            "timestamp": [T0 + timedelta(days=d) for d in days],
            "responded": [i % 2 == 0 for i in range(20)],
        }
    )
    config = PropensityDataConfig(validation_start=T0 + timedelta(days=6), test_start=T0 + timedelta(days=8))
    data = split_table(table, pl.DataFrame({"action_id": ["a"]}), [], config, label_days=2)

    def period(frame: pl.DataFrame) -> list[int]:
        return sorted({(t - T0).days for t in frame["timestamp"]})

    # A 2-day window from day 5 would end on day 7, inside validation; from day 7, inside test.
    assert (period(data.train), period(data.validation), period(data.test)) == ([0, 1, 2, 3, 4], [6], [8, 9])
    unpurged = split_table(table, pl.DataFrame({"action_id": ["a"]}), [], config)
    assert period(unpurged.train) == [0, 1, 2, 3, 4, 5]


# --- device ----------------------------------------------------------------------------------------------------


def test_device_choice_falls_back_to_cpu():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if cuda_available() else "cpu")
    with pytest.raises(DeviceError, match="tpu"):
        select_device("tpu")
    if not cuda_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            select_device("cuda")


# --- a generated world -----------------------------------------------------------------------------------------


@pytest.mark.slow  # generates a world and trains the network and a baseline on it: ~6 s
def test_generated_world_beats_logistic_regression_and_is_calibrated(tmp_path):
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.training.propensity_data import load_propensity_data

    ds = Dataset.at(tmp_path / "world")
    generate_world(WorldConfig(customers=800, days=120, seed=3, exposures_per_customer=20), ds)
    data = load_propensity_data(ds)
    assert data.has_truth and data.target == "actions"
    fit = fit_propensity(data, PropensityConfig(epochs=20, patience=3), device="cpu")
    assert sorted(fit.model.encoder.activity_channels) == ["app", "store", "web"]
    m = evaluate_propensity(fit, data).metrics
    # Measured on this world: AUC 0.76, oracle 0.84, logistic regression 0.70, ECE 0.02. The oracle knows
    # latent traits (price sensitivity, profiles of customers who declined profiling) that no model sees.
    assert m["auc"] >= m["baseline_auc_logreg"] + 0.02
    assert m["auc"] >= m["oracle_auc"] - 0.12
    assert m["ece"] <= 0.05


# --- customer–action affinity from a CF model ----------------------------------------------------------------


def _two_factor_affinity(aggregate: str = "mean") -> ActionAffinity:
    """Brand A's items load on factor 0, brand B's on factor 1; free shipping has no target items."""
    catalog = pl.DataFrame(
        {
            "action_id": ["discount_a", "discount_b", "free_shipping"],
            "kind": ["discount", "discount", "free_shipping"],
            "brand": ["A", "B", None],
        }
    )
    items = pl.DataFrame({"item_id": ["A1", "A2", "B1", "B2"], "brand": ["A", "A", "B", "B"]})
    targets = action_target_items(catalog, items)
    assert targets == {"discount_a": ["A1", "A2"], "discount_b": ["B1", "B2"], "free_shipping": []}
    factors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    return ActionAffinity(
        ["A1", "A2", "B1", "B2"], factors, regularization=0.1, alpha=2.0, targets=targets, aggregate=aggregate
    )


def test_affinity_known_answer_on_a_two_factor_model():
    """A customer who bought A1 folds in to x = (c / (1 + λ + c), 0) (c = alpha · weight): brand A's items
    score x₀, brand B's 0; their mean is x₀/2 and their spread x₀/2, so the standardised affinity is exactly +1
    for the brand-A discount and −1 for brand B's, whatever the weight."""
    affinity = _two_factor_affinity()
    for weight in (1.0, 5.0):
        x = affinity.user_factors(
            affinity.interaction_matrix(
                pl.DataFrame({"customer_id": ["C"], "item_id": ["A1"], "weight": [weight]}), ["C"]
            )
        )
        c = 2.0 * weight
        assert x[0] == pytest.approx([c / (1 + 0.1 + c), 0.0])
        got = affinity.score_items({"A1": weight})
        assert got["discount_a"] == pytest.approx(1.0) and got["discount_b"] == pytest.approx(-1.0)
        assert math.isnan(got["free_shipping"])
    # A mixed history leans to the brand bought more; no history (or only unknown items) says nothing.
    mixed = affinity.score_items({"A1": 1.0, "B2": 3.0})
    assert mixed["discount_b"] > 0 > mixed["discount_a"]
    assert all(math.isnan(v) for v in affinity.score_items({"Z9": 5.0}).values())
    assert all(math.isnan(v) for v in affinity.score_items({}).values())
    # max over target items: the same here (both A items score alike).
    assert _two_factor_affinity("max").score_items({"A1": 1.0})["discount_a"] == pytest.approx(1.0)


def test_affinity_fold_in_equals_implicit_recalculate_user(rng):
    import scipy.sparse as sp

    from nextbest.training.recommenders import ALSConfig, ALSRecommender

    dense = (rng.uniform(size=(60, 25)) < 0.2) * rng.integers(1, 6, size=(60, 25))
    matrix = sp.csr_matrix(dense.astype(np.float32))
    als = ALSRecommender(ALSConfig(factors=6, iterations=5, alpha=3.0, regularization=0.5), threads=1)
    als.fit(matrix)
    ids = [f"I{i:02d}" for i in range(25)]
    affinity = ActionAffinity.from_recommender(als, ids, {"all": ids})
    rows = np.arange(10)
    expected = als.implicit_model.recalculate_user(rows, matrix[rows])
    np.testing.assert_allclose(affinity.user_factors(matrix[rows]), expected, rtol=1e-3, atol=1e-4)


def test_affinity_round_trips_without_pickle(tmp_path):
    affinity = _two_factor_affinity("max")
    affinity.save(tmp_path)
    loaded = ActionAffinity.load(tmp_path)
    assert loaded is not None and loaded.aggregate == "max" and loaded.action_ids == affinity.action_ids
    history = {"A2": 1.0, "B1": 4.0}
    assert loaded.score_items(history) == pytest.approx(affinity.score_items(history), nan_ok=True)
    assert ActionAffinity.load(tmp_path / "nothing") is None


def test_affinity_at_a_snapshot_sees_only_earlier_interactions():
    """C1 views brand A before the snapshot and buys brand B after it: the affinity at the snapshot favours A,
    and later events change nothing; moved before the snapshot, the B purchases turn it round."""
    from nextbest.features.interactions import InteractionConfig

    affinity = _two_factor_affinity()
    snapshot = T0 + timedelta(days=7)

    def events(b_day: float) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "customer_id": ["C1", "C1", "C1", "C1"],
                "item_id": ["A1", "A2", "B1", "B2"],
                "event_type": ["view", "view", "purchase", "purchase"],
                "timestamp": [T0 + timedelta(days=1), T0 + timedelta(days=2)]
                + [T0 + timedelta(days=b_day)] * 2,
            }
        )

    rows = pl.DataFrame(
        {
            "customer_id": ["C1", "C1", "C1", "C2"],
            "action_id": ["discount_a", "discount_b", "free_shipping", "discount_a"],
            SNAPSHOT_AT: [snapshot, snapshot, snapshot, None],
        }
    )
    config = InteractionConfig()
    later = affinity_asof(rows, events(9.0), affinity, config).to_list()
    only_before = affinity_asof(rows, events(9.0).head(2), affinity, config).to_list()
    assert later == only_before
    assert later[0] == pytest.approx(1.0) and later[1] == pytest.approx(-1.0)
    assert later[2] is None and later[3] is None
    earlier = affinity_asof(rows, events(3.0), affinity, config).to_list()
    assert earlier[1] > 0 > earlier[0]


@pytest.fixture(scope="module")
def affinity_world(tmp_path_factory):
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.training.propensity_data import load_propensity_data

    ds = Dataset.at(tmp_path_factory.mktemp("affinity") / "world")
    generate_world(WorldConfig(customers=300, days=90, seed=5, exposures_per_customer=8), ds)
    data = load_propensity_data(ds)
    fit = fit_propensity(data, PropensityConfig(epochs=2, hidden_sizes=[16], batch_size=512), device="cpu")
    return ds, data, fit.model


def test_affinity_is_an_input_recorded_with_the_data_and_the_model(affinity_world):
    _, data, model = affinity_world
    assert data.affinity is not None and data.affinity.source["from"] == "fit"
    assert data.summary()["affinity"]["trained_until"] == data.validation_start.isoformat()
    assert "cf_affinity" in model.encoder.spec.pair_numeric and "cf_affinity" not in data.customer_columns
    assert model.info["affinity"] == data.affinity.source
    table = pl.concat([data.train, data.validation, data.test]).join(
        data.catalog.select("action_id", "kind"), on="action_id"
    )
    known = table.group_by("kind").agg(pl.col("cf_affinity").is_not_null().mean().alias("known"))
    known = dict(known.iter_rows())
    # Discounts and bundles have target items (their brand's, their sport's); the rest have none.
    assert known["discount"] > 0.5 and known["bundle"] > 0.5
    assert known["free_shipping"] == known["none"] == known["newsletter"] == 0.0
    off = PropensityDataConfig(affinity=False)
    assert PropensityDataConfig.model_validate_json(off.model_dump_json()) == off


def test_affinity_online_equals_offline_and_travels_with_the_model(affinity_world, tmp_path):
    from nextbest.features.interactions import InteractionConfig, interaction_weights
    from nextbest.features.pipeline import FeatureConfig, clean_events

    ds, data, model = affinity_world
    scorer = PropensityScorer.load(model.save(tmp_path / "model"))
    assert scorer.affinity is not None
    events = clean_events(ds, FeatureConfig(), purpose="profiling").collect()
    rows = data.test.filter(pl.col("cf_affinity").is_not_null()).head(5)
    assert rows.height == 5
    offline = scorer.score_frame(rows)
    for k, row in enumerate(rows.iter_rows(named=True)):
        past = events.lazy().filter(
            (pl.col("customer_id") == row["customer_id"]) & (pl.col("timestamp") < row[SNAPSHOT_AT])
        )
        weights = interaction_weights(past, InteractionConfig()).collect()
        online = scorer.affinities(dict(zip(weights["item_id"], weights["weight"], strict=True)))
        assert online[row["action_id"]] == pytest.approx(row["cf_affinity"], rel=1e-9)
        customer = {c: row[c] for c in data.customer_columns}
        p = scorer.score(
            customer, [row["action_id"]], row["channel"], now=row["timestamp"], affinities=online
        )
        assert p[row["action_id"]] == pytest.approx(float(offline[k]), abs=1e-6)


@pytest.mark.slow  # trains and registers an ALS through MLflow
def test_affinity_takes_the_registered_als_trained_on_the_same_data(affinity_world, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from nextbest.features.pipeline import build_features
    from nextbest.training.cf import train_cf
    from nextbest.training.propensity_data import (
        champion_affinity_config,
        load_propensity_data,
        registered_recommender,
    )
    from nextbest.training.tracking import TrackingConfig

    ds, _, _ = affinity_world
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    assert registered_recommender(ds, tracking_uri=uri) is None  # no registry yet
    previous = mlflow.get_tracking_uri()
    try:
        build_features(ds)
        tracking = TrackingConfig(tracking_uri=uri)
        train_cf(
            ds, "als", {"factors": 8, "iterations": 3}, tracking=tracking, evaluate_test=False, threads=1
        )
        found = registered_recommender(ds, tracking_uri=uri, alias="challenger")
        assert found is not None
        bundle, label = found
        assert label == "nextbest-recommender/1"
        assert (
            registered_recommender(Dataset.at(tmp_path / "other"), tracking_uri=uri, alias="challenger")
            is None
        )
        data = load_propensity_data(ds, recommender=bundle, recommender_label=label)
        assert data.affinity is not None and data.affinity.source["from"] == "registry"
        assert data.affinity.source["registered_model"] == label and data.affinity.n_factors == 8
        forced = load_propensity_data(
            ds, PropensityDataConfig(affinity_source="fit"), recommender=bundle, recommender_label=label
        )
        assert forced.affinity is not None and forced.affinity.source["from"] == "fit"
        # train/tune propensity: the champion's hyperparameters, refitted on the training period (no leakage)
        assert champion_affinity_config(ds, PropensityDataConfig(), tracking_uri=uri) == (
            PropensityDataConfig(),
            None,
        )  # a challenger only: no champion yet
        MlflowClient(uri, uri).set_registered_model_alias("nextbest-recommender", "champion", "1")
        config, label = champion_affinity_config(ds, PropensityDataConfig(), tracking_uri=uri)
        assert label == "nextbest-recommender/1"
        assert (config.affinity_als.factors, config.affinity_als.iterations) == (8, 3)
        off = PropensityDataConfig(affinity_source="fit")
        assert champion_affinity_config(ds, off, tracking_uri=uri) == (off, None)
        refit = load_propensity_data(ds, config, recommender_label=label)
        assert refit.affinity is not None and refit.affinity.n_factors == 8
        assert refit.affinity.source["from"] == "fit" and refit.affinity.source["config_from"] == label
    finally:
        mlflow.set_tracking_uri(previous)


# --- what the model is shown of a customer: the service's consent rule, offline -------------------------------


def test_model_view_applies_the_service_consent_rule_to_training_rows():
    from nextbest.features.privacy import consent_state
    from nextbest.training.propensity_data import model_view

    # c1 granted everything and has a profile; c2 granted but has no events yet (no profile); c3 declined
    # personalisation; c4 declined profiling only (no profile, as the pipeline builds none); c5 has no record
    # (the default decides); web:x is an unlinked cookie (never profiled).
    table = pl.DataFrame(
        {
            "customer_id": ["c1", "c2", "c3", "c4", "c5", "web:x", "c1"],
            "exposure_id": ["e1", "e2", "e3", "e4", "e5", "e6", "e7"],
            "age": [30, None, 50, None, 40, None, 30],
            "age_band": ["25-34", None, "45-54", None, "35-44", None, "25-34"],
            "region": ["north", None, "south", None, "east", None, "north"],
            "frequency": [3, None, 7, None, 1, 2, 3],
            "cf_affinity": [0.5, None, 0.9, 0.1, 0.2, 0.3, 0.6],
        },
        schema_overrides={"age": pl.Int64, "frequency": pl.Int32},
    )
    customers = pl.DataFrame(
        {
            "customer_id": ["c1", "c2", "c3", "c4", "c5"],
            "age": [30, 22, 50, 61, 40],
            "gender": ["f", "m", "f", "m", "f"],
            "region": ["north", "west", "south", "north", "east"],
        }
    )
    records = pl.DataFrame(
        {
            "customer_id": ["c1", "c1", "c2", "c2", "c3", "c3", "c4", "c4"],
            "purpose": ["personalisation", "profiling"] * 4,
            "granted": [True, True, True, True, False, True, True, False],
            "timestamp": [T0] * 8,
        }
    )
    state = consent_state(records.lazy()).collect()
    columns = ["age", "age_band", "region", "frequency", "cf_affinity"]
    out = model_view(table, columns, customers, state, default=True)
    assert out.columns == table.columns and out["exposure_id"].to_list() == table["exposure_id"].to_list()
    rows = {r["exposure_id"]: r for r in out.iter_rows(named=True)}
    # Everything granted: the profile as it was.
    assert rows["e1"] | {} == table.row(0, named=True)
    # No events yet: the customers table's age and region fill the missing profile; nothing is invented.
    assert (rows["e2"]["age"], rows["e2"]["region"], rows["e2"]["frequency"]) == (22, "west", None)
    assert rows["e2"]["age_band"] is None  # a profile column, not a demographic: the service has none either
    # Personalisation declined: the segment only (age band and region); no behaviour, no affinity.
    assert (rows["e3"]["age_band"], rows["e3"]["region"]) == ("45-54", "south")
    assert (rows["e3"]["age"], rows["e3"]["frequency"], rows["e3"]["cf_affinity"]) == (None, None, None)
    # Profiling declined: demographics (as the service merges them), but no affinity.
    assert (rows["e4"]["age"], rows["e4"]["region"], rows["e4"]["cf_affinity"]) == (61, "north", None)
    # No record: the default (granted) applies.
    assert (rows["e5"]["frequency"], rows["e5"]["cf_affinity"]) == (1, 0.2)
    # An unlinked cookie may be personalised by default but is never profiled: no affinity.
    assert (rows["e6"]["frequency"], rows["e6"]["cf_affinity"]) == (2, None)
    # With "no record means no", c5 keeps only the segment.
    strict = model_view(table, columns, customers, state, default=False)
    r5 = strict.row(4, named=True)
    assert (r5["age_band"], r5["region"], r5["age"], r5["frequency"]) == ("35-44", "east", None, None)


def test_model_view_derives_the_age_band_of_a_declined_customer_without_a_profile():
    from nextbest.features.privacy import consent_state
    from nextbest.training.propensity_data import model_view

    table = pl.DataFrame(
        {"customer_id": ["c1", "c2"], "age_band": [None, None], "n_events": [None, None]},
        schema={"customer_id": pl.String, "age_band": pl.String, "n_events": pl.UInt32},
    )
    customers = pl.DataFrame(
        {"customer_id": ["c1", "c2"], "age": [19, None]}, schema_overrides={"age": pl.Int64}
    )
    records = pl.DataFrame(
        {
            "customer_id": ["c1", "c2"],
            "purpose": ["personalisation"] * 2,
            "granted": [False, False],
            "timestamp": [T0] * 2,
        }
    )
    out = model_view(
        table, ["age_band", "n_events"], customers, consent_state(records.lazy()).collect(), default=True
    )
    # As Engine._model_features: the band of the customers table's age, None (not "unknown") without one.
    assert out["age_band"].to_list() == ["18-24", None]
