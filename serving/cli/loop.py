"""The loop from what the service saw back to the models: ``nextbest retrain`` and ``nextbest simulate``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nextbest.serving.cli.bento import _export_to_bento
from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    UsageError,
    _absolute_tracking_uri,
    _emit,
    _no_bento,
    _open_store,
    _progress,
    _runs,
    _state_url,
    _tracking,
    _window_days,
)


def cmd_retrain(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from nextbest.features.dataset import Dataset
    from nextbest.serving.retrain import retrain

    window = timedelta(days=_window_days(args))
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
        # A locked dataset, a failed fold, a missing erasure key or store are named errors: one line each.
        report = retrain(
            ds,
            store,
            tracking_uri=_absolute_tracking_uri(args.tracking_uri),
            window=window,
            delivered_channels=delivered,
            force=args.force,
            progress=_progress(args),
        )
    finally:
        store.close()
    summary: dict[str, Any] = {"command": "retrain", **report.to_dict()}
    lines = report.lines()
    if not args.no_bento and not report.skipped and len(report.failed) < len(report.models):
        try:
            bento, bento_lines = _export_to_bento(_tracking(args).tracking_uri)
        except UsageError as exc:
            summary |= {"bento_error": str(exc)}
            lines.append(f"  not exported to the BentoML model store: {exc}")
        else:
            summary |= bento
            lines += bento_lines
    _emit(args, summary, lines)
    if report.failed:
        raise UsageError(f"retrain: {', '.join(report.failed)} not retrained (see the summary)")


def add_retrain_parser(sub: Any) -> None:
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
    _runs(rt, cmd_retrain)


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


def add_simulate_parser(sub: Any) -> None:
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
    _runs(sm, cmd_simulate)
