"""The propensity network's fit on the CPU and on a CUDA device, same rows, same config, in one run.

Usage::

    python benchmarks/propensity_device.py [--customers 20000] [--per-customer 20] [--epochs 8] [--json]

Builds the propensity tests' synthetic table (``tests/test_propensity.py``'s ``synthetic_table``: customers
exposed to random actions with a planted propensity), splits it as training does, fits the network with
``fit_propensity`` on ``cpu`` and, where torch sees one, on ``cuda``, and prints the fit time, rows per second,
AUC and ECE of each and the ratio CPU time / GPU time. Without a CUDA device it measures the CPU alone and says
so. The figures feed the README's capacity plan (training on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--per-customer", type=int, default=20)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from nextbest.training.device import cuda_available
    from nextbest.training.propensity import PropensityConfig, fit_propensity
    from nextbest.training.propensity_data import PropensityDataConfig, split_table
    from nextbest.training.propensity_eval import evaluate_propensity
    from tests.test_propensity import synthetic_table

    table, catalog, columns = synthetic_table(
        customers=args.customers, per_customer=args.per_customer, seed=3
    )
    data = split_table(table, catalog, columns, PropensityDataConfig())
    config = PropensityConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0)
    devices = ["cpu", "cuda"] if cuda_available() else ["cpu"]
    out: dict[str, dict[str, float | str]] = {}
    for device in devices:
        t0 = time.perf_counter()
        fit = fit_propensity(data, config, device=device)
        seconds = time.perf_counter() - t0
        metrics = evaluate_propensity(fit, data, baselines=False).metrics
        out[device] = {
            "seconds": seconds,
            "rows_per_s": data.train.height * args.epochs / seconds,
            "auc": metrics["auc"],
            "ece": metrics["ece"],
        }
        name = torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
        out[device]["device"] = name
        print(
            f"{device:<5} {name:<28} fit {seconds:7.1f} s  {out[device]['rows_per_s']:>10,.0f} rows/s  "
            f"AUC {metrics['auc']:.4f}  ECE {metrics['ece']:.4f}"
        )
    summary: dict[str, object] = {
        "train_rows": data.train.height,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "devices": out,
    }
    if "cuda" in out:
        summary["cpu_over_gpu_time"] = float(out["cpu"]["seconds"]) / float(out["cuda"]["seconds"])
        print(
            f"CPU time / GPU time: {summary['cpu_over_gpu_time']:.2f}x on {data.train.height:,} training rows"
        )
    else:
        print("no CUDA device here: the CPU alone was measured")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
