"""MLflow tracking: where runs go, what every run carries, logging the pyfunc model, registry aliases.

Tracking URI: ``TrackingConfig.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlruns/mlflow.db``. With a SQLite URI, artifacts go to ``artifacts/`` beside the database
file (``mlruns/artifacts`` by default). One experiment per dataset, named after the dataset directory.
Registered model ``nextbest-recommender``; new models get the alias ``challenger``, and
:func:`training.promotion.promote_recommender` moves ``champion`` to it only when it is better on the validation
metric. Optuna studies and their runs are :mod:`training.studies`.

What a reviewer sees, the same for the recommender and the propensity model:

* run names ``<model> <stage> · <dataset>`` (``als train · world``, ``als study · world``,
  ``als trial 3 · world``) and tags ``nextbest.model``, ``nextbest.stage`` (``train``, ``study``, ``trial``),
  ``nextbest.dataset`` (the dataset's name; ``nextbest.dataset_path`` the resolved directory);
* every top-level run (train, study parent) logs ``config.json`` (its typed configs) and
  ``data_manifest.json`` (:class:`DataManifest`), and the manifest's key facts as ``data.*`` params;
* a run whose model is registered carries ``nextbest.registered_model``, ``nextbest.model_version`` and
  ``nextbest.alias`` (``challenger``, ``champion`` or ``previous-champion``), kept in step with the registry
  aliases by :func:`sync_alias_tags` whenever a model is registered or promoted, so that the filter
  ``tags.nextbest.alias = "champion"`` finds the champion's run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

import polars as pl
from pydantic import BaseModel, ConfigDict

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.moved_names import moved_names
from nextbest.training.registry import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION
from nextbest.training.registry import RECOMMENDER as REGISTERED_MODEL

MODEL_NAME_IN_RUN = "model"
MODEL_CODE = Path(__file__).with_name("recommender_model_code.py")
CONFIG_ARTIFACT = "config.json"
DATA_MANIFEST_ARTIFACT = "data_manifest.json"
TAG_MODEL = "nextbest.model"
TAG_STAGE = "nextbest.stage"
TAG_DATASET = "nextbest.dataset"
TAG_DATASET_PATH = "nextbest.dataset_path"
TAG_REGISTERED_MODEL = "nextbest.registered_model"
TAG_MODEL_VERSION = "nextbest.model_version"
TAG_ALIAS = "nextbest.alias"
ALIAS_PRECEDENCE = (CHAMPION, CHALLENGER, PREVIOUS_CHAMPION)
"""A run whose registered versions hold several aliases is tagged with the first of these it holds."""
Stage = Literal["train", "study", "trial"]
T = TypeVar("T")

# Moved out by the split, still importable from here: each is imported from its new module on first use (those
# modules import this one, so importing them back at the top would be a cycle). version_by_alias lives in
# training.registry; callers imported it from here while the promotion gate here used it.
__getattr__ = moved_names(
    __name__,
    {
        "nextbest.training.promotion": "PromotionDecision promote promote_recommender",
        "nextbest.training.studies": "REGISTERED_BEST_ATTR StudyRun log_trial_run open_study register_study_best "
        "start_study study_parent_run",
        "nextbest.training.registry": "version_by_alias",
    },
)


class TrackingConfig(BaseModel):
    """Where and whether runs are tracked.

    Attributes:
        enabled: log to MLflow at all (off: train and evaluate only).
        tracking_uri: MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or the SQLite file under ``mlruns/``.
        experiment: experiment name; default the dataset directory's name.
        registered_model: registry name of the model.
        register_model: register the logged model and point ``alias`` at it.
        alias: the alias a newly registered model gets.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str | None = None
    registered_model: str = REGISTERED_MODEL
    register_model: bool = True
    alias: str = CHALLENGER


def resolve_tracking_uri(config: TrackingConfig | None = None) -> str:
    """The tracking URI in force (see the module docstring)."""
    if config is not None and config.tracking_uri:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / 'mlruns' / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths against the working directory), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix) :]).resolve()


def artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments: ``artifacts/`` beside a SQLite database; the server's default else."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db is not None else None


def default_optuna_storage(config: TrackingConfig | None = None) -> str:
    """Optuna's RDB storage: ``optuna.db`` beside the MLflow SQLite file, else ``mlruns/optuna.db``."""
    db = sqlite_path(resolve_tracking_uri(config))
    folder = db.parent if db is not None else Path.cwd() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').as_posix()}"


def use_tracking(config: TrackingConfig, default_experiment: str) -> str:
    """Point MLflow at the tracking URI, create the experiment if needed; return its id."""
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(config)
    db = sqlite_path(uri)  # its folder is created by sqlite_init_lock below
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = config.experiment or default_experiment

    def experiment_id() -> str:
        client = MlflowClient(uri, uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except Exception:
            # Another worker created it between our lookup and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # Workers started together against a new SQLite file race to create and migrate MLflow's tables.
    with sqlite_init_lock(db):
        return with_retries(experiment_id, what=f"the MLflow store at {mask_credentials(uri)}")


@contextmanager
def sqlite_init_lock(db: Path | None):
    """Hold an exclusive lock on ``<db>.init.lock`` (nothing for a server URI, ``db`` None): processes on one
    machine that open a new SQLite store at once create its tables one after the other, not concurrently."""
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def registry_write_lock(uri: str, name: str):
    """Hold an exclusive lock named ``name`` on the tracking store at ``uri`` across processes and machines: the
    SQLite file's ``.init.lock`` (:func:`sqlite_init_lock`), a session-level advisory lock on a PostgreSQL store,
    nothing for an MLflow server URL (it offers no lock)."""
    db = sqlite_path(uri)
    if db is not None:
        with sqlite_init_lock(db):
            yield
        return
    if not uri.startswith("postgresql"):
        yield
        return
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from nextbest.features.dataset_lock import advisory_lock_key

    key = advisory_lock_key(name)
    engine = sa.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def with_retries(work: Callable[[], T], *, what: str, attempts: int = 8) -> T:
    """``work()``, retried with a short randomised back-off when the database says another writer got there
    first (tables or a row created concurrently, a locked SQLite file): how several tuning workers can start
    at once against one new storage.

    Raises:
        StudyStorageError: still failing after ``attempts`` tries (the message names ``what`` and the cause).
    """
    import random

    for attempt in range(attempts):
        try:
            return work()
        except Exception as exc:
            if not (_lost_a_race(exc) or _lost_a_race(getattr(exc, "__cause__", None))):
                raise
            if attempt == attempts - 1:
                raise StudyStorageError(
                    f"{what}: still failing after {attempts} tries: {str(exc).splitlines()[0]}"
                ) from exc
            time.sleep(0.1 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


DUPLICATE_DDL_SQLSTATES = frozenset({"42P07", "42710"})
"""PostgreSQL's duplicate_table and duplicate_object: another worker created the table or enum type first."""


def _lost_a_race(exc: BaseException | None) -> bool:
    """Whether ``exc`` says another writer got there first (see :func:`with_retries`)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(exc, IntegrityError | OperationalError):
        return True
    if isinstance(exc, ProgrammingError):
        orig = exc.orig
        return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in DUPLICATE_DDL_SQLSTATES
    return False


class StudyStorageError(NextbestError, RuntimeError):
    """An Optuna or MLflow store could not be opened (after retrying concurrent initialisation)."""


def flat_params(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``cf.factors`` → ``"64"``."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def mask_credentials(url: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://***@host/db`` (for logs and results)."""
    return re.sub(r"//[^/@]+@", "//***@", url)


# --- what every run carries: names, tags, configs and the data manifest -----------------------------------------


def run_name(model: str, stage: Stage, dataset: str, *, trial: int | None = None) -> str:
    """``als train · world``, ``als study · world``, ``als trial 3 · world``."""
    what = stage if trial is None else f"{stage} {trial}"
    return f"{model} {what} · {dataset}"


def run_tags(model: str, stage: Stage, dataset: Dataset) -> dict[str, str]:
    """The ``nextbest.*`` tags the compare view filters and groups by."""
    root = dataset.root.resolve()
    return {
        TAG_MODEL: model,
        TAG_STAGE: stage,
        TAG_DATASET: root.name,
        TAG_DATASET_PATH: str(root),
    }


class DataManifest(BaseModel):
    """What data a run was trained and evaluated on, logged as ``data_manifest.json`` and ``data.*`` params.

    Attributes:
        dataset: the dataset's name (its directory's name).
        dataset_path: the resolved dataset directory.
        code_version: nextbest's version (and commit) that trained the run.
        features_code_version: the code version in the feature manifest (None before ``features build``).
        features_built_at: when the features were built (None before ``features build``).
        validation_start: first time of the validation period.
        test_start: first time of the test period.
        split: how the cut-offs were chosen (``source`` and, where used, the fractions).
        rows: row counts (events, interactions or exposures per period, customers, items …).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    dataset_path: str
    code_version: str
    features_code_version: str | None = None
    features_built_at: str | None = None
    validation_start: datetime
    test_start: datetime
    split: dict[str, str | float | None]
    rows: dict[str, int]

    @classmethod
    def describe(
        cls,
        ds: Dataset,
        *,
        validation_start: datetime,
        test_start: datetime,
        split: Mapping[str, str | float | None],
        rows: Mapping[str, int],
    ) -> DataManifest:
        """The manifest of a run on ``ds``: the feature manifest's facts (when built) and ``raw_events`` added
        to ``rows`` (counted from the raw files now, so a re-import since the feature build shows)."""
        from nextbest.features.pipeline import code_version

        built: dict[str, Any] = ds.read_manifest() if ds.manifest_path.exists() else {}
        raw_events = ds.scan("events").select(pl.len()).collect().item() if ds.has_table("events") else 0
        root = ds.root.resolve()
        return cls(
            dataset=root.name,
            dataset_path=str(root),
            code_version=code_version(),
            features_code_version=built.get("code_version"),
            features_built_at=built.get("built_at"),
            validation_start=validation_start,
            test_start=test_start,
            split=dict(split),
            rows={"raw_events": int(raw_events), **{k: int(v) for k, v in rows.items()}},
        )

    def params(self) -> dict[str, str]:
        """The key facts as ``data.*`` MLflow params (columns of the compare view)."""
        out = {
            "data.dataset": self.dataset,
            "data.features_code_version": str(self.features_code_version),
            "data.validation_start": self.validation_start.isoformat(),
            "data.test_start": self.test_start.isoformat(),
        }
        out.update({f"data.split.{k}": str(v) for k, v in self.split.items()})
        out.update({f"data.{k}": str(v) for k, v in self.rows.items()})
        return out


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def log_run_inputs(
    configs: Mapping[str, Any], manifest: DataManifest, *, run_id: str | None = None, mutable: bool = False
) -> None:
    """Log ``config.json`` (every config of the run under its name), ``data_manifest.json`` and the manifest's
    ``data.*`` params into a run (default the active one).

    Args:
        configs: name → typed config (pydantic models are dumped as JSON) or plain JSON value.
        manifest: the data the run used.
        run_id: the run (default: the active run).
        mutable: the run is logged again later (a study's parent run when a resumed study finds a new best):
            params already logged with another value are recorded as tags of the same name instead, since
            MLflow params cannot change.
    """
    import mlflow
    from mlflow import MlflowClient

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_run_inputs needs a run: pass run_id or call it inside mlflow.start_run()")
        run_id = active.info.run_id
    client = MlflowClient()
    config_text = json.dumps({k: _jsonable(v) for k, v in configs.items()}, indent=2, default=str)
    client.log_text(run_id, config_text + "\n", CONFIG_ARTIFACT)
    client.log_text(run_id, manifest.model_dump_json(indent=2) + "\n", DATA_MANIFEST_ARTIFACT)
    params = manifest.params()
    logged = client.get_run(run_id).data.params if mutable else {}
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
    fresh = [k for k in params if k not in logged]
    from mlflow.entities import Param, RunTag

    client.log_batch(
        run_id,
        params=[Param(k, params[k]) for k in fresh],
        tags=[RunTag(k, v) for k, v in changed.items()],
    )


@contextmanager
def quiet_mlflow():
    """Silence MLflow's advice that does not apply to us and its artifact download bars.

    Our signature is explicit (so the type-hint advice is moot), and ``rank`` is never missing (so the
    integer-column hint is too).
    """
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*type hint", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*[Ii]nteger column", category=UserWarning)
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def load_pyfunc(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` without the advice warnings (see :func:`quiet_mlflow`)."""
    with quiet_mlflow():
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(model_uri)


def pip_requirements() -> list[str]:
    """What the pyfunc needs beyond nextbest itself (which must be installed where it is served)."""
    reqs = []
    for pkg in (
        "implicit",
        "numpy",
        "scipy",
        "polars",
        "pandas",
        "pyarrow",
        "pydantic",
        "mlflow",
        "threadpoolctl",
    ):
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_recommender_bundle(
    bundle_dir: Path,
    *,
    example_customers: list[str],
    tracking: TrackingConfig,
    version_tags: dict[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Log a saved bundle as a pyfunc model in the active run; register it and set the alias when asked
    (see :func:`register_logged_model`).

    Returns:
        ``model_uri``, ``model_id`` and, when registered, ``registered_model``, ``version`` and ``alias``.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from nextbest.training.recommender_bundle import RecommenderBundle

    with quiet_mlflow():
        # Imported here: defining the PythonModel subclass is what triggers MLflow's type-hint advice.
        from nextbest.training.recommender_pyfunc import BUNDLE_ARTIFACT, DEFAULT_PARAMS

        example = pd.DataFrame({"customer_id": example_customers[:2] or ["unknown"]})
        output = RecommenderBundle.load(bundle_dir).recommend(example["customer_id"].tolist(), 3).to_pandas()
        signature = infer_signature(example, output, params=dict(DEFAULT_PARAMS))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(MODEL_CODE),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=tracking.registered_model if tracking.register_model else None,
        )
    return register_logged_model(info, tracking, version_tags=version_tags, description=description)


def version_description(metrics: Mapping[str, float], *, run_id: str, experiment_id: str) -> str:
    """A registered version's description: its key validation metrics and a link to its run in the UI."""
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None and math.isfinite(v))
    link = f"[run {run_id[:8]}](#/experiments/{experiment_id}/runs/{run_id})"
    return f"Validation: {shown or 'no metrics'}. Trained in {link}."


def register_logged_model(
    info: Any,
    tracking: TrackingConfig,
    *,
    version_tags: Mapping[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """After ``log_model(..., registered_model_name=...)`` in the active run: tag the version, describe it,
    point ``tracking.alias`` at it, and tag the run (``nextbest.registered_model``, ``nextbest.model_version``,
    ``nextbest.alias`` via :func:`sync_alias_tags`).

    Returns:
        ``model_uri``, ``model_id`` and, when registered, ``registered_model``, ``version`` and ``alias``.
    """
    import mlflow
    from mlflow import MlflowClient

    out: dict[str, Any] = {"model_uri": info.model_uri, "model_id": info.model_id}
    if not tracking.register_model:
        return out
    name = tracking.registered_model
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    # Two study workers on a server store may register at the same moment: the one whose alias insert loses the
    # race sets it again (the registry then holds both versions, the alias on the later).
    with_retries(
        lambda: client.set_registered_model_alias(name, tracking.alias, version),
        what=f"the alias {tracking.alias!r} of {name}",
    )
    run_id = mlflow.active_run().info.run_id
    client.set_tag(run_id, TAG_REGISTERED_MODEL, name)
    client.set_tag(run_id, TAG_MODEL_VERSION, version)
    sync_alias_tags(client, name)
    out.update({"registered_model": name, "version": version, "alias": tracking.alias})
    return out


def set_version_tags(tracking_uri: str, registered_model: str, version: str, tags: Mapping[str, str]) -> None:
    """Tag one registered version (e.g. ``refit`` and ``data_until``: which data the model saw)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, str(version), key, str(value))


def sync_alias_tags(client: Any, registered_model: str) -> dict[str, str | None]:
    """Set every run's ``nextbest.alias`` tag to the alias its versions of ``registered_model`` hold now
    (the first of :data:`ALIAS_PRECEDENCE`), and remove it from runs whose versions hold none.

    Returns:
        run id → alias (None: tag removed or absent).
    """
    from mlflow.exceptions import MlflowException

    # search_model_versions leaves ``aliases`` empty: the registered model's alias → version map is the truth.
    version_run = {
        str(v.version): v.run_id
        for v in client.search_model_versions(f"name = '{registered_model}'")
        if v.run_id
    }
    held = client.get_registered_model(registered_model).aliases or {}
    best: dict[str, str | None] = dict.fromkeys(version_run.values())
    for alias in reversed(ALIAS_PRECEDENCE):  # the most important alias is written last and wins
        run_id = version_run.get(str(held.get(alias, "")))
        if run_id is not None:
            best[run_id] = alias
    for run_id, alias in best.items():
        try:
            tags = client.get_run(run_id).data.tags
            if alias is not None and tags.get(TAG_ALIAS) != alias:
                client.set_tag(run_id, TAG_ALIAS, alias)
            elif alias is None and TAG_ALIAS in tags:
                client.delete_tag(run_id, TAG_ALIAS)
        except MlflowException:
            continue  # a deleted run: nothing to show in the UI
    return best
