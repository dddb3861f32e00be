"""A self-contained Bento: champions exported from MLflow into the BentoML model store, built, served without MLflow.

One module fixture generates a small world, trains a tiny recommender and propensity model into a temporary
MLflow registry and runs ``nextbest promote`` for both (which exports the champions into a temporary
``BENTOML_HOME``). The tests check the store's labels and idempotency, run the real ``bentoml build`` from the
repository root, serve the built Bento with the MLflow registry out of reach and compare its answers with the
engine loaded from MLflow, and finally move ``champion`` in the registry and check that the store follows.

BentoML resolves ``BENTOML_HOME`` once per process, on first use of its stores, so the fixture also points
its model and Bento stores at the temporary home for the module (whatever ran earlier in the process); the
subprocesses (``bentoml build``, ``bentoml serve``) get it through the environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import build_features
from nextbest.serving import api
from nextbest.serving.bento_store import (
    CHALLENGER,
    CHAMPION,
    NO_ALIAS,
    PROPENSITY_MODEL,
    RECOMMENDER_MODEL,
    bento_model_tags,
    export_champions,
    stored_champion,
    stored_models,
)
from nextbest.serving.cli import main
from nextbest.serving.engine import Engine, EngineConfig, EngineLoadError, check_models, load_serving_models
from nextbest.serving.server import PROJECT_ROOT, start
from nextbest.training.cf import train_cf
from nextbest.training.propensity_tuning import train_propensity
from nextbest.training.tracking import TrackingConfig

pytestmark = [
    pytest.mark.slow,  # bentoml build and serve
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]


@dataclass
class Packaged:
    """The trained world, its registry, the BentoML home and what ``nextbest promote --json`` printed."""

    ds: Dataset
    tracking_uri: str
    home: Path
    root: Path
    promoted: dict[str, dict]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Packaged:
    root = tmp_path_factory.mktemp("bento")
    home = root / "bentoml"
    for folder in ("models", "bentos", "envs", "tmp"):
        (home / folder).mkdir(parents=True)
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    with (
        pytest.MonkeyPatch.context() as mp,
        BentoMLContainer.bentoml_home.patch(str(home)),
        BentoMLContainer.model_store.patch(ModelStore(home / "models")),
        BentoMLContainer.bento_store.patch(BentoStore(home / "bentos")),
    ):
        mp.setenv("BENTOML_HOME", str(home))
        mp.setenv("BENTOML_DO_NOT_TRACK", "True")
        ds = Dataset.at(root / "world")
        generate_world(WorldConfig(customers=400, days=120, seed=5), ds)
        build_features(ds)
        (root / "mlruns").mkdir()
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        tracking = TrackingConfig(tracking_uri=uri)
        train_cf(
            ds, "als", {"factors": 16, "iterations": 8}, tracking=tracking, evaluate_test=False, threads=1
        )
        train_propensity(
            ds, {"epochs": 2, "hidden_sizes": [32], "batch_size": 512}, tracking=tracking, device="cpu"
        )
        promoted = {}
        for kind in ("recommender", "propensity"):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(["promote", kind, "--tracking-uri", uri, "--json", "--quiet"]) == 0
            promoted[kind] = json.loads(printed.getvalue().strip().splitlines()[-1])
        yield Packaged(ds, uri, home, root, promoted)


def _store_files(home: Path) -> dict[str, float]:
    """Every stored model folder under ``home`` with its ``model.yaml`` modification time."""
    return {
        f"{p.parent.parent.name}:{p.parent.name}": p.stat().st_mtime
        for p in sorted((home / "models").glob("*/*/model.yaml"))
    }


def known_customers(ds: Dataset, k: int) -> list[str]:
    """Customers with every consent and a profile (the model was fitted on them)."""
    state = pl.read_parquet(ds.features_dir / "consent_state.parquet").filter(
        pl.col("personalisation") & pl.col("profiling") & pl.col("marketing")
    )
    profiled = set(pl.read_parquet(ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    return [c for c in sorted(state["customer_id"].to_list()) if c in profiled][:k]


def test_promote_exports_the_champions_with_their_registry_labels(packaged):
    for kind, name in (("recommender", RECOMMENDER_MODEL), ("propensity", PROPENSITY_MODEL)):
        summary = packaged.promoted[kind]
        assert summary["promoted"] and summary["challenger_version"] == "1"
        (stored,) = stored_models(name)
        assert summary["bento_model"] == stored.tag and stored.tag.startswith(f"{name}:v1-")
        assert summary["bento_home"] == str(packaged.home)
        assert (packaged.home / "models" / name / stored.tag.split(":")[1] / "model.yaml").exists()
        assert (stored.registered_model, stored.mlflow_version, stored.alias) == (name, "1", CHAMPION)
        assert stored.run_id and stored.tag.endswith(stored.run_id[:8])
        assert stored_champion(name).tag == stored.tag
    # The labels and metadata BentoML itself reports.
    import bentoml

    info = bentoml.models.get(packaged.promoted["recommender"]["bento_model"]).info
    assert info.labels["registered_model"] == RECOMMENDER_MODEL and info.labels["alias"] == CHAMPION
    from mlflow import MlflowClient

    client = MlflowClient(packaged.tracking_uri, packaged.tracking_uri)
    version = client.get_model_version_by_alias(RECOMMENDER_MODEL, CHAMPION)
    assert info.labels["mlflow_run_id"] == version.run_id
    logged = client.get_run(version.run_id).data.metrics["ndcg_at_10"]
    assert info.metadata["metrics"]["ndcg_at_10"] == pytest.approx(logged)
    assert info.metadata["source"] == f"models:/{RECOMMENDER_MODEL}/1"


def test_a_second_export_adds_nothing(packaged):
    before = _store_files(packaged.home)
    assert len(before) == 2
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bento", "export", "--tracking-uri", packaged.tracking_uri, "--json"]) == 0
    summary = json.loads(printed.getvalue().strip().splitlines()[-1])
    assert [m["action"] for m in summary["bento_models"]] == ["unchanged", "unchanged"]
    assert _store_files(packaged.home) == before


def test_a_missing_champion_or_store_model_says_what_to_run(packaged, tmp_path):
    empty = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    from nextbest.serving.bento_store import BentoStoreError

    with pytest.raises(BentoStoreError, match="nextbest train cf"):
        export_champions(empty)
    config = EngineConfig(
        data=packaged.ds.root, model_source="bentoml", recommender_model="nextbest-unexported"
    )
    with pytest.raises(EngineLoadError, match="nextbest promote recommender") as e:
        check_models(config)
    assert "\n" not in str(e.value) and "nextbest-unexported" in str(e.value)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bento", "export", "--tracking-uri", empty]) == 2


def test_model_source_bentoml_loads_the_exported_champions(packaged, tmp_path):
    config = EngineConfig(
        data=packaged.ds.root, model_source="bentoml", tracking_uri=f"sqlite:///{tmp_path}/none/mlflow.db"
    )
    assert check_models(config) == {
        "recommender": f"{RECOMMENDER_MODEL}/1",
        "propensity": f"{PROPENSITY_MODEL}/1",
    }
    models = load_serving_models(config)
    assert models.recommender[CHAMPION].label == f"{RECOMMENDER_MODEL}/1"
    assert models.propensity[CHAMPION].label == f"{PROPENSITY_MODEL}/1"
    assert not (tmp_path / "none").exists()  # the registry was never asked


def test_bentoml_build_packages_both_champions_and_serves_them_without_mlflow(packaged, tmp_path):
    env = os.environ | {"BENTOML_HOME": str(packaged.home), "BENTOML_DO_NOT_TRACK": "True"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = next(
        line.removeprefix("__tag__:") for line in built.stdout.splitlines() if line.startswith("__tag__:")
    )
    champions = {kind: packaged.promoted[kind]["bento_model"] for kind in ("recommender", "propensity")}
    assert bento_model_tags(tag) == champions
    bento_dir = packaged.home / "bentos" / tag.replace(":", "/")
    text = (bento_dir / "bento.yaml").read_text()
    assert "service: serving.bento_entry:NextBest" in text and "/next_best_action" in text
    for f in (
        "serving/engine.py",
        "serving/policies/default.toml",
        "serving/templates/dashboard.html.j2",
        "features/profiles.py",
        "training/propensity.py",
    ):
        assert (bento_dir / "src" / f).exists(), f
    assert not (bento_dir / "src" / "tests").exists() and not (bento_dir / "src" / "data").exists()

    # The same answers from the engine that loads the champions from MLflow.
    reference = Engine.load(
        EngineConfig(
            data=packaged.ds.root,
            tracking_uri=packaged.tracking_uri,
            model_source="mlflow",
            state_dir=tmp_path / "reference",
            model_poll_seconds=0,
        )
    )
    customers = known_customers(packaged.ds, 5)
    try:
        expected = {
            c: reference.recommend(api.RecommendRequest(customer_id=c, n=5)).model_dump(mode="json")
            for c in customers
        }
    finally:
        reference.close()

    # An empty registry: MLflow would create its tables in it on first use.
    unreachable = tmp_path / "no-registry" / "mlflow.db"
    unreachable.parent.mkdir()
    unreachable.touch()
    server = start(
        packaged.ds.root,
        bento=tag,
        state_dir=tmp_path / "state",
        tracking_uri=f"sqlite:///{unreachable}",
        threads=2,
        log_path=tmp_path / "server.log",
    )
    with server:
        server.wait_ready(timeout=180)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        for c in customers:
            r = httpx.post(f"{server.url}/recommend", json={"customer_id": c, "n": 5}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in expected[c]["items"]]
            assert body["model_version"] == expected[c]["model_version"] == f"{RECOMMENDER_MODEL}/1"
        decision = httpx.post(
            f"{server.url}/next_best_action", json={"customer_id": customers[0], "channel": "web"}, timeout=30
        ).json()
        assert decision["model_versions"] == {
            "recommender": f"{RECOMMENDER_MODEL}/1",
            "propensity": f"{PROPENSITY_MODEL}/1",
        }
    assert f'from "{tag}"' in server.log()  # BentoML served the built Bento, not the working tree
    assert unreachable.stat().st_size == 0  # the MLflow registry was never opened


def test_the_store_follows_the_registry_champion(packaged):
    """A new challenger is stored beside the champion, which is written again to stay the latest; after the
    champion alias moves, the new champion becomes the latest and the old one loses its alias label; then
    nothing changes."""
    from mlflow import MlflowClient

    tracking = TrackingConfig(tracking_uri=packaged.tracking_uri)
    train_cf(packaged.ds, "popularity", None, tracking=tracking, evaluate_test=False, threads=1)
    first = export_champions(packaged.tracking_uri, models={"recommender": RECOMMENDER_MODEL})
    assert [(e.mlflow_version, e.alias, e.action) for e in first] == [
        ("2", CHALLENGER, "exported"),
        ("1", CHAMPION, "rewritten"),
    ]
    assert stored_champion(RECOMMENDER_MODEL).mlflow_version == "1"
    assert len(stored_models(RECOMMENDER_MODEL)) == 2
    split = load_serving_models(
        EngineConfig(data=packaged.ds.root, model_source="bentoml", challenger_share=0.5)
    )
    assert {arm: m.label for arm, m in split.recommender.items()} == {
        CHAMPION: f"{RECOMMENDER_MODEL}/1",
        CHALLENGER: f"{RECOMMENDER_MODEL}/2",
    }

    MlflowClient(packaged.tracking_uri, packaged.tracking_uri).set_registered_model_alias(
        RECOMMENDER_MODEL, CHAMPION, "2"
    )
    second = export_champions(packaged.tracking_uri, models={"recommender": RECOMMENDER_MODEL})
    assert [(e.mlflow_version, e.alias, e.action) for e in second] == [("2", CHAMPION, "rewritten")]
    assert stored_champion(RECOMMENDER_MODEL).mlflow_version == "2"
    aliases = {s.mlflow_version: s.alias for s in stored_models(RECOMMENDER_MODEL)}
    assert aliases == {"1": NO_ALIAS, "2": CHAMPION}
    moved = load_serving_models(EngineConfig(data=packaged.ds.root, model_source="bentoml"))
    assert moved.recommender[CHAMPION].label == f"{RECOMMENDER_MODEL}/2"
    before = _store_files(packaged.home)
    third = export_champions(packaged.tracking_uri, models={"recommender": RECOMMENDER_MODEL})
    assert [e.action for e in third] == ["unchanged"]
    assert _store_files(packaged.home) == before


def test_credentials_in_a_tracking_uri_stay_out_of_the_stored_metadata():
    from nextbest.serving.bento_store import _without_credentials

    assert (
        _without_credentials("https://ann:s3cret@mlflow.example:5000/api")
        == "https://mlflow.example:5000/api"
    )
    assert _without_credentials("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"
