"""The ``nextbest`` command line: one module per command group; nothing imports it.

Every command shows progress on long work (on standard error) and accepts ``--json``, which prints one JSON
object summarising the result as the last line of standard output. A named error the user can fix
(:class:`~nextbest.features.errors.NextbestError`, or a config out of range) is printed as one line naming what
is wrong, with exit status 2 — never a traceback. Anything else is a bug: exit status 1, with its type, message
and the line of our code it came from (``NEXTBEST_DEBUG=1`` shows the whole traceback).

The main job is a plain function too: :func:`nextbest.serving.cli.run.run_main_job`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from nextbest.serving.cli.bento import add_bento_parsers
from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    UsageError,
    _no_bento,
    _runs,
)
from nextbest.serving.cli.data import add_data_parsers
from nextbest.serving.cli.loop import add_retrain_parser, add_simulate_parser
from nextbest.serving.cli.reports import add_report_parsers
from nextbest.serving.cli.serve import add_serve_parser
from nextbest.serving.cli.training import add_training_parsers

__all__ = ["DEFAULT_DATA", "RunConfig", "RunReport", "UsageError", "build_parser", "main", "run_main_job"]


def cmd_run(args: argparse.Namespace) -> None:
    """``nextbest run`` (in :mod:`.run`, imported only when it runs: it needs pydantic at import)."""
    from nextbest.serving.cli.run import cmd_run

    cmd_run(args)


def __getattr__(name: str) -> Any:
    # The main job's names, without importing pydantic for `nextbest --help`.
    if name in ("RunConfig", "RunReport", "run_main_job"):
        from nextbest.serving.cli import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    _runs(run, cmd_run)

    add_data_parsers(sub)
    add_training_parsers(sub)
    add_bento_parsers(sub)
    add_retrain_parser(sub)
    add_simulate_parser(sub)
    add_serve_parser(sub)
    add_report_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nextbest`` console script."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("nextbest: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("NEXTBEST_DEBUG"):
            raise
        from nextbest.serving.cli.failures import report_failure

        return report_failure(exc)
    return 0
