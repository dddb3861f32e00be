"""The model registry, one way in: the registered names, the aliases, a client, a version's files and the
champion recommender loaded (the dashboard's and the notebooks' way to it).

Everything here takes the tracking URI it should use and passes it to MLflow explicitly; nothing sets MLflow's
process-wide tracking or registry URI. A running service's model watcher, a dashboard build and a training job
in one process (a notebook, a test run) each read the registry they were given, never one another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECOMMENDER = "nextbest-recommender"
"""The registered name of the recommender."""
PROPENSITY = "nextbest-propensity"
"""The registered name of the propensity model."""
CHAMPION = "champion"
"""The alias of the version that serves."""
CHALLENGER = "challenger"
"""The alias of the latest trained version (and of the A/B arm that tries it)."""
PREVIOUS_CHAMPION = "previous-champion"
"""The alias a promotion leaves on the version it replaced."""


def registry_client(uri: str) -> Any:
    """An ``MlflowClient`` for tracking and registry at ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The version of registered model ``name`` that ``alias`` points at; None when there is none (no such
    model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model(uri: str, artifact_uri: str, dst: str | Path | None = None) -> Path:
    """Files at ``artifact_uri`` (a store's location: ``file://…``, ``mlflow-artifacts:/…``, ``s3://…``) of the
    registry at ``uri``, on local disk (a local store's own folder when it has one)."""
    import mlflow

    from nextbest.training.tracking import quiet_mlflow

    with quiet_mlflow():
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri,
            dst_path=None if dst is None else str(dst),
            tracking_uri=uri,
            registry_uri=uri,
        )
    return Path(local)


def download_version(uri: str, name: str, version: str | int, dst: str | Path | None = None) -> Path:
    """The files of version ``version`` of registered model ``name`` in the registry at ``uri``, on local disk.

    The version's storage location is asked of a client scoped to ``uri``: MLflow's own ``models:/NAME/VERSION``
    resolution reads the process-wide registry URI whatever it is told.
    """
    location = registry_client(uri).get_model_version_download_uri(name, str(version))
    return download_model(uri, location, dst)


@dataclass
class ChampionRecommender:
    """The registered champion recommender, loaded.

    Attributes:
        bundle: the model with its histories.
        label: ``nextbest-recommender v3 (champion, als)``.
        dataset: the dataset it was trained on (its registry tag), if recorded.
    """

    bundle: Any  # training.recommender_bundle.RecommenderBundle
    label: str
    dataset: str | None = None


def load_champion_recommender(
    tracking_uri: str | None = None, *, registered_model: str | None = None, alias: str = "champion"
) -> ChampionRecommender | None:
    """The registry's ``alias`` version of the recommender, or None when there is no registry or no such version.

    A SQLite tracking URI whose file does not exist counts as no registry (nothing is created). The registry is
    read through a client of its own (no process-wide MLflow URI is set).

    Args:
        tracking_uri: the MLflow tracking/registry URI; default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``.
        registered_model: the registered model name; default ``nextbest-recommender``.
        alias: the alias to resolve.
    """
    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path

    uri = tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from nextbest.training.recommender_bundle import find_bundle

    name = registered_model or RECOMMENDER
    version = version_by_alias(registry_client(uri), name, alias)
    if version is None:
        return None
    bundle = find_bundle(download_version(uri, name, version.version))
    if bundle is None:
        return None
    kind = bundle.metadata.get("model") or (version.tags or {}).get("model")
    label = f"{name} v{version.version} ({alias}{', ' + kind if kind else ''})"
    return ChampionRecommender(bundle, label, (version.tags or {}).get("dataset"))
