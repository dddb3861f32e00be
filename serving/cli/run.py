"""The main job as a plain function, :func:`run_main_job`, and ``nextbest run``, which parses and calls it.

From Python::

    from nextbest.serving.cli.run import RunConfig, run_main_job

    report = run_main_job(RunConfig(data="data/world", trials=4))
    report.to_dict()  # the JSON `nextbest run --json` prints

The package's ``__init__`` imports this module only when ``nextbest run`` runs: pydantic is slow to import and
``nextbest --help`` should not wait for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from nextbest.serving.cli.bento import _export_to_bento
from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    _absolute_tracking_uri,
    _dataset_folder,
    _emit,
    _example_requests,
    _feature_config,
    _progress,
    _require_events,
)
from nextbest.serving.cli.training import _propensity_lines


class RunConfig(BaseModel):
    """What the main job does; ``RunConfig.model_validate_json(c.model_dump_json()) == c``.

    Attributes:
        data: the dataset folder; a world is generated there when it has no events.
        customers: customers in a newly generated world.
        days: days of a newly generated world.
        seed: seeds a newly generated world.
        trials: Optuna trials for the recommender.
        train: train, promote and export; off, the job stops after the features.
        export_bento: export the champions (and challengers) into the BentoML model store (BENTOML_HOME).
    """

    model_config = ConfigDict(extra="forbid")

    data: Path = DEFAULT_DATA
    customers: int = 5000
    days: int = 180
    seed: int = 42
    trials: int = 8
    train: bool = True
    export_bento: bool = True


@dataclass
class RunReport:
    """What :func:`run_main_job` did; ``to_dict`` is the JSON ``nextbest run --json`` prints.

    Attributes:
        data: the dataset folder.
        features: the features' folder, row counts and splits.
        generated: the generated world's summary, when the job generated one.
        recommender: the tuned recommender's study, metrics and promotion (when trained).
        propensity: the propensity model's test metrics, version and promotion (when trained).
        bento: what went into the BentoML model store (when exported).
        training_lines: the human summary of the training, promotion and export.
    """

    data: str
    features: dict[str, Any]
    generated: dict[str, Any] | None = None
    recommender: dict[str, Any] | None = None
    propensity: dict[str, Any] | None = None
    bento: dict[str, Any] | None = None
    training_lines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"command": "run", "data": self.data}
        if self.generated is not None:
            summary["generate"] = self.generated
        summary["features"] = self.features
        for key in ("recommender", "propensity", "bento"):
            if getattr(self, key) is not None:
                summary[key] = getattr(self, key)
        return summary

    def lines(self) -> list[str]:
        """The human summary."""
        rc = self.features["row_counts"]
        return [
            f"dataset: {self.data}",
            f"features: {self.features['path']} ({rc['interaction_customers']:,} customers × "
            f"{rc['interaction_items']:,} items, {rc['profiles']:,} profiles)",
            *self.training_lines,
        ]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_main_job(
    config: RunConfig, *, progress: bool = True, say: Callable[[str], None] = _to_stderr
) -> RunReport:
    """The main job: generate the embedded world if ``config.data`` has no events, build its features, tune and
    register a recommender and train a propensity model (each promoted if it beats its champion), and export
    the champions into the BentoML model store. Runs are tracked in the MLflow registry in force
    (``MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns/mlflow.db``).

    Args:
        config: what to do.
        progress: show progress bars on standard error.
        say: receives a line as each long stage starts (default: standard error).

    Returns:
        What was built, trained, promoted and exported.

    Raises:
        NextbestError: a named error the user can act on (a dataset that cannot be read, no trial completed,
            no champion to export …).
    """
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features

    ds = Dataset.at(_dataset_folder(config.data))
    generated = None
    if not ds.has_table("events"):
        world = WorldConfig(customers=config.customers, days=config.days, seed=config.seed)
        say(f"generating the embedded world ({world.customers} customers, {world.days} days) in {ds.root}")
        generated = generate_world(world, ds, progress=progress)
    _require_events(ds)
    manifest = build_features(ds, _feature_config(None), progress=progress)
    report = RunReport(
        data=str(ds.root),
        generated=generated,
        features={
            "path": str(ds.features_dir),
            "row_counts": manifest["row_counts"],
            "splits": manifest["splits"],
        },
    )
    if config.train:
        _train_promote_export(ds, config, report, progress=progress, say=say)
    return report


def _train_promote_export(
    ds: Any, config: RunConfig, report: RunReport, *, progress: bool, say: Callable[[str], None]
) -> None:
    """Tune and register a recommender and train a propensity model; promote each if it beats its champion;
    export the champions. Fills ``report``."""
    from nextbest.training.cf_tuning import tune_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.tracking import TrackingConfig

    say(f"tuning ALS on {ds.root} ({config.trials} Optuna trials, tracked in MLflow)")
    tuned = tune_cf(
        ds, "als", trials=config.trials, metric="new_ndcg_at_10", tracking=TrackingConfig(), progress=progress
    )
    decision = promote_recommender(TrackingConfig(), metric="ndcg_at_10", data=ds.root)
    best = tuned.to_dict()  # the best trial's result is flattened into the study summary
    report.recommender = {
        "study": tuned.study_name,
        "metrics": best["metrics"],
        "test_metrics": best.get("test_metrics"),
        "promotion": decision.model_dump(mode="json"),
    }
    shown = ("ndcg_at_10", "new_ndcg_at_10")
    lines = [
        f"recommender: tuned ALS ({tuned.trials} trials): "
        + ", ".join(f"{k} {best['metrics'][k]:.4f}" for k in shown if k in best["metrics"]),
        f"  {decision.reason}",
    ]
    from nextbest.training.propensity_tuning import promote_propensity, train_propensity

    say(f"training the propensity model on {ds.root}")
    result = train_propensity(ds, tracking=TrackingConfig(), progress=progress)
    p_decision = promote_propensity(TrackingConfig(), data=ds.root)
    report.propensity = {
        k: result.get(k)
        for k in ("auc", "log_loss", "brier", "ece", "baseline_auc_logreg", "oracle_auc", "version")
    } | {"promotion": p_decision.model_dump(mode="json")}
    lines += ["propensity model:", *_propensity_lines(result), f"  {p_decision.reason}"]
    if config.export_bento:
        # As `nextbest promote` does: the champions go into the BentoML model store, ready for `bento build`.
        bento, bento_lines = _export_to_bento(None)
        report.bento = bento
        lines += [f"BentoML model store ({bento['bento_home']}):", *bento_lines]
    lines.append("compare runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    report.training_lines = lines


def cmd_run(args: argparse.Namespace) -> None:
    """``nextbest run``: the main job (:func:`run_main_job`), and with ``--serve`` serve what it trained."""
    config = RunConfig(
        data=args.data,
        customers=args.customers,
        days=args.days,
        seed=args.seed,
        trials=args.trials,
        train=not args.skip_training,
        export_bento=not args.no_bento,
    )
    report = run_main_job(config, progress=_progress(args))
    _emit(args, report.to_dict(), report.lines())
    if args.serve and config.train:
        from nextbest.serving.server import serve

        print(f"serving {report.data} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", file=sys.stderr)
        for line in _example_requests(args.port):
            print(line, file=sys.stderr)
        serve(args.port, "127.0.0.1", report.data, clock="data", tracking_uri=_absolute_tracking_uri(None))
