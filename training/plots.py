"""Figures a reviewer looks at in MLflow: metrics by K, per-segment bars, Optuna's optimisation history and
parameter importance (the propensity reliability diagram lives beside its report in
``training.propensity_eval``).

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas, so no GUI backend and no global
pyplot state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from nextbest.training.evaluation import LIST_METRICS, metric_name

SEGMENT_METRICS = ("ndcg_at_10", "new_ndcg_at_10")


def _figure(width: float = 9.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _finish(fig: Any, labelled: Any, legend: Any, path: Path, title: str) -> Path:
    """Label the value axis, add the legend and the title, save ``fig`` to ``path``."""
    labelled.set_ylabel("value")
    legend.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def metrics_by_k(metrics: dict[str, float], ks: Sequence[int], path: Path, *, title: str = "") -> Path:
    """Line plot of every list metric against K: repeats counted (left) and discovery (right)."""
    fig, axes = _figure(ncols=2)
    for ax, new, label in ((axes[0], False, "repeats counted"), (axes[1], True, "discovery (new items)")):
        for kind in LIST_METRICS:
            values = [metrics.get(metric_name(kind, k, new=new)) for k in ks]
            if all(v is not None for v in values):
                ax.plot(list(ks), values, marker="o", label=kind)
        ax.set_xlabel("K")
        ax.set_title(label)
        ax.set_xticks(list(ks))
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0], axes[1], path, title)


def best_so_far(values: Sequence[float], *, minimize: bool = False) -> list[float]:
    """The running best of ``values`` (the lowest for a minimised objective, else the highest)."""
    better = min if minimize else max
    out: list[float] = []
    for value in values:
        out.append(value if not out else better(out[-1], value))
    return out


def optimisation_history(study: Any, path: Path, *, metric: str = "") -> Path:
    """Objective per completed trial and the best so far (lowest for a minimised objective)."""
    import optuna

    fig, axes = _figure()
    ax = axes[0]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if done:
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        best = best_so_far(ys, minimize=study.direction == optuna.study.StudyDirection.MINIMIZE)
        ax.scatter(xs, ys, label="trial", s=18)
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned if t.intermediate_values]
        xs = [t.number for t in pruned if t.intermediate_values]
        ax.scatter(xs, last, marker="x", color="grey", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric or "objective")
    ax.set_title(f"optimisation history of {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def parameter_importance(importances: dict[str, float], path: Path, *, title: str = "") -> Path:
    """Horizontal bars of Optuna's parameter importances (most important on top)."""
    fig, axes = _figure(height=max(2.5, 0.5 * len(importances) + 1))
    ax = axes[0]
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(title or "parameter importance")
    fig.savefig(path, dpi=100)
    return path


def segment_bars(
    by_segment: pl.DataFrame,
    path: Path,
    *,
    metrics: Sequence[str] = SEGMENT_METRICS,
    title: str = "",
) -> Path:
    """Grouped bars of ``metrics`` per segment value, one panel per segment (age band, region, journey phase…).

    Args:
        by_segment: the tidy table of :class:`training.evaluation.EvaluationResult` (``segment``,
            ``segment_value``, ``customers``, ``metric``, ``value``); the ``all`` row is left out.
        path: the PNG to write.
        metrics: the metrics drawn side by side.
        title: figure title.
    """
    table = by_segment.filter((pl.col("segment") != "all") & pl.col("metric").is_in(list(metrics)))
    segments = sorted(table["segment"].unique().to_list())
    fig, axes = _figure(width=max(6.0, 4.5 * len(segments)), height=4.0, ncols=max(1, len(segments)))
    width = 0.8 / max(1, len(metrics))
    for ax, segment in zip(axes, segments, strict=False):
        part = table.filter(pl.col("segment") == segment)
        values = sorted(part["segment_value"].unique().to_list())
        customers = dict(part.group_by("segment_value").agg(pl.col("customers").max()).iter_rows())
        for k, metric in enumerate(metrics):
            by_value = dict(
                part.filter(pl.col("metric") == metric).select("segment_value", "value").iter_rows()
            )
            ax.bar(
                [i + k * width for i in range(len(values))],
                [by_value.get(v, 0.0) or 0.0 for v in values],
                width=width,
                label=metric,
            )
        ax.set_xticks(
            [i + width * (len(metrics) - 1) / 2 for i in range(len(values))],
            [f"{v}\n(n={customers.get(v, 0)})" for v in values],
            fontsize="small",
            rotation=30 if len(values) > 4 else 0,
        )
        ax.set_title(segment)
        ax.grid(alpha=0.3, axis="y")
    if not segments:
        axes[0].text(0.5, 0.5, "no segments", ha="center", va="center")
    return _finish(fig, axes[0], axes[0], path, title)


def study_artifacts(study: Any, out: Path, *, metric: str, title: str = "") -> list[Path]:
    """Write a study's ``optuna_history.png``, ``optuna_importance.png`` (when importances can be computed:
    two or more completed trials with a varying parameter) and ``optuna_trials.csv`` into ``out``."""
    import optuna

    written = [optimisation_history(study, out / "optuna_history.png", metric=metric)]
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        importances = {}  # too few completed trials, or no parameter varied
    if importances:
        written.append(
            parameter_importance(importances, out / "optuna_importance.png", title=title or metric)
        )
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    frame.to_csv(out / "optuna_trials.csv", index=False)
    written.append(out / "optuna_trials.csv")
    return written
