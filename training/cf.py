"""Train, evaluate, tune (Optuna) and register (MLflow) the follow-up purchase recommenders of a dataset.

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
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl
import scipy.sparse as sp
from pydantic import BaseModel
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.interactions import Interactions, build_interactions, interaction_weights
from nextbest.features.pipeline import FeatureConfig, clean_events
from nextbest.features.profiles import build_profiles
from nextbest.features.schema import TIMESTAMP_COL
from nextbest.features.splits import temporal_split
from nextbest.training.evaluation import (
    EvaluationConfig,
    EvaluationResult,
    EvaluationTask,
    evaluate,
    parse_metric_name,
    prepare_evaluation,
    score_metric,
)
from nextbest.training.histories import purchase_matrix, recency_matrix
from nextbest.training.recommender_bundle import RecommenderBundle
from nextbest.training.recommenders import MODEL_NAMES, Recommender, config_for, make_recommender
from nextbest.training.tracking import (
    DataManifest,
    TrackingConfig,
    flat_params,
    log_recommender_bundle,
    log_run_inputs,
    log_trial_run,
    mask_credentials,
    register_study_best,
    run_name,
    run_tags,
    start_study,
    use_tracking,
    version_description,
)

ITERATIVE_MODELS = ("als", "bpr")
TEST_PREFIX = "test_"


class CFDataError(NextbestError, ValueError):
    """A dataset cannot be trained on yet (no features built, no split, no purchases in a period)."""


class TuneError(NextbestError, RuntimeError):
    """A study finished without a single completed trial."""


# --- data ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodMatrices:
    """A training matrix with the matrices the models and the evaluation need beside it.

    Attributes:
        interactions: weighted interactions (model input) with vocabularies.
        bought: purchase counts, same shape (left out of discovery lists).
        recency: age in days of each pair's latest event at ``as_of`` (repeat model).
        as_of: the cut-off the matrices describe.
        last_event: the latest event in them (None when not known).
    """

    interactions: Interactions
    bought: sp.csr_matrix
    recency: sp.csr_matrix
    as_of: datetime
    last_event: datetime | None = None


@dataclass(frozen=True)
class CFData:
    """Everything train and tune need from a dataset, prepared once.

    Attributes:
        dataset: the dataset.
        validation_start, test_start: the cut-offs from the feature manifest.
        feature_config: the config the features were built with.
        train: matrices of the events before ``validation_start``.
        validation: the validation period, aligned with ``train``.
        full: matrices of the events before ``test_start`` (None without test evaluation).
        test: the test period aligned with ``full`` (None without test evaluation).
        event_counts: clean personalisation events in all (``events``) and per period (``train_events``,
            ``validation_events``, ``test_events``), for the run's data manifest.
        everything: matrices of every event up to the data's ``as_of`` (only for ``refit="all"``).
    """

    dataset: Dataset
    validation_start: datetime
    test_start: datetime
    feature_config: FeatureConfig
    train: PeriodMatrices
    validation: EvaluationTask
    full: PeriodMatrices | None = None
    test: EvaluationTask | None = None
    event_counts: dict[str, int] = field(default_factory=dict)
    everything: PeriodMatrices | None = None

    def cutoffs(self) -> dict[str, str]:
        return {
            "validation_start": self.validation_start.isoformat(),
            "test_start": self.test_start.isoformat(),
        }

    def manifest(self) -> DataManifest:
        """The run's data manifest: cut-offs from the feature manifest, events, interactions and customers."""
        rows = dict(self.event_counts)
        matrix = self.train.interactions.matrix
        rows.update(
            {
                "train_interactions": int(matrix.nnz),
                "train_customers": int(matrix.shape[0]),
                "train_items": int(matrix.shape[1]),
                "validation_purchases": self.validation.counts.get("period_purchases", 0),
                "validation_customers": self.validation.counts.get("customers", 0),
            }
        )
        if self.full is not None and self.test is not None:
            rows.update(
                {
                    "full_interactions": int(self.full.interactions.matrix.nnz),
                    "test_purchases": self.test.counts.get("period_purchases", 0),
                    "test_customers": self.test.counts.get("customers", 0),
                }
            )
        return DataManifest.describe(
            self.dataset,
            validation_start=self.validation_start,
            test_start=self.test_start,
            split={"source": "feature manifest"},
            rows=rows,
        )


def _period_matrices(events: pl.LazyFrame, config: FeatureConfig, as_of: datetime) -> PeriodMatrices:
    weights = interaction_weights(events, config.interactions, as_of=as_of).collect()
    interactions = build_interactions(weights)
    return PeriodMatrices(
        interactions,
        purchase_matrix(events, interactions.customers, interactions.items),
        recency_matrix(events, interactions.customers, interactions.items, as_of=as_of),
        as_of,
        events.select(pl.col(TIMESTAMP_COL).max()).collect().item(),
    )


def _profiles_at(ds: Dataset, config: FeatureConfig, as_of: datetime) -> pl.DataFrame:
    # Segments as they stood at the cut-off (journey phase changes over time), from profiling-consented events.
    events = clean_events(ds, config, purpose="profiling").filter(pl.col(TIMESTAMP_COL) < as_of)
    return build_profiles(
        events,
        ds.scan("items", required=False),
        ds.scan("customers", required=False),
        as_of=as_of,
        config=config.profiles,
    ).collect()


def prepare_cf_data(
    data: Dataset | str | Path,
    *,
    evaluation: EvaluationConfig | None = None,
    with_test: bool = True,
    refit_all: bool = False,
    progress: bool = False,
) -> CFData:
    """Split the clean events at the manifest's cut-offs and build the matrices and evaluation periods (and,
    with ``refit_all``, the matrices of every event up to the manifest's ``as_of``).

    Raises:
        DatasetError: the dataset or its manifest is missing (run ``nextbest features build``).
        CFDataError: the manifest has no split, or the training period has no interactions.
    """
    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    ds.require()
    manifest = ds.read_manifest()
    splits = manifest.get("splits")
    if not splits:
        why = "; ".join(manifest.get("warnings", [])) or "the manifest has no splits"
        raise CFDataError(f"{ds.root}: cannot train without a train/validation/test split ({why})")
    validation_start = datetime.fromisoformat(splits["validation_start"])
    test_start = datetime.fromisoformat(splits["test_start"])
    config = FeatureConfig.model_validate(manifest.get("config", {}))
    evaluation = evaluation or EvaluationConfig()
    steps = tqdm(total=4 if with_test else 2, desc="preparing data", disable=not progress, unit="step")
    events = clean_events(ds, config, purpose="personalisation").collect().lazy()
    ts = pl.col(TIMESTAMP_COL)
    event_counts = (
        events.select(
            pl.len().alias("events"),
            (ts < validation_start).sum().alias("train_events"),
            ((ts >= validation_start) & (ts < test_start)).sum().alias("validation_events"),
            (ts >= test_start).sum().alias("test_events"),
        )
        .collect()
        .row(0, named=True)
    )
    split = temporal_split(events, validation_start=validation_start, test_start=test_start)
    train = _period_matrices(split.train, config, validation_start)
    if train.interactions.matrix.nnz == 0:
        raise CFDataError(f"{ds.root}: no interactions before {validation_start.isoformat()} to train on")
    steps.update()
    validation = prepare_evaluation(
        train.interactions,
        split.validation,
        bought=train.bought,
        profiles=_profiles_at(ds, config, validation_start),
        config=evaluation,
    )
    steps.update()
    full = test = None
    if with_test:
        full = _period_matrices(events.filter(pl.col(TIMESTAMP_COL) < test_start), config, test_start)
        steps.update()
        test = prepare_evaluation(
            full.interactions,
            split.test,
            bought=full.bought,
            profiles=_profiles_at(ds, config, test_start),
            config=evaluation,
        )
        steps.update()
    everything = None
    if refit_all:
        everything = _period_matrices(events, config, datetime.fromisoformat(manifest["as_of"]))
    steps.close()
    return CFData(
        ds,
        validation_start,
        test_start,
        config,
        train,
        validation,
        full,
        test,
        {k: int(v) for k, v in event_counts.items()},
        everything,
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


# --- tuning -------------------------------------------------------------------------------------------------


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
