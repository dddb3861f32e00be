"""The propensity model judged on the test period, beside its baselines: the per-action base rate, logistic
regression and, on generated data, the planted probabilities; and the reliability diagram of that report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nextbest.features.schema import ACTION_ID
from nextbest.training.encoder import EncodedRows, FeatureEncoder
from nextbest.training.propensity import PropensityFit, _labels, _sigmoid
from nextbest.training.propensity_config import P_TRUE
from nextbest.training.propensity_metrics import (
    classification_metrics,
    expected_calibration_error,
    log_loss,
    per_action_metrics,
    reliability_table,
    roc_auc,
)
from nextbest.training.propensity_targets import PropensityData

# --- baselines ---------------------------------------------------------------------------------------------


@dataclass
class BaseRateBaseline:
    """Per-action response rate of the training period, shrunk towards the overall rate for small actions.

    Attributes:
        rates: action id → rate.
        overall: the overall rate (for actions unseen in training).
    """

    rates: dict[str, float]
    overall: float

    @classmethod
    def fit(
        cls, action_ids: Sequence[str] | np.ndarray, y: np.ndarray, *, prior_rows: float = 10.0
    ) -> BaseRateBaseline:
        """Rates ``(responses + prior_rows · overall) / (rows + prior_rows)`` per action."""
        frame = pl.DataFrame({ACTION_ID: np.asarray(action_ids).astype(str), "y": np.asarray(y, np.float64)})
        overall = float(frame["y"].mean())
        per = frame.group_by(ACTION_ID).agg(pl.col("y").sum().alias("s"), pl.len().alias("n"))
        rates = {a: (s + prior_rows * overall) / (n + prior_rows) for a, s, n in per.iter_rows()}
        return cls(rates=rates, overall=overall)

    def predict(self, action_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        get = self.rates.get
        return np.array([get(str(a), self.overall) for a in action_ids], dtype=np.float64)


def fit_logistic_regression(
    encoder: FeatureEncoder, rows: EncodedRows, y: np.ndarray, *, c: float = 1.0, max_iter: int = 300
) -> Any:
    """Logistic regression (scikit-learn) on the same inputs: one-hot categoricals plus the normalised numerics."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
    model.fit(encoder.one_hot_matrix(rows), np.asarray(y).astype(np.int64))
    return model


# --- evaluation --------------------------------------------------------------------------------------------


@dataclass
class PropensityReport:
    """Test-period evaluation of the model beside its baselines (and the planted truth when known).

    Attributes:
        metrics: flat metrics (``auc``, ``log_loss``, ``brier``, ``ece``, ``baseline_*``, ``oracle_*``, …).
        per_action: per-action table (see :func:`per_action_metrics`).
        reliability: per model, the reliability table of the test period.
        predictions: per model, the test-period probabilities (and ``y``, ``action_id``).
    """

    metrics: dict[str, float]
    per_action: pl.DataFrame
    reliability: dict[str, pl.DataFrame]
    predictions: dict[str, np.ndarray]


def evaluate_propensity(
    fit: PropensityFit, data: PropensityData, *, baselines: bool = True
) -> PropensityReport:
    """Evaluate a fit on the held-out test period beside the base-rate and logistic-regression baselines.

    Calibration was fitted on the validation period, so the test period shows whether it holds later on.
    """
    model = fit.model
    encoder = model.encoder
    y_train = _labels(data.train)
    y_val = _labels(data.validation)
    y_test = _labels(data.test)
    enc_test = encoder.encode_frame(data.test)
    test_logits = model.logits(enc_test)
    val_logits = model.logits(fit.encoded_validation)
    preds: dict[str, np.ndarray] = {
        "model": model.calibration.apply(test_logits),
        "uncalibrated": _sigmoid(test_logits.astype(np.float64)),
    }
    metrics: dict[str, float] = {}
    if baselines:
        base = BaseRateBaseline.fit(data.train[ACTION_ID].to_numpy(), y_train)
        preds["base_rate"] = base.predict(data.test[ACTION_ID].to_numpy())
        started = time.perf_counter()
        logreg = fit_logistic_regression(encoder, fit.encoded_train, y_train)
        metrics["logreg_train_seconds"] = time.perf_counter() - started
        preds["logreg"] = logreg.predict_proba(encoder.one_hot_matrix(enc_test))[:, 1]
        val_logreg = logreg.predict_proba(encoder.one_hot_matrix(fit.encoded_validation))[:, 1]
        metrics["baseline_val_auc_logreg"] = roc_auc(y_val, val_logreg)
    if data.has_truth and P_TRUE in data.test.columns:
        truth = data.test[P_TRUE].cast(pl.Float64).to_numpy()
        if np.isfinite(truth).all():
            preds["oracle"] = truth
    for name, p in preds.items():
        m = classification_metrics(y_test, p)
        prefix = {
            "model": "",
            "uncalibrated": "uncalibrated_",
            "base_rate": "baseline_",
            "logreg": "baseline_",
            "oracle": "oracle_",
        }[name]
        suffix = {"base_rate": "_base_rate", "logreg": "_logreg"}.get(name, "")
        for key in ("auc", "log_loss", "brier", "ece"):
            metrics[f"{prefix}{key}{suffix}"] = m[key]
    val_p = model.calibration.apply(val_logits)
    metrics.update(
        {
            "val_auc": roc_auc(y_val, val_p),
            "val_log_loss": log_loss(y_val, val_p),
            "val_ece": expected_calibration_error(y_val, val_p),
            "val_loss": fit.best_val_loss,
            "test_positive_rate": float(y_test.mean()) if y_test.size else float("nan"),
            "test_mean_predicted": float(preds["model"].mean()) if y_test.size else float("nan"),
            "rows_train": float(data.train.height),
            "rows_validation": float(data.validation.height),
            "rows_test": float(data.test.height),
            "best_epoch": float(fit.best_epoch),
            "epochs_run": float(len(fit.history)),
            "train_seconds": fit.train_seconds,
            "rows_per_second": fit.rows_per_second,
            "pos_weight": fit.pos_weight,
        }
    )
    shown = {k: v for k, v in preds.items() if k != "uncalibrated"}
    per_action = per_action_metrics(data.test[ACTION_ID].to_numpy(), y_test, shown)
    reliability = {k: reliability_table(y_test, v) for k, v in preds.items()}
    preds["y"] = y_test
    return PropensityReport(
        metrics=metrics, per_action=per_action, reliability=reliability, predictions=preds
    )


def reliability_plot(
    report: PropensityReport, path: str | Path, *, title: str = "Propensity reliability (test)"
) -> Path:
    """Write a reliability diagram (mean predicted vs observed rate per bin) of every model as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    for name, table in report.reliability.items():
        t = table.filter(pl.col("n") > 0)
        ece = expected_calibration_error(report.predictions["y"], report.predictions[name])
        ax.plot(t["mean_predicted"], t["observed_rate"], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed response rate")
    ax.set_title(title)
    ax.legend(loc="upper left")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
