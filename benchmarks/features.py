"""Feature-build benchmark: the full pipeline against a bare Polars group_by count on the same events.

Usage::

    .venv/bin/python benchmarks/features.py [--events 10_000_000] [--data benchmarks/out/world10m]

Generates (once, then reuses) a world with about ``--events`` events, then runs, each in a fresh process so
that peak memory is its own: (1) the baseline, a bare ``group_by(customer_id, item_id).len()`` over the raw
event files; (2) ``nextbest features build``. Prints events/s, wall time, peak RSS and the ratio full/baseline.
Targets (issue 2): ratio ≤ 3, peak memory < 4 GiB at 10M events.

The two alternate ``--repeat`` times (default 3): a shared machine's noise moves one run by ±20%, so each
round's ratio is printed and the median is the figure (with the median times and the largest peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the features package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

BASELINE = """
import sys, time, polars as pl
from nextbest.features.dataset import Dataset
ds = Dataset.at(sys.argv[1])
t = time.perf_counter()
n = pl.scan_parquet(ds.table_files("events")).group_by("customer_id", "item_id").len().collect().height
import resource
print(time.perf_counter() - t, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

FULL = """
import sys, time
from nextbest.features.dataset import Dataset
from nextbest.features.pipeline import build_features
t = time.perf_counter()
m = build_features(Dataset.at(sys.argv[1]))
import resource
print(time.perf_counter() - t, m["row_counts"]["interaction_nonzeros"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _run(code: str, data: Path) -> tuple[float, int, float]:
    """Run ``code`` in a fresh interpreter; return (seconds, result count, its own peak RSS in GiB)."""
    out = subprocess.run(
        [sys.executable, "-c", code, str(data)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    ).stdout.split()
    return float(out[0]), int(out[1]), int(out[2]) / 2**20


def _ensure_world(data: Path, events: int) -> int:
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world

    ds = Dataset.at(data)
    if ds.has_table("events"):
        import polars as pl

        return pl.scan_parquet(ds.table_files("events")).select(pl.len()).collect().item()
    pilot = Dataset.at(data.parent / (data.name + "-pilot"))
    summary = generate_world(WorldConfig(customers=2000, seed=7), pilot)
    per_customer = _events_in(summary) / 2000
    customers = max(2000, int(events / per_customer))
    print(f"generating {customers:,} customers (~{per_customer:.1f} events each) in {data}", file=sys.stderr)
    t = time.perf_counter()
    summary = generate_world(WorldConfig(customers=customers, seed=7), ds, progress=True)
    n = _events_in(summary)
    print(f"generated {n:,} events in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return n


def _events_in(summary: dict) -> int:
    tables = summary.get("tables", summary.get("counts", {}))
    ev = tables["events"]
    return int(
        ev["rows"]
        if isinstance(ev, dict) and "rows" in ev
        else ev.get("rows_accepted", ev)
        if isinstance(ev, dict)
        else ev
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/out/world10m"))
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds of baseline and build")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n_events = _ensure_world(args.data, args.events)
    rounds = []
    for k in range(max(args.repeat, 1)):
        base_s, pairs, base_mem = _run(BASELINE, args.data)
        full_s, nnz, full_mem = _run(FULL, args.data)
        rounds.append((base_s, full_s, base_mem, full_mem))
        print(
            f"round {k + 1}: baseline {base_s:.2f} s, full build {full_s:.2f} s, ratio {full_s / base_s:.2f}"
        )
    base_s = statistics.median(r[0] for r in rounds)
    full_s = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    base_mem = max(r[2] for r in rounds)
    full_mem = max(r[3] for r in rounds)
    result = {
        "events": n_events,
        "rounds": len(rounds),
        "baseline_groupby_s": round(base_s, 2),
        "baseline_pairs": pairs,
        "baseline_peak_gib": round(base_mem, 2),
        "full_build_s": round(full_s, 2),
        "full_build_events_per_s": round(n_events / full_s),
        "full_build_peak_gib": round(full_mem, 2),
        "interaction_nonzeros": nnz,
        "ratio_full_to_baseline": round(ratio, 2),
        "ratios": [round(r[1] / r[0], 2) for r in rounds],
    }
    print(f"events:                      {n_events:,}")
    print(f"baseline group_by count:     {base_s:.2f} s median ({pairs:,} pairs, peak {base_mem:.2f} GiB)")
    print(
        f"full feature build:          {full_s:.2f} s median ({n_events / full_s:,.0f} events/s, "
        f"peak {full_mem:.2f} GiB)"
    )
    print(f"ratio full / baseline:       {ratio:.2f} median of {len(rounds)}  (target ≤ 3)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
