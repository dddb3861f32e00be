"""``nextbest serve``: recommendations and next best actions over HTTP (BentoML)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from nextbest.serving.cli.common import DEFAULT_DATA, UsageError, _absolute_tracking_uri, _example_requests


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


def add_serve_parser(sub: Any) -> None:
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
