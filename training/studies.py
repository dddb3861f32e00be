"""Optuna studies tracked in MLflow: a study opened (created, resumed or joined by other workers), its parent
run, one nested run per trial, and the best trial's model registered once, whichever worker finishes last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nextbest.features.dataset import Dataset
from nextbest.training.tracking import (
    TAG_STAGE,
    TrackingConfig,
    default_optuna_storage,
    mask_credentials,
    registry_write_lock,
    resolve_tracking_uri,
    run_name,
    run_tags,
    sqlite_init_lock,
    sqlite_path,
    use_tracking,
    with_retries,
)


def open_study(storage: str, name: str, *, direction: str, pruner: Any, seed: int) -> Any:
    """Create the Optuna study ``name`` in ``storage``, or load it to resume or to join other workers.

    Several workers may start at once against one RDB URL: the race to create the tables and the study is
    retried (:func:`with_retries`). The TPE sampler is seeded with ``seed`` plus the trials already in the study,
    so a resumed study draws a fresh stream, and uses the constant-liar heuristic so that concurrent workers do
    not all sample next to the same promising point (give each worker its own ``seed``).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with sqlite_init_lock(sqlite_path(storage)):  # creates the SQLite file's folder
        study = with_retries(
            lambda: optuna.create_study(
                study_name=name, storage=storage, direction=direction, pruner=pruner, load_if_exists=True
            ),
            what=f"Optuna study {name!r} in {mask_credentials(storage)}",
        )
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), constant_liar=True)
    return study


@dataclass
class StudyRun:
    """An Optuna study and, when tracking is on, the MLflow parent run its trials log under."""

    study: Any
    storage: str
    client: Any = None
    experiment_id: str = ""
    parent_id: str | None = None


def start_study(
    tracking: TrackingConfig,
    *,
    storage: str | None,
    name: str,
    direction: str,
    pruner: Any,
    seed: int,
    dataset: Dataset,
    model: str,
    objective: str,
    default_experiment: str,
) -> StudyRun:
    """Open (create, resume or join) the study ``name`` in ``storage`` (default :func:`default_optuna_storage`)
    and, with tracking on, its MLflow parent run (:func:`study_parent_run`) in the experiment of ``tracking``
    (``default_experiment`` without one): what ``nextbest tune cf`` and ``tune propensity`` both start with."""
    storage_url = storage or default_optuna_storage(tracking)
    study = open_study(storage_url, name, direction=direction, pruner=pruner, seed=seed)
    run = StudyRun(study, storage_url)
    if tracking.enabled:
        from mlflow import MlflowClient

        run.experiment_id = use_tracking(tracking, default_experiment)
        uri = resolve_tracking_uri(tracking)
        run.client = MlflowClient(uri, uri)
        run.parent_id = study_parent_run(
            run.client,
            study,
            run.experiment_id,
            model=model,
            dataset=dataset,
            storage=storage_url,
            objective=objective,
        )
    return run


def study_parent_run(
    client: Any,
    study: Any,
    experiment_id: str,
    *,
    model: str,
    dataset: Dataset,
    storage: str,
    objective: str,
) -> str:
    """An Optuna study's MLflow parent run: the one recorded on the study (resumed), or a new one.

    The run is named ``<model> study · <dataset>`` and tagged with :func:`run_tags` (stage ``study``) and
    ``optuna.study``; its id is kept in the study's user attributes.
    """
    from mlflow.exceptions import MlflowException

    name = run_name(model, "study", dataset.root.resolve().name)
    tags = {**run_tags(model, "study", dataset), "optuna.study": study.study_name}
    known = study.user_attrs.get("mlflow_parent_run_id")
    if known:
        try:
            if client.get_run(known).info.experiment_id == experiment_id:
                # Runs of an older naming scheme get today's name and tags.
                for key, value in {**tags, "mlflow.runName": name}.items():
                    client.set_tag(known, key, value)
                return known
        except MlflowException:
            pass
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.log_param(run.info.run_id, "study_name", study.study_name)
    client.log_param(run.info.run_id, "storage", mask_credentials(storage))
    client.log_param(run.info.run_id, "objective", objective)
    # Workers that start together each find no parent and create one; all of them then adopt the earliest
    # (ties broken by run id), and the others delete theirs, so the study ends with one parent run.
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`optuna.study` = '{study.study_name}' and tags.`{TAG_STAGE}` = 'study'",
        max_results=1000,
    )
    earliest = min(parents, key=lambda r: (r.info.start_time, r.info.run_id), default=run)
    parent_id = earliest.info.run_id
    if parent_id != run.info.run_id:
        client.delete_run(run.info.run_id)
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    return parent_id


REGISTERED_BEST_ATTR = "nextbest_registered_best"
"""The study user attribute recording the trial whose model was registered as the study's best, and what was
logged for it (``{"trial": n, "logged": {...}}``)."""


def register_study_best(
    study: Any, trial: int, tracking: TrackingConfig, register: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Log and register trial ``trial``'s refitted model as the study's best, once, whichever worker gets here.

    Workers of one study finish at different times, each with the best of the trials it could see. Under a lock
    (:func:`registry_write_lock`: a file beside a SQLite store, an advisory lock in a PostgreSQL one; none for an
    MLflow server, which offers none, so two workers there can still register one trial twice), the study's best
    is read again: a worker whose trial is no longer the best registers nothing (the worker finishing last sees
    every trial and registers the true best), and a trial already registered is not registered twice.

    Args:
        study: the Optuna study.
        trial: the trial whose configuration was refitted.
        tracking: where the registry is.
        register: logs into the parent run and registers; returns what :func:`register_logged_model` returns.

    Returns:
        what was registered for the study's best (``version`` …), or ``{"registered_by": "another worker"}``.
    """
    with registry_write_lock(resolve_tracking_uri(tracking), f"nextbest register best of {study.study_name}"):
        best = study.best_trial.number
        done = study.user_attrs.get(REGISTERED_BEST_ATTR)
        if done and done.get("trial") == best:
            return dict(done["logged"])
        if best != trial:
            return {"registered_by": "another worker"}
        logged = register()
        plain = {k: v for k, v in logged.items() if v is None or isinstance(v, str | int | float | bool)}
        study.set_user_attr(REGISTERED_BEST_ATTR, {"trial": trial, "logged": plain})
        return logged


def log_trial_run(
    client: Any,
    experiment_id: str,
    *,
    parent_run_id: str,
    model: str,
    dataset: Dataset,
    study_name: str,
    trial: int,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    steps: Mapping[str, list[tuple[int, float]]] | None = None,
    state: str,
) -> str:
    """One Optuna trial as a finished nested run (through the client, so that worker threads cannot mix runs).

    Args:
        client: an ``MlflowClient``.
        experiment_id: the study's experiment.
        parent_run_id: the study's parent run.
        model, dataset: what the run name and the ``nextbest.*`` tags say.
        study_name, trial: the Optuna study and trial number (``optuna.study``, ``optuna.trial`` tags).
        params: the trial's sampled config, flat.
        metrics: final metrics (non-finite values are left out).
        steps: metric name → ``(step, value)`` pairs (learning curves).
        state: ``COMPLETE``, ``PRUNED`` or ``FAIL`` (the ``optuna.state`` tag).

    Returns:
        the run id.
    """
    from mlflow.entities import Metric, Param, RunTag

    tags = {
        **run_tags(model, "trial", dataset),
        "mlflow.parentRunId": parent_run_id,
        "optuna.study": study_name,
        "optuna.trial": str(trial),
    }
    run = client.create_run(
        experiment_id, run_name=run_name(model, "trial", dataset.root.resolve().name, trial=trial), tags=tags
    )
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    for key, history in (steps or {}).items():
        values += [Metric(key, float(v), now, int(step)) for step, v in history if math.isfinite(v)]
    client.log_batch(
        run.info.run_id,
        metrics=values,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("optuna.state", state)],
    )
    client.set_terminated(run.info.run_id, "FAILED" if state == "FAIL" else "FINISHED")
    return run.info.run_id
