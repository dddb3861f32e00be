"""Propensity ceiling: how close to the planted oracle a model can get on a generated world (issue 4 evidence).

Usage::

    .venv/bin/python benchmarks/propensity_ceiling.py [--customers 5000] [--seed 42] [--gb-seeds 5] [--json]

Method. The world is the one ``benchmarks/propensity.py`` builds and reuses; ``load_propensity_data`` splits it
by time and every AUC is on the same test-period rows. The planted propensity's inputs are rebuilt per exposure
from the raw and truth tables: the action's kind, brand, sport, discount and channel; the customer's true
preferred brand and sport, age, app habit and latent price sensitivity; R, F90 and M from the customer's
purchases strictly before the exposure (cookies resolved through ``truth/identities``).
``features.generate.planted_propensity`` on them must reproduce ``truth/propensity.parquet`` (else it stops).

* oracle: ``p_true``; the goal (issue 4) is AUC ≥ oracle − 0.02.
* oracle, consent rule: ``p_true``, but for customers who declined personalisation or profiling the world's
  mean ``p_true`` of the same (action, channel, age group). The consent rule is the service's
  (``training.propensity_data.model_view``): without personalisation the model sees the segment (age band,
  region) only; without profiling no behaviour, only demographics; so of the planted inputs only the age
  survives a decline.
* oracle, consent rule, latent traits read from behaviour: the same, averaged over the latent app habit's
  Bayes posterior given the customer's session counts per channel in our table (the generator's channel mix,
  the world's share of app customers by age group as the prior) and over the latent price sensitivity at its
  share in the world; the other inputs exact.
* oracle formula on what our table shows: the same, with the brand and sport matches from our profiles'
  preferred brand and sport, and the group mean for rows without a profile (no events before the snapshot):
  nearly the best a model of our table could do given unlimited data.
* GB rows: scikit-learn ``HistGradientBoostingClassifier`` fitted on the training and validation periods (its
  own early stopping on a random 10%), mean test AUC over seeds 0..n-1. On the true inputs; then with the
  customer inputs but the age (brand/sport match, app habit, R, F90, M) missing for decliners and the price
  sensitivity left out (exact observable features under the consent rule); then the same, missing wherever our
  table has no profile (declined, or no consented events yet); then on our encoded model inputs
  (``FeatureEncoder`` categoricals of at most 255 values as categorical features, all numerics).
* network: ``fit_propensity`` with the default ``PropensityConfig`` (trained on the training period,
  early-stopped and calibrated on the validation period); logreg: ``evaluate_propensity``'s baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a script, this file's folder comes first on sys.path and its name would shadow the features package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

if TYPE_CHECKING:
    from nextbest.features.dataset import Dataset

GOAL_GAP = 0.02
# The planted propensity's customer inputs (``_planted`` reads them all). The consent rule hides every one but
# the age, a demographic the service shows the model whatever the customer declined (as an age band without
# personalisation, whose bounds include the planted thresholds 35 and 55).
PROFILE_INPUTS = (
    "brand_match",
    "sport_match",
    "app_user",
    "age",
    "recency_days",
    "frequency_90d",
    "monetary",
)
EXPOSURE_INPUTS = ("kind_index", "channel_index", "discount_pct")
DEMOGRAPHIC_INPUTS = ("age",)
REPRODUCTION_TOLERANCE = 1e-9


class CeilingError(RuntimeError):
    """The rebuilt oracle inputs do not reproduce the planted propensity."""


def _purchase_history(events: pl.DataFrame, identities: pl.DataFrame) -> pl.DataFrame:
    """Purchases by true customer in time order, with the running count and spend up to each one."""
    true_id = identities.select(
        pl.col("source_id").alias("customer_id"), pl.col("customer_id").alias("owner")
    )
    return (
        events.filter(pl.col("event_type") == "purchase")
        .join(true_id, on="customer_id", how="left")
        .select(
            pl.coalesce("owner", "customer_id").alias("customer_id"),
            pl.col("timestamp").alias("at"),
            (pl.col("price") * pl.col("quantity")).alias("amount"),
        )
        .sort("customer_id", "at")
        .with_columns(
            pl.col("amount").cum_sum().over("customer_id").alias("spend"),
            pl.int_range(1, pl.len() + 1).over("customer_id").alias("count"),
        )
        .sort("at", "count")  # same-time purchases: the last one carries the full count
    )


def _history_before(exposures: pl.DataFrame, history: pl.DataFrame, days: int) -> pl.DataFrame:
    """Per exposure, the customer's purchase count, spend and last purchase strictly before ``timestamp − days``."""
    left = exposures.select(
        "exposure_id", "customer_id", (pl.col("timestamp") - pl.duration(days=days)).alias("at")
    ).sort("at")
    right = history.select("customer_id", "at", "spend", "count", pl.col("at").alias("last_at"))
    joined = left.join_asof(
        right,
        on="at",
        by="customer_id",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,  # both sides are sorted by "at" (polars cannot check that within "by" groups)
    )
    return joined.select(
        "exposure_id", pl.col("spend").fill_null(0.0), pl.col("count").fill_null(0), "last_at"
    )


def true_inputs(ds: Dataset) -> pl.DataFrame:
    """Per exposure, the planted propensity's inputs rebuilt from the raw and truth tables, with ``p_rebuilt``,
    ``p_true`` and ``profiling`` (the customer grants profiling)."""
    from nextbest.features.generate import ACTION_KINDS, EXPOSURE_CHANNELS

    truth = ds.truth_dir
    catalog = ds.read("action_catalog").select(
        "action_id", "kind", pl.col("brand").alias("action_brand"), pl.col("sport").alias("action_sport"),
        pl.col("discount_pct").fill_null(0.0),
    )  # fmt: skip
    preferences = pl.read_parquet(truth / "preferences.parquet").select(
        "customer_id", pl.col("brand").alias("true_brand"), pl.col("sport").alias("true_sport")
    )
    consent = (
        pl.read_parquet(truth / "consent.parquet")
        .filter(pl.col("purpose").is_in(["personalisation", "profiling"]))
        .pivot(on="purpose", index="customer_id", values="granted", aggregate_function="first")
    )
    exposures = (
        ds.read("actions")
        .select("exposure_id", "customer_id", "action_id", "channel", "timestamp")
        .join(catalog, on="action_id", how="left")
        .join(preferences, on="customer_id", how="left")
        .join(pl.read_parquet(truth / "latent.parquet"), on="customer_id", how="left")
        .join(ds.read("customers").select("customer_id", "age"), on="customer_id", how="left")
        .join(consent.select("customer_id", "personalisation", "profiling"), on="customer_id", how="left")
    )
    history = _purchase_history(ds.read("events"), pl.read_parquet(truth / "identities.parquet"))
    now = _history_before(exposures, history, 0)
    before_90 = _history_before(exposures, history, 90).select(
        "exposure_id", pl.col("count").alias("count_90")
    )
    x = (
        exposures.join(now, on="exposure_id", how="left")
        .join(before_90, on="exposure_id", how="left")
        .with_columns(
            pl.col("kind").replace_strict({k: i for i, k in enumerate(ACTION_KINDS)}).alias("kind_index"),
            pl.col("channel")
            .replace_strict({c: i for i, c in enumerate(EXPOSURE_CHANNELS)})
            .alias("channel_index"),
            (pl.col("action_brand") == pl.col("true_brand")).fill_null(False).alias("brand_match"),
            (pl.col("action_sport") == pl.col("true_sport")).fill_null(False).alias("sport_match"),
            (pl.col("channel_type") == "app").alias("app_user"),
            pl.col("age").cast(pl.Float64),
            pl.when(pl.col("last_at").is_null())
            .then(float("inf"))
            .otherwise((pl.col("timestamp") - pl.col("last_at")).dt.total_seconds() / 86400)
            .alias("recency_days"),
            (pl.col("count") - pl.col("count_90")).alias("frequency_90d"),
            pl.col("spend").alias("monetary"),
            pl.col("profiling").fill_null(True),
            pl.col("personalisation").fill_null(True),
        )
    )
    x = x.with_columns(pl.Series("p_rebuilt", _planted(x, x["price_sensitive"].to_numpy())))
    planted = pl.read_parquet(truth / "propensity.parquet").select(
        "exposure_id", pl.col("p_true").cast(pl.Float64)
    )
    x = x.join(planted, on="exposure_id", how="left")
    worst = float((x["p_rebuilt"] - x["p_true"]).abs().max())
    if not worst <= REPRODUCTION_TOLERANCE:
        raise CeilingError(
            f"{ds.root}: rebuilt inputs give p_true off by up to {worst:.3g} (world generator changed?)"
        )
    return x


def _planted(x: pl.DataFrame, price_sensitive: np.ndarray) -> np.ndarray:
    from nextbest.features.generate import planted_propensity

    col = {c: x[c].to_numpy() for c in (*PROFILE_INPUTS, *EXPOSURE_INPUTS)}
    return planted_propensity(
        kind=col["kind_index"], brand_match=col["brand_match"], sport_match=col["sport_match"],
        discount_pct=col["discount_pct"], channel=col["channel_index"], age=col["age"], app_user=col["app_user"],
        price_sensitive=price_sensitive, recency_days=col["recency_days"], frequency_90d=col["frequency_90d"],
        monetary=col["monetary"],
    )  # fmt: skip


_AGE_GROUP = (
    pl.when(pl.col("age") < 35).then(0).when(pl.col("age") < 55).then(1).otherwise(2).alias("age_group")
)  # the planted thresholds


def oracle_under_consent(x: pl.DataFrame, rows: pl.DataFrame) -> np.ndarray:
    """``p_true`` where the customer grants personalisation and profiling, else the world's mean ``p_true`` of
    (action, channel, age group): what is left visible of a customer who declined either."""
    keys = ["action_id", "channel", "age_group"]
    x = x.with_columns(_AGE_GROUP)
    means = x.group_by(keys).agg(pl.col("p_true").mean().alias("p_group"))
    r = rows.select("exposure_id").join(
        x.select("exposure_id", *keys, "p_true", "profiling", "personalisation"),
        on="exposure_id",
        how="left",
        maintain_order="left",
    )
    r = r.join(means, on=keys, how="left", maintain_order="left")
    granted = pl.col("profiling") & pl.col("personalisation")
    return r.select(pl.when(granted).then("p_true").otherwise("p_group")).to_series().to_numpy()


def oracle_with_observed_habit(
    x: pl.DataFrame, rows: pl.DataFrame, *, observed_preferences: bool = False
) -> np.ndarray:
    """:func:`oracle_under_consent`, but with the two latent traits read as well as behaviour allows: the
    planted formula averaged over P(app habit | session counts per channel in our table) — a Bayes posterior
    under the generator's :data:`~features.generate.CHANNEL_MIX`, the world's share of app customers by age
    group as the prior — and over the price sensitivity at its share in the world. Every other input exact;
    with ``observed_preferences`` the brand and sport matches come from our profiles' preferred brand and sport
    instead, and a row without a profile (no events before its snapshot) gets the group mean like a decliner —
    nearly the best any model of our table could do with unlimited data."""
    from nextbest.features.generate import CHANNEL_MIX, CUSTOMER_TYPES

    customers = x.unique("customer_id").with_columns(_AGE_GROUP)
    prior = customers.group_by("age_group").agg(
        *[(pl.col("channel_type") == t).mean().alias(t) for t in CUSTOMER_TYPES]
    )
    r = rows.select(
        "exposure_id",
        "n_events",
        "preferred_brand",
        "preferred_sport",
        *[f"sessions_{t}" for t in CUSTOMER_TYPES],
    ).join(x.with_columns(_AGE_GROUP), on="exposure_id", how="left", maintain_order="left")
    granted = (r["profiling"] & r["personalisation"]).to_numpy()
    if observed_preferences:
        r = r.with_columns(
            (pl.col("action_brand") == pl.col("preferred_brand")).fill_null(False).alias("brand_match"),
            (pl.col("action_sport") == pl.col("preferred_sport")).fill_null(False).alias("sport_match"),
        )
        granted = granted & r["n_events"].is_not_null().to_numpy()
    p_type = r.select("age_group").join(prior, on="age_group", how="left", maintain_order="left")
    counts = np.column_stack(
        [r[f"sessions_{t}"].fill_null(0).cast(pl.Float64).to_numpy() for t in CUSTOMER_TYPES]
    )
    log_post = np.log(np.column_stack([p_type[t].to_numpy() for t in CUSTOMER_TYPES]) + 1e-12)
    log_post = log_post + counts @ np.log(np.asarray(CHANNEL_MIX)).T
    post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    p_app = post[:, CUSTOMER_TYPES.index("app")] / post.sum(axis=1)
    # Price sensitivity shows in behaviour too faintly to read (see the README): its share in the world.
    share_sensitive = float(customers["price_sensitive"].mean())
    expected = np.zeros(r.height)
    for app, p_a in ((True, p_app), (False, 1.0 - p_app)):
        for sensitive, p_s in ((True, share_sensitive), (False, 1.0 - share_sensitive)):
            planted = _planted(r.with_columns(pl.lit(app).alias("app_user")), np.full(r.height, sensitive))
            expected += p_a * p_s * planted
    return np.where(granted, expected, oracle_under_consent(x, rows))


def true_matrix(x: pl.DataFrame, rows: pl.DataFrame, hidden: np.ndarray, *, sensitivity: bool) -> np.ndarray:
    """The true inputs of ``rows`` as a float matrix: exposure inputs first, then the profile inputs (NaN where
    ``hidden``), then the latent price sensitivity if ``sensitivity``."""
    r = rows.select("exposure_id").join(x, on="exposure_id", how="left", maintain_order="left")
    cols = [r[c].cast(pl.Float64).to_numpy() for c in EXPOSURE_INPUTS]
    for c in PROFILE_INPUTS:
        v = r[c].cast(pl.Float64).to_numpy()
        v = np.where(np.isinf(v), 999.0, v)  # no purchase yet: a finite "long ago"
        cols.append(v if c in DEMOGRAPHIC_INPUTS else np.where(hidden, np.nan, v))
    if sensitivity:
        cols.append(r["price_sensitive"].cast(pl.Float64).to_numpy())
    return np.column_stack(cols)


def gb_categoricals(cardinalities: Any) -> np.ndarray:
    """Which encoded categorical inputs gradient boosting takes as categorical features: those of at most 255
    values (``HistGradientBoostingClassifier``'s limit); the others are left out."""
    return np.asarray(cardinalities) <= 255


def gb_inputs(rows: Any, categoricals: np.ndarray) -> np.ndarray:
    """Gradient boosting's matrix of encoded rows: the categoricals ``categoricals`` selects, then every numeric."""
    return np.column_stack([rows.categorical[:, categoricals], rows.numeric]).astype(np.float64)


def gradient_boosting_aucs(
    x_learn: np.ndarray,
    y_learn: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    categorical: int,
    seeds: int,
) -> list[float]:
    """Test AUC of histogram gradient boosting (its first ``categorical`` columns categorical), one per seed."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from nextbest.training.propensity_metrics import roc_auc

    mask = np.arange(x_learn.shape[1]) < categorical
    aucs = []
    for seed in range(seeds):
        model = HistGradientBoostingClassifier(
            max_iter=500, learning_rate=0.05, max_leaf_nodes=15, early_stopping=True,
            validation_fraction=0.1, categorical_features=mask, random_state=seed,
        )  # fmt: skip
        model.fit(x_learn, y_learn)
        aucs.append(roc_auc(y_test, model.predict_proba(x_test)[:, 1]))
    return aucs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--exposures", type=float, default=4.0, help="exposures per customer")
    parser.add_argument("--seed", type=int, default=42, help="world seed")
    parser.add_argument("--data", default=None, help="world directory (default benchmarks/out/propensity-…)")
    parser.add_argument(
        "--gb-seeds", type=int, default=5, help="gradient boosting fits (seeds 0..n-1) per row"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)

    from benchmarks.propensity import propensity_world
    from nextbest.training.propensity import PropensityConfig, fit_propensity
    from nextbest.training.propensity_data import load_propensity_data
    from nextbest.training.propensity_eval import evaluate_propensity
    from nextbest.training.propensity_metrics import roc_auc

    started = time.perf_counter()
    # The same world as benchmarks/propensity.py (same default folder; generated once, then reused).
    ds = propensity_world(args.customers, args.days, args.seed, args.exposures, data=args.data)
    root = ds.root
    data = load_propensity_data(ds)
    x = true_inputs(ds)
    learn, test = pl.concat([data.train, data.validation], how="diagonal_relaxed"), data.test
    y_learn, y = (f["responded"].cast(pl.Float64).to_numpy() for f in (learn, test))
    test_truth = test.select("exposure_id").join(x, on="exposure_id", how="left", maintain_order="left")
    aucs: dict[str, list[float]] = {
        "oracle": [roc_auc(y, test_truth["p_true"].to_numpy())],
        "oracle, consent rule": [roc_auc(y, oracle_under_consent(x, test))],
        "oracle, consent rule, latent traits read from behaviour": [
            roc_auc(y, oracle_with_observed_habit(x, test))
        ],
        "oracle formula on what our table shows": [
            roc_auc(y, oracle_with_observed_habit(x, test, observed_preferences=True))
        ],
    }

    def declined(rows: pl.DataFrame) -> np.ndarray:
        r = rows.select("exposure_id").join(x, on="exposure_id", how="left", maintain_order="left")
        return ~(r["profiling"] & r["personalisation"]).to_numpy()

    def no_profile(rows: pl.DataFrame) -> np.ndarray:
        return rows["n_events"].is_null().to_numpy()

    def nothing(rows: pl.DataFrame) -> np.ndarray:
        return np.zeros(rows.height, dtype=bool)

    for name, hide, sensitivity in (
        ("GB, true inputs", nothing, True),
        ("GB, true inputs, consent rule, no price sensitivity", declined, False),
        ("GB, true inputs where our table has a profile, no price sensitivity", no_profile, False),
    ):
        x_learn, x_test = (true_matrix(x, f, hide(f), sensitivity=sensitivity) for f in (learn, test))
        aucs[name] = gradient_boosting_aucs(x_learn, y_learn, x_test, y, 2, args.gb_seeds)

    fit = fit_propensity(data, PropensityConfig(), device="cpu")
    report = evaluate_propensity(fit, data, baselines=True)
    encoder = fit.model.encoder
    small = gb_categoricals(encoder.cardinalities)
    x_obs = np.vstack([gb_inputs(fit.encoded_train, small), gb_inputs(fit.encoded_validation, small)])
    aucs["GB, observed inputs"] = gradient_boosting_aucs(
        x_obs, y_learn, gb_inputs(encoder.encode_frame(test), small), y, int(small.sum()), args.gb_seeds
    )
    aucs["network (default PropensityConfig)"] = [roc_auc(y, report.predictions["model"])]
    aucs["logreg"] = [roc_auc(y, report.predictions["logreg"])]

    oracle = aucs["oracle"][0]
    goal = oracle - GOAL_GAP
    seconds = time.perf_counter() - started
    share_declined = float(declined(test).mean())
    print(
        f"world {root}: {learn.height:,} training+validation rows, {test.height:,} test rows ({share_declined:.1%} "
        f"declined personalisation or profiling, {float(no_profile(test).mean()):.1%} without a profile in our table)"
    )
    print(
        f"rebuilt inputs reproduce p_true (max |Δp| ≤ {REPRODUCTION_TOLERANCE:g}); GB: mean of {args.gb_seeds} seeds"
    )
    width = max(len(k) for k in aucs) + 2
    print(f"{'model':<{width}}{'test AUC':>10}{'GB seeds min–max':>18}{'oracle − AUC':>14}{'meets goal':>12}")
    for name, values in aucs.items():
        auc = float(np.mean(values))
        spread = f"{min(values):.4f}–{max(values):.4f}" if len(values) > 1 else ""
        meets = "yes" if auc >= goal else "no"
        print(f"{name:<{width}}{auc:>10.4f}{spread:>18}{oracle - auc:>14.4f}{meets:>12}")
    print(f"{'goal threshold (oracle − 0.02)':<{width}}{goal:>10.4f}")
    print(f"{seconds:.0f} s (network: {len(fit.history)} epochs)")
    summary = {
        "dataset": str(root),
        "rows_learn": learn.height,
        "rows_test": test.height,
        "test_share_declined": share_declined,
        "auc": {name: float(np.mean(v)) for name, v in aucs.items()},
        "gb_seed_aucs": {name: v for name, v in aucs.items() if len(v) > 1},
        "goal_threshold": goal,
        "network_epochs": len(fit.history),
        "seconds": round(seconds, 1),
    }
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
