"""What a reviewer sees in MLflow: every training run carries its configs, a data manifest whose counts match the
data, the plots, and names and tags that line candidates up against the champion (issue 6).

One small generated world with an action log; recommenders and a propensity model are trained (one tiny study
for the Optuna plots) into a SQLite store under a temporary directory, then read back with ``MlflowClient``.
Every count in the data manifests is recomputed here with Polars from the dataset itself.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import FeatureConfig, build_features, clean_events
from nextbest.training.cf import train_cf
from nextbest.training.cf_data import prepare_cf_data
from nextbest.training.cf_tuning import tune_cf
from nextbest.training.evaluation import EvaluationConfig
from nextbest.training.plots import best_so_far
from nextbest.training.promotion import promote_recommender
from nextbest.training.propensity import PropensityConfig
from nextbest.training.propensity_data import PropensityDataConfig, load_propensity_data
from nextbest.training.propensity_tuning import train_propensity
from nextbest.training.recommenders import config_for
from nextbest.training.tracking import DataManifest, TrackingConfig

# Slow: its fixtures train, log and register real models in MLflow (about 10 s before the first test).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_PROPENSITY = PropensityConfig(epochs=2, batch_size=256, hidden_sizes=[32], cross_layers=1)
ALS = {"factors": 16, "iterations": 6}
# The filters the README tells a reviewer to type into the UI's search box.
CHAMPION_FILTER = 'tags.nextbest.alias = "champion"'
CANDIDATES_FILTER = "tags.nextbest.alias LIKE 'ch%'"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("run-artifacts") / "world")
    generate_world(WorldConfig(customers=300, days=120, seed=1, exposures_per_customer=10), ds)
    build_features(ds)
    return ds


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlruns')}/mlflow.db")


@pytest.fixture(scope="module")
def client(tracking) -> MlflowClient:
    return MlflowClient(tracking.tracking_uri, tracking.tracking_uri)


@pytest.fixture(scope="module")
def runs(world, tracking, client, tmp_path_factory):
    """Popularity trained and promoted, then ALS trained and promoted over it (on discovery NDCG, where the
    planted preferences make ALS far better), then a tiny ALS study, and a propensity model.

    Returns the results and, per step, the run each alias pointed at, read from the tags after that step.
    """
    prepared = prepare_cf_data(world)
    alias_runs = {}

    def tagged(flt: str) -> list[str]:
        exp = client.get_experiment_by_name("world")
        return sorted(r.info.run_id for r in client.search_runs([exp.experiment_id], flt))

    popularity = train_cf(world, "popularity", tracking=tracking, prepared=prepared)
    first = promote_recommender(tracking, metric="new_ndcg_at_10")
    alias_runs["first"] = (first, tagged(CHAMPION_FILTER))
    als = train_cf(world, "als", ALS, tracking=tracking, prepared=prepared)
    alias_runs["before second"] = (None, tagged(CANDIDATES_FILTER))
    second = promote_recommender(tracking, metric="new_ndcg_at_10")
    alias_runs["second"] = (second, tagged(CHAMPION_FILTER))
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna')}/optuna.db"
    study = tune_cf(world, "als", trials=3, storage=storage, tracking=tracking, prepared=prepared, seed=1)
    table = load_propensity_data(world)
    propensity = train_propensity(world, QUICK_PROPENSITY, tracking=tracking, device="cpu", prepared=table)
    return {
        "popularity": popularity,
        "als": als,
        "study": study,
        "propensity": propensity,
        "aliases": alias_runs,
        "prepared": prepared,
    }


# --- helpers ------------------------------------------------------------------------------------------------


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def read_json(client: MlflowClient, run_id: str, path: str, tmp: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(tmp))).read_text())


def assert_real_png(client: MlflowClient, run_id: str, path: str, tmp: Path) -> None:
    """A PNG that is a figure: magic bytes, a plausible size, and ink on at least 1 % of the pixels."""
    import matplotlib.image

    local = Path(client.download_artifacts(run_id, path, str(tmp)))
    data = local.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))
    pixels = matplotlib.image.imread(local)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300, (path, pixels.shape)
    ink = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert ink > 0.01, (path, ink)


def clean_personalisation_events(ds: Dataset) -> pl.DataFrame:
    manifest = ds.read_manifest()
    return clean_events(
        ds, FeatureConfig.model_validate(manifest["config"]), purpose="personalisation"
    ).collect()


# --- recommender runs ---------------------------------------------------------------------------------------


def test_recommender_train_run_has_config_manifest_plots_name_and_tags(runs, world, client, tmp_path):
    result = runs["als"]
    run_id = result.tracking["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "als train · world"
    tags = run.data.tags
    assert tags["nextbest.model"] == "als" and tags["nextbest.stage"] == "train"
    assert tags["nextbest.dataset"] == "world" and tags["nextbest.dataset_path"] == str(world.root.resolve())
    assert tags["nextbest.registered_model"] == "nextbest-recommender"
    assert tags["nextbest.model_version"] == result.tracking["version"]

    paths = artifact_paths(client, run_id)
    for name in (
        "config.json",
        "data_manifest.json",
        "evaluation/metrics_by_k.png",
        "evaluation/segments_validation.png",
        "evaluation/segments_validation.csv",
        "evaluation/metrics_by_k_test.png",
        "evaluation/segments_test.png",
    ):
        assert name in paths, (name, sorted(paths))
    for png in ("evaluation/metrics_by_k.png", "evaluation/segments_validation.png"):
        assert_real_png(client, run_id, png, tmp_path)

    configs = read_json(client, run_id, "config.json", tmp_path)
    assert configs["model"] == "als"
    assert config_for("als", configs["config"]) == config_for("als", ALS) == result.config
    assert EvaluationConfig.model_validate(configs["evaluation"]) == EvaluationConfig()
    feature_manifest = world.read_manifest()
    assert FeatureConfig.model_validate(configs["features"]) == FeatureConfig.model_validate(
        feature_manifest["config"]
    )
    assert configs["run_options"] == {"seed": 0, "threads": 0}

    manifest = DataManifest.model_validate(read_json(client, run_id, "data_manifest.json", tmp_path))
    validation_start = datetime.fromisoformat(feature_manifest["splits"]["validation_start"])
    test_start = datetime.fromisoformat(feature_manifest["splits"]["test_start"])
    assert (manifest.validation_start, manifest.test_start) == (validation_start, test_start)
    assert manifest.dataset == "world" and manifest.features_code_version == feature_manifest["code_version"]

    raw = pl.scan_parquet(sorted(world.raw_dir.glob("events*.parquet"))).select(pl.len()).collect().item()
    events = clean_personalisation_events(world)
    ts = pl.col("timestamp")
    train = events.filter(ts < validation_start)
    validation = events.filter((ts >= validation_start) & (ts < test_start))
    before_test = events.filter(ts < test_start)
    expected = {
        "raw_events": raw,
        "events": events.height,
        "train_events": train.height,
        "validation_events": validation.height,
        "test_events": events.filter(ts >= test_start).height,
        # every event type has a positive weight: an interaction is a distinct (customer, item) pair
        "train_interactions": train.select("customer_id", "item_id").unique().height,
        "train_customers": train["customer_id"].n_unique(),
        "train_items": train["item_id"].n_unique(),
        "validation_purchases": validation.filter(pl.col("event_type") == "purchase").height,
        "full_interactions": before_test.select("customer_id", "item_id").unique().height,
    }
    assert {k: manifest.rows[k] for k in expected} == expected
    assert raw > events.height > train.height > validation.height > 0
    # validation customers (what the metrics average over): bought an item known in training, and are known
    purchases = validation.filter(
        (pl.col("event_type") == "purchase")
        & pl.col("customer_id").is_in(train["customer_id"].implode())
        & pl.col("item_id").is_in(train["item_id"].implode())
    )
    assert manifest.rows["validation_customers"] == purchases["customer_id"].n_unique()

    params = run.data.params
    assert params["data.validation_start"] == validation_start.isoformat()
    assert params["data.test_start"] == test_start.isoformat()
    for key, value in expected.items():
        assert params[f"data.{key}"] == str(value), key
    assert params["model"] == "als" and params["factors"] == "16"


def test_recommender_version_has_a_description_with_metrics_and_run_link(runs, client):
    result = runs["als"]
    version = client.get_model_version("nextbest-recommender", result.tracking["version"])
    assert f"ndcg_at_10 {result.metrics['ndcg_at_10']:.4f}" in version.description
    assert f"runs/{result.tracking['run_id']})" in version.description


def test_study_parent_has_optuna_plots_and_its_trials_are_named_and_tagged(runs, client, tmp_path):
    study = runs["study"]
    parent = client.get_run(study.parent_run_id)
    assert parent.info.run_name == "als study · world"
    assert parent.data.tags["nextbest.stage"] == "study" and parent.data.tags["nextbest.model"] == "als"
    paths = artifact_paths(client, study.parent_run_id)
    for name in (
        "config.json",
        "data_manifest.json",
        "evaluation/optuna_history.png",
        "evaluation/optuna_importance.png",
        "evaluation/optuna_trials.csv",
        "evaluation/metrics_by_k.png",
        "evaluation/segments_validation.png",
    ):
        assert name in paths, (name, sorted(paths))
    for png in ("evaluation/optuna_history.png", "evaluation/optuna_importance.png"):
        assert_real_png(client, study.parent_run_id, png, tmp_path)
    configs = read_json(client, study.parent_run_id, "config.json", tmp_path)
    assert config_for("als", configs["config"]) == study.best.config
    assert parent.data.params["data.train_events"] == str(runs["prepared"].event_counts["train_events"])

    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{study.parent_run_id}'"
    )
    assert len(trials) == 3
    assert {r.info.run_name for r in trials} == {f"als trial {n} · world" for n in range(3)}
    assert all(r.data.tags["nextbest.stage"] == "trial" for r in trials)
    # the best-so-far line of the history plot: the trials' recorded values, the best is the maximum
    frame = pl.read_csv(
        client.download_artifacts(study.parent_run_id, "evaluation/optuna_trials.csv", str(tmp_path))
    )
    complete = frame.filter(pl.col("state") == "COMPLETE")
    assert complete["value"].max() == pytest.approx(study.best_value)


# --- propensity run -----------------------------------------------------------------------------------------


def test_propensity_train_run_has_config_manifest_reliability_name_and_tags(runs, world, client, tmp_path):
    out = runs["propensity"]
    run_id = out["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "propensity train · world"
    tags = run.data.tags
    assert (tags["nextbest.model"], tags["nextbest.stage"], tags["nextbest.dataset"]) == (
        "propensity",
        "train",
        "world",
    )
    assert tags["nextbest.registered_model"] == "nextbest-propensity"
    assert tags["nextbest.model_version"] == out["version"] and tags["nextbest.alias"] == "challenger"

    paths = artifact_paths(client, run_id)
    assert {"config.json", "data_manifest.json", "evaluation/reliability.png"} <= paths, sorted(paths)
    assert_real_png(client, run_id, "evaluation/reliability.png", tmp_path)

    configs = read_json(client, run_id, "config.json", tmp_path)
    assert PropensityConfig.model_validate(configs["config"]) == QUICK_PROPENSITY
    assert PropensityDataConfig.model_validate(configs["data_config"]) == PropensityDataConfig()

    manifest = DataManifest.model_validate(read_json(client, run_id, "data_manifest.json", tmp_path))
    assert manifest.split == {
        "source": "fractions",
        "target": "actions",
        "validation_fraction": 0.15,
        "test_fraction": 0.15,
    }
    actions = pl.read_parquet(sorted(world.raw_dir.glob("actions*.parquet")))
    ts = pl.col("timestamp")
    periods = {
        "train": actions.filter(ts < manifest.validation_start),
        "validation": actions.filter((ts >= manifest.validation_start) & (ts < manifest.test_start)),
        "test": actions.filter(ts >= manifest.test_start),
    }
    expected = {"exposures": actions.height, "customers": actions["customer_id"].n_unique()}
    for name, part in periods.items():
        expected[f"{name}_exposures"] = part.height
        expected[f"{name}_responses"] = int(part["responded"].sum())
    expected["actions"] = pl.read_parquet(sorted(world.raw_dir.glob("action_catalog*.parquet"))).height
    assert {k: manifest.rows[k] for k in expected} == expected
    # the cut-offs are where the fractions put them: 15 % of exposures in each later period (± ties)
    for name in ("validation", "test"):
        share = expected[f"{name}_exposures"] / actions.height
        assert share == pytest.approx(0.15, abs=0.01), (name, share)
    params = run.data.params
    assert params["data.train_exposures"] == str(expected["train_exposures"])
    assert params["data.split.validation_fraction"] == "0.15"
    assert params["data_config.snapshot_days"] == "7" and params["lr"] == str(QUICK_PROPENSITY.lr)


# --- aliases as tags --------------------------------------------------------------------------------------------


def test_alias_tags_follow_the_registry_and_move_with_each_promotion(runs, client):
    pop_run = runs["popularity"].tracking["run_id"]
    als_run = runs["als"].tracking["run_id"]
    study_run = runs["study"].parent_run_id

    first, champions = runs["aliases"]["first"]
    assert first.promoted and "no champion yet" in first.reason
    assert champions == [pop_run]
    # before the second promotion, the candidates filter lines up the challenger (ALS) and the champion
    _, candidates = runs["aliases"]["before second"]
    assert candidates == sorted([pop_run, als_run])
    second, champions = runs["aliases"]["second"]
    assert second.promoted and second.champion_version == runs["popularity"].tracking["version"]
    assert second.challenger_version == runs["als"].tracking["version"]
    assert second.challenger_value > 1.5 * second.champion_value  # planted preferences: discovery needs CF
    assert champions == [als_run]

    # now: the study's best is the challenger, ALS the champion, popularity the previous champion
    alias = {r: client.get_run(r).data.tags.get("nextbest.alias") for r in (pop_run, als_run, study_run)}
    assert alias == {pop_run: "previous-champion", als_run: "champion", study_run: "challenger"}
    registry = client.get_registered_model("nextbest-recommender").aliases
    assert registry["champion"] == int(runs["als"].tracking["version"])
    assert registry["challenger"] == int(runs["study"].best.tracking["version"])
    # the propensity registry is separate: its run's alias is its own
    assert client.get_run(runs["propensity"]["run_id"]).data.tags["nextbest.alias"] == "challenger"


def test_the_readme_filters_work_and_pick_the_runs_they_promise(runs, client):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    filters = re.findall(r"^\| `(tags\.nextbest\.[^`]+)` \|", readme, flags=re.MULTILINE)
    assert CHAMPION_FILTER in filters and CANDIDATES_FILTER in filters, filters
    exp = client.get_experiment_by_name("world")
    names = {f: sorted(r.info.run_name for r in client.search_runs([exp.experiment_id], f)) for f in filters}
    assert names[CHAMPION_FILTER] == ["als train · world"]
    assert names[CANDIDATES_FILTER] == ["als study · world", "als train · world"]
    assert names['tags.nextbest.alias = "previous-champion"'] == ["popularity train · world"]
    assert names['tags.nextbest.stage != "trial"'] == sorted(
        ["popularity train · world", "als train · world", "als study · world"]
    )
    top = client.search_runs([exp.experiment_id], 'tags.nextbest.stage != "trial"')
    assert {r.data.params.get("data.dataset") for r in top} == {"world"}  # a column of the compare view
    assert names['tags.nextbest.model = "als"'] == sorted(
        ["als train · world", "als study · world", *(f"als trial {n} · world" for n in range(3))]
    )


def test_best_so_far_follows_the_direction_of_the_study():
    values = [0.3, 0.1, 0.2, 0.05, 0.4]
    assert best_so_far(values) == [0.3, 0.3, 0.3, 0.3, 0.4]
    assert best_so_far(values, minimize=True) == [0.3, 0.1, 0.1, 0.05, 0.05]
    assert best_so_far([]) == []


def test_a_relogged_parent_keeps_first_params_and_records_changed_facts_as_tags(world, tracking, client):
    import mlflow

    from nextbest.training.tracking import log_run_inputs, use_tracking

    experiment_id = use_tracking(tracking, "relog")
    cutoffs = {"validation_start": datetime(2026, 3, 1), "test_start": datetime(2026, 4, 1)}

    def manifest(events: int) -> DataManifest:
        return DataManifest.describe(world, **cutoffs, split={"source": "test"}, rows={"events": events})

    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_run_inputs({"config": {"a": 1}}, manifest(10), mutable=True)
    log_run_inputs({"config": {"a": 2}}, manifest(12), run_id=run.info.run_id, mutable=True)
    logged = client.get_run(run.info.run_id).data
    assert logged.params["data.events"] == "10" and logged.tags["data.events"] == "12"
    assert "data.test_start" not in logged.tags  # unchanged facts are not repeated as tags
    local = client.download_artifacts(run.info.run_id, "data_manifest.json")
    assert DataManifest.model_validate_json(Path(local).read_text()).rows["events"] == 12
    with pytest.raises(RuntimeError, match="needs a run"):
        log_run_inputs({}, manifest(1))
