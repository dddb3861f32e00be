"""``nextbest tune cf``: an Optuna study over a recommender's hyperparameters, tracked in MLflow, whose best
configuration is trained, evaluated and registered the way :func:`training.cf.train_cf` does it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.training.cf import TrainResult, _experiment_name, _log_outcome, _run_configs, run_configuration
from nextbest.training.cf_data import CFData, prepare_cf_data
from nextbest.training.evaluation import EvaluationConfig, evaluate, parse_metric_name, score_metric
from nextbest.training.recommenders import MODEL_NAMES, Recommender, config_for, make_recommender
from nextbest.training.studies import log_trial_run, register_study_best, start_study
from nextbest.training.tracking import TrackingConfig, flat_params, log_run_inputs, mask_credentials

ITERATIVE_MODELS = ("als", "bpr")


class TuneError(NextbestError, RuntimeError):
    """A study finished without a single completed trial."""


def suggest_config(trial: Any, model: str) -> BaseModel:
    """Sample a config of ``model`` from its search space (log scales where the effect is multiplicative)."""
    if model == "als":
        # Wide ranges on purpose: on Complete Journey (weights 5 × purchases) the best discovery models have
        # alpha ≈ 0.03–0.1 and regularization ≈ 10, far from implicit's defaults (1.0, 0.01).
        return config_for(
            "als",
            {
                "factors": trial.suggest_int("factors", 8, 256, log=True),
                "regularization": trial.suggest_float("regularization", 1e-4, 30.0, log=True),
                "alpha": trial.suggest_float("alpha", 0.01, 50.0, log=True),
                "iterations": trial.suggest_int("iterations", 5, 30),
            },
        )
    if model == "bpr":
        return config_for(
            "bpr",
            {
                "factors": trial.suggest_int("factors", 8, 256, log=True),
                "learning_rate": trial.suggest_float("learning_rate", 1e-3, 0.2, log=True),
                "regularization": trial.suggest_float("regularization", 1e-5, 0.1, log=True),
                "iterations": trial.suggest_int("iterations", 20, 300, log=True),
            },
        )
    if model == "itemknn":
        return config_for(
            "itemknn",
            {
                "weighting": trial.suggest_categorical("weighting", ["cosine", "bm25"]),
                "K": trial.suggest_int("K", 5, 500, log=True),
                "K1": trial.suggest_float("K1", 0.2, 3.0),
                "B": trial.suggest_float("B", 0.0, 1.0),
            },
        )
    if model == "popularity":
        return config_for(
            "popularity", {"measure": trial.suggest_categorical("measure", ["customers", "weight"])}
        )
    if model == "repeat":
        return config_for(
            "repeat",
            {
                "recency_mix": trial.suggest_float("recency_mix", 0.0, 1.0),
                "half_life_days": trial.suggest_float("half_life_days", 1.0, 180.0, log=True),
            },
        )
    if model == "ease":
        # One fit inverts a max_items² matrix: the item count is a choice among a few sizes, not a range.
        return config_for(
            "ease",
            {
                "l2": trial.suggest_float("l2", 10.0, 10_000.0, log=True),
                "max_items": trial.suggest_categorical("max_items", [2000, 4000, 8000]),
                "binary": trial.suggest_categorical("binary", [True, False]),
            },
        )
    if model == "rp3beta":
        return config_for(
            "rp3beta",
            {
                "alpha": trial.suggest_float("alpha", 0.2, 1.5),
                "beta": trial.suggest_float("beta", 0.0, 1.0),
                "K": trial.suggest_int("K", 10, 500, log=True),
            },
        )
    if model == "tifu":
        return config_for(
            "tifu",
            {
                "half_life_days": trial.suggest_float("half_life_days", 7.0, 365.0, log=True),
                "due_weight": trial.suggest_float("due_weight", 0.0, 1.0),
                "horizon_days": trial.suggest_float("horizon_days", 1.0, 90.0, log=True),
                "lapse_intervals": trial.suggest_float("lapse_intervals", 0.5, 50.0, log=True),
                "neighbours": trial.suggest_int("neighbours", 5, 500, log=True),
                "neighbour_weight": trial.suggest_float("neighbour_weight", 0.0, 1.0),
            },
        )
    if model == "blend":
        return config_for(
            "blend",
            {
                "repeat_weight": trial.suggest_float("repeat_weight", 0.0, 1.0),
                "repeat": {
                    "recency_mix": trial.suggest_float("recency_mix", 0.0, 1.0),
                    "half_life_days": trial.suggest_float("half_life_days", 1.0, 180.0, log=True),
                },
                "cf": {
                    "kind": "als",
                    "factors": trial.suggest_int("factors", 8, 256, log=True),
                    "regularization": trial.suggest_float("regularization", 1e-4, 30.0, log=True),
                    "alpha": trial.suggest_float("alpha", 0.01, 50.0, log=True),
                },
                "knn": {
                    "weighting": "bm25",
                    "K": trial.suggest_int("knn_K", 20, 300, log=True),
                    "K1": trial.suggest_float("knn_K1", 0.2, 3.0),
                    "B": trial.suggest_float("knn_B", 0.0, 1.0),
                },
                "knn_weight": trial.suggest_float("knn_weight", 0.0, 1.0),
            },
        )
    raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODEL_NAMES)}")


@dataclass
class TuneResult:
    """What :func:`tune_cf` did. ``to_dict`` is the JSON the CLI prints."""

    study_name: str
    storage: str
    metric: str
    trials: int
    complete: int
    pruned: int
    best_trial: int
    best_value: float
    best: TrainResult
    parent_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": mask_credentials(self.storage),
            "metric": self.metric,
            "trials": self.trials,
            "complete": self.complete,
            "pruned": self.pruned,
            "best_trial": self.best_trial,
            "best_value": self.best_value,
            "parent_run_id": self.parent_run_id,
            **self.best.to_dict(),
        }


def tune_cf(
    data: Dataset | str | Path,
    model: str = "als",
    *,
    trials: int = 20,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    metric: str = "ndcg_at_10",
    tracking: TrackingConfig | None = None,
    evaluation: EvaluationConfig | None = None,
    evaluate_test: bool = True,
    eval_every: int = 5,
    seed: int = 0,
    threads: int = 0,
    progress: bool = False,
    prepared: CFData | None = None,
) -> TuneResult:
    """An Optuna study over ``model``'s hyperparameters, tracked in MLflow; the best is registered.

    TPE sampling and median pruning; ALS and BPR report the validation ``metric`` every ``eval_every``
    iterations while they fit, so poor trials stop early. The study lives in RDB ``storage`` (default
    ``optuna.db`` beside the MLflow database) under ``study_name`` (default ``<experiment>-<model>-<metric>``):
    calling again resumes it, and several processes given the same storage and name share it (give each its
    own ``seed``). One MLflow parent run per study, one nested run per trial; after the trials, the best
    configuration is run through :func:`run_configuration` and logged into the parent run with the plots.

    Args:
        data: the dataset directory (features built).
        model: the model to tune.
        trials: trials to run in this call.
        timeout: stop starting trials after this many seconds.
        storage: Optuna storage URL (``sqlite:///…``, ``postgresql://…``).
        study_name: study to create or resume.
        metric: validation metric to maximise.
        tracking: MLflow settings.
        evaluation: metric settings (``max_customers`` samples the validation customers for speed).
        evaluate_test: refit the best configuration on train + validation and evaluate on test.
        eval_every: iterations between intermediate reports (ALS, BPR).
        seed: sampler and model seed.
        threads: implicit's threads.
        progress: progress bars.
        prepared: data from :func:`prepare_cf_data`, to reuse.

    Raises:
        TuneError: no trial completed.
    """
    import optuna

    tracking = tracking or TrackingConfig()
    evaluation = evaluation or EvaluationConfig()
    parse_metric_name(metric)
    config_for(model)  # unknown model names fail before any work
    data_ = prepared or prepare_cf_data(
        data, evaluation=evaluation, with_test=evaluate_test, progress=progress
    )
    experiment = tracking.experiment or _experiment_name(data_.dataset)
    started = start_study(
        tracking,
        storage=storage,
        name=study_name or f"{experiment}-{model}-{metric}",
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, interval_steps=1),
        seed=seed,
        dataset=data_.dataset,
        model=model,
        objective=metric,
        default_experiment=_experiment_name(data_.dataset),
    )
    study, storage_url, name = started.study, started.storage, started.study.study_name
    client, experiment_id, parent_id = started.client, started.experiment_id, started.parent_id

    task = data_.validation
    # The objective's K is always evaluated, even when it is not among the configured ones.
    ks = sorted({*evaluation.ks, parse_metric_name(metric)[1]})

    def log_trial(
        trial: Any,
        config: BaseModel,
        metrics: dict[str, float],
        state: str,
        started: float,
        history: list[tuple[int, float]],
    ) -> None:
        if client is None or parent_id is None:
            return
        log_trial_run(
            client,
            experiment_id,
            parent_run_id=parent_id,
            model=model,
            dataset=data_.dataset,
            study_name=name,
            trial=trial.number,
            params={"model": model, **flat_params(config)},
            metrics={**metrics, "trial_seconds": time.perf_counter() - started},
            steps={f"{metric}_by_iteration": history},
            state=state,
        )

    def objective(trial: Any) -> float:
        started = time.perf_counter()
        config = suggest_config(trial, model)
        trial.set_user_attr("config", config.model_dump(mode="json"))
        history: list[tuple[int, float]] = []
        holder: dict[str, Recommender] = {}
        total = getattr(config, "iterations", 0)

        def on_iteration(done: int) -> None:
            if done % eval_every and done != total:
                return
            value = score_metric(holder["model"], task, metric)
            history.append((done, value))
            trial.report(value, done)
            if done != total and trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} after {done} iterations")

        rec = make_recommender(model, config, seed=seed, threads=threads)
        holder["model"] = rec
        try:
            fit_start = time.perf_counter()
            rec.fit(
                data_.train.interactions.matrix,
                recency=data_.train.recency,
                callback=on_iteration if model in ITERATIVE_MODELS else None,
            )
            fit_seconds = time.perf_counter() - fit_start
        except optuna.TrialPruned:
            log_trial(trial, config, {}, "PRUNED", started, history)
            raise
        result = evaluate(rec, task, ks=ks, batch_size=evaluation.batch_size)
        value = result.metrics[metric]
        log_trial(trial, config, {**result.metrics, "fit_seconds": fit_seconds}, "COMPLETE", started, history)
        return value

    try:
        study.optimize(objective, n_trials=trials, timeout=timeout, show_progress_bar=progress)
        states = [t.state for t in study.trials]
        complete = states.count(optuna.trial.TrialState.COMPLETE)
        if complete == 0:
            raise TuneError(
                f"study {name}: no trial completed ({len(states)} trial(s), all pruned or failed)"
            )
        best = study.best_trial
        best_config = config_for(model, best.user_attrs["config"])
        outcome = run_configuration(
            data_,
            model,
            best_config,
            ks=ks,
            batch_size=evaluation.batch_size,
            seed=seed,
            threads=threads,
            progress=progress,
        )
        info: dict[str, Any] = {}
        if tracking.enabled and parent_id is not None:
            import mlflow

            def study_plots(out: Path) -> None:
                from nextbest.training import plots

                plots.study_artifacts(study, out, metric=metric, title=f"{model}: {metric}")

            def register() -> dict[str, Any]:
                with mlflow.start_run(run_id=parent_id):
                    mlflow.log_metrics(
                        {"best_value": best.value, "best_trial": best.number, "trials": len(states)}
                    )
                    log_run_inputs(
                        _run_configs(model, best_config, evaluation, data_, seed, threads),
                        data_.manifest(),
                        mutable=True,
                    )
                    return _log_outcome(
                        outcome, data_, tracking, ks=ks, extra_artifacts=study_plots, params_as_tags=True
                    )

            logged = register_study_best(study, best.number, tracking, register)
            info = {
                "run_id": parent_id,
                "experiment": experiment,
                "tracking_uri": mlflow.get_tracking_uri(),
                **logged,
            }
    except BaseException:
        if client is not None and parent_id is not None:
            client.set_terminated(parent_id, "FAILED")
        raise
    result = TrainResult(
        model,
        best_config,
        outcome.validation.metrics,
        outcome.test.metrics if outcome.test else None,
        outcome.validation.counts,
        outcome.fit_seconds,
        data_.cutoffs(),
        info,
        outcome.bundle,
    )
    states = [t.state for t in study.trials]
    return TuneResult(
        study_name=name,
        storage=storage_url,
        metric=metric,
        trials=len(states),
        complete=states.count(optuna.trial.TrialState.COMPLETE),
        pruned=states.count(optuna.trial.TrialState.PRUNED),
        best_trial=best.number,
        best_value=float(best.value),
        best=result,
        parent_run_id=parent_id,
    )
