"""The propensity network against gradient boosting on the same inputs and rows (issue 14, part 3).

Usage::

    .venv/bin/python benchmarks/propensity_vs_gb.py [--customers 20000] [--seeds 5] [--bins 0,8] [--json]

The world is the one ``benchmarks/propensity.py`` and ``benchmarks/propensity_ceiling.py`` build and reuse
(``benchmarks/out/propensity-<customers>-4-42``); ``load_propensity_data`` splits it by time and every AUC is
on the same test-period rows.

* GB, the network's rows: scikit-learn's ``HistGradientBoostingClassifier`` on our encoded inputs (categoricals
  of at most 255 values as categorical features, every numeric), fitted on the training period and
  early-stopped on the validation period's log-loss (``X_val``) — the rows and the stopping rule the network
  has. Without row or feature subsampling its fit does not depend on the seed: one fit.
* GB, training + validation: the ceiling script's row (``benchmarks/propensity_ceiling.py``): fitted on both
  periods with its own early stop on a random 10%, mean over seeds 0..n-1.
* network, ``numeric_bins`` b: ``fit_propensity`` with the default ``PropensityConfig`` but ``numeric_bins``,
  seeds 0..n-1 (trained on the training period, early-stopped and calibrated on the validation period).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path: put the repository root there instead, as
# benchmarks/propensity_ceiling.py does, so that ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20000)
    parser.add_argument("--seeds", type=int, default=5, help="network (and ceiling-GB) seeds 0..n-1")
    parser.add_argument("--bins", default="0,8", help="comma-separated numeric_bins of the networks")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)

    import polars as pl
    from sklearn.ensemble import HistGradientBoostingClassifier

    from benchmarks.propensity import propensity_world
    from benchmarks.propensity_ceiling import gb_categoricals, gb_inputs, gradient_boosting_aucs
    from nextbest.training.encoder import FeatureEncoder
    from nextbest.training.propensity import PropensityConfig, fit_propensity
    from nextbest.training.propensity_data import load_propensity_data
    from nextbest.training.propensity_metrics import expected_calibration_error, roc_auc

    started = time.perf_counter()
    ds = propensity_world(args.customers, 180, 42, 4.0)
    data = load_propensity_data(ds)
    frames = (data.train, data.validation, data.test)
    y_train, y_val, y_test = (f["responded"].cast(pl.Float64).to_numpy() for f in frames)
    encoder = FeatureEncoder.fit(
        data.train, data.catalog, data.customer_columns, min_count=PropensityConfig().min_category_count
    )
    small = gb_categoricals(encoder.cardinalities)
    x_train, x_val, x_test = (gb_inputs(encoder.encode_frame(f), small) for f in frames)
    categorical = np.arange(x_train.shape[1]) < int(small.sum())
    rows: dict[str, dict[str, Any]] = {}

    t = time.perf_counter()
    gb = HistGradientBoostingClassifier(
        max_iter=2000, learning_rate=0.05, max_leaf_nodes=15, early_stopping=True, scoring="loss",
        n_iter_no_change=20, categorical_features=categorical, random_state=0,
    )  # fmt: skip
    gb.fit(x_train, y_train, X_val=x_val, y_val=y_val)
    p = gb.predict_proba(x_test)[:, 1]
    rows["GB, the network's rows (train, early stop on validation)"] = {
        "aucs": [roc_auc(y_test, p)],
        "eces": [expected_calibration_error(y_test, p)],
        "iterations": int(gb.n_iter_),
        "seconds": time.perf_counter() - t,
    }
    t = time.perf_counter()
    aucs = gradient_boosting_aucs(
        np.vstack([x_train, x_val]),
        np.concatenate([y_train, y_val]),
        x_test,
        y_test,
        int(small.sum()),
        args.seeds,
    )
    rows["GB, training + validation (the ceiling script's row)"] = {
        "aucs": aucs,
        "seconds": time.perf_counter() - t,
    }
    for bins in (int(b) for b in args.bins.split(",")):
        t = time.perf_counter()
        aucs, eces, epochs = [], [], []
        for seed in range(args.seeds):
            fit = fit_propensity(data, PropensityConfig(seed=seed, numeric_bins=bins), device="cpu")
            p = fit.model.predict_proba(data.test)
            aucs.append(roc_auc(y_test, p))
            eces.append(expected_calibration_error(y_test, p))
            epochs.append(len(fit.history))
        rows[f"network, numeric_bins {bins}"] = {
            "aucs": aucs,
            "eces": eces,
            "epochs": epochs,
            "seconds": time.perf_counter() - t,
        }

    print(
        f"world {ds.root}: {data.train.height:,} training, {data.validation.height:,} validation, "
        f"{data.test.height:,} test rows"
    )
    width = max(len(k) for k in rows) + 2
    print(f"{'model':<{width}}{'test AUC':>10}{'min–max':>16}{'ECE':>8}{'s':>8}")
    for name, row in rows.items():
        spread = f"{min(row['aucs']):.4f}–{max(row['aucs']):.4f}" if len(row["aucs"]) > 1 else ""
        ece = f"{np.mean(row['eces']):.4f}" if "eces" in row else ""
        print(f"{name:<{width}}{np.mean(row['aucs']):>10.4f}{spread:>16}{ece:>8}{row['seconds']:>8.0f}")
    summary = {
        "dataset": str(ds.root),
        "rows": {"train": data.train.height, "validation": data.validation.height, "test": data.test.height},
        "models": {name: {**row, "auc_mean": float(np.mean(row["aucs"]))} for name, row in rows.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{summary['seconds']:.0f} s")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
