"""Figures a reviewer looks at in MLflow: metrics by K, Optuna's optimisation history and parameter importance.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas, so no GUI backend and no global
pyplot state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.evaluation import LIST_METRICS, metric_name


def _figure(width: float = 9.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


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
    axes[0].set_ylabel("value")
    axes[1].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def optimisation_history(study: Any, path: Path, *, metric: str = "") -> Path:
    """Objective per completed trial and the best so far."""
    import optuna

    fig, axes = _figure()
    ax = axes[0]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if done:
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        best, running = [], float("-inf")
        for y in ys:
            running = max(running, y)
            best.append(running)
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
