"""What every command group of the command line shares: its user error, output, flags and the state store.

Nothing heavy is imported here at module level: ``nextbest --help`` imports every command group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nextbest.features.errors import NextbestError

DEFAULT_DATA = Path("data/world")


class UsageError(NextbestError):
    """A problem with what the user asked for, reported as one line."""


def _emit(args: argparse.Namespace, summary: dict[str, Any], human: Sequence[str]) -> None:
    if not args.json:
        for line in human:
            print(line)
    else:
        print(json.dumps(summary, default=str, sort_keys=False))


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def _command_group(sub: Any, name: str, help: str, dest: str, metavar: str = "SUBCOMMAND") -> Any:
    """``nextbest NAME …``: a command whose subcommands are added to what this returns."""
    return sub.add_parser(name, help=help).add_subparsers(dest=dest, required=True, metavar=metavar)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last line of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _runs(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], None]) -> None:
    """A command's last words: ``--json`` and ``--quiet``, and the function that runs it."""
    _common(p)
    p.set_defaults(func=func)


def _no_bento(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-bento",
        action="store_true",
        help="do not export the champions (and challengers) into the BentoML model store (BENTOML_HOME)",
    )


def _tracked(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
    )
    _common(p)


def _tracking(args: argparse.Namespace) -> Any:
    from nextbest.training.tracking import TrackingConfig

    fields: dict[str, Any] = {}
    if getattr(args, "tracking_uri", None):
        fields["tracking_uri"] = args.tracking_uri
    if getattr(args, "no_tracking", False):
        fields["enabled"] = False
    return TrackingConfig(**fields)


def _absolute_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force, with a relative SQLite path made absolute: the server runs elsewhere."""
    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path

    resolved = resolve_tracking_uri() if uri is None else uri
    path = sqlite_path(resolved)
    return f"sqlite:///{path.resolve().as_posix()}" if path is not None else resolved


def _config_file(path: str | Path) -> Path:
    """A config file named by a flag: it must exist and be a file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"config file {path} is not a file")
    return path


def _feature_config(path: str | None) -> Any:
    from nextbest.features.pipeline import FeatureConfig

    if path is None:
        return FeatureConfig()
    return FeatureConfig.load(_config_file(path))


def _dataset_folder(path: str | Path) -> Path:
    """A dataset folder named by a flag, to be created or written: it must not be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a dataset folder")
    return path


def _require_events(ds: Any) -> None:
    """Raise unless ``ds`` is a dataset holding at least one event (an import whose every row was quarantined
    holds none): a feature build needs the time of the latest event.

    Raises:
        DatasetError: ``ds`` is not a dataset, or has no events table.
        UsageError: its events table is empty.
    """
    from nextbest.features.pipeline import data_as_of

    ds.require()
    try:
        data_as_of(ds)
    except ValueError as e:  # its one ValueError: "the dataset has no events"
        raise UsageError(str(e)) from None


def _example_requests(port: int) -> list[str]:
    base = f"http://127.0.0.1:{port}"
    return [
        "try it:",
        f'  curl -s -X POST {base}/recommend -H \'content-type: application/json\' -d \'{{"customer_id": "C0000001", "n": 5}}\'',
        f'  curl -s -X POST {base}/next_best_action -H \'content-type: application/json\' -d \'{{"customer_id": "C0000001", "channel": "web"}}\'',
        f"  OpenAPI docs: {base}/docs",
    ]


def _window_days(args: argparse.Namespace) -> float:
    """``--window-days``: a finite number of days, not negative."""
    days = args.window_days
    if not math.isfinite(days) or days < 0:
        raise UsageError(f"--window-days must be a number of days >= 0, got {days:g}")
    return days


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
