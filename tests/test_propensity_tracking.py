"""Propensity tracking: an MLflow run with metrics and artifacts, the registered challenger loading back with the
same predictions, an Optuna study with nested runs, and promotion in both directions."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.training.propensity import PropensityConfig, PropensityModel
from nextbest.training.propensity_data import load_propensity_data
from nextbest.training.propensity_scorer import PropensityScorer
from nextbest.training.propensity_tuning import (
    REGISTERED_MODEL,
    higher_is_better,
    promote_propensity,
    propensity_tracking,
    train_propensity,
    tune_propensity,
)
from nextbest.training.tracking import TrackingConfig, load_pyfunc

QUICK = PropensityConfig(epochs=2, batch_size=256, hidden_sizes=[32], cross_layers=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("propensity-tracking")
    ds = Dataset.at(root / "world")
    generate_world(WorldConfig(customers=300, days=90, seed=5, exposures_per_customer=10), ds)
    previous = mlflow.get_tracking_uri()
    yield ds, load_propensity_data(ds), root
    mlflow.set_tracking_uri(previous)


def _tracking(root, name: str) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{(root / name / 'mlflow.db').as_posix()}")


def test_tracking_defaults_to_the_propensity_registry():
    assert propensity_tracking(None).registered_model == REGISTERED_MODEL == "nextbest-propensity"
    assert propensity_tracking(TrackingConfig(registered_model="mine")).registered_model == "mine"


@pytest.mark.slow  # trains, logs and registers through MLflow
def test_train_logs_a_run_registers_the_challenger_and_it_loads_back(world):
    ds, data, root = world
    tracking = _tracking(root, "train")
    out = train_propensity(
        ds, QUICK, tracking=tracking, device="cpu", model_dir=root / "saved", prepared=data
    )
    for key in (
        "auc",
        "log_loss",
        "brier",
        "ece",
        "baseline_auc_logreg",
        "baseline_auc_base_rate",
        "oracle_auc",
    ):
        assert math.isfinite(out[key]), key
    assert out["registered_model"] == REGISTERED_MODEL and out["alias"] == "challenger"
    assert out["data"]["rows_test"] == data.test.height

    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["run_id"])
    for key in ("auc", "log_loss", "brier", "ece", "baseline_auc_logreg", "oracle_auc", "val_log_loss"):
        assert run.data.metrics[key] == pytest.approx(out[key]), key
    assert run.data.params["lr"] == str(QUICK.lr) and run.data.params["cross_layers"] == "1"
    assert run.data.tags["nextbest.model"] == "propensity"
    assert len(client.get_metric_history(out["run_id"], "epoch_val_loss")) == out["epochs_run"]
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "evaluation")}
    assert {
        "evaluation/reliability.png",
        "evaluation/per_action.csv",
        "evaluation/per_action.html",
        "evaluation/history.csv",
        "evaluation/evaluation.json",
    } <= artifacts

    version = client.get_model_version_by_alias(REGISTERED_MODEL, "challenger")
    assert str(version.version) == out["version"] and version.run_id == out["run_id"]
    assert version.tags["dataset"] == str(ds.root.resolve())

    local = PropensityModel.load(root / "saved").predict_proba(data.test)
    pyfunc = load_pyfunc(f"models:/{REGISTERED_MODEL}@challenger")
    predicted = pyfunc.predict(data.test.to_pandas())["propensity"].to_numpy()
    np.testing.assert_allclose(predicted, local, atol=1e-6)
    scorer = PropensityScorer.load(f"models:/{REGISTERED_MODEL}@challenger")
    np.testing.assert_allclose(scorer.score_frame(data.test), local, atol=1e-7)


@pytest.mark.slow  # a whole Optuna study with MLflow runs
def test_tune_logs_nested_trial_runs_and_registers_the_best(world):
    ds, data, root = world
    tracking = _tracking(root, "tune")
    storage = f"sqlite:///{(root / 'tune' / 'optuna.db').as_posix()}"
    out = tune_propensity(
        ds, trials=2, storage=storage, config=QUICK, tracking=tracking, device="cpu", prepared=data
    )
    assert out["trials"] == 2 and out["complete"] + out["pruned"] == 2
    assert out["version"] == "1" and out["alias"] == "challenger"
    assert out["run_id"] == out["parent_run_id"]
    children = mlflow.search_runs(
        experiment_names=[out["experiment"]],
        filter_string=f"tags.mlflow.parentRunId = '{out['parent_run_id']}'",
        output_format="list",
    )
    assert len(children) == 2
    assert {c.data.tags["optuna.trial"] for c in children} == {"0", "1"}
    for child in children:
        assert "epoch_val_loss" in child.data.metrics
    best = min(children, key=lambda c: c.data.metrics.get("val_log_loss", math.inf))
    assert best.data.metrics["val_log_loss"] == pytest.approx(out["best_value"])
    parent = MlflowClient(out["tracking_uri"]).get_run(out["parent_run_id"])
    assert "auc" in parent.data.metrics and parent.data.tags["nextbest.stage"] == "study"


@pytest.mark.slow  # trains and registers two models through MLflow
def test_promote_moves_champion_only_to_a_better_challenger(world):
    ds, data, root = world
    tracking = _tracking(root, "promote")
    assert "no registered model" in promote_propensity(tracking).reason

    first = train_propensity(ds, QUICK, tracking=tracking, device="cpu", prepared=data)
    decision = promote_propensity(tracking)
    assert decision.promoted and "no champion yet" in decision.reason
    assert promote_propensity(tracking).reason.endswith("is already the champion")

    second = train_propensity(ds, QUICK.model_copy(update={"seed": 1}), tracking=tracking, prepared=data)
    client = MlflowClient(second["tracking_uri"])
    # The run's latest value of a metric is what promotion reads: make the challenger worse, then better.
    client.log_metric(second["run_id"], "val_log_loss", first["val_log_loss"] + 1.0)
    worse = promote_propensity(tracking)
    assert not worse.promoted and "does not beat" in worse.reason
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version) == first["version"]

    client.log_metric(second["run_id"], "val_log_loss", first["val_log_loss"] / 2)
    better = promote_propensity(tracking, data=ds.root)
    assert better.promoted and better.challenger_version == second["version"]
    assert better.champion_version == first["version"] and "<" in better.reason
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version) == second["version"]
    assert (
        str(client.get_model_version_by_alias(REGISTERED_MODEL, "previous-champion").version)
        == first["version"]
    )

    elsewhere = promote_propensity(tracking, data=root / "some-other-dataset")
    assert not elsewhere.promoted and "was trained on" in elsewhere.reason


def test_metric_directions():
    assert higher_is_better("val_auc")
    assert not higher_is_better("val_log_loss") and not higher_is_better("val_ece")
    assert not higher_is_better("brier")
