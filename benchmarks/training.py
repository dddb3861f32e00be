"""Training benchmark: our ``train cf`` fitting step against a bare implicit ALS fit, and MLflow's cost per trial.

Usage::

    .venv/bin/python benchmarks/training.py [--customers 50000] [--repeats 3] [--json]

1. Generates (once, then reuses) a world of ``--customers`` customers under ``benchmarks/out/``, builds its
   features and the training matrix (events before the validation cut-off), then fits on that one matrix,
   alternating, ``--repeats`` times each: (a) ``training.cf.fit_recommender("als", …)`` — the fitting step of
   ``nextbest train cf`` (input checks, popularity and tie-break state, BLAS limit, implicit's fit) — and (b) a
   bare ``implicit.cpu.als.AlternatingLeastSquares(...).fit(matrix)`` with the same hyperparameters, seed and
   threads, under the same one-thread BLAS limit (API_NOTES: implicit asks for it). Prints the best of each and
   the ratio ours / bare (target ≤ 1.15, issue 3).
2. Runs a real tiny study twice on a small world (``--study-customers``): ``tune_cf`` with MLflow tracking into a
   temporary SQLite URI, and the same study (same seed, fresh Optuna storage) with tracking off. The overhead per
   trial is the difference of the median trial durations (Optuna's own start/complete times; the nested run is
   created, logged and terminated inside the trial). Also reported: the median time between a nested run's
   creation and its termination in MLflow, and the whole study's wall time both ways (the tracked study also logs
   the best model as a pyfunc model, registers it and draws its plots once, after the trials).

``--json`` prints the summary as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; make the project importable instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
# implicit's threads do the parallel work; BLAS must stay on one thread (set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

OUT = Path(__file__).resolve().parent / "out"


def _world(customers: int, seed: int, *, progress: bool) -> Path:
    """A generated world with features built, cached under ``benchmarks/out/world<customers>-<seed>``."""
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features

    ds = Dataset.at(OUT / f"world{customers}-{seed}")
    if not (ds.features_dir / "manifest.json").exists():
        started = time.perf_counter()
        generate_world(WorldConfig(customers=customers, seed=seed), ds, progress=progress)
        build_features(ds, progress=progress)
        print(f"generated and built {ds.root} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return ds.root


def bare_implicit_fit(matrix: Any, config: Any, *, seed: int, threads: int) -> float:
    """Seconds of a bare implicit ALS fit with ``config``'s hyperparameters (BLAS on one thread)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            num_threads=threads,
            random_state=seed,
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        return time.perf_counter() - started


def time_fits(data_dir: Path, *, repeats: int, seed: int, threads: int) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of our fitting step and of the bare implicit fit on the same matrix."""
    from nextbest.training.cf import fit_recommender
    from nextbest.training.cf_data import prepare_cf_data
    from nextbest.training.recommenders import ALSConfig

    data = prepare_cf_data(data_dir, with_test=False)
    period = data.train
    matrix = period.interactions.matrix
    config = ALSConfig()
    # One untimed fit each first: implicit compiles nothing, but the first call pays imports and page faults.
    fit_recommender("als", config, period, seed=seed, threads=threads)
    bare_implicit_fit(matrix, config, seed=seed, threads=threads)
    ours: list[float] = []
    bare: list[float] = []
    for _ in range(repeats):
        # ``fit_recommender`` times exactly rec.fit(...) — what `nextbest train cf` runs on the train period.
        _, seconds = fit_recommender("als", config, period, seed=seed, threads=threads)
        ours.append(seconds)
        bare.append(bare_implicit_fit(matrix, config, seed=seed, threads=threads))
    return {
        "matrix_customers": int(matrix.shape[0]),
        "matrix_items": int(matrix.shape[1]),
        "matrix_nonzeros": int(matrix.nnz),
        "config": config.model_dump(mode="json"),
        "threads": threads,
        "ours_s": ours,
        "bare_s": bare,
        "ours_best_s": min(ours),
        "bare_best_s": min(bare),
        "ratio": min(ours) / min(bare),
    }


def _trial_seconds(storage: str, study_name: str) -> list[float]:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    out = []
    for t in study.trials:
        if t.datetime_start is not None and t.datetime_complete is not None:
            out.append((t.datetime_complete - t.datetime_start) / timedelta(seconds=1))
    return out


def _nested_run_seconds(tracking_uri: str, parent_run_id: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time]


def tracking_overhead(data_dir: Path, *, trials: int, seed: int, threads: int) -> dict[str, Any]:
    """The same tiny ALS study with and without MLflow tracking; per-trial and per-study costs."""
    from nextbest.training.cf_data import prepare_cf_data
    from nextbest.training.cf_tuning import tune_cf
    from nextbest.training.tracking import TrackingConfig

    data = prepare_cf_data(data_dir, with_test=False)
    result: dict[str, Any] = {"trials": trials}
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for label, enabled in (("untracked", False), ("tracked", True)):
            storage = f"sqlite:///{tmp}/optuna-{label}.db"
            name = f"bench-{label}"
            started = time.perf_counter()
            tuned = tune_cf(
                data_dir,
                "als",
                trials=trials,
                storage=storage,
                study_name=name,
                tracking=TrackingConfig(enabled=enabled, tracking_uri=uri, experiment="bench"),
                evaluate_test=False,
                seed=seed,
                threads=threads,
                prepared=data,
            )
            result[f"{label}_study_s"] = time.perf_counter() - started
            seconds = _trial_seconds(storage, name)
            result[f"{label}_trial_median_s"] = statistics.median(seconds)
            result[f"{label}_trial_seconds"] = seconds
            if enabled and tuned.parent_run_id:
                nested = _nested_run_seconds(uri, tuned.parent_run_id)
                result["nested_runs"] = len(nested)
                result["nested_run_median_s"] = statistics.median(nested) if nested else float("nan")
    result["overhead_per_trial_s"] = result["tracked_trial_median_s"] - result["untracked_trial_median_s"]
    result["overhead_per_trial_pct"] = (
        100 * result["overhead_per_trial_s"] / result["untracked_trial_median_s"]
    )
    result["study_overhead_s"] = result["tracked_study_s"] - result["untracked_study_s"]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=50_000, help="world for the fit timing")
    parser.add_argument("--study-customers", type=int, default=3_000, help="world for the tiny study")
    parser.add_argument("--trials", type=int, default=8, help="trials of the tiny study (each way)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits each (best is reported)")
    parser.add_argument("--seed", type=int, default=42, help="world seed; the models use seed 0")
    parser.add_argument("--threads", type=int, default=0, help="implicit threads (0: all cores)")
    parser.add_argument("--skip-study", action="store_true", help="only time the fits")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)

    fit_world = _world(args.customers, args.seed, progress=args.progress)
    fits = time_fits(fit_world, repeats=args.repeats, seed=0, threads=args.threads)
    summary: dict[str, Any] = {"load_average_1m": os.getloadavg()[0], "fit": fits}
    print(
        f"matrix: {fits['matrix_customers']:,} customers × {fits['matrix_items']:,} items, "
        f"{fits['matrix_nonzeros']:,} non-zeros; ALS {fits['config']}"
    )
    print(
        f"nextbest fit_recommender('als'):  best {fits['ours_best_s']:.3f} s  (runs: "
        + ", ".join(f"{s:.3f}" for s in fits["ours_s"])
        + ")"
    )
    print(
        f"bare implicit ALS fit:            best {fits['bare_best_s']:.3f} s  (runs: "
        + ", ".join(f"{s:.3f}" for s in fits["bare_s"])
        + ")"
    )
    print(f"ratio ours / bare:                {fits['ratio']:.3f}  (target ≤ 1.15)")
    if not args.skip_study:
        study_world = _world(args.study_customers, args.seed, progress=args.progress)
        study = tracking_overhead(study_world, trials=args.trials, seed=0, threads=args.threads)
        summary["tracking"] = study
        print(
            f"tiny study ({args.trials} ALS trials, {args.study_customers:,}-customer world): median trial "
            f"{study['untracked_trial_median_s']:.3f} s untracked, {study['tracked_trial_median_s']:.3f} s "
            "tracked"
        )
        print(
            f"MLflow overhead per trial:        {study['overhead_per_trial_s'] * 1e3:.0f} ms "
            f"({study['overhead_per_trial_pct']:.1f}% of an untracked trial); nested run open → terminated: "
            f"median {study.get('nested_run_median_s', float('nan')) * 1e3:.0f} ms over "
            f"{study.get('nested_runs', 0)} runs"
        )
        print(
            f"whole study:                      {study['untracked_study_s']:.1f} s untracked, "
            f"{study['tracked_study_s']:.1f} s tracked (+{study['study_overhead_s']:.1f} s: the parent run, "
            "nested runs, the best model's pyfunc logging, registration and plots)"
        )
    if args.json:
        print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()
