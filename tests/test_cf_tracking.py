"""Training, tuning, MLflow tracking, the pyfunc model and promotion, on a small generated world."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from nextbest.features.dataset import Dataset, DatasetError
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import build_features
from nextbest.training.cf import train_cf
from nextbest.training.cf_data import CFDataError, prepare_cf_data
from nextbest.training.cf_tuning import tune_cf
from nextbest.training.promotion import promote_recommender
from nextbest.training.tracking import CHAMPION, REGISTERED_MODEL, TrackingConfig, load_pyfunc
from tests.conftest import process_wide_mlflow_uri

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("cf") / "world")
    generate_world(WorldConfig(customers=300, days=120, seed=1), ds)
    build_features(ds)
    return ds


@pytest.fixture(scope="module")
def prepared(world):
    return prepare_cf_data(world)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlruns')}/mlflow.db")


@pytest.fixture(scope="module")
def study(world, prepared, tracking, tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna')}/optuna.db"
    result = tune_cf(world, "als", trials=4, storage=storage, tracking=tracking, prepared=prepared, seed=1)
    return result, storage


def test_every_model_trains_and_als_beats_popularity_on_discovery(world, prepared):
    off = TrackingConfig(enabled=False)
    results = {
        m: train_cf(world, m, tracking=off, prepared=prepared) for m in ("popularity", "repeat", "als")
    }
    for r in results.values():
        json.dumps(r.to_dict())  # the CLI prints it
        assert {"ndcg_at_10", "new_ndcg_at_10", "recall_at_20", "map_at_10", "hit_rate_at_5"} <= set(
            r.metrics
        )
        assert r.test_metrics is not None and "ndcg_at_10" in r.test_metrics
        assert r.counts["customers"] > 50
    pop, rep, als = (results[m].metrics for m in ("popularity", "repeat", "als"))
    # Planted preferences (sport, colour, brand) and follow-ups: CF must find new items popularity cannot.
    assert als["new_ndcg_at_10"] > 1.5 * pop["new_ndcg_at_10"]
    assert rep["ndcg_at_10"] > 2 * pop["ndcg_at_10"]
    # The registered bundle is the refit on train + validation: it knows more customers than train alone.
    assert results["als"].bundle.history.matrix.shape[0] >= prepared.train.interactions.matrix.shape[0]


@pytest.mark.slow  # a whole Optuna study with MLflow runs
def test_study_logs_parent_and_nested_runs_and_registers_challenger(study, tracking):
    result, _ = study
    assert result.trials == 4 and result.complete + result.pruned == 4 and result.complete >= 1
    client = MlflowClient(tracking.tracking_uri)
    exp = client.get_experiment_by_name("world")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(nested) == 4
    assert {r.data.tags["optuna.state"] for r in nested} <= {"COMPLETE", "PRUNED"}
    complete = [r for r in nested if r.data.tags["optuna.state"] == "COMPLETE"]
    assert all("ndcg_at_10" in r.data.metrics and "factors" in r.data.params for r in complete)
    # ALS reported its validation score while fitting (the pruning signal)
    history = client.get_metric_history(nested[0].info.run_id, "ndcg_at_10_by_iteration")
    assert len(history) >= 1
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "challenger")
    assert version.run_id == result.parent_run_id
    assert str(version.version) == result.best.tracking["version"]
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["ndcg_at_10"] == pytest.approx(result.best.metrics["ndcg_at_10"])
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "evaluation")}
    for name in (
        "metrics_by_k.png",
        "optuna_history.png",
        "segments_validation.csv",
        "segments_validation.html",
        "evaluation.json",
    ):
        assert f"evaluation/{name}" in artifacts, artifacts


@pytest.mark.slow  # loads the registered model through MLflow's pyfunc
def test_pyfunc_from_the_registry_matches_the_in_memory_model(study, tracking, prepared):
    result, _ = study
    # A models:/ URI is resolved through the process-wide tracking URI: set it for the load, then put it back.
    with process_wide_mlflow_uri(tracking.tracking_uri):
        loaded = load_pyfunc(f"models:/{REGISTERED_MODEL}@challenger")
    customers = [*list(prepared.validation.segments["customer_id"][:5]), "NOBODY"]
    got = loaded.predict(pd.DataFrame({"customer_id": customers}), params={"n": 5})
    expected = result.best.bundle.recommend(customers, 5).to_pandas()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    assert set(got["customer_id"]) == set(customers) and (got.groupby("customer_id").size() == 5).all()
    assert loaded.metadata.signature is not None


@pytest.mark.slow  # needs the module's Optuna study with MLflow runs: ~7 s
def test_study_resumes_from_its_storage(study, world, prepared, tracking):
    result, storage = study
    again = tune_cf(world, "als", trials=1, storage=storage, tracking=tracking, prepared=prepared, seed=2)
    assert again.study_name == result.study_name and again.trials == 5
    assert again.parent_run_id == result.parent_run_id
    loaded = optuna.load_study(study_name=result.study_name, storage=storage)
    assert len(loaded.trials) == 5
    # The best trial's model is registered once: a resumed study whose best did not change keeps that version.
    first, second = result.to_dict()["version"], again.to_dict()["version"]
    if again.best_trial == 4:  # the new trial is the new best: a new version
        assert second != first
    else:
        assert again.best_trial == result.best_trial and second == first


@pytest.mark.slow  # needs the module's Optuna study with MLflow runs
def test_promotion_needs_a_better_challenger(study, world, prepared, tracking):
    first = promote_recommender(tracking)
    assert first.promoted and "no champion yet" in first.reason
    champion_version = first.challenger_version
    again = promote_recommender(tracking)
    assert not again.promoted and "already the champion" in again.reason
    # popularity is far worse on ndcg_at_10 than the tuned ALS: registered as challenger, refused as champion
    worse = train_cf(world, "popularity", tracking=tracking, prepared=prepared, evaluate_test=False)
    assert worse.tracking["alias"] == "challenger"
    decision = promote_recommender(tracking)
    assert not decision.promoted
    assert "does not beat" in decision.reason and decision.champion_version == champion_version
    client = MlflowClient(tracking.tracking_uri)
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version) == champion_version
    elsewhere = promote_recommender(tracking, data=world.root.parent / "other")
    assert not elsewhere.promoted and "trained on" in elsewhere.reason


def test_missing_features_and_splits_are_named(tmp_path, world):
    bare = Dataset.at(tmp_path / "bare").ensure()
    with pytest.raises(DatasetError, match="features build"):
        prepare_cf_data(bare)
    manifest = json.loads(world.manifest_path.read_text())
    copy = Dataset.at(tmp_path / "nosplit")
    copy.ensure()
    for f in world.raw_dir.glob("*.parquet"):
        (copy.raw_dir / f.name).write_bytes(f.read_bytes())
    copy.features_dir.mkdir(parents=True)
    copy.manifest_path.write_text(json.dumps({**manifest, "splits": None, "warnings": ["too short"]}))
    with pytest.raises(CFDataError, match="too short"):
        prepare_cf_data(copy)
