"""The model registry, one way in: the registered names, the aliases, a client and a version's files.

Everything here takes the tracking URI it should use and passes it to MLflow explicitly; nothing sets MLflow's
process-wide tracking or registry URI. A running service's model watcher, a dashboard build and a training job
in one process (a notebook, a test run) each read the registry they were given, never one another's.
"""

from __future__ import annotations

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
