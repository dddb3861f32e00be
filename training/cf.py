"""``nextbest train cf``: train one recommender configuration, evaluate it and register it in MLflow.

The protocol, the same for ``train_cf`` and for the best trial of ``tune_cf``:

1. read the clean personalisation events and the cut-offs in the feature manifest;
2. fit on train (events before ``validation_start``) and evaluate on the validation period — these are the
   metrics without prefix (``ndcg_at_10``, ``new_ndcg_at_10`` …) that tuning and promotion compare;
3. refit the same config on train + validation (everything before ``test_start``) and evaluate on the test
   period (``test_ndcg_at_10`` … in MLflow, ``test_metrics`` in the result); this refit model, with the
   histories it was fitted on, is what gets logged as the pyfunc model and registered as ``challenger``;
4. only with ``refit="all"`` (what ``nextbest retrain`` asks for): once the held-out periods have decided,
   refit the same config on every event up to the data's ``as_of`` and register that model instead, so the
   served model knows the latest period too.

The registered version says which data it saw: tags ``refit`` (``train``, ``train+validation`` or ``all``) and
``data_until`` (the latest event it was fitted on).

Step 1 is :mod:`training.cf_data`; the study that tunes a configuration is :mod:`training.cf_tuning`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel

from nextbest.features.dataset import Dataset
from nextbest.features.moved_names import moved_names
from nextbest.training.cf_data import CFData, CFDataError, PeriodMatrices, prepare_cf_data
from nextbest.training.evaluation import EvaluationConfig, EvaluationResult, evaluate
from nextbest.training.recommender_bundle import RecommenderBundle
from nextbest.training.recommenders import Recommender, config_for, make_recommender
from nextbest.training.tracking import (
    TrackingConfig,
    flat_params,
    log_recommender_bundle,
    log_run_inputs,
    run_name,
    run_tags,
    use_tracking,
    version_description,
)

TEST_PREFIX = "test_"

# Moved out by the split, still importable from here: each is imported from its new module on first use (the
# tuning imports this module, so importing it back at the top would be a cycle).
__getattr__ = moved_names(
    __name__,
    {
        "nextbest.training.cf_data": "CFData CFDataError PeriodMatrices prepare_cf_data",
        "nextbest.training.cf_tuning": "ITERATIVE_MODELS TuneError TuneResult suggest_config tune_cf",
    },
)


# --- fitting and the outcome of one configuration -------------------------------------------------------------


def fit_recommender(
    model: str,
    config: BaseModel | dict[str, Any] | None,
    period: PeriodMatrices,
    *,
    seed: int = 0,
    threads: int = 0,
    progress: bool = False,
    callback: Callable[[int], None] | None = None,
) -> tuple[Recommender, float]:
    """Fit ``model`` on a period's matrices; return it and the seconds the fit took."""
    rec = make_recommender(model, config, seed=seed, threads=threads)
    started = time.perf_counter()
    rec.fit(period.interactions.matrix, recency=period.recency, progress=progress, callback=callback)
    return rec, time.perf_counter() - started


@dataclass
class Outcome:
    """One configuration trained, evaluated on validation and (optionally) refit and evaluated on test."""

    model: str
    config: BaseModel
    validation: EvaluationResult
    fit_seconds: float
    bundle: RecommenderBundle
    test: EvaluationResult | None = None
    refit_seconds: float | None = None


def run_configuration(
    data: CFData,
    model: str,
    config: BaseModel,
    *,
    ks: list[int],
    batch_size: int = 256,
    seed: int = 0,
    threads: int = 0,
    progress: bool = False,
) -> Outcome:
    """Steps 2 and 3 of the module docstring for one configuration."""
    rec, fit_seconds = fit_recommender(
        model, config, data.train, seed=seed, threads=threads, progress=progress
    )
    validation = evaluate(rec, data.validation, ks=ks, batch_size=batch_size, progress=progress)
    final, history, test, refit_seconds, refit = rec, data.train, None, None, "train"
    if data.full is not None and data.test is not None:
        final, refit_seconds = fit_recommender(
            model, config, data.full, seed=seed, threads=threads, progress=progress
        )
        history, refit = data.full, "train+validation"
        test = evaluate(final, data.test, ks=ks, batch_size=batch_size, progress=progress)
    if data.everything is not None:
        # Held-out data has decided; the model that serves learns from every event up to now.
        final, refit_seconds = fit_recommender(
            model, config, data.everything, seed=seed, threads=threads, progress=progress
        )
        history, refit = data.everything, "all"
    metadata = {
        "model": model,
        "config": config.model_dump(mode="json"),
        "dataset": str(data.dataset.root.resolve()),
        "trained_until": history.as_of.isoformat(),
        "refit": refit,
        "data_until": history.last_event.isoformat() if history.last_event else None,
        "cutoffs": data.cutoffs(),
        "validation_metrics": validation.metrics,
        "test_metrics": test.metrics if test else None,
    }
    bundle = RecommenderBundle(final, history.interactions, metadata)
    return Outcome(model, config, validation, fit_seconds, bundle, test, refit_seconds)


def _segment_html(table: pl.DataFrame) -> str:
    keep = ["ndcg_at_10", "new_ndcg_at_10", "hit_rate_at_10", "recall_at_20", "popularity_bias_at_10"]
    wide = (
        table.filter(pl.col("metric").is_in(keep))
        .pivot(on="metric", index=["segment", "segment_value"], values="value")
        .join(
            table.filter(pl.col("metric") == "ndcg_at_10").select("segment", "segment_value", "customers"),
            on=["segment", "segment_value"],
            how="left",
        )
        .sort("segment", "segment_value")
    )
    return wide.to_pandas().to_html(index=False, float_format=lambda v: f"{v:.4f}")


def _log_outcome(
    outcome: Outcome,
    data: CFData,
    tracking: TrackingConfig,
    *,
    ks: list[int],
    extra_artifacts: Callable[[Path], None] | None = None,
    params_as_tags: bool = False,
) -> dict[str, Any]:
    """Log params, metrics, tables, plots and the pyfunc model into the active MLflow run.

    ``params_as_tags`` records the config as ``best.<param>`` tags instead: a study's parent run is logged
    again when a resumed study finds a new best, and MLflow params cannot change once logged.
    """
    import mlflow

    from nextbest.training import plots

    # Cut-offs and row counts are the data.* params of the data manifest (see training.tracking).
    params = {"model": outcome.model, **flat_params(outcome.config)}
    if params_as_tags:
        mlflow.set_tags({f"best.{k}": v for k, v in params.items()})
    else:
        mlflow.log_params(params)
    metrics = dict(outcome.validation.metrics)
    metrics["fit_seconds"] = outcome.fit_seconds
    metrics["validation_customers"] = float(outcome.validation.counts.get("customers", 0))
    if outcome.test is not None:
        metrics.update({f"{TEST_PREFIX}{k}": v for k, v in outcome.test.metrics.items()})
        metrics["test_customers"] = float(outcome.test.counts.get("customers", 0))
    if outcome.refit_seconds is not None:
        metrics["refit_seconds"] = outcome.refit_seconds
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory(prefix="nextbest-cf-") as tmp:
        out = Path(tmp)
        plots.metrics_by_k(
            outcome.validation.metrics, ks, out / "metrics_by_k.png", title=f"{outcome.model} on validation"
        )
        plots.segment_bars(
            outcome.validation.by_segment,
            out / "segments_validation.png",
            title=f"{outcome.model} on validation, by segment",
        )
        outcome.validation.by_segment.write_csv(out / "segments_validation.csv")
        (out / "segments_validation.html").write_text(_segment_html(outcome.validation.by_segment))
        if outcome.test is not None:
            plots.metrics_by_k(
                outcome.test.metrics, ks, out / "metrics_by_k_test.png", title=f"{outcome.model} on test"
            )
            plots.segment_bars(
                outcome.test.by_segment,
                out / "segments_test.png",
                title=f"{outcome.model} on test, by segment",
            )
            outcome.test.by_segment.write_csv(out / "segments_test.csv")
        summary = {
            "config": outcome.config.model_dump(mode="json"),
            "validation": outcome.validation.to_dict(),
            "test": outcome.test.to_dict() if outcome.test else None,
            "cutoffs": data.cutoffs(),
        }
        (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
        if extra_artifacts is not None:
            extra_artifacts(out)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        bundle_dir = outcome.bundle.save(out / "bundle")
        history = outcome.bundle.history
        example = list(history.customers.ids[:2])
        run = mlflow.active_run().info
        shown = ("ndcg_at_10", "new_ndcg_at_10", "recall_at_20")
        logged = log_recommender_bundle(
            bundle_dir,
            example_customers=example,
            tracking=tracking,
            version_tags={
                "dataset": str(data.dataset.root.resolve()),
                "model": outcome.model,
                "validation_ndcg_at_10": f"{outcome.validation.metrics.get('ndcg_at_10', float('nan')):.6f}",
                **data_tags(outcome.bundle.metadata),
            },
            description=f"{outcome.model} on {data.dataset.root.resolve().name}. "
            + version_description(
                {k: outcome.validation.metrics[k] for k in shown if k in outcome.validation.metrics},
                run_id=run.run_id,
                experiment_id=run.experiment_id,
            ),
        )
    return logged


def data_tags(metadata: dict[str, Any]) -> dict[str, str]:
    """The registry version tags that say which data a bundle saw: ``refit`` and ``data_until``."""
    return {k: str(metadata[k]) for k in ("refit", "data_until") if metadata.get(k) is not None}


# --- results ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train_cf` did. ``to_dict`` is the JSON the CLI prints.

    Attributes:
        model, config: what was trained.
        metrics: validation metrics (``ndcg_at_10`` …).
        test_metrics: test metrics of the refit model (same names), or None.
        counts: validation customers and dropped purchases.
        fit_seconds: the training fit (train period).
        tracking: run id, experiment, tracking URI, model URI, registered version and alias (when tracked).
        bundle: the final model with its histories (not in ``to_dict``).
    """

    model: str
    config: BaseModel
    metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    counts: dict[str, int]
    fit_seconds: float
    cutoffs: dict[str, str]
    tracking: dict[str, Any] = field(default_factory=dict)
    bundle: RecommenderBundle | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config.model_dump(mode="json"),
            "metrics": self.metrics,
            "test_metrics": self.test_metrics,
            "counts": self.counts,
            "fit_seconds": round(self.fit_seconds, 4),
            "cutoffs": self.cutoffs,
            **self.tracking,
        }


def _experiment_name(ds: Dataset) -> str:
    return ds.root.resolve().name


def _run_configs(
    model: str, config: BaseModel, evaluation: EvaluationConfig, data: CFData, seed: int, threads: int
) -> dict[str, Any]:
    """The configs a recommender run logs as ``config.json``: read ``config`` back with
    ``config_for(model, ...)``, ``evaluation`` with ``EvaluationConfig``, ``features`` with ``FeatureConfig``."""
    return {
        "model": model,
        "config": config,
        "evaluation": evaluation,
        "features": data.feature_config,
        "run_options": {"seed": seed, "threads": threads},
    }


def train_cf(
    data: Dataset | str | Path,
    model: str = "als",
    config: BaseModel | dict[str, Any] | None = None,
    *,
    tracking: TrackingConfig | None = None,
    evaluation: EvaluationConfig | None = None,
    evaluate_test: bool = True,
    seed: int = 0,
    threads: int = 0,
    progress: bool = False,
    prepared: CFData | None = None,
    refit: Literal["train+validation", "all"] = "train+validation",
) -> TrainResult:
    """Train one configuration, evaluate it, log it to MLflow and register it as ``challenger``.

    Args:
        data: the dataset directory (features built).
        model: ``als``, ``bpr``, ``itemknn``, ``popularity``, ``repeat`` or ``blend``.
        config: its hyperparameters (typed config, dict, or None for defaults).
        tracking: MLflow settings (``TrackingConfig(enabled=False)`` to skip tracking).
        evaluation: metrics settings (K values, segments).
        evaluate_test: refit on train + validation and evaluate on test (the refit model is registered).
        seed, threads: run options of the model.
        progress: progress bars.
        prepared: data from :func:`prepare_cf_data`, to reuse across calls.
        refit: what the registered model is fitted on after evaluation: ``train+validation`` (step 3 of the
            module docstring), or ``all`` (step 4: every event up to the data's ``as_of``).

    Returns:
        metrics and tracking references (see :class:`TrainResult`).

    Raises:
        CFDataError: ``refit="all"`` with ``prepared`` data built without ``refit_all``.
    """
    tracking = tracking or TrackingConfig()
    evaluation = evaluation or EvaluationConfig()
    typed = config_for(model, config)
    data_ = prepared or prepare_cf_data(
        data, evaluation=evaluation, with_test=evaluate_test, refit_all=refit == "all", progress=progress
    )
    if refit == "all" and data_.everything is None:
        raise CFDataError("refit='all' needs data prepared with prepare_cf_data(..., refit_all=True)")
    outcome = run_configuration(
        data_,
        model,
        typed,
        ks=evaluation.ks,
        batch_size=evaluation.batch_size,
        seed=seed,
        threads=threads,
        progress=progress,
    )
    info: dict[str, Any] = {}
    if tracking.enabled:
        import mlflow

        experiment_id = use_tracking(tracking, _experiment_name(data_.dataset))
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name(model, "train", data_.dataset.root.resolve().name),
            tags=run_tags(model, "train", data_.dataset),
        ) as run:
            mlflow.log_param("seed", seed)
            log_run_inputs(_run_configs(model, typed, evaluation, data_, seed, threads), data_.manifest())
            logged = _log_outcome(outcome, data_, tracking, ks=evaluation.ks)
        info = {
            "run_id": run.info.run_id,
            "experiment": tracking.experiment or _experiment_name(data_.dataset),
            "tracking_uri": mlflow.get_tracking_uri(),
            **logged,
        }
    return TrainResult(
        model,
        typed,
        outcome.validation.metrics,
        outcome.test.metrics if outcome.test else None,
        outcome.validation.counts,
        outcome.fit_seconds,
        data_.cutoffs(),
        info,
        outcome.bundle,
    )
