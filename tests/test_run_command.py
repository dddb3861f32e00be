"""The main job, as the README's first command runs it: ``nextbest run`` generates the embedded world, builds its
features, tunes and registers a recommender, trains a propensity model, promotes both (an empty registry has no
champion to beat) and exports the champions into the BentoML model store. One real subprocess on a tiny world,
with MLflow and ``BENTOML_HOME`` in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # a subprocess job


def test_the_main_job_registers_promotes_and_exports_both_models(tmp_path):
    from mlflow import MlflowClient

    from nextbest.serving.engine_config import PROPENSITY_MODEL, RECOMMENDER_MODEL

    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    home = tmp_path / "bentoml"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    nextbest = Path(sys.executable).with_name("nextbest")
    argv = [str(nextbest), "run", "--data", str(tmp_path / "world"), "--customers", "300", "--days", "90"]
    done = subprocess.run(
        [*argv, "--trials", "2", "--json", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    assert summary["features"]["row_counts"]["profiles"] > 0
    assert summary["recommender"]["promotion"]["promoted"] is True
    assert summary["propensity"]["promotion"]["promoted"] is True
    client = MlflowClient(uri, uri)
    champions = {
        name: client.get_model_version_by_alias(name, "champion")
        for name in (RECOMMENDER_MODEL, PROPENSITY_MODEL)
    }
    # A 300-customer world is too small to judge the model (its quality is tested elsewhere): what the command
    # prints is what the champion's MLflow run logged.
    logged = client.get_run(champions[PROPENSITY_MODEL].run_id).data.metrics
    for key in ("auc", "oracle_auc"):
        assert summary["propensity"][key] == pytest.approx(logged[key]), key
    assert str(summary["propensity"]["version"]) == str(champions[PROPENSITY_MODEL].version)
    exported = summary["bento"]["bento_champions"]
    assert set(exported) == {RECOMMENDER_MODEL, PROPENSITY_MODEL}
    for name, version in champions.items():
        # The exported tag names the registry version it came from, and the store holds it.
        assert exported[name].startswith(f"{name}:v{version.version}-")
        assert (home / "models" / name / exported[name].split(":", 1)[1] / "model.yaml").is_file()
    assert summary["bento"]["bento_home"] == str(home)
