"""The served models: the champion (and challenger) recommender and propensity model, from the MLflow registry
or from the BentoML model store (inside a built Bento, the ones it packages). Used by :mod:`serving.engine`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nextbest.serving.arms import CHALLENGER, CHAMPION
from nextbest.serving.engine_config import EngineConfig, EngineLoadError, one_line, train_command

logger = logging.getLogger("nextbest.serving")

# --- models from the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    """A model object with the registry version it came from.

    Attributes:
        name: the registered model name.
        version: the registry version ("local" for a model handed over in code).
        alias: the alias it was resolved through.
        model: a :class:`~training.recommender_bundle.RecommenderBundle` or a
            :class:`~training.propensity.PropensityModel`.
    """

    name: str
    version: str
    alias: str
    model: Any

    @property
    def label(self) -> str:
        """``name/version``, as responses and the decision log report it."""
        return f"{self.name}/{self.version}"


@dataclass
class ServingModels:
    """The models by arm: ``champion`` always, ``challenger`` only when it is a different version."""

    recommender: dict[str, RegisteredModel]
    propensity: dict[str, RegisteredModel]

    def __post_init__(self) -> None:
        for kind, slots in (("recommender", self.recommender), ("propensity", self.propensity)):
            if CHAMPION not in slots:
                raise EngineLoadError(f"no champion {kind} was given")

    def labels(self) -> dict[str, dict[str, str]]:
        """Kind → arm → ``name/version`` of the models held."""
        return {
            "recommender": {arm: m.label for arm, m in self.recommender.items()},
            "propensity": {arm: m.label for arm, m in self.propensity.items()},
        }


def _train_hint(kind: str, data: Path) -> str:
    return f"{train_command(kind)} --data {data}"


def check_registry(config: EngineConfig) -> dict[str, str]:
    """Check that both champions exist, without loading them; return their ``name/version`` labels.

    Raises:
        EngineLoadError: no registry, no registered model or no champion (the message says what to run).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path, version_by_alias

    uri = config.tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise EngineLoadError(
            f"no MLflow registry at {uri}: run '{_train_hint('recommender', config.data)}' and "
            f"'{_train_hint('propensity', config.data)}' first (or set MLFLOW_TRACKING_URI)"
        )
    client = MlflowClient(uri, uri)
    labels = {}
    for kind, name in (("recommender", config.recommender_model), ("propensity", config.propensity_model)):
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise EngineLoadError(
                f"no model {name!r} in the MLflow registry at {uri}: run '{_train_hint(kind, config.data)}' first"
            ) from None
        version = version_by_alias(client, name, CHAMPION)
        if version is None:
            raise EngineLoadError(
                f"{name} has no '{CHAMPION}' version in the MLflow registry at {uri}: train one with "
                f"'{_train_hint(kind, config.data)}' and promote it to champion"
            )
        labels[kind] = f"{name}/{version.version}"
    return labels


def _load_recommender(root: Path, label: str) -> Any:
    """The recommender bundle inside an MLflow model directory (downloaded or copied into the model store)."""
    from nextbest.training.recommender_bundle import BUNDLE_FILE, find_bundle

    bundle = find_bundle(root)
    if bundle is None:
        raise EngineLoadError(f"{label} holds no recommender bundle ({BUNDLE_FILE}) under {root}")
    return bundle


def _load_propensity(root: Path, label: str) -> Any:
    """The propensity model inside an MLflow model directory."""
    from nextbest.training.propensity import PropensityModel, PropensityModelError
    from nextbest.training.propensity_scorer import find_model_dir

    try:
        return PropensityModel.load(find_model_dir(root), device="cpu")
    except PropensityModelError as e:
        raise EngineLoadError(f"{label}: {one_line(e)}") from None


_LOADERS = {"recommender": _load_recommender, "propensity": _load_propensity}


def resolve_model_source(config: EngineConfig) -> Literal["mlflow", "bentoml", "bento"]:
    """Where :func:`load_serving_models` takes the models from: ``bento`` (the models the running Bento
    packages, for ``auto`` inside a Bento), ``bentoml`` (the model store's latest champions) or ``mlflow``."""
    if config.model_source == "mlflow":
        return "mlflow"
    from nextbest.serving.bento_store import packaged_model_tags

    if packaged_model_tags():
        return "bento"
    return "bentoml" if config.model_source == "bentoml" else "mlflow"


def _registered_names(config: EngineConfig) -> dict[str, str]:
    return {"recommender": config.recommender_model, "propensity": config.propensity_model}


def _stored_champions(config: EngineConfig, source: str) -> dict[str, Any]:
    """Kind → :class:`~serving.bento_store.StoredModel` of each champion in the BentoML model store.

    Raises:
        EngineLoadError: a model is missing from the store, or is not the registered model the config names.
    """
    from nextbest.serving.bento_store import (
        BentoStoreError,
        packaged_model_tags,
        stored_champion,
        stored_model,
    )

    packaged = packaged_model_tags() if source == "bento" else {}
    out = {}
    for kind, name in _registered_names(config).items():
        try:
            if source == "bento":
                if kind not in packaged:
                    raise EngineLoadError(
                        f"the running Bento packages no {kind} model (alias {kind!r}): list both models in "
                        "[tool.bentoml.build] models of pyproject.toml and run 'nextbest bento build'"
                    )
                stored = stored_model(packaged[kind])
            else:
                stored = stored_champion(name)
        except BentoStoreError as e:
            raise EngineLoadError(one_line(e)) from None
        if stored.registered_model != name:
            raise EngineLoadError(
                f"{stored.tag} in the BentoML model store is a version of {stored.registered_model}, not of "
                f"{name}: export the right champion with 'nextbest promote {kind}'"
            )
        out[kind] = stored
    return out


def check_models(config: EngineConfig) -> dict[str, str]:
    """Check that both champions exist where the config takes them from, without loading them; return their
    ``name/version`` labels. Outside a Bento, ``auto`` checks the MLflow registry.

    Raises:
        EngineLoadError: a registry, model or champion is missing (the message says what to run).
    """
    source = resolve_model_source(config)
    if source == "mlflow":
        return check_registry(config)
    return {kind: stored.label for kind, stored in _stored_champions(config, source).items()}


def load_serving_models(config: EngineConfig) -> ServingModels:
    """Load the champion (and challenger) of the recommender and the propensity model.

    From the MLflow registry, or from the BentoML model store (``config.model_source``, see
    :func:`resolve_model_source`). Either way the models carry their registry name and version, which responses
    report. The challenger is loaded only when ``challenger_share`` > 0 and it is another version than the
    champion (a Bento packages the champions only).

    Raises:
        EngineLoadError: the registry, the store or a champion is missing.
    """
    source = resolve_model_source(config)
    if source == "mlflow":
        return _load_from_registry(config)
    return _load_from_store(config, source)


def _load_from_store(config: EngineConfig, source: str) -> ServingModels:
    from nextbest.serving.bento_store import stored_challenger

    out: dict[str, dict[str, RegisteredModel]] = {}
    for kind, champion in _stored_champions(config, source).items():
        load = _LOADERS[kind]
        name = champion.registered_model
        slots = {
            CHAMPION: RegisteredModel(
                name, champion.mlflow_version, CHAMPION, load(champion.path, champion.tag)
            )
        }
        if config.challenger_share > 0:
            challenger = stored_challenger(name) if source == "bentoml" else None
            if challenger is not None and challenger.mlflow_version != champion.mlflow_version:
                slots[CHALLENGER] = RegisteredModel(
                    name, challenger.mlflow_version, CHALLENGER, load(challenger.path, challenger.tag)
                )
            else:
                logger.info("%s: no challenger in the model store: every customer gets the champion", name)
        logger.info("%s: %s from the BentoML model store (%s)", kind, champion.label, champion.tag)
        out[kind] = slots
    return ServingModels(recommender=out["recommender"], propensity=out["propensity"])


def _load_from_registry(config: EngineConfig) -> ServingModels:
    from mlflow import MlflowClient

    from nextbest.training.registry import download_version
    from nextbest.training.tracking import resolve_tracking_uri, version_by_alias

    check_registry(config)
    uri = config.tracking_uri or resolve_tracking_uri()
    client = MlflowClient(uri, uri)

    def loaded(kind: str, name: str, version: str) -> Any:
        root = download_version(uri, name, version)
        return _LOADERS[kind](root, f"{name} version {version}")

    out: dict[str, dict[str, RegisteredModel]] = {}
    for kind, name in _registered_names(config).items():
        champion = version_by_alias(client, name, CHAMPION)
        assert champion is not None  # check_registry made sure
        slots = {
            CHAMPION: RegisteredModel(
                name, str(champion.version), CHAMPION, loaded(kind, name, champion.version)
            )
        }
        if config.challenger_share > 0:
            challenger = version_by_alias(client, name, CHALLENGER)
            if challenger is not None and str(challenger.version) != str(champion.version):
                slots[CHALLENGER] = RegisteredModel(
                    name, str(challenger.version), CHALLENGER, loaded(kind, name, challenger.version)
                )
            else:
                logger.info(
                    "%s has no challenger other than the champion: every customer gets the champion", name
                )
        out[kind] = slots
    return ServingModels(recommender=out["recommender"], propensity=out["propensity"])


def served_labels(config: EngineConfig) -> dict[str, dict[str, str]]:
    """Kind → arm → ``name/version`` that :func:`load_serving_models` would load now, without loading anything
    (a few registry or model-store lookups: what a running service polls to see a new champion).

    Raises:
        EngineLoadError: the registry, the store or a champion is missing.
    """
    source = resolve_model_source(config)
    if source != "mlflow":
        from nextbest.serving.bento_store import stored_challenger

        out: dict[str, dict[str, str]] = {}
        for kind, champion in _stored_champions(config, source).items():
            arms = {CHAMPION: f"{champion.registered_model}/{champion.mlflow_version}"}
            challenger = (
                stored_challenger(champion.registered_model)
                if config.challenger_share > 0 and source == "bentoml"
                else None
            )
            if challenger is not None and challenger.mlflow_version != champion.mlflow_version:
                arms[CHALLENGER] = f"{champion.registered_model}/{challenger.mlflow_version}"
            out[kind] = arms
        return out
    from mlflow import MlflowClient

    from nextbest.training.tracking import resolve_tracking_uri, version_by_alias

    check_registry(config)
    uri = config.tracking_uri or resolve_tracking_uri()
    client = MlflowClient(uri, uri)
    out = {}
    for kind, name in _registered_names(config).items():
        champion = version_by_alias(client, name, CHAMPION)
        assert champion is not None  # check_registry made sure
        arms = {CHAMPION: f"{name}/{champion.version}"}
        if config.challenger_share > 0:
            challenger = version_by_alias(client, name, CHALLENGER)
            if challenger is not None and str(challenger.version) != str(champion.version):
                arms[CHALLENGER] = f"{name}/{challenger.version}"
        out[kind] = arms
    return out
