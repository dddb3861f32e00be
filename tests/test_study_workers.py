"""Several `nextbest tune cf` workers started at once against one new Optuna storage and one new MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from mlflow import MlflowClient

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import build_features
from nextbest.training.tracking import REGISTERED_MODEL, TAG_STAGE

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # worker processes

WORKERS = 2
TRIALS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("workers") / "world")
    generate_world(WorldConfig(customers=300, days=120, seed=4), ds)
    build_features(ds)
    return ds


def test_workers_share_one_study_one_parent_run_and_register_the_best(world, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"  # neither file exists yet: the workers race to create both
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    argv = [
        sys.executable,
        "-m",
        "nextbest.serving.cli",
        "tune",
        "cf",
        "--data",
        str(world.root),
        "--model",
        "als",
    ]
    argv += ["--trials", str(TRIALS), "--storage", storage, "--study", "shared", "--json", "--quiet"]
    procs = [
        subprocess.Popen(
            [*argv, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for seed in range(WORKERS)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    # One study holding every worker's trials, each with its own configuration (seeds differ).
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == WORKERS * TRIALS
    configs = {json.dumps(t.user_attrs["config"], sort_keys=True) for t in study.trials}
    assert len(configs) == WORKERS * TRIALS

    check_one_shared_study(uri, study, summaries, WORKERS * TRIALS, WORKERS)


def check_one_shared_study(
    uri: str, study: optuna.Study, summaries: list[dict], trials: int, workers: int
) -> None:
    """What workers sharing one study leave in MLflow (at ``uri``): one parent run (the losers of the race
    deleted theirs) with a nested run per trial, and the study's best trial registered once as the challenger."""
    client = MlflowClient(uri, uri)  # the registry too: earlier tests in this process set a global one
    experiment = client.get_experiment_by_name("world")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_STAGE}` = 'study'", max_results=100
    )
    assert len(parents) == 1
    parent = parents[0].info.run_id
    assert {s["run_id"] for s in summaries} == {parent}
    nested = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100
    )
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == list(range(trials))

    # The challenger is the study's best trial, registered once: the worker that finished last saw every trial,
    # and a worker whose best was overtaken registered nothing or an earlier version.
    registered = study.user_attrs["nextbest_registered_best"]
    assert registered["trial"] == study.best_trial.number
    challenger = client.get_model_version_by_alias(REGISTERED_MODEL, "challenger")
    assert str(challenger.version) == registered["logged"]["version"]
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert 1 <= len(versions) <= workers
    assert registered["logged"]["version"] in {s.get("version") for s in summaries}
    assert client.get_run(parent).data.metrics["best_value"] == pytest.approx(study.best_value)
