"""How well probabilities predict binary outcomes (pure functions): AUC, log-loss, Brier score, calibration.

What the propensity model is judged by, overall (:func:`classification_metrics`) and per action
(:func:`per_action_metrics`); the reliability table and the expected calibration error use equal-width bins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import rankdata

from nextbest.features.schema import ACTION_ID

ECE_BINS = 10
_EPS = 1e-15


def _arrays(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but the scores have {p.size}")
    return y, p


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (the Mann–Whitney statistic, ties counted half); NaN with one class only."""
    y, s = _arrays(y_true, y_score)
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y_true: Any, y_prob: Any) -> float:
    """Mean negative log-likelihood of binary outcomes (probabilities clipped to [1e-15, 1 - 1e-15])."""
    y, p = _arrays(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier_score(y_true: Any, y_prob: Any) -> float:
    """Mean squared difference between probability and outcome."""
    y, p = _arrays(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    # Equal-width bins [0, 0.1), …, [0.9, 1.0]: the last bin includes 1.
    return np.minimum((np.clip(p, 0.0, 1.0) * bins).astype(np.int64), bins - 1)


def reliability_table(y_true: Any, y_prob: Any, *, bins: int = ECE_BINS) -> pl.DataFrame:
    """Per equal-width probability bin: count, mean predicted probability and observed response rate."""
    y, p = _arrays(y_true, y_prob)
    idx = _bin_index(p, bins)
    n = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(n > 0, sum_p / np.maximum(n, 1), np.nan)
        rate = np.where(n > 0, sum_y / np.maximum(n, 1), np.nan)
    return pl.DataFrame(
        {
            "bin": np.arange(bins),
            "lower": np.arange(bins) / bins,
            "upper": (np.arange(bins) + 1) / bins,
            "n": n,
            "mean_predicted": mean_p,
            "observed_rate": rate,
        }
    )


def expected_calibration_error(y_true: Any, y_prob: Any, *, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean of |observed rate − mean predicted probability| over equal-width bins."""
    y, p = _arrays(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    idx = _bin_index(p, bins)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, weights=y, minlength=bins) - np.bincount(idx, weights=p, minlength=bins))
    # Σ_b n_b/N · |Σy_b/n_b − Σp_b/n_b| = Σ_b |Σy_b − Σp_b| / N
    return float(gap[n > 0].sum() / y.size)


def classification_metrics(y_true: Any, y_prob: Any) -> dict[str, float]:
    """AUC, log-loss, Brier score and ECE (10 bins), with the row count and rates."""
    y, p = _arrays(y_true, y_prob)
    return {
        "auc": roc_auc(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p),
        "n": float(y.size),
        "positive_rate": float(y.mean()) if y.size else float("nan"),
        "mean_predicted": float(p.mean()) if y.size else float("nan"),
    }


def per_action_metrics(
    action_ids: Sequence[str] | np.ndarray, y_true: Any, predictions: Mapping[str, Any]
) -> pl.DataFrame:
    """One row per action: rows, responses, response rate, and each model's AUC, log-loss, Brier, ECE and mean
    prediction (columns ``<model>_<metric>``), largest actions first."""
    ids = np.asarray(action_ids).astype(str)
    y = np.asarray(y_true, dtype=np.float64)
    preds = {k: np.asarray(v, dtype=np.float64) for k, v in predictions.items()}
    rows = []
    for a in np.unique(ids):
        mask = ids == a
        row: dict[str, Any] = {
            ACTION_ID: str(a),
            "n": int(mask.sum()),
            "responses": int(y[mask].sum()),
            "response_rate": float(y[mask].mean()),
        }
        for name, p in preds.items():
            m = classification_metrics(y[mask], p[mask])
            for key in ("auc", "log_loss", "brier", "ece", "mean_predicted"):
                row[f"{name}_{key}"] = m[key]
        rows.append(row)
    return pl.DataFrame(rows).sort(["n", ACTION_ID], descending=[True, False])
