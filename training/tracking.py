"""MLflow tracking for recommenders: where runs go, logging the pyfunc model, the registry aliases, promotion.

Tracking URI: ``TrackingConfig.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlruns/mlflow.db``. With a SQLite URI, artifacts go to ``artifacts/`` beside the database
file (``mlruns/artifacts`` by default). One experiment per dataset, named after the dataset directory.
Registered model ``nextbest-recommender``; new models get the alias ``challenger``, and
:func:`promote_recommender` moves ``champion`` to it only when it is better on the validation metric.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

REGISTERED_MODEL = "nextbest-recommender"
CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
MODEL_NAME_IN_RUN = "model"
MODEL_CODE = Path(__file__).with_name("recommender_model_code.py")


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
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = config.experiment or default_experiment
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
) -> dict[str, Any]:
    """Log a saved bundle as a pyfunc model in the active run; register it and set the alias when asked.

    Returns:
        ``model_uri``, ``model_id`` and, when registered, ``registered_model``, ``version`` and ``alias``.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from training.recommender_bundle import RecommenderBundle

    with quiet_mlflow():
        # Imported here: defining the PythonModel subclass is what triggers MLflow's type-hint advice.
        from training.recommender_pyfunc import BUNDLE_ARTIFACT, DEFAULT_PARAMS

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
    out: dict[str, Any] = {"model_uri": info.model_uri, "model_id": info.model_id}
    if tracking.register_model:
        version = str(info.registered_model_version)
        client = MlflowClient()
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(tracking.registered_model, version, key, value)
        client.set_registered_model_alias(tracking.registered_model, tracking.alias, version)
        out.update(
            {"registered_model": tracking.registered_model, "version": version, "alias": tracking.alias}
        )
    return out


class PromotionDecision(BaseModel):
    """The outcome of :func:`promote_recommender`.

    Attributes:
        promoted: whether ``champion`` now points at the challenger.
        reason: one human-readable sentence saying why.
        metric: the validation metric compared.
        challenger_version, champion_version: registry versions (``champion_version`` before the decision).
        challenger_value, champion_value: their logged validation values.
    """

    promoted: bool
    reason: str
    metric: str
    registered_model: str
    challenger_version: str | None = None
    champion_version: str | None = None
    challenger_value: float | None = None
    champion_value: float | None = None


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _logged_metric(client: Any, version: Any, metric: str) -> float | None:
    if not version.run_id:
        return None
    value = client.get_run(version.run_id).data.metrics.get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def promote(
    tracking: TrackingConfig,
    *,
    metric: str,
    higher: bool,
    train_command: str,
    min_improvement: float = 0.0,
    data: str | Path | None = None,
) -> PromotionDecision:
    """Move ``champion`` to the challenger of ``tracking.registered_model`` only if it beats the champion on
    the logged validation ``metric`` (``higher``: larger is better), and say why either way.

    Args:
        tracking: where the registry is and which registered model.
        metric: logged validation metric to compare.
        higher: whether a larger value is better (AUC, NDCG) or worse (losses, ECE).
        train_command: the command named when there is no model yet.
        min_improvement: relative margin the challenger must win by (0.05 = 5 %).
        data: if given, the challenger must have been trained on this dataset directory.

    Returns:
        the decision and its reason; the previous champion keeps the alias ``previous-champion``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking)
    client = MlflowClient(uri, uri)
    name = tracking.registered_model

    def decide(promoted: bool, reason: str, **kw: Any) -> PromotionDecision:
        return PromotionDecision(promoted=promoted, reason=reason, metric=metric, registered_model=name, **kw)

    def version_by_alias(alias: str) -> Any | None:
        return _version_by_alias(client, name, alias)

    def logged(version: Any) -> float | None:
        return _logged_metric(client, version, metric)

    try:
        client.get_registered_model(name)
    except MlflowException:
        return decide(False, f"no registered model {name!r} at {uri}: train one with '{train_command}' first")
    challenger = version_by_alias(tracking.alias)
    if challenger is None:
        return decide(False, f"{name} has no {tracking.alias!r} version to promote")
    cv = str(challenger.version)
    c_value = logged(challenger)
    if data is not None:
        trained_on = (challenger.tags or {}).get("dataset")
        wanted = str(Path(data).resolve())
        if trained_on is not None and trained_on != wanted:
            return decide(
                False,
                f"challenger v{cv} was trained on {trained_on}, not on {wanted}",
                challenger_version=cv,
                challenger_value=c_value,
            )
    if c_value is None:
        return decide(False, f"challenger v{cv} has no logged {metric}", challenger_version=cv)
    champion = version_by_alias(CHAMPION)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"no champion yet: challenger v{cv} ({metric} {c_value:.4f}) becomes champion",
            challenger_version=cv,
            challenger_value=c_value,
        )
    pv = str(champion.version)
    p_value = logged(champion)
    common = {
        "challenger_version": cv,
        "champion_version": pv,
        "challenger_value": c_value,
        "champion_value": p_value,
    }
    if pv == cv:
        return decide(False, f"challenger v{cv} is already the champion", **common)
    if p_value is None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, pv)
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"champion v{pv} has no logged {metric}; challenger v{cv} ({c_value:.4f}) replaces it",
            **common,
        )
    if higher:
        threshold = p_value * (1 + min_improvement)
        better, relation = c_value > threshold, ">"
    else:
        threshold = p_value * (1 - min_improvement)
        better, relation = c_value < threshold, "<"
    margin = f" (champion {p_value:.4f} with a {min_improvement:.0%} margin)" if min_improvement else ""
    if better:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, pv)
        client.set_registered_model_alias(name, CHAMPION, cv)
        return decide(
            True,
            f"challenger v{cv} beats champion v{pv} on {metric}: {c_value:.4f} {relation} {threshold:.4f}{margin}",
            **common,
        )
    return decide(
        False,
        f"challenger v{cv} does not beat champion v{pv} on {metric}: {c_value:.4f} is not {relation} "
        f"{threshold:.4f}{margin}; champion unchanged",
        **common,
    )


def promote_recommender(
    tracking: TrackingConfig | None = None,
    *,
    metric: str = "ndcg_at_10",
    min_improvement: float = 0.0,
    data: str | Path | None = None,
) -> PromotionDecision:
    """Promote the recommender challenger if it beats the champion on ``metric`` (higher is better); see
    :func:`promote`."""
    return promote(
        tracking or TrackingConfig(),
        metric=metric,
        higher=True,
        train_command="nextbest train cf",
        min_improvement=min_improvement,
        data=data,
    )
