"""Train, tune (Optuna), track (MLflow), register and promote the action propensity model.

* :func:`train_propensity` builds the training table of a dataset, fits the network on the training period,
  early-stops and calibrates it on the validation period, evaluates it on the later test period beside the
  base-rate and logistic-regression baselines (and the planted truth on generated data), logs one MLflow run
  (params, metrics, per-epoch validation loss, reliability plot, per-action table) and registers the model as
  ``nextbest-propensity`` with alias ``challenger``.
* :func:`tune_propensity` runs an Optuna study (TPE, median pruning on the per-epoch validation loss) with one
  MLflow parent run per study and one nested run per trial, then trains the best configuration into the parent
  run and registers it.
* :func:`promote_propensity` moves ``champion`` to the challenger only if it is better on a validation metric
  (``val_log_loss`` by default: it rewards calibration as well as ranking), and says why either way.

MLflow locations, experiments, run names, tags, ``config.json`` / ``data_manifest.json`` and registry helpers
come from :mod:`training.tracking`; the propensity runs go to the experiment
``<dataset directory name>-propensity``, named ``propensity train · <dataset>`` and ``propensity study · <dataset>``.

Why it is longer than the project's ~600 lines: training, tuning and promotion of one model share what a run
is (the training table's loading, the data manifest, ``config.json``, :func:`log_propensity_run`), and a study
logs its best through that same function into its parent run, so a tuned champion's run reads like a trained
one. Moving the tuning out would only make four private helpers public for it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.schema import CUSTOMER_ID, RESPONDED
from nextbest.training import tracking as tracking_module
from nextbest.training.promotion import PromotionDecision, promote
from nextbest.training.propensity import PropensityConfig, PropensityFit, fit_propensity
from nextbest.training.propensity_data import (
    PropensityData,
    PropensityDataConfig,
    champion_affinity_config,
    load_propensity_data,
)
from nextbest.training.propensity_eval import PropensityReport, evaluate_propensity, reliability_plot
from nextbest.training.propensity_metrics import log_loss, roc_auc
from nextbest.training.registry import PROPENSITY
from nextbest.training.studies import log_trial_run, register_study_best, start_study
from nextbest.training.tracking import (
    DataManifest,
    TrackingConfig,
    flat_params,
    log_run_inputs,
    mask_credentials,
    quiet_mlflow,
    register_logged_model,
    resolve_tracking_uri,
    run_name,
    run_tags,
    use_tracking,
    version_description,
)

REGISTERED_MODEL = PROPENSITY
MODEL_TAG = "propensity"
"""The ``nextbest.model`` tag and the first word of the run names."""
MODEL_NAME_IN_RUN = "model"
MODEL_CODE = Path(__file__).with_name("propensity_model_code.py")
PROPENSITY_ARTIFACT = "propensity"
"""The artifact name of the saved model directory inside the logged pyfunc (see propensity_model_code.py)."""
SUMMARY_METRICS = (
    "auc",
    "log_loss",
    "brier",
    "ece",
    "baseline_auc_logreg",
    "baseline_auc_base_rate",
    "baseline_log_loss_logreg",
    "baseline_ece_logreg",
    "baseline_log_loss_base_rate",
    "baseline_ece_base_rate",
    "uncalibrated_ece",
    "oracle_auc",
    "oracle_log_loss",
    "oracle_ece",
    "val_auc",
    "val_log_loss",
    "val_ece",
)
LOWER_IS_BETTER = ("loss", "ece", "brier")


class PropensityTuneError(NextbestError, RuntimeError):
    """A study finished without a single completed trial."""


def propensity_tracking(tracking: TrackingConfig | None) -> TrackingConfig:
    """The tracking settings for the propensity model: the recommender's default registry name is replaced by
    ``nextbest-propensity`` (any other name given is kept)."""
    tracking = tracking or TrackingConfig()
    if tracking.registered_model == tracking_module.REGISTERED_MODEL:
        tracking = tracking.model_copy(update={"registered_model": REGISTERED_MODEL})
    return tracking


def experiment_name(ds: Dataset) -> str:
    """The MLflow experiment of a dataset's propensity runs."""
    return f"{ds.root.resolve().name}-propensity"


def pip_requirements() -> list[str]:
    """What the pyfunc needs beyond nextbest itself (torch pinned without the local ``+cpu`` tag)."""
    from importlib import metadata

    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for pkg in ("numpy", "scipy", "polars", "pandas", "pyarrow", "pydantic", "mlflow", "scikit-learn"):
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _dataset(data: Dataset | str | Path) -> Dataset:
    return data if isinstance(data, Dataset) else Dataset.at(data)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _summary(
    report: PropensityReport, fit: PropensityFit, data: PropensityData, config: PropensityConfig
) -> dict[str, Any]:
    metrics = report.metrics
    out: dict[str, Any] = {k: metrics[k] for k in SUMMARY_METRICS if k in metrics}
    out.update(
        {
            "rows_per_second": fit.rows_per_second,
            "train_seconds": fit.train_seconds,
            "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.history),
            "device": fit.device,
            "data": data.summary(),
            "config": config.model_dump(mode="json"),
        }
    )
    return out


def data_manifest(ds: Dataset, data: PropensityData, config: PropensityDataConfig) -> DataManifest:
    """The run's data manifest: exposures and responses per period, customers, actions, and how the cut-offs
    were chosen (explicit dates, or the fractions of exposures by time)."""
    periods = {"train": data.train, "validation": data.validation, "test": data.test}
    rows: dict[str, int] = {}
    for name, part in periods.items():
        rows[f"{name}_exposures"] = part.height
        rows[f"{name}_responses"] = int(part[RESPONDED].cast(pl.Int64).sum())
    rows["exposures"] = sum(part.height for part in periods.values())
    rows["customers"] = pl.concat([p.select(CUSTOMER_ID) for p in periods.values()])[CUSTOMER_ID].n_unique()
    rows["actions"] = data.catalog.height
    explicit = config.validation_start is not None and config.test_start is not None
    split: dict[str, str | float | None] = {
        "source": "explicit" if explicit else "fractions",
        "target": data.target,
        "validation_fraction": None if explicit else config.validation_fraction,
        "test_fraction": None if explicit else config.test_fraction,
    }
    return DataManifest.describe(
        ds, validation_start=data.validation_start, test_start=data.test_start, split=split, rows=rows
    )


def _run_configs(config: PropensityConfig, data_config: PropensityDataConfig, device: str) -> dict[str, Any]:
    """The configs a propensity run logs as ``config.json`` (``config``: :class:`PropensityConfig`,
    ``data_config``: :class:`PropensityDataConfig`)."""
    return {"config": config, "data_config": data_config, "run_options": {"device": device}}


def log_propensity_run(
    fit: PropensityFit,
    report: PropensityReport,
    data: PropensityData,
    ds: Dataset,
    tracking: TrackingConfig,
    *,
    data_config: PropensityDataConfig,
    params_as_tags: bool = False,
    extra_artifacts: Any = None,
) -> dict[str, Any]:
    """Log a trained model into the active MLflow run and register it with the tracking alias.

    Logs params (config, ``data_config.*``, target, device; the run's ``config.json``, ``data_manifest.json``
    and ``data.*`` params come from :func:`training.tracking.log_run_inputs`), metrics (test, baselines, oracle,
    validation; the validation loss per epoch as steps), artifacts (``evaluation/reliability.png``,
    ``per_action.csv``/``.html``, ``history.csv``, ``evaluation.json``) and the pyfunc model whose artifact is
    the saved model directory; registers it (see :func:`training.tracking.register_logged_model`).

    Returns:
        ``model_uri``, ``model_id`` and, when registered, ``registered_model``, ``version`` and ``alias``.
    """
    import mlflow

    model = fit.model
    # Cut-offs, fractions and row counts are the data.* params of the data manifest (see training.tracking).
    params = {
        **flat_params(model.config),
        **flat_params(data_config, "data_config."),
        "target": data.target,
        "device": fit.device,
    }
    if params_as_tags:
        # A study's parent run may be logged again when a resumed study finds a new best; params cannot change.
        mlflow.set_tags({f"best.{k}": v for k, v in params.items()})
    else:
        mlflow.log_params(params)
    mlflow.log_metrics(_finite(report.metrics))
    for h in fit.history:
        mlflow.log_metrics(
            _finite({"epoch_val_loss": h["val_loss"], "epoch_train_loss": h["train_loss"]}),
            step=int(h["epoch"]),
        )
    dataset = str(ds.root.resolve())
    mlflow.set_tag("nextbest.target", data.target)
    with tempfile.TemporaryDirectory(prefix="nextbest-propensity-") as tmp:
        out = Path(tmp)
        evaluation = out / "evaluation"
        evaluation.mkdir()
        reliability_plot(
            report, evaluation / "reliability.png", title=f"Propensity reliability, {ds.root.name} test"
        )
        report.per_action.write_csv(evaluation / "per_action.csv")
        (evaluation / "per_action.html").write_text(
            report.per_action.to_pandas().to_html(index=False, float_format=lambda v: f"{v:.4f}")
        )
        pl.DataFrame(fit.history).write_csv(evaluation / "history.csv")
        for name, table in report.reliability.items():
            table.write_csv(evaluation / f"reliability_{name}.csv")
        (evaluation / "evaluation.json").write_text(
            json.dumps(
                {
                    "metrics": report.metrics,
                    "data": data.summary(),
                    "config": model.config.model_dump(mode="json"),
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        if extra_artifacts is not None:
            extra_artifacts(evaluation)
        mlflow.log_artifacts(str(evaluation), artifact_path="evaluation")
        saved = model.save(out / PROPENSITY_ARTIFACT)
        with quiet_mlflow():
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(MODEL_CODE),
                artifacts={PROPENSITY_ARTIFACT: str(saved)},
                pip_requirements=pip_requirements(),
                registered_model_name=tracking.registered_model if tracking.register_model else None,
            )
    run = mlflow.active_run().info
    shown = ("val_log_loss", "val_auc", "val_ece", "auc", "ece")
    return register_logged_model(
        info,
        tracking,
        version_tags={
            "dataset": dataset,
            "target": data.target,
            "val_log_loss": f"{report.metrics.get('val_log_loss', float('nan')):.6f}",
            "val_auc": f"{report.metrics.get('val_auc', float('nan')):.6f}",
        },
        description=f"Propensity ({data.target}) on {ds.root.resolve().name}. "
        + version_description(
            {k: report.metrics[k] for k in shown if k in report.metrics},
            run_id=run.run_id,
            experiment_id=run.experiment_id,
        ),
    )


def _load_data(
    ds: Dataset, data_config: PropensityDataConfig, tracking: TrackingConfig, *, progress: bool
) -> PropensityData:
    """The propensity table; the CF affinity's ALS takes the registered champion recommender's
    hyperparameters when there is one (refitted on the training period: see ``champion_affinity_config``)."""
    data_config, label = champion_affinity_config(
        ds, data_config, tracking_uri=resolve_tracking_uri(tracking)
    )
    return load_propensity_data(ds, data_config, progress=progress, recommender_label=label)


DATA_SECTION = "data"
"""Key of a run config file's training-table settings (:class:`PropensityDataConfig`) beside the model's."""


def split_run_config(
    config: PropensityConfig | Mapping[str, Any] | None, data_config: PropensityDataConfig | None = None
) -> tuple[PropensityConfig, PropensityDataConfig]:
    """The model and training-table configs of a run config (what ``--config FILE`` holds): the model's
    hyperparameters, and optionally a ``"data"`` object of :class:`PropensityDataConfig` fields (campaign
    inputs, snapshot days, …). Fields set explicitly on ``data_config`` (command-line flags such as
    ``--test-fraction``) win over the file's.

    Raises:
        pydantic.ValidationError: a field is unknown or out of range (the message names it).
    """
    if isinstance(config, PropensityConfig):
        return config, data_config or PropensityDataConfig()
    raw = dict(config or {})
    from_file = dict(raw.pop(DATA_SECTION, None) or {})
    typed = PropensityConfig.model_validate(raw)
    explicit = data_config.model_dump(include=data_config.model_fields_set) if data_config else {}
    return typed, PropensityDataConfig.model_validate({**from_file, **explicit})


def train_propensity(
    data: Dataset | str | Path,
    config: PropensityConfig | dict[str, Any] | None = None,
    *,
    data_config: PropensityDataConfig | None = None,
    tracking: TrackingConfig | None = None,
    device: str = "auto",
    model_dir: str | Path | None = None,
    progress: bool = False,
    prepared: PropensityData | None = None,
) -> dict[str, Any]:
    """Train, evaluate, log and register the propensity model of a dataset.

    Args:
        data: the dataset directory (an action log, or events and items for derived targets).
        config: hyperparameters (typed, dict, or None for defaults); a dict may carry a ``"data"`` object of
            training-table settings (see :func:`split_run_config`).
        data_config: how the training table is built and split.
        tracking: MLflow settings (``TrackingConfig(enabled=False)`` to skip tracking); the registered model
            defaults to ``nextbest-propensity``.
        device: ``auto``, ``cpu`` or ``cuda``.
        model_dir: also save the model directory here (readable by :meth:`PropensityScorer.load`).
        progress: progress bars.
        prepared: a table from :func:`load_propensity_data`, to reuse across calls.

    Returns:
        a JSON-able summary: ``auc``, ``log_loss``, ``brier``, ``ece`` (test period, calibrated),
        ``baseline_auc_logreg``, ``baseline_auc_base_rate`` (and their log-loss and ECE), ``oracle_auc`` etc.
        on generated data, ``val_*``, throughput, ``data`` (rows, rates, cut-offs), ``config``, ``per_action``
        and, when tracked, ``run_id``, ``experiment``, ``tracking_uri``, ``model_uri``, ``version``, ``alias``.
    """
    ds = _dataset(data)
    typed, data_config = split_run_config(config, data_config)
    tracking = propensity_tracking(tracking)
    table = prepared or _load_data(ds, data_config, tracking, progress=progress)
    fit = fit_propensity(table, typed, device=device, progress=progress)
    report = evaluate_propensity(fit, table)
    summary = {"command": "train propensity", "dataset": str(ds.root), **_summary(report, fit, table, typed)}
    summary["per_action"] = report.per_action.to_dicts()
    if model_dir is not None:
        summary["model_dir"] = str(fit.model.save(model_dir))
    if tracking.enabled:
        import mlflow

        experiment_id = use_tracking(tracking, experiment_name(ds))
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name(MODEL_TAG, "train", ds.root.resolve().name),
            tags=run_tags(MODEL_TAG, "train", ds),
        ) as run:
            log_run_inputs(_run_configs(typed, data_config, device), data_manifest(ds, table, data_config))
            logged = log_propensity_run(fit, report, table, ds, tracking, data_config=data_config)
        summary.update(
            {
                "run_id": run.info.run_id,
                "experiment": tracking.experiment or experiment_name(ds),
                "tracking_uri": resolve_tracking_uri(tracking),
                **logged,
            }
        )
    return json_safe(summary)


# --- tuning ------------------------------------------------------------------------------------------------


def suggest_propensity_config(trial: Any, base: PropensityConfig) -> PropensityConfig:
    """Sample hyperparameters around ``base`` (log scales where effects are multiplicative).

    The class weighting stays ``base.imbalance`` so that the per-epoch validation losses that pruning compares
    are on one scale across trials.
    """
    layers = trial.suggest_int("hidden_layers", 1, 3)
    width = trial.suggest_categorical("hidden_width", [32, 64, 128, 256])
    return base.model_copy(
        update={
            "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-7, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
            "embedding_dim": trial.suggest_categorical("embedding_dim", [4, 8, 16]),
            "cross_layers": trial.suggest_int("cross_layers", 0, 3),
            "hidden_sizes": [max(16, width // 2**i) for i in range(layers)],
            "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024, 2048]),
            "numeric_bins": trial.suggest_categorical("numeric_bins", [0, 8, 16]),
        }
    )


def tune_propensity(
    data: Dataset | str | Path,
    trials: int = 20,
    timeout: float | None = None,
    storage: str | None = None,
    *,
    study_name: str | None = None,
    config: PropensityConfig | dict[str, Any] | None = None,
    data_config: PropensityDataConfig | None = None,
    tracking: TrackingConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    prepared: PropensityData | None = None,
) -> dict[str, Any]:
    """An Optuna study of the propensity hyperparameters, tracked in MLflow; the best is trained and registered.

    Each trial fits on the training period and reports the validation loss after every epoch (the median pruner
    stops poor trials after two epochs); its objective is the calibrated validation log-loss. The study lives in
    ``storage`` (default ``optuna.db`` beside the MLflow database) under ``study_name`` (default
    ``<experiment>-val_log_loss``): calling again resumes it, and several processes may share it. One MLflow
    parent run per study, one nested run per trial (``mlflow.parentRunId``), logged through the client so that
    worker threads cannot mix them up. The best configuration is then trained, evaluated on the test period and
    logged into the parent run, and registered as ``challenger``.

    Args:
        data: the dataset directory.
        trials: trials to run in this call.
        timeout: stop starting trials after this many seconds.
        storage: Optuna storage URL.
        study_name: study to create or resume.
        config: the base config (epochs, patience, seed, imbalance and calibration are taken from it).
        data_config: how the training table is built.
        tracking: MLflow settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: sampler seed.
        progress: progress bars.
        prepared: a table from :func:`load_propensity_data`, to reuse.

    Raises:
        PropensityTuneError: no trial completed.
    """
    import optuna

    ds = _dataset(data)
    base = config if isinstance(config, PropensityConfig) else PropensityConfig.model_validate(config or {})
    data_config = data_config or PropensityDataConfig()
    tracking = propensity_tracking(tracking)
    table = prepared or _load_data(ds, data_config, tracking, progress=progress)
    experiment = tracking.experiment or experiment_name(ds)
    started = start_study(
        tracking,
        storage=storage,
        name=study_name or f"{experiment}-val_log_loss",
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2, interval_steps=1),
        seed=seed,
        dataset=ds,
        model=MODEL_TAG,
        objective="val_log_loss",
        default_experiment=experiment_name(ds),
    )
    study, storage_url, name = started.study, started.storage, started.study.study_name
    client, experiment_id, parent_id = started.client, started.experiment_id, started.parent_id

    y_val = table.validation[RESPONDED].cast(pl.Float64).to_numpy()

    def log_trial(
        trial: Any, cfg: PropensityConfig, metrics: dict[str, float], state: str, history: list
    ) -> None:
        if client is None or parent_id is None:
            return
        log_trial_run(
            client,
            experiment_id,
            parent_run_id=parent_id,
            model=MODEL_TAG,
            dataset=ds,
            study_name=name,
            trial=trial.number,
            params=flat_params(cfg),
            metrics=metrics,
            steps={"epoch_val_loss": history},
            state=state,
        )

    def objective(trial: Any) -> float:
        started = time.perf_counter()
        cfg = suggest_propensity_config(trial, base)
        trial.set_user_attr("config", cfg.model_dump(mode="json"))
        history: list[tuple[int, float]] = []

        def on_epoch(epoch: int, val_loss: float) -> None:
            history.append((epoch, val_loss))
            trial.report(val_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {val_loss:.4f} after {epoch} epochs")

        try:
            fit = fit_propensity(table, cfg, device=device, on_epoch=on_epoch)
        except optuna.TrialPruned:
            log_trial(trial, cfg, {"trial_seconds": time.perf_counter() - started}, "PRUNED", history)
            raise
        val_p = fit.model.calibration.apply(fit.model.logits(fit.encoded_validation))
        value = log_loss(y_val, val_p)
        metrics = {
            "val_log_loss": value,
            "val_auc": roc_auc(y_val, val_p),
            "val_loss": fit.best_val_loss,
            "best_epoch": float(fit.best_epoch),
            "trial_seconds": time.perf_counter() - started,
        }
        log_trial(trial, cfg, metrics, "COMPLETE", history)
        return value

    try:
        bar = tqdm(total=trials, desc="propensity trials", disable=not progress, unit="trial")
        study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[lambda *_: bar.update()])
        bar.close()
        states = [t.state for t in study.trials]
        complete = states.count(optuna.trial.TrialState.COMPLETE)
        if complete == 0:
            raise PropensityTuneError(
                f"study {name}: no trial completed ({len(states)} trial(s), all pruned or failed)"
            )
        best = study.best_trial
        best_config = PropensityConfig.model_validate(best.user_attrs["config"])
        fit = fit_propensity(table, best_config, device=device, progress=progress)
        report = evaluate_propensity(fit, table)
        summary: dict[str, Any] = {
            "command": "tune propensity",
            "dataset": str(ds.root),
            **_summary(report, fit, table, best_config),
        }
        if tracking.enabled and parent_id is not None:
            import mlflow

            def study_plots(out: Path) -> None:
                from nextbest.training import plots

                plots.study_artifacts(study, out, metric="val_log_loss", title="propensity: val_log_loss")

            def register() -> dict[str, Any]:
                with mlflow.start_run(run_id=parent_id):
                    mlflow.log_metrics(
                        {"best_value": float(best.value), "best_trial": best.number, "trials": len(states)}
                    )
                    log_run_inputs(
                        _run_configs(best_config, data_config, device),
                        data_manifest(ds, table, data_config),
                        mutable=True,
                    )
                    return log_propensity_run(
                        fit,
                        report,
                        table,
                        ds,
                        tracking,
                        data_config=data_config,
                        params_as_tags=True,
                        extra_artifacts=study_plots,
                    )

            logged = register_study_best(study, best.number, tracking, register)
            summary.update(
                {
                    "run_id": parent_id,
                    "experiment": experiment,
                    "tracking_uri": resolve_tracking_uri(tracking),
                    **logged,
                }
            )
    except BaseException:
        if client is not None and parent_id is not None:
            client.set_terminated(parent_id, "FAILED")
        raise
    states = [t.state for t in study.trials]
    summary.update(
        {
            "study_name": name,
            "storage": mask_credentials(storage_url),
            "trials": len(states),
            "complete": states.count(optuna.trial.TrialState.COMPLETE),
            "pruned": states.count(optuna.trial.TrialState.PRUNED),
            "best_trial": best.number,
            "best_value": float(best.value),
            "best_params": dict(best.params),
            "parent_run_id": parent_id,
        }
    )
    return json_safe(summary)


# --- promotion ---------------------------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (AUC) or worse (losses, ECE, Brier)."""
    return not any(word in metric for word in LOWER_IS_BETTER)


def promote_propensity(
    tracking: TrackingConfig | None = None,
    *,
    metric: str = "val_log_loss",
    min_improvement: float = 0.0,
    data: str | Path | None = None,
) -> PromotionDecision:
    """Move ``champion`` to the challenger only if it beats the champion on the logged validation ``metric``.

    Args:
        tracking: where the registry is (the registered model defaults to ``nextbest-propensity``).
        metric: logged validation metric: ``val_log_loss`` (default; lower is better), ``val_auc`` (higher is
            better), ``val_ece`` …
        min_improvement: relative margin the challenger must win by (0.01 = 1 %).
        data: if given, the challenger must have been trained on this dataset directory.

    Returns:
        the decision and its reason; the previous champion keeps the alias ``previous-champion``.
    """
    return promote(
        propensity_tracking(tracking),
        metric=metric,
        higher=higher_is_better(metric),
        train_command="nextbest train propensity",
        min_improvement=min_improvement,
        data=data,
    )
