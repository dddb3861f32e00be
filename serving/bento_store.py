"""The BentoML model store side of serving: champions copied from the MLflow registry, and found again.

``nextbest promote`` (or ``nextbest bento export``) copies the registry's ``champion`` (and ``challenger``) of
``nextbest-recommender`` and ``nextbest-propensity`` into the BentoML model store (``BENTOML_HOME/models``) with
:func:`export_champions`; ``bentoml build`` then packages the code with the champions (the models listed in
``[tool.bentoml.build]`` of ``pyproject.toml``), and the Bento serves without the MLflow registry.

Layout of the store, one BentoML model per MLflow model version:

* the name is the registered model's (``nextbest-recommender``); the version is ``v<MLflow version>-<first
  eight characters of the MLflow run id>`` (``nextbest-recommender:v3-1a2b3c4d``), so two registries exporting
  into one store never collide;
* ``model.path`` holds the MLflow model directory as the registry serves it (:data:`MLFLOW_MODEL_DIR`);
* labels: ``project``, ``registered_model``, ``mlflow_version``, ``mlflow_run_id`` and ``alias`` (``champion``,
  ``challenger`` or ``none``: what the version was when last exported); metadata adds the run's metrics, the
  source URI and the tracking URI;
* the champion is always the *latest* version of its name, which is what ``pyproject.toml`` packages
  (``nextbest-recommender:latest``, under the alias ``recommender``).

Exporting is idempotent: a version already in the store with the right labels is left alone; a version whose
role changed is written again under the same tag (never a second copy), and so is the champion when a newer
version (a new challenger) was just written, so that it stays the latest; nothing is written when nothing
changed in the registry.

Inside a running Bento, :func:`packaged_model_tags` says which stored models the Bento packages (by the aliases
of ``[tool.bentoml.build] models``). Errors are :class:`BentoStoreError`, one line saying what to run.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nextbest.features.errors import NextbestError
from nextbest.serving.arms import CHALLENGER, CHAMPION
from nextbest.serving.engine_config import PROPENSITY_MODEL, RECOMMENDER_MODEL, train_command

SERVED_MODELS: dict[str, str] = {"recommender": RECOMMENDER_MODEL, "propensity": PROPENSITY_MODEL}
"""Kind → registered model name of the models the service loads. The kind is also the model's alias in a
Bento (``[tool.bentoml.build] models`` in ``pyproject.toml`` must use the same aliases)."""
NO_ALIAS = "none"
PROJECT_LABEL = "nextbest"
MLFLOW_MODEL_DIR = "mlflow_model"
"""The folder in a stored model's ``path`` that holds the MLflow model directory."""


class BentoStoreError(NextbestError, RuntimeError):
    """The BentoML model store cannot give or take what was asked; one line saying what to run first."""


class ExportedModel(BaseModel):
    """One MLflow model version in the BentoML model store after :func:`export_champions`.

    Attributes:
        tag: the BentoML model tag (``nextbest-recommender:v3-1a2b3c4d``).
        registered_model: the MLflow registered model name.
        mlflow_version: its registry version.
        alias: ``champion`` or ``challenger``.
        run_id: the MLflow run that logged it.
        action: ``exported`` (copied from the registry now), ``rewritten`` (already stored, written again
            under the same tag because its alias changed, or because a champion must be the latest version of
            its name and a newer one was just written) or ``unchanged``.
    """

    tag: str
    registered_model: str
    mlflow_version: str
    alias: str
    run_id: str
    action: str


@dataclass(frozen=True)
class StoredModel:
    """A nextbest model in the BentoML model store.

    Attributes:
        tag: the BentoML tag.
        registered_model, mlflow_version, alias, run_id: from its labels.
        path: the folder holding the MLflow model directory.
    """

    tag: str
    registered_model: str
    mlflow_version: str
    alias: str
    run_id: str
    path: Path

    @property
    def label(self) -> str:
        """``name/version`` of the registry version, as responses report it."""
        return f"{self.registered_model}/{self.mlflow_version}"


def _kind_of(name: str) -> str:
    return next((k for k, n in SERVED_MODELS.items() if n == name), "recommender")


def bentoml_home() -> Path:
    """The BentoML home in force (``BENTOML_HOME``, default ``~/bentoml``), for messages."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _stored(model: Any) -> StoredModel | None:
    labels = dict(model.info.labels)
    if labels.get("project") != PROJECT_LABEL or "mlflow_version" not in labels:
        return None
    return StoredModel(
        tag=str(model.tag),
        registered_model=labels.get("registered_model", model.tag.name),
        mlflow_version=labels["mlflow_version"],
        alias=labels.get("alias", NO_ALIAS),
        run_id=labels.get("mlflow_run_id", ""),
        path=Path(model.path) / MLFLOW_MODEL_DIR,
    )


def stored_models(name: str) -> list[StoredModel]:
    """The nextbest models stored under ``name`` (oldest first); empty when there are none."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = sorted(bentoml.models.list(name), key=lambda m: m.creation_time)
    except NotFound:
        return []
    return [s for m in models if (s := _stored(m)) is not None]


def _latest_tag(name: str) -> str | None:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return str(bentoml.models.get(f"{name}:latest").tag)
    except NotFound:
        return None


def stored_model(tag: str) -> StoredModel:
    """The stored nextbest model of ``tag`` (``name:version`` or ``name:latest``).

    Raises:
        BentoStoreError: the store does not hold it, or it was not written by nextbest.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    name = tag.split(":", 1)[0]
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        kind = _kind_of(name)
        raise BentoStoreError(
            f"the BentoML model store at {bentoml_home()} holds no {tag}: run 'nextbest promote {kind}' "
            f"(or 'nextbest bento export') with BENTOML_HOME={bentoml_home()} first"
        ) from None
    stored = _stored(model)
    if stored is None:
        raise BentoStoreError(
            f"{model.tag} in the BentoML model store at {bentoml_home()} was not exported by nextbest "
            f"(no mlflow_version label): delete it with 'bentoml models delete {model.tag}' and run "
            "'nextbest bento export'"
        )
    return stored


def stored_champion(name: str) -> StoredModel:
    """The champion of ``name`` in the store: its latest version (see the module docstring).

    Raises:
        BentoStoreError: nothing stored under ``name`` (the message says which command to run).
    """
    return stored_model(f"{name}:latest")


def stored_challenger(name: str) -> StoredModel | None:
    """The newest stored model of ``name`` exported as challenger, if it is not the champion's version."""
    champion = _latest_tag(name)
    for s in reversed(stored_models(name)):
        if s.alias == CHALLENGER and s.tag != champion:
            return s
    return None


def packaged_model_tags() -> dict[str, str]:
    """Kind → BentoML tag of the models the running Bento packages; empty outside a Bento.

    BentoML records the aliases of ``[tool.bentoml.build] models`` when it loads a Bento (``bentoml serve
    <bento tag>``, or ``bentoml serve .`` in the project) and resolves them in ``bentoml.models.get``; the
    mapping itself is only reachable through its container.
    """
    if "bentoml" not in sys.modules:  # a Bento's server imports BentoML before the service: not in a Bento
        return {}
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        aliases = dict(BentoMLContainer.model_aliases.get())
    except (ImportError, AttributeError):  # a BentoML without the container: no Bento detection
        return {}
    return {kind: str(aliases[kind]) for kind in SERVED_MODELS if kind in aliases}


# --- export ---------------------------------------------------------------------------------------------------


def _version_tag(name: str, version: str, run_id: str) -> str:
    suffix = f"-{run_id[:8].lower()}" if run_id else ""
    return f"{name}:v{version}{suffix}"


def _run_metrics(client: Any, run_id: str) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except Exception:  # a run deleted since: the model is still worth exporting
        return {}
    return {
        k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, int | float) and math.isfinite(v)
    }


def _write(
    tag: str,
    labels: dict[str, str],
    metadata: dict[str, Any],
    fill: Any,
) -> None:
    """Create ``tag`` in the store; ``fill(folder)`` writes the MLflow model directory into ``folder``."""
    import bentoml

    with bentoml.models.create(tag, labels=labels, metadata=metadata) as ref:
        fill(Path(ref.path) / MLFLOW_MODEL_DIR)


def _rewrite(stored: StoredModel, labels: dict[str, str], metadata: dict[str, Any] | None = None) -> None:
    """Write ``stored`` again under the same tag with new labels (it also becomes the latest of its name);
    ``metadata`` None keeps its metadata with the new alias."""
    import bentoml

    if metadata is None:
        metadata = {**dict(bentoml.models.get(stored.tag).info.metadata), "alias": labels["alias"]}
    with tempfile.TemporaryDirectory(prefix="nextbest-bento-") as tmp:
        keep = Path(tmp) / MLFLOW_MODEL_DIR
        shutil.copytree(stored.path, keep)
        bentoml.models.delete(stored.tag)
        _write(stored.tag, labels, metadata, lambda folder: shutil.copytree(keep, folder))


def export_champions(
    tracking_uri: str | None = None,
    *,
    models: Mapping[str, str] | None = None,
    challengers: bool = True,
) -> list[ExportedModel]:
    """Copy the ``champion`` (and ``challenger``) of each registered model into the BentoML model store.

    Args:
        tracking_uri: the MLflow registry (default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``).
        models: kind → registered model name (default both served models, :data:`SERVED_MODELS`).
        challengers: also export the challenger when it is another version than the champion.

    Returns:
        one entry per exported version (champions last), saying whether anything was written.

    Raises:
        BentoStoreError: no registry, no registered model or no champion (the message names the command).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path, version_by_alias

    uri = tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise BentoStoreError(
            f"no MLflow registry at {uri}: train and promote the models first ('nextbest train cf', "
            "'nextbest promote recommender') or set MLFLOW_TRACKING_URI"
        )
    client = MlflowClient(uri, uri)
    out: list[ExportedModel] = []
    for kind, name in (models or SERVED_MODELS).items():
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise BentoStoreError(
                f"no model {name!r} in the MLflow registry at {uri}: run '{train_command(kind)}' and "
                f"'nextbest promote {kind}' first"
            ) from None

        champion = version_by_alias(client, name, CHAMPION)
        if champion is None:
            raise BentoStoreError(
                f"{name} has no '{CHAMPION}' version in the MLflow registry at {uri}: run "
                f"'nextbest promote {kind}' first"
            )
        roles: list[tuple[str, Any]] = []
        challenger = version_by_alias(client, name, CHALLENGER) if challengers else None
        if challenger is not None and str(challenger.version) != str(champion.version):
            roles.append((CHALLENGER, challenger))
        roles.append((CHAMPION, champion))  # last, so that it is the latest version of its name
        out += _export_roles(client, uri, name, roles)
    return out


def _export_roles(client: Any, uri: str, name: str, roles: list[tuple[str, Any]]) -> list[ExportedModel]:
    from nextbest.training.registry import download_version

    wanted = {(str(v.version), v.run_id or ""): alias for alias, v in roles}
    stored = {(s.mlflow_version, s.run_id): s for s in stored_models(name)}
    # Versions no longer champion or challenger lose the alias label first, so that the champion, written
    # (or rewritten) last, stays the latest version of its name.
    for key, s in stored.items():
        if key not in wanted and s.alias != NO_ALIAS:
            _rewrite(s, {**_labels(name, s.mlflow_version, s.run_id), "alias": NO_ALIAS})
    out = []
    for alias, version in roles:
        v, run_id = str(version.version), version.run_id or ""
        labels = {**_labels(name, v, run_id), "alias": alias}
        metadata: dict[str, Any] = {
            "registered_model": name,
            "mlflow_version": v,
            "mlflow_run_id": run_id,
            "alias": alias,
            "source": f"models:/{name}/{v}",
            "tracking_uri": _without_credentials(uri),
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "metrics": _run_metrics(client, run_id),
        }
        existing = stored.get((v, run_id))
        must_be_latest = alias == CHAMPION
        if existing is None:
            tag = _version_tag(name, v, run_id)

            def fill(folder: Path, v: str = v) -> None:
                download_version(uri, name, v, folder)

            _write(tag, labels, metadata, fill)
            action = "exported"
        elif existing.alias != alias or (must_be_latest and _latest_tag(name) != existing.tag):
            _rewrite(existing, labels, metadata)
            tag, action = existing.tag, "rewritten"
        else:
            tag, action = existing.tag, "unchanged"
        out.append(
            ExportedModel(
                tag=tag, registered_model=name, mlflow_version=v, alias=alias, run_id=run_id, action=action
            )
        )
    return out


def _without_credentials(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, which must not travel inside a Bento."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def _labels(name: str, version: str, run_id: str) -> dict[str, str]:
    return {
        "project": PROJECT_LABEL,
        "registered_model": name,
        "mlflow_version": version,
        "mlflow_run_id": run_id,
    }


# --- Bentos -----------------------------------------------------------------------------------------------------


def bento_model_tags(bento_tag: str) -> dict[str, str]:
    """Alias (or name) → model tag of every model a built Bento packages.

    Raises:
        BentoStoreError: the Bento store holds no such Bento.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bento = bentoml.bentos.get(bento_tag)
    except NotFound:
        raise BentoStoreError(
            f"no Bento {bento_tag} in the Bento store at {bentoml_home()}: run 'nextbest bento build' "
            "(or 'bentoml build' in the project) first"
        ) from None
    return {(m.alias or m.tag.name): str(m.tag) for m in bento.info.all_models}
