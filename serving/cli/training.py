"""The training commands: ``nextbest train``, ``tune`` and ``promote`` of the recommender and the propensity model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nextbest.serving.cli.bento import _export_to_bento
from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    UsageError,
    _command_group,
    _config_file,
    _emit,
    _no_bento,
    _progress,
    _tracked,
    _tracking,
)

MODELS = ["als", "bpr", "itemknn", "popularity", "repeat", "blend", "ease", "rp3beta", "tifu"]


def _model_config(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "config", None):
        return None
    path = _config_file(args.config)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc


def _metric_lines(metrics: dict[str, float] | None, title: str) -> list[str]:
    if not metrics:
        return []
    keys = [
        k
        for k in (
            "precision_at_10",
            "recall_at_20",
            "ndcg_at_10",
            "map_at_10",
            "new_ndcg_at_10",
            "hit_rate_at_10",
        )
        if k in metrics
    ]
    return [f"  {title}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)]


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What a training run is told apart from its config: where it is tracked, its seed, progress bars."""
    return {"tracking": _tracking(args), "seed": args.seed, "progress": _progress(args)}


def cmd_train_cf(args: argparse.Namespace) -> None:
    from nextbest.training.cf import train_cf

    result = train_cf(args.data, args.model, _model_config(args), **_run_options(args)).to_dict()
    lines = [
        f"trained {args.model} on {args.data} in {result['fit_seconds']:.1f} s",
        *_metric_lines(result["metrics"], "validation"),
        *_metric_lines(result.get("test_metrics"), "test"),
        *_registry_lines(result),
    ]
    _emit(args, {"command": "train cf", "data": args.data, **result, **result["metrics"]}, lines)


def _registry_lines(result: dict[str, Any]) -> list[str]:
    if not result.get("version"):
        return []
    return [
        f"  registered {result.get('registered_model', 'model')} version {result['version']} "
        f"as @{result.get('alias', 'challenger')} (MLflow run {result.get('run_id', '?')})"
    ]


def _metric(name: str) -> str:
    """``--metric``: a metric name the evaluation produces."""
    from nextbest.training.evaluation import parse_metric_name

    try:
        parse_metric_name(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return name


def _storage(url: str | None) -> str | None:
    """``--storage``: a database URL SQLAlchemy can open (else Optuna fails deep inside, naming a plugin)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from nextbest.training.tracking import mask_credentials

    try:
        make_url(url).get_dialect()
    except ArgumentError as e:  # NoSuchModuleError too: an unknown database or driver
        raise UsageError(
            f"--storage {mask_credentials(url)} is not a database URL SQLAlchemy can open: {e}"
        ) from None
    return url


def cmd_tune_cf(args: argparse.Namespace) -> None:
    from nextbest.training.cf_tuning import tune_cf

    result = tune_cf(
        args.data,
        args.model,
        trials=args.trials,
        timeout=args.timeout,
        storage=_storage(args.storage),
        study_name=args.study,
        metric=_metric(args.metric),
        **_run_options(args),
    ).to_dict()
    lines = [
        f"study {result['study_name']}: {result['trials']} trials ({result['complete']} complete, {result['pruned']} pruned)",
        f"  best trial {result['best_trial']}: {result['metric']} {result['best_value']:.4f}",
        *_metric_lines(result.get("test_metrics"), "test (best)"),
        *_registry_lines(result),
    ]
    _emit(args, {"command": "tune cf", "data": args.data, **result, **result["metrics"]}, lines)


def _promote_and_export(args: argparse.Namespace, kind: str, decision: Any) -> None:
    summary: dict[str, Any] = {"command": f"promote {kind}", **decision.model_dump(mode="json")}
    lines = [decision.reason]
    if not args.no_bento:
        try:
            bento, bento_lines = _export_to_bento(_tracking(args).tracking_uri, [kind])
        except UsageError as exc:
            # The decision stands; there is just no champion to export yet.
            summary |= {"bento_model": None, "bento_error": str(exc)}
            lines.append(f"  not exported to the BentoML model store: {exc}")
        else:
            summary |= {"bento_model": next(iter(bento["bento_champions"].values())), **bento}
            lines += bento_lines
    _emit(args, summary, lines)


def cmd_promote_recommender(args: argparse.Namespace) -> None:
    from nextbest.training.promotion import promote_recommender

    decision = promote_recommender(_tracking(args), metric=args.metric, data=args.data)
    _promote_and_export(args, "recommender", decision)


def _propensity_lines(result: dict[str, Any]) -> list[str]:
    def fmt(key: str) -> str:
        value = result.get(key)
        return f"{key} {value:.4f}" if isinstance(value, int | float) else f"{key} n/a"

    keys = ("auc", "log_loss", "brier", "ece", "baseline_auc_logreg", "baseline_auc_base_rate", "oracle_auc")
    return ["  test: " + ", ".join(fmt(k) for k in keys if k in result), *_registry_lines(result)]


def _propensity_data_config(args: argparse.Namespace) -> Any:
    from nextbest.training.propensity_data import PropensityDataConfig

    fields: dict[str, Any] = {}
    for name in ("target", "validation_fraction", "test_fraction"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return PropensityDataConfig(**fields)


def _propensity_run_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--config`` of the propensity model: a JSON object of hyperparameters, with an optional ``"data"``
    object (the training table's fields)."""
    config = _model_config(args)
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("data") or {}, dict)):
        raise UsageError(f'config file {args.config} must hold a JSON object (and its "data" an object)')
    return config


def cmd_train_propensity(args: argparse.Namespace) -> None:
    from nextbest.training.propensity_tuning import train_propensity

    result = train_propensity(
        args.data,
        _propensity_run_config(args),
        data_config=_propensity_data_config(args),
        tracking=_tracking(args),
        device=args.device,
        progress=_progress(args),
    )
    _emit(
        args,
        {"command": "train propensity", "data": args.data, **result},
        [f"trained the propensity model on {args.data}", *_propensity_lines(result)],
    )


def cmd_tune_propensity(args: argparse.Namespace) -> None:
    from nextbest.training.propensity_tuning import tune_propensity

    result = tune_propensity(
        args.data,
        trials=args.trials,
        timeout=args.timeout,
        storage=_storage(args.storage),
        study_name=args.study,
        data_config=_propensity_data_config(args),
        device=args.device,
        **_run_options(args),
    )
    _emit(
        args,
        {"command": "tune propensity", "data": args.data, **result},
        [
            f"study {result.get('study_name')}: {result.get('trials')} trials "
            f"({result.get('complete')} complete, {result.get('pruned')} pruned); best trial {result.get('best_trial')}",
            *_propensity_lines(result),
        ],
    )


def cmd_promote_propensity(args: argparse.Namespace) -> None:
    from nextbest.training.propensity_tuning import promote_propensity

    decision = promote_propensity(_tracking(args), metric=args.metric, data=args.data)
    _promote_and_export(args, "propensity", decision)


def add_training_parsers(sub: Any) -> None:
    """``train``, ``tune`` and ``promote``, each of ``cf``/``recommender`` and ``propensity``."""
    train = _command_group(sub, "train", "train one configuration", "train_command", "MODEL_KIND")
    tc = train.add_parser("cf", help="a follow-up purchase model (collaborative filtering or a baseline)")
    tc.add_argument("--data", default=str(DEFAULT_DATA))
    tc.add_argument("--model", choices=MODELS, default="als")
    tc.add_argument("--config", help='hyperparameters as a JSON file (e.g. {"factors": 128})')
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--no-tracking", action="store_true", help="train and evaluate without MLflow")
    _tracked(tc)
    tc.set_defaults(func=cmd_train_cf)

    tune = _command_group(sub, "tune", "tune with an Optuna study", "tune_command", "MODEL_KIND")
    uc = tune.add_parser("cf", help="tune a follow-up purchase model")
    uc.add_argument("--data", default=str(DEFAULT_DATA))
    uc.add_argument("--model", choices=MODELS, default="als")
    uc.add_argument("--trials", type=int, default=20)
    uc.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    uc.add_argument("--storage", help="Optuna RDB URL shared by workers (default: sqlite under mlruns/)")
    uc.add_argument(
        "--study", help="study name (default: derived from dataset and model); resumes if it exists"
    )
    uc.add_argument("--metric", default="ndcg_at_10", help="validation metric to maximise")
    uc.add_argument("--seed", type=int, default=0)
    _tracked(uc)
    uc.set_defaults(func=cmd_tune_cf)

    promote = _command_group(
        sub,
        "promote",
        "move champion to the challenger if it is better, then export it for a Bento",
        "promote_command",
        "MODEL_KIND",
    )
    pr = promote.add_parser("recommender", help="nextbest-recommender")
    pr.add_argument("--data", help="require the challenger to be trained on this dataset")
    pr.add_argument("--metric", default="ndcg_at_10")
    _no_bento(pr)
    _tracked(pr)
    pr.set_defaults(func=cmd_promote_recommender)

    def propensity_data(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=str(DEFAULT_DATA))
        p.add_argument(
            "--target",
            choices=["auto", "actions", "derived"],
            help="action log, or derived follow-up purchase targets",
        )
        p.add_argument(
            "--validation-fraction", type=float, help="share of exposures (by time) for validation"
        )
        p.add_argument("--test-fraction", type=float, help="share of exposures (by time) for test")
        p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")

    tp = train.add_parser("propensity", help="the action propensity model (PyTorch, calibrated)")
    propensity_data(tp)
    tp.add_argument("--config", help="hyperparameters as a JSON file")
    tp.add_argument("--no-tracking", action="store_true", help="train and evaluate without MLflow")
    _tracked(tp)
    tp.set_defaults(func=cmd_train_propensity)

    up = tune.add_parser("propensity", help="tune the propensity model")
    propensity_data(up)
    up.add_argument("--trials", type=int, default=20)
    up.add_argument("--timeout", type=float)
    up.add_argument("--storage", help="Optuna RDB URL shared by workers")
    up.add_argument("--study", help="study name; resumes if it exists")
    up.add_argument("--seed", type=int, default=0)
    _tracked(up)
    up.set_defaults(func=cmd_tune_propensity)

    pp = promote.add_parser("propensity", help="nextbest-propensity")
    pp.add_argument("--data", help="require the challenger to be trained on this dataset")
    pp.add_argument(
        "--metric", default="val_log_loss", help="val_log_loss (lower is better), val_auc, val_ece …"
    )
    _no_bento(pp)
    _tracked(pp)
    pp.set_defaults(func=cmd_promote_propensity)
