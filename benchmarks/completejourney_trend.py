"""Complete Journey: a probe of EASE plus the items' recent popularity for discovery (not a product feature).

Usage::

    .venv/bin/python benchmarks/completejourney_trend.py [--data DIR] [--max-items 8000]

EASE (8,000 most bought items, binary, λ 800) is fitted once per period (train before 2017-10-01 for October
validation, before 2017-11-01 for the test period). Its scores, min-max scaled per customer as a blend scales
its parts, get ``w`` × the
item's recent popularity added: log(1 + customers whose latest purchase of the item is at most ``d`` days before
the cut-off), scaled to a maximum of 1. Prints ``new_ndcg_at_10`` for each (d, w) on both periods.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

# Run as a script, this file's folder is first on sys.path: the data and the log of the main benchmark.
from completejourney import OUT, _log, ensure_dataset

WEIGHTS = [0.0, 0.05, 0.1, 0.2, 0.4]
DAYS = [14, 28, 56]


def recent_popularity(recency: sp.csr_matrix, days: float) -> np.ndarray:
    """Per item, log(1 + customers whose latest purchase is at most ``days`` old), scaled to a maximum of 1."""
    recent = recency.tocsc(copy=True)
    recent.data = (recent.data <= days).astype(np.float32)
    counts = np.log1p(np.asarray(recent.sum(axis=0)).ravel())
    return (counts / max(float(counts.max()), 1e-12)).astype(np.float32)


def probe(period: Any, task: Any, label: str, max_items: int) -> dict[tuple[int, float], float]:
    """``new_ndcg_at_10`` of EASE plus each (days, weight) of recent popularity on ``task``."""
    from nextbest.training.cf import fit_recommender
    from nextbest.training.evaluation import score_metric
    from nextbest.training.recommenders import BlendRecommender, EASEConfig

    model, seconds = fit_recommender("ease", EASEConfig(max_items=max_items), period)
    _log(f"{label}: EASE on {max_items} items fitted in {seconds:.0f} s")
    ease_scores = model.scores
    out: dict[tuple[int, float], float] = {}
    for days in DAYS:
        trend = recent_popularity(period.recency, days)
        for weight in WEIGHTS:
            if weight == 0 and days != DAYS[0]:
                continue

            def scores(users, items, *, recalculate_user=False, _w=weight, _trend=trend):
                x = ease_scores(users, items, recalculate_user=recalculate_user)
                return BlendRecommender._scaled(x) + _w * _trend[None, :]

            model.scores = scores
            out[(days, weight)] = score_metric(model, task, "new_ndcg_at_10")
            _log(f"{label} d {days} w {weight}: new ndcg@10 {out[(days, weight)]:.4f}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=OUT / "completejourney")
    parser.add_argument("--max-items", type=int, default=8000)
    args = parser.parse_args(argv)
    from nextbest.training.cf_data import prepare_cf_data

    started = time.perf_counter()
    ds = ensure_dataset(args.data)
    tune = prepare_cf_data(ds, with_test=False)
    validation = probe(tune.train, tune.validation, "validation", args.max_items)
    data = prepare_cf_data(ds)
    test = probe(data.full, data.test, "test", args.max_items)
    print(f"{'days':>5}{'w':>6}{'val new ndcg@10':>17}{'test new ndcg@10':>18}")
    for key, value in validation.items():
        print(f"{key[0]:>5}{key[1]:>6.2f}{value:>17.4f}{test[key]:>18.4f}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
