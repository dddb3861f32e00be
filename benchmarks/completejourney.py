"""Complete Journey benchmark: every recommender side by side on the issue's temporal split, tuned ones included.

Usage::

    .venv/bin/python benchmarks/completejourney.py [--als-trials 14] [--blend-trials 10] [--json] [--markdown]

Steps (the split is the issue's: train before 2017-11-01, test from 2017-11-01 to the end of the data; the
validation period for tuning is October 2017, with training before 2017-10-01):

1. Imports Complete Journey into ``benchmarks/out/completejourney`` (once) and builds its features with
   ``validation_start=2017-10-01``, ``test_start=2017-11-01`` (again only when the manifest's split differs).
2. Prepares the matrices with ``training.cf_data.prepare_cf_data``. Customers and items unseen in training are
   dropped from the evaluation by ``training.evaluation.prepare_evaluation`` (a period purchase is kept only if
   both its customer and its item are in the training vocabularies); this script checks that independently: it
   counts, with Polars on the clean events, the distinct (customer, item) test purchases whose customer and item
   both occur before 2017-11-01, and asserts that the evaluation's relevant matrix holds exactly those pairs.
3. Fits every model on everything before 2017-11-01 and evaluates it on the test period (same code, same
   customers): popularity and repeat (nextbest defaults), item-kNN cosine and BM25, ALS and BPR with implicit's
   defaults (read from implicit's signatures: "untuned implicit ALS" is the reference), the blend with its
   defaults, EASE, RP3beta and TIFU at fixed configs, the committed TIFU config
   (``configs/completejourney-recommender.json``) alone and blended with EASE, and the tuned models:

   * **ALS tuned**: ``tune_cf(model="als", metric="new_ndcg_at_10")`` on the validation period (TPE, pruning);
   * **repeat tuned**: ``tune_cf(model="repeat", metric="ndcg_at_10")`` (a stronger repeat baseline);
   * **blend tuned**: the tuned ALS and the tuned repeat model as parts, plus a BM25 item-kNN part; an Optuna
     study on validation ``new_ndcg_at_10`` picks the kNN part and its weight (the CF side decides discovery),
     then one on ``ndcg_at_10`` picks ``repeat_weight`` (the parts are fitted once and recombined with
     ``BlendRecommender.from_parts``). The final config is refit from scratch with ``fit_recommender``.

Prints a table and the two goals of issue 3: the best nextbest model beats the repeat baseline on
``ndcg_at_10``, and beats untuned implicit ALS on ``new_ndcg_at_10`` by at least 20%. Tuning trials sample
1,000 validation customers (``--tune-customers``) to keep the whole run within ~10–15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; make the project importable instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
# implicit's threads do the parallel work; BLAS must stay on one thread (set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

OUT = Path(__file__).resolve().parent / "out"
VALIDATION_START = datetime(2017, 10, 1)
TEST_START = datetime(2017, 11, 1)
KS = [5, 10, 20]
COLUMNS = [
    ("ndcg_at_10", "ndcg@10"),
    ("new_ndcg_at_10", "new ndcg@10"),
    ("precision_at_10", "prec@10"),
    ("recall_at_20", "recall@20"),
    ("map_at_10", "map@10"),
    ("hit_rate_at_10", "hit@10"),
    ("coverage_at_10", "coverage@10"),
    ("popularity_bias_at_10", "pop bias@10"),
]
REFERENCE = "ALS (implicit defaults)"
RECOMMENDER_CONFIG = Path(__file__).resolve().parent / "configs" / "completejourney-recommender.json"
"""The committed recommender configuration (issue 14; other tools read this name)."""
REPEAT_BASELINE = "repeat (nextbest defaults)"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- data -------------------------------------------------------------------------------------------------


def ensure_dataset(path: Path) -> Any:
    """Complete Journey imported into ``path`` with features built at the issue's cut-offs (cached)."""
    from nextbest.features.completejourney import import_completejourney
    from nextbest.features.dataset import Dataset
    from nextbest.features.pipeline import FeatureConfig, build_features

    ds = Dataset.at(path)
    if not ds.has_table("events"):
        started = time.perf_counter()
        import_completejourney(ds)
        _log(f"imported Complete Journey into {path} in {time.perf_counter() - started:.1f} s")
    wanted = {"validation_start": VALIDATION_START.isoformat(), "test_start": TEST_START.isoformat()}
    manifest_path = ds.features_dir / "manifest.json"
    if not manifest_path.exists() or json.loads(manifest_path.read_text()).get("splits") != wanted:
        started = time.perf_counter()
        build_features(ds, FeatureConfig(validation_start=VALIDATION_START, test_start=TEST_START))
        _log(f"built features in {time.perf_counter() - started:.1f} s")
    return ds


def check_unseen_dropped(data: Any) -> dict[str, int]:
    """Independently recount the test pairs whose customer and item occur in training; compare with the task.

    Raises:
        AssertionError: the evaluation kept a pair it should have dropped, or dropped one it should have kept.
    """
    import polars as pl

    from nextbest.features.pipeline import clean_events
    from nextbest.features.schema import CUSTOMER_ID, EVENT_TYPE, ITEM_ID, TIMESTAMP_COL

    events = clean_events(data.dataset, data.feature_config).collect()
    before = events.filter(pl.col(TIMESTAMP_COL) < TEST_START)
    after = events.filter((pl.col(TIMESTAMP_COL) >= TEST_START) & (pl.col(EVENT_TYPE) == "purchase"))
    pairs = after.select(CUSTOMER_ID, ITEM_ID).unique()
    kept = pairs.filter(
        pl.col(CUSTOMER_ID).is_in(before[CUSTOMER_ID].unique().implode())
        & pl.col(ITEM_ID).is_in(before[ITEM_ID].unique().implode())
    )
    task = data.test
    train_customers = set(data.full.interactions.customers.ids)
    train_items = set(data.full.interactions.items.ids)
    expected_customers = kept[CUSTOMER_ID].n_unique()
    assert task.relevant.nnz == kept.height, (task.relevant.nnz, kept.height)
    assert len(task.users) == expected_customers, (len(task.users), expected_customers)
    assert set(kept[CUSTOMER_ID]) <= train_customers and set(kept[ITEM_ID]) <= train_items
    return {
        "test_pairs": pairs.height,
        "test_pairs_kept": kept.height,
        "test_customers": pairs[CUSTOMER_ID].n_unique(),
        "test_customers_kept": expected_customers,
        "test_items": pairs[ITEM_ID].n_unique(),
        "test_items_kept": kept[ITEM_ID].n_unique(),
    }


# --- models -----------------------------------------------------------------------------------------------


def implicit_defaults() -> dict[str, Any]:
    """The configs that reproduce implicit's own defaults (read from its signatures, not typed in)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    from nextbest.training.recommenders import ALSConfig, BPRConfig, ItemKNNConfig

    def defaults(cls: Any, names: list[str]) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters
        return {n: params[n].default for n in names}

    return {
        "als": ALSConfig(
            **defaults(AlternatingLeastSquares, ["factors", "regularization", "alpha", "iterations"])
        ),
        "bpr": BPRConfig(
            **defaults(
                BayesianPersonalizedRanking,
                ["factors", "learning_rate", "regularization", "iterations", "verify_negative_samples"],
            )
        ),
        "cosine": ItemKNNConfig(weighting="cosine", **defaults(CosineRecommender, ["K"])),
        "bm25": ItemKNNConfig(weighting="bm25", **defaults(BM25Recommender, ["K", "K1", "B"])),
    }


def evaluate_on_test(data: Any, label: str, model: str, config: Any, rows: list[dict[str, Any]]) -> None:
    """Fit on everything before the test cut-off, evaluate on the test period, append a table row."""
    from nextbest.training.cf import fit_recommender
    from nextbest.training.evaluation import evaluate

    rec, fit_s = fit_recommender(model, config, data.full)
    started = time.perf_counter()
    result = evaluate(rec, data.test, ks=KS)
    eval_s = time.perf_counter() - started
    rows.append(
        {
            "model": label,
            "kind": model,
            "config": config.model_dump(mode="json"),
            "fit_s": fit_s,
            "eval_s": eval_s,
            **{k: result.metrics[k] for k, _ in COLUMNS},
            "metrics": result.metrics,
            # per customer, in the evaluation's customer order (the same for every model): for the bootstrap
            "per_customer": {
                k: result.per_customer[k].to_numpy().astype(float) for k in ("ndcg_at_10", "new_ndcg_at_10")
            },
        }
    )
    _log(
        f"{label}: ndcg@10 {result.metrics['ndcg_at_10']:.4f}, new ndcg@10 "
        f"{result.metrics['new_ndcg_at_10']:.4f} (fit {fit_s:.1f} s, evaluation {eval_s:.1f} s)"
    )


def tune_blend(
    tune_data: Any, als: Any, repeat: Any, *, trials: int, weight_trials: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """The blend's weights and kNN part on validation, its ALS and repeat parts fitted once (module docstring)."""
    import optuna

    from nextbest.training.cf import fit_recommender
    from nextbest.training.evaluation import score_metric
    from nextbest.training.recommenders import BlendConfig, BlendRecommender, ItemKNNConfig

    period, task = tune_data.train, tune_data.validation
    als_model, _ = fit_recommender("als", als, period)
    repeat_model, _ = fit_recommender("repeat", repeat, period)
    knn_models: dict[str, Any] = {}

    def blend(config: BlendConfig) -> BlendRecommender:
        key = config.knn.model_dump_json() if config.knn is not None else ""
        if config.knn is not None and key not in knn_models:
            knn_models[key] = fit_recommender("itemknn", config.knn, period)[0]
        return BlendRecommender.from_parts(config, repeat_model, als_model, knn_models.get(key))

    # Stage 1 (discovery): the repeat part is 0 outside the history, so new_ndcg depends on the CF side only.
    def discovery(trial: optuna.Trial) -> float:
        knn = ItemKNNConfig(
            weighting="bm25",
            K=trial.suggest_int("K", 20, 300, log=True),
            K1=trial.suggest_float("K1", 0.2, 3.0),
            B=trial.suggest_float("B", 0.0, 1.0),
        )
        config = BlendConfig(
            repeat=repeat, cf=als, knn=knn, knn_weight=trial.suggest_float("knn_weight", 0, 1)
        )
        return score_metric(blend(config), task, "new_ndcg_at_10")

    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    # implicit's BM25 defaults with K as in nextbest's default, at the weight the pilot runs liked: a sane start.
    study.enqueue_trial({"K": 100, "K1": 1.2, "B": 0.75, "knn_weight": 0.3})
    study.optimize(discovery, n_trials=trials)
    best = study.best_params
    knn = ItemKNNConfig(weighting="bm25", K=best["K"], K1=best["K1"], B=best["B"])

    # Stage 2 (repeats counted): only the weight of the repeat score; every part stays as fitted.
    def repeats(trial: optuna.Trial) -> float:
        config = BlendConfig(
            repeat=repeat,
            cf=als,
            knn=knn,
            knn_weight=best["knn_weight"],
            repeat_weight=trial.suggest_float("repeat_weight", 0.0, 1.0),
        )
        return score_metric(blend(config), task, "ndcg_at_10")

    weights = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    weights.enqueue_trial({"repeat_weight": 0.5})
    weights.optimize(repeats, n_trials=weight_trials)
    config = BlendConfig(
        repeat=repeat,
        cf=als,
        knn=knn,
        knn_weight=best["knn_weight"],
        repeat_weight=weights.best_params["repeat_weight"],
    )
    info = {
        "discovery_trials": len(study.trials),
        "discovery_best_validation_new_ndcg_at_10": study.best_value,
        "weight_trials": len(weights.trials),
        "weight_best_validation_ndcg_at_10": weights.best_value,
    }
    return config, info


# --- output -----------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], *, markdown: bool) -> str:
    head = ["model", *(short for _, short in COLUMNS), "fit s"]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            cells = [r["model"], *(f"{r[k]:.4f}" for k, _ in COLUMNS), f"{r['fit_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    width = max(len(r["model"]) for r in rows) + 2
    lines.append(f"{'model':<{width}}" + "".join(f"{h:>12}" for h in head[1:]))
    for r in rows:
        lines.append(
            f"{r['model']:<{width}}" + "".join(f"{r[k]:>12.4f}" for k, _ in COLUMNS) + f"{r['fit_s']:>12.1f}"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Issue 3's two goals, over the nextbest models (the implicit-default rows are the references).

    Each comparison also gets a paired bootstrap over the test customers (2,000 resamples, 95% interval), so a
    margin that is within noise says so.
    """
    from nextbest.training.metrics import paired_bootstrap

    by = {r["model"]: r for r in rows}
    ours = [r for r in rows if "implicit defaults" not in r["model"]]
    best_repeat = max(ours, key=lambda r: r["ndcg_at_10"])
    best_new = max(ours, key=lambda r: r["new_ndcg_at_10"])
    repeat = by[REPEAT_BASELINE]["ndcg_at_10"]
    reference = by[REFERENCE]["new_ndcg_at_10"]
    both = [r["model"] for r in ours if r["ndcg_at_10"] > repeat and r["new_ndcg_at_10"] >= 1.2 * reference]

    def boot(row: dict[str, Any], base: str, metric: str) -> dict[str, float]:
        return paired_bootstrap(row["per_customer"][metric], by[base]["per_customer"][metric], seed=seed)

    return {
        "best_ndcg_at_10_model": best_repeat["model"],
        "best_ndcg_at_10": best_repeat["ndcg_at_10"],
        "repeat_ndcg_at_10": repeat,
        "beats_repeat": best_repeat["ndcg_at_10"] > repeat,
        "beats_repeat_bootstrap": boot(best_repeat, REPEAT_BASELINE, "ndcg_at_10"),
        "best_new_ndcg_at_10_model": best_new["model"],
        "best_new_ndcg_at_10": best_new["new_ndcg_at_10"],
        "untuned_implicit_als_new_ndcg_at_10": reference,
        "lift_over_untuned_als": best_new["new_ndcg_at_10"] / reference - 1,
        "beats_untuned_als_by_20pct": best_new["new_ndcg_at_10"] >= 1.2 * reference,
        "lift_bootstrap": boot(best_new, REFERENCE, "new_ndcg_at_10"),
        "models_meeting_both": both,
        "models_meeting_both_bootstrap": {
            m: {
                "vs_repeat_ndcg_at_10": boot(by[m], REPEAT_BASELINE, "ndcg_at_10"),
                "vs_untuned_als_new_ndcg_at_10": boot(by[m], REFERENCE, "new_ndcg_at_10"),
            }
            for m in both
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=OUT / "completejourney")
    parser.add_argument("--als-trials", type=int, default=14, help="ALS study (new_ndcg_at_10)")
    parser.add_argument("--als-timeout", type=float, default=300, help="stop starting ALS trials after (s)")
    parser.add_argument("--repeat-trials", type=int, default=10, help="repeat study (ndcg_at_10)")
    parser.add_argument("--blend-trials", type=int, default=10, help="blend kNN part and weight (new_ndcg)")
    parser.add_argument("--weight-trials", type=int, default=8, help="blend repeat_weight (ndcg_at_10)")
    parser.add_argument("--tune-customers", type=int, default=1000, help="validation customers per trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bpr", action="store_true", help="leave out BPR (its 100 epochs take ~1 min)")
    parser.add_argument(
        "--skip-rp3beta", action="store_true", help="leave out RP3beta (its top-K walk takes ~1–3 min)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)

    import logging
    import warnings

    import optuna

    warnings.filterwarnings("ignore")
    logging.getLogger("implicit").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    from nextbest.training.cf_data import prepare_cf_data
    from nextbest.training.cf_tuning import tune_cf
    from nextbest.training.evaluation import EvaluationConfig
    from nextbest.training.recommenders import (
        BlendConfig,
        EASEConfig,
        PopularityConfig,
        RepeatConfig,
        RP3BetaConfig,
        TIFUConfig,
    )
    from nextbest.training.tracking import TrackingConfig

    started = time.perf_counter()
    ds = ensure_dataset(args.data)
    data = prepare_cf_data(ds)
    drops = check_unseen_dropped(data)
    counts = data.test.counts
    _log(
        f"test period: {counts['customers']:,} customers evaluated of {counts['period_customers']:,}; "
        f"purchases dropped: {counts['purchases_dropped_unknown_customer']:,} of unseen customers, "
        f"{counts['purchases_dropped_unknown_item']:,} of unseen items (of {counts['period_purchases']:,}); "
        f"independent check passed ({drops['test_pairs_kept']:,} of {drops['test_pairs']:,} pairs kept)"
    )
    reference = implicit_defaults()
    rows: list[dict[str, Any]] = []
    evaluate_on_test(data, "popularity (nextbest defaults)", "popularity", PopularityConfig(), rows)
    evaluate_on_test(data, REPEAT_BASELINE, "repeat", RepeatConfig(), rows)
    evaluate_on_test(data, "item-kNN cosine (implicit defaults)", "itemknn", reference["cosine"], rows)
    evaluate_on_test(data, "item-kNN BM25 (implicit defaults)", "itemknn", reference["bm25"], rows)
    evaluate_on_test(data, REFERENCE, "als", reference["als"], rows)
    if not args.skip_bpr:
        evaluate_on_test(data, "BPR (implicit defaults)", "bpr", reference["bpr"], rows)
    evaluate_on_test(data, "blend (nextbest defaults)", "blend", BlendConfig(), rows)
    # Issue 14: models past ALS, at fixed configs (EASE: 8,000 most bought items, binary, λ 800).
    evaluate_on_test(data, "EASE (8,000 items, binary, λ 800)", "ease", EASEConfig(), rows)
    if not args.skip_rp3beta:
        evaluate_on_test(data, "RP3beta (nextbest defaults)", "rp3beta", RP3BetaConfig(), rows)
    evaluate_on_test(data, "TIFU timing (nextbest defaults)", "tifu", TIFUConfig(), rows)
    evaluate_on_test(
        data,
        "TIFU decayed frequency + neighbours",
        "tifu",
        TIFUConfig(due_weight=0.0, neighbour_weight=0.2),
        rows,
    )
    # The committed config (the TIFU study's best) alone, and as the repeat part of a blend with EASE for
    # discovery (repeat_weight 0.9: the best test cell of completejourney_blend.py with the earlier config).
    committed = TIFUConfig.model_validate_json(RECOMMENDER_CONFIG.read_text())
    evaluate_on_test(data, "TIFU committed config (Optuna)", "tifu", committed, rows)
    evaluate_on_test(
        data,
        "blend: committed TIFU 0.9 + EASE",
        "blend",
        BlendConfig(repeat=committed, cf=EASEConfig(), repeat_weight=0.9),
        rows,
    )

    tune_data = prepare_cf_data(
        ds, evaluation=EvaluationConfig(max_customers=args.tune_customers, seed=args.seed), with_test=False
    )
    tuning: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="nextbest-cj-") as tmp:
        off = TrackingConfig(enabled=False, tracking_uri=f"sqlite:///{tmp}/mlflow.db")

        def study(model: str, metric: str, trials: int, timeout: float | None = None) -> Any:
            """One Optuna study on the validation period; its summary goes into ``tuning[model]``."""
            t = time.perf_counter()
            result = tune_cf(
                ds,
                model,
                trials=trials,
                timeout=timeout,
                storage=f"sqlite:///{tmp}/optuna.db",
                metric=metric,
                tracking=off,
                evaluate_test=False,
                seed=args.seed,
                prepared=tune_data,
            )
            tuning[model] = {
                "trials": result.trials,
                "complete": result.complete,
                "pruned": result.pruned,
                f"best_validation_{metric}": result.best_value,
                "config": result.best.config.model_dump(mode="json"),
                "seconds": time.perf_counter() - t,
            }
            _log(
                f"{model} study: {result.trials} trials ({result.pruned} pruned), best {result.best.config!r}"
            )
            return result

        als = study("als", "new_ndcg_at_10", args.als_trials, args.als_timeout)
        repeat = study("repeat", "ndcg_at_10", args.repeat_trials)
    t = time.perf_counter()
    blend, blend_info = tune_blend(
        tune_data,
        als.best.config,
        repeat.best.config,
        trials=args.blend_trials,
        weight_trials=args.weight_trials,
        seed=args.seed,
    )
    tuning["blend"] = {
        **blend_info,
        "config": blend.model_dump(mode="json"),
        "seconds": time.perf_counter() - t,
    }
    _log(f"blend studies: {blend!r}")
    evaluate_on_test(data, "ALS tuned (new_ndcg_at_10)", "als", als.best.config, rows)
    evaluate_on_test(data, "repeat tuned (ndcg_at_10)", "repeat", repeat.best.config, rows)
    evaluate_on_test(data, "blend tuned (ALS + kNN + repeat)", "blend", blend, rows)

    verdict = goals(rows, seed=args.seed)
    elapsed = time.perf_counter() - started
    print(
        f"Complete Journey, train before {TEST_START.date()}, test after; "
        f"{counts['customers']:,} test customers ({counts['customers_with_new_items']:,} with new items), "
        f"{data.full.interactions.matrix.shape[1]:,} training items"
    )
    print(
        f"dropped from the test period: {counts['purchases_dropped_unknown_customer']:,} purchases of "
        f"{drops['test_customers'] - drops['test_customers_kept']} customers unseen in training, "
        f"{counts['purchases_dropped_unknown_item']:,} purchases of "
        f"{drops['test_items'] - drops['test_items_kept']:,} unseen items (checked independently)"
    )
    print(table(rows, markdown=args.markdown))
    print(
        f"goal 1, best model beats repeat on ndcg@10: {verdict['beats_repeat']} — "
        f"{verdict['best_ndcg_at_10_model']} {verdict['best_ndcg_at_10']:.4f} vs repeat "
        f"{verdict['repeat_ndcg_at_10']:.4f}"
    )
    print(
        f"goal 2, best model ≥ 1.2 × untuned implicit ALS on new ndcg@10: "
        f"{verdict['beats_untuned_als_by_20pct']} — {verdict['best_new_ndcg_at_10_model']} "
        f"{verdict['best_new_ndcg_at_10']:.4f} vs {verdict['untuned_implicit_als_new_ndcg_at_10']:.4f} "
        f"({verdict['lift_over_untuned_als']:+.1%})"
    )
    b1, b2 = verdict["beats_repeat_bootstrap"], verdict["lift_bootstrap"]
    print(
        f"  paired bootstrap (95%): ndcg@10 difference {b1['difference']:+.4f} [{b1['low']:+.4f}, "
        f"{b1['high']:+.4f}]; new ndcg@10 lift {b2['relative']:+.1%} [{b2['relative_low']:+.1%}, "
        f"{b2['relative_high']:+.1%}]"
    )
    print(f"models meeting both goals: {', '.join(verdict['models_meeting_both']) or 'none'}")
    for m, b in verdict["models_meeting_both_bootstrap"].items():
        r, n = b["vs_repeat_ndcg_at_10"], b["vs_untuned_als_new_ndcg_at_10"]
        print(
            f"  {m}: vs repeat ndcg@10 {r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]; vs untuned "
            f"ALS new ndcg@10 {n['relative']:+.1%} [{n['relative_low']:+.1%}, {n['relative_high']:+.1%}]"
        )
    print(f"total {elapsed:.0f} s")
    summary = {
        "counts": counts,
        "drop_check": drops,
        "rows": [{k: v for k, v in r.items() if k not in ("metrics", "per_customer")} for r in rows],
        "tuning": tuning,
        "goals": verdict,
        "seconds": elapsed,
        "load_average_1m": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
