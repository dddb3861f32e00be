"""The Bento commands: ``nextbest bento export``, ``build`` and ``serve``, and the export every promotion ends with."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    UsageError,
    _command_group,
    _emit,
    _example_requests,
    _runs,
    _tracked,
    _tracking,
)


def _export_to_bento(
    tracking_uri: str | None, kinds: Sequence[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Export the champions (and challengers) of ``kinds`` (default: every model the service loads) from the
    registry at ``tracking_uri`` (default: the one in force) into the BentoML model store; summary and lines.

    Raises:
        UsageError: the registry has no such model or no champion (the message names the command to run).
    """
    from nextbest.serving.bento_store import SERVED_MODELS, BentoStoreError, bentoml_home, export_champions

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        models = SERVED_MODELS if kinds is None else {k: SERVED_MODELS[k] for k in kinds}
        exported = export_champions(tracking_uri, models=models)
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


def cmd_bento_export(args: argparse.Namespace) -> None:
    summary, lines = _export_to_bento(_tracking(args).tracking_uri)
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


def add_bento_parsers(sub: Any) -> None:
    """``bento export``, ``bento build`` and ``bento serve``."""
    bento = _command_group(
        sub,
        "bento",
        "package the service with its champions as a Bento (BentoML model store: BENTOML_HOME)",
        "bento_command",
    )
    be = bento.add_parser("export", help="copy both champions (and challengers) from MLflow into the store")
    _tracked(be)
    be.set_defaults(func=cmd_bento_export)
    bb = bento.add_parser("build", help="bentoml build: the code and both exported champions as one Bento")
    _runs(bb, cmd_bento_build)
    bs = bento.add_parser("serve", help="bentoml serve a built Bento (no MLflow registry needed)")
    bs.add_argument("bento", nargs="?", default="nextbest:latest", help="Bento tag (default: %(default)s)")
    bs.add_argument("--data", default=str(DEFAULT_DATA))
    bs.add_argument("--port", type=int, default=3000)
    bs.add_argument("--host", default="127.0.0.1")
    bs.add_argument("--state-dir", help="live state (default DATA/service)")
    bs.add_argument("--clock", choices=["wall", "data"], default="data")
    bs.set_defaults(func=cmd_bento_serve, json=False, quiet=False)
