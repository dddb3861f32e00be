"""The reports over what the service logged: ``nextbest report decisions``, ``report policy`` and ``dashboard``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    _command_group,
    _emit,
    _open_store,
    _runs,
    _state_url,
    _window_days,
)


def cmd_report_decisions(args: argparse.Namespace) -> None:
    from nextbest.serving.dashboard import offer_responses
    from nextbest.serving.decision_log import summarise_decisions
    from nextbest.serving.state_store import redact

    window_days = _window_days(args)
    url = _state_url(
        args, Path(args.data), f"serve with 'nextbest serve --data {args.data}' and ask for decisions first"
    )
    store = _open_store(url)
    log = redact(url)
    table = summarise_decisions(store, offer_responses(store), window_days=window_days)
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


def add_report_parsers(sub: Any) -> None:
    """``report decisions``, ``report policy`` and ``dashboard``."""
    rp = _command_group(sub, "report", "reports over what the service logged", "report_command", "REPORT")
    rd = rp.add_parser("decisions", help="acceptance of next best actions by arm and action")
    rd.add_argument("--data", default=str(DEFAULT_DATA))
    rd.add_argument("--state-dir", help="the service's state folder (default DATA/service)")
    rd.add_argument(
        "--state-url", help="the service's state store (default NEXTBEST_STATE_URL, else STATE_DIR/state.db)"
    )
    rd.add_argument("--window-days", type=float, default=7.0)
    _runs(rd, cmd_report_decisions)

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
    _runs(rpol, cmd_report_policy)

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
    _runs(db, cmd_dashboard)
