"""The service's configuration (:class:`EngineConfig`, from the environment) and its named errors.

Split out of :mod:`serving.engine` so that the model loading (:mod:`serving.models`) and the engine share them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nextbest.features.errors import NextbestError
from nextbest.training.registry import PROPENSITY, RECOMMENDER

RECOMMENDER_MODEL = RECOMMENDER
PROPENSITY_MODEL = PROPENSITY
DEFAULT_STATE_DIR = "service"
"""The state directory's default name, inside the dataset directory."""


def train_command(kind: str) -> str:
    """The command that trains a model of ``kind`` (``recommender`` or ``propensity``), for messages."""
    return "nextbest train cf" if kind == "recommender" else "nextbest train propensity"


# --- errors -------------------------------------------------------------------------------------------------


class ServiceError(Exception):
    """A request the service cannot answer as asked; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    """The request repeats something stored already that may be stored once (a second response of one kind)."""

    status = 409


class Gone(ServiceError):
    """The request is about a customer who was erased: the service stores nothing more about the id."""

    status = 410


class NotReady(ServiceError):
    status = 503


class EngineLoadError(NextbestError, RuntimeError):
    """The service cannot start; the message is one line saying what is missing and what to run first."""


# --- configuration ------------------------------------------------------------------------------------------


class EngineConfig(BaseModel):
    """Where the engine finds its data, models and state. Round-trips through JSON (the admin token excepted).

    Attributes:
        data: the dataset directory (features built).
        state_dir: live state (event log, contact ledger, decision log, levers); default ``DATA/service``.
        tracking_uri: MLflow tracking/registry URI; default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``.
        admin_token: bearer token of the admin endpoints; None disables them. Never serialised.
        challenger_share: share of customers (by a stable hash of the id) served by the challenger models.
        arm_salt: salt of that hash (change it to draw a fresh split).
        policy: the action policy file; default the policy shipped with nextbest.
        clock: ``wall`` (decisions happen now) or ``data`` (time runs on from the dataset's last event, for
            demonstrations on a dataset from the past).
        recommender_model: registry name of the recommender.
        propensity_model: registry name of the propensity model.
        model_source: where the models come from: ``mlflow`` (the registry's aliases), ``bentoml`` (the
            BentoML model store, as ``nextbest promote`` exported them: :mod:`serving.bento_store`) or
            ``auto`` (the models packaged in the running Bento when there is one, else the registry).
        segment_column: the profile column whose values are the segments of non-personalised popularity.
        min_segment_customers: segments with fewer customers fall back to overall popularity.
        bought_days: purchases this recent count as owned (``bought_brand`` … in policy rules).
        state_url: the state store (:mod:`serving.state_store`): ``sqlite:///…`` or ``postgresql://…``; default
            ``sqlite:///STATE_DIR/state.db``. Several replicas share one PostgreSQL.
        sync_interval_ms: how often the service looks for what other replicas wrote (events, contacts, levers,
            erasures) between its own writes.
        model_poll_seconds: how often the service looks for new champions and rebuilt features and swaps them
            in without a restart (:mod:`serving.hot_swap`); 0 turns polling off (``POST /reload`` still works).
    """

    model_config = ConfigDict(extra="forbid")

    data: Path
    state_dir: Path | None = None
    tracking_uri: str | None = None
    admin_token: str | None = Field(default=None, exclude=True, repr=False)
    challenger_share: float = Field(0.0, ge=0, le=1)
    arm_salt: str = ""
    policy: Path | None = None
    clock: Literal["wall", "data"] = "wall"
    recommender_model: str = RECOMMENDER_MODEL
    propensity_model: str = PROPENSITY_MODEL
    model_source: Literal["auto", "mlflow", "bentoml"] = "auto"
    segment_column: str = "age_band"
    min_segment_customers: int = Field(20, ge=1)
    bought_days: int = Field(90, ge=1)
    state_url: str | None = None
    sync_interval_ms: float = Field(20.0, gt=0, le=60_000)
    model_poll_seconds: float = Field(30.0, ge=0, le=86_400)

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.data / DEFAULT_STATE_DIR

    @property
    def store_url(self) -> str:
        """The state store's URL: :attr:`state_url`, else the embedded SQLite file of the state directory."""
        from nextbest.serving.state_store import default_state_url

        return self.state_url or default_state_url(self.state_path)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """The config from ``NEXTBEST_DATA``, ``NEXTBEST_STATE_DIR``, ``MLFLOW_TRACKING_URI``,
        ``NEXTBEST_ADMIN_TOKEN``, ``NEXTBEST_CHALLENGER_SHARE``, ``NEXTBEST_POLICY``, ``NEXTBEST_CLOCK``,
        ``NEXTBEST_MODEL_SOURCE``, ``NEXTBEST_STATE_URL``, ``NEXTBEST_SYNC_INTERVAL_MS`` and
        ``NEXTBEST_MODEL_POLL_SECONDS``.

        Raises:
            EngineLoadError: a variable holds an invalid value (the message names it).
        """
        env = os.environ if environ is None else environ
        fields: dict[str, Any] = {"data": env.get("NEXTBEST_DATA", "data/world")}
        for var, name in (
            ("NEXTBEST_STATE_DIR", "state_dir"),
            ("MLFLOW_TRACKING_URI", "tracking_uri"),
            ("NEXTBEST_ADMIN_TOKEN", "admin_token"),
            ("NEXTBEST_CHALLENGER_SHARE", "challenger_share"),
            ("NEXTBEST_POLICY", "policy"),
            ("NEXTBEST_CLOCK", "clock"),
            ("NEXTBEST_MODEL_SOURCE", "model_source"),
            ("NEXTBEST_STATE_URL", "state_url"),
            ("NEXTBEST_SYNC_INTERVAL_MS", "sync_interval_ms"),
            ("NEXTBEST_MODEL_POLL_SECONDS", "model_poll_seconds"),
        ):
            if env.get(var):
                fields[name] = env[var]
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            names = {
                "state_dir": "NEXTBEST_STATE_DIR",
                "challenger_share": "NEXTBEST_CHALLENGER_SHARE",
                "policy": "NEXTBEST_POLICY",
                "clock": "NEXTBEST_CLOCK",
                "model_source": "NEXTBEST_MODEL_SOURCE",
                "data": "NEXTBEST_DATA",
                "state_url": "NEXTBEST_STATE_URL",
                "sync_interval_ms": "NEXTBEST_SYNC_INTERVAL_MS",
                "model_poll_seconds": "NEXTBEST_MODEL_POLL_SECONDS",
            }
            problems = [f"{names.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}" for err in e.errors()]
            raise EngineLoadError("invalid service configuration: " + "; ".join(problems)) from None


def one_line(exc: BaseException) -> str:
    """An exception as one line (what start-up failures print)."""
    return " ".join(str(exc).split()) or type(exc).__name__
