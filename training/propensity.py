"""The action propensity model: a calibrated PyTorch cross network, its baselines, metrics and online scorer.

P(responded | customer, action, context) feeds the next best action's P × V × L, so what matters beyond ranking
(AUC) is calibration: a 0.2 must mean one in five. The network is trained with a positive-class weight (rare
responses), which shifts its raw probabilities; a calibration map fitted on the validation period (Platt scaling
by default) undoes the shift, and the later test period shows whether it holds.

Learned state is saved without pickling objects: ``model.pt`` holds the network's tensors (loaded with
``weights_only=True``), ``model.json`` the config, encoder vocabularies, normalisation and calibration,
``catalog.parquet`` the action catalogue and, when the model reads the customer–action affinity,
``affinity.npz``/``affinity.json`` the CF item factors and target items it is computed from (the directory is
self-contained: serving needs no recommender to compute it).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from nextbest.features.errors import NextbestError
from nextbest.features.schema import ACTION_ID, RESPONDED
from nextbest.training.affinity import AFFINITY, ActionAffinity
from nextbest.training.device import select_device
from nextbest.training.encoder import EncodedRows, EncoderState, FeatureEncoder
from nextbest.training.propensity_config import P_TRUE
from nextbest.training.propensity_targets import PropensityData

MODEL_FILE = "model.pt"
META_FILE = "model.json"
CATALOG_FILE = "catalog.parquet"
FORMAT_VERSION = 1
ECE_BINS = 10
_EPS = 1e-15


class PropensityModelError(NextbestError, ValueError):
    """A saved propensity model cannot be read (missing file, unknown format version)."""


# --- metrics (pure functions) ------------------------------------------------------------------------------


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


# --- config ------------------------------------------------------------------------------------------------


class PropensityConfig(BaseModel):
    """Hyperparameters of the propensity network. Round-trips through JSON; Optuna samples it.

    Attributes:
        hidden_sizes: widths of the deep (MLP) tower; empty for none.
        embedding_dim: embedding width of every categorical input (the action's included).
        cross_layers: DCN-v2 cross layers beside the MLP (0: MLP only).
        cross_rank: rank of each cross layer's weight (``W = U·Vᵀ``, the low-rank DCN-v2 form; 0: full rank).
            Full-rank cross layers cost width² per row and dominate online scoring time.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        dropout: dropout after each hidden layer (off by default: random masks cost more than the matrix
            products of a network this small on CPU; weight decay and early stopping regularise instead).
        batch_size: rows per optimiser step.
        epochs: most epochs.
        patience: epochs without a better validation loss before stopping.
        seed: seed of initialisation, shuffling and dropout.
        imbalance: positive-class weight in the loss: ``none`` (1), ``sqrt`` (√(neg/pos)) or ``balanced``
            (neg/pos). Probabilities are re-calibrated afterwards either way.
        calibration: map fitted on the validation period: ``platt`` (scale and shift of the logit),
            ``temperature`` (scale only), ``isotonic`` or ``none``.
        min_category_count: categorical values seen fewer times in training are treated as unknown.
        action_dropout: share of training rows whose action id is hidden (set to unknown), so that the model
            learns what an action it has not seen is like from its attributes (new campaigns).
    """

    model_config = ConfigDict(extra="forbid")

    hidden_sizes: list[int] = Field(default_factory=lambda: [128, 64])
    embedding_dim: int = Field(8, ge=1, le=256)
    cross_layers: int = Field(2, ge=0, le=8)
    cross_rank: int = Field(32, ge=0)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-5, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(1024, ge=1)
    epochs: int = Field(30, ge=1)
    patience: int = Field(6, ge=1)
    seed: int = 0
    imbalance: Literal["none", "sqrt", "balanced"] = "sqrt"
    calibration: Literal["platt", "temperature", "isotonic", "none"] = "platt"
    min_category_count: int = Field(5, ge=1)
    action_dropout: float = Field(0.1, ge=0, lt=1)

    @classmethod
    def load(cls, path: str | Path) -> PropensityConfig:
        """Read a config from JSON."""
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


# --- calibration -------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


class Calibration(BaseModel):
    """A map from the network's logit to a calibrated probability.

    ``platt``/``temperature``: ``sigmoid(scale · logit + bias)``; ``isotonic``: a monotone step function of
    ``sigmoid(logit)`` given by its knots ``x`` → ``y`` (linear between knots); ``none``: ``sigmoid(logit)``.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["platt", "temperature", "isotonic", "none"] = "none"
    scale: float = 1.0
    bias: float = 0.0
    x: list[float] = Field(default_factory=list)
    y: list[float] = Field(default_factory=list)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "isotonic":
            p = np.interp(_sigmoid(z), np.asarray(self.x), np.asarray(self.y))
            # A step function can reach 0 or 1 exactly; keep log-loss finite.
            return np.clip(p, 1e-6, 1 - 1e-6)
        return _sigmoid(self.scale * z + self.bias)


def fit_platt(
    logits: np.ndarray, y: np.ndarray, *, fit_bias: bool = True, iterations: int = 100
) -> tuple[float, float]:
    """Scale (and bias) minimising the log-loss of ``sigmoid(scale · logit + bias)``, by damped Newton steps.

    Returns:
        (scale, bias); bias is 0 when ``fit_bias`` is False (temperature scaling).
    """
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    features = np.column_stack([z, np.ones_like(z)]) if fit_bias else z[:, None]
    w = np.zeros(features.shape[1])
    w[0] = 1.0
    ridge = 1e-6 * np.eye(w.size)

    def loss(w: np.ndarray) -> float:
        return log_loss(t, _sigmoid(features @ w))

    current = loss(w)
    for _ in range(iterations):
        p = _sigmoid(features @ w)
        grad = features.T @ (p - t) / t.size
        hess = (features * (p * (1 - p))[:, None]).T @ features / t.size + ridge
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-4:
            candidate = w - scale * step
            new = loss(candidate)
            if new <= current:
                break
            scale /= 2
        else:
            break
        improved = current - new
        w, current = candidate, new
        if improved < 1e-12:
            break
    return float(w[0]), float(w[1]) if fit_bias else 0.0


def fit_calibration(logits: np.ndarray, y: np.ndarray, method: str) -> Calibration:
    """Fit the calibration ``method`` on validation logits and outcomes."""
    if method == "none":
        return Calibration(method="none")
    if method in ("platt", "temperature"):
        scale, bias = fit_platt(logits, y, fit_bias=method == "platt")
        return Calibration(method=method, scale=scale, bias=bias)  # type: ignore[arg-type]
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(_sigmoid(np.asarray(logits, dtype=np.float64)), np.asarray(y, dtype=np.float64))
        return Calibration(
            method="isotonic",
            x=[float(v) for v in iso.X_thresholds_],
            y=[float(v) for v in iso.y_thresholds_],
        )
    raise ValueError(f"calibration {method!r} is not one of platt, temperature, isotonic, none")


# --- the network -------------------------------------------------------------------------------------------


class PropensityNet(nn.Module):
    """Embeddings of every categorical input (one table, offset per input), normalised numerics, then a DCN-v2
    cross network beside an MLP; one logit per row.

    Args:
        cardinalities: vocabulary size of each categorical input (index 0 = unknown).
        n_numeric: number of numeric inputs.
        embedding_dim: embedding width.
        hidden_sizes: MLP widths.
        cross_layers: number of cross layers.
        cross_rank: rank of the cross layers' weights (0: full rank).
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_numeric: int,
        *,
        embedding_dim: int = 8,
        hidden_sizes: Sequence[int] = (128, 64),
        cross_layers: int = 2,
        cross_rank: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        cards = torch.tensor(list(cardinalities), dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(cards, 0)[:-1]])
        # Offsets follow from the cardinalities, which the saved metadata holds: not part of the state dict.
        self.register_buffer("offsets", offsets, persistent=False)
        self.embedding = nn.Embedding(int(cards.sum()), embedding_dim)
        # Small initial embeddings: an action or value never seen in training stays near "no effect".
        nn.init.normal_(self.embedding.weight, std=0.01)
        width = len(cardinalities) * embedding_dim + n_numeric

        def cross_layer() -> nn.Module:
            if cross_rank <= 0 or cross_rank >= width:
                return nn.Linear(width, width)
            return nn.Sequential(nn.Linear(width, cross_rank, bias=False), nn.Linear(cross_rank, width))

        self.cross = nn.ModuleList(cross_layer() for _ in range(cross_layers))
        layers: list[nn.Module] = []
        d = width
        for h in hidden_sizes:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        self.deep = nn.Sequential(*layers)
        head_in = (width if cross_layers else 0) + (d if hidden_sizes else 0) or width
        self.head = nn.Linear(head_in, 1)
        self._has_deep = bool(hidden_sizes)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(categorical + self.offsets).flatten(1)
        x0 = torch.cat([emb, numeric], dim=1)
        parts = []
        if len(self.cross):
            x = x0
            for layer in self.cross:
                x = x0 * layer(x) + x
            parts.append(x)
        if self._has_deep:
            parts.append(self.deep(x0))
        h = torch.cat(parts, dim=1) if parts else x0
        return self.head(h).squeeze(-1)


# --- the model (learned state) -----------------------------------------------------------------------------


class PropensityModel:
    """A fitted propensity model: config, feature encoder, network and calibration.

    Attributes:
        config: hyperparameters it was trained with.
        encoder: the fitted feature encoder (with the action catalogue).
        net: the network (in eval mode).
        calibration: the calibration map.
        info: training facts kept with the model (periods, rows, target, affinity source).
        affinity: the customer–action affinity model whose values feed the ``cf_affinity`` input (None when the
            model does not read it).
    """

    def __init__(
        self,
        config: PropensityConfig,
        encoder: FeatureEncoder,
        net: PropensityNet,
        calibration: Calibration,
        info: Mapping[str, Any] | None = None,
        affinity: ActionAffinity | None = None,
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.net = net.eval()
        self.calibration = calibration
        self.info = dict(info or {})
        self.affinity = affinity if AFFINITY in encoder.spec.pair_numeric else None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def logits(self, rows: EncodedRows, *, batch_size: int = 65_536) -> np.ndarray:
        """Raw logits of encoded rows (batched; no gradient)."""
        device = self.device
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                cat = torch.from_numpy(np.ascontiguousarray(rows.categorical[start : start + batch_size]))
                num = torch.from_numpy(np.ascontiguousarray(rows.numeric[start : start + batch_size]))
                out.append(self.net(cat.to(device), num.to(device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def predict_rows(self, rows: EncodedRows, *, calibrated: bool = True) -> np.ndarray:
        """Response probabilities of encoded rows."""
        z = self.logits(rows)
        return self.calibration.apply(z) if calibrated else _sigmoid(z.astype(np.float64))

    def predict_proba(self, frame: pl.DataFrame, *, calibrated: bool = True) -> np.ndarray:
        """Response probabilities of exposure rows (``action_id``, ``timestamp``, ``channel`` and profile
        columns, as in the training table)."""
        return self.predict_rows(self.encoder.encode_frame(frame), calibrated=calibrated)

    def to(self, device: torch.device | str) -> PropensityModel:
        self.net.to(device)
        return self

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (tensors), ``model.json`` and ``catalog.parquet`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        torch.save(state, out / MODEL_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "encoder": self.encoder.state.model_dump(mode="json"),
            "cardinalities": self.encoder.cardinalities,
            "n_numeric": self.encoder.n_numeric,
            "calibration": self.calibration.model_dump(mode="json"),
            "info": self.info,
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        self.encoder.catalog.write_parquet(out / CATALOG_FILE)
        if self.affinity is not None:
            self.affinity.save(out)
        return out

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> PropensityModel:
        """Read a model written by :meth:`save` (tensors loaded with ``weights_only=True``).

        Raises:
            PropensityModelError: a file is missing or the format version is unknown.
        """
        src = Path(directory)
        for name in (MODEL_FILE, META_FILE, CATALOG_FILE):
            if not (src / name).exists():
                raise PropensityModelError(f"{src} is not a saved propensity model: {name} is missing")
        meta = json.loads((src / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise PropensityModelError(
                f"{src / META_FILE}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        config = PropensityConfig.model_validate(meta["config"])
        encoder = FeatureEncoder.from_state(
            EncoderState.model_validate(meta["encoder"]), pl.read_parquet(src / CATALOG_FILE)
        )
        net = build_net(meta["cardinalities"], meta["n_numeric"], config)
        net.load_state_dict(torch.load(src / MODEL_FILE, map_location="cpu", weights_only=True))
        model = cls(
            config,
            encoder,
            net,
            Calibration.model_validate(meta["calibration"]),
            meta.get("info"),
            affinity=ActionAffinity.load(src),
        )
        if AFFINITY in encoder.spec.pair_numeric and model.affinity is None:
            raise PropensityModelError(f"{src} reads {AFFINITY} but holds no affinity.json / affinity.npz")
        return model.to(select_device(device))


def build_net(cardinalities: Sequence[int], n_numeric: int, config: PropensityConfig) -> PropensityNet:
    """The network for these input sizes and hyperparameters."""
    return PropensityNet(
        cardinalities,
        n_numeric,
        embedding_dim=config.embedding_dim,
        hidden_sizes=config.hidden_sizes,
        cross_layers=config.cross_layers,
        cross_rank=config.cross_rank,
        dropout=config.dropout,
    )


# --- training ----------------------------------------------------------------------------------------------


@contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and switch on deterministic algorithms for the duration (restored afterwards).

    On CUDA a few kernels (embedding gradients) have no deterministic version: they only warn there.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def positive_weight(y: np.ndarray, imbalance: str) -> float:
    """The loss weight of a positive row for an imbalance setting (see :class:`PropensityConfig`)."""
    pos = float(np.sum(y))
    neg = float(y.size - pos)
    if imbalance == "none" or pos == 0 or neg == 0:
        return 1.0
    ratio = neg / pos
    return float(math.sqrt(ratio) if imbalance == "sqrt" else ratio)


EpochCallback = Callable[[int, float], None]
"""Called after each epoch with (epoch, validation loss); may raise to stop training (Optuna pruning)."""


@dataclass
class PropensityFit:
    """A trained model with its training history.

    Attributes:
        model: the fitted model (calibrated).
        history: per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``seconds``.
        best_epoch: the epoch whose weights were kept.
        train_seconds: time spent in optimiser epochs.
        rows_per_second: training rows processed per second.
        pos_weight: the positive-class weight used.
        device: the device it trained on.
        encoded_train: encoded training rows (reused by the baselines).
        encoded_validation: encoded validation rows.
    """

    model: PropensityModel
    history: list[dict[str, float]]
    best_epoch: int
    train_seconds: float
    rows_per_second: float
    pos_weight: float
    device: str
    encoded_train: EncodedRows = field(repr=False)
    encoded_validation: EncodedRows = field(repr=False)

    @property
    def best_val_loss(self) -> float:
        return min(h["val_loss"] for h in self.history)


def _labels(frame: pl.DataFrame) -> np.ndarray:
    # A copy: Polars may hand out a read-only view, which torch.from_numpy warns about.
    return np.array(frame[RESPONDED].cast(pl.Float32).to_numpy(), dtype=np.float32)


def fit_propensity(
    data: PropensityData,
    config: PropensityConfig | None = None,
    *,
    device: str = "auto",
    progress: bool = False,
    on_epoch: EpochCallback | None = None,
) -> PropensityFit:
    """Train the network on the training period, early-stop and calibrate on the validation period.

    Args:
        data: the split training table.
        config: hyperparameters.
        device: ``auto``, ``cpu`` or ``cuda`` (see :func:`training.device.select_device`).
        progress: show a progress bar over epochs.
        on_epoch: called with (epoch, validation loss) after each epoch.

    Returns:
        the fit: calibrated model, history and throughput.
    """
    config = config or PropensityConfig()
    dev = select_device(device)
    encoder = FeatureEncoder.fit(
        data.train, data.catalog, data.customer_columns, min_count=config.min_category_count
    )
    enc_train = encoder.encode_frame(data.train)
    enc_val = encoder.encode_frame(data.validation)
    y_train = _labels(data.train)
    y_val = _labels(data.validation)
    pos_weight = positive_weight(y_train, config.imbalance)

    with deterministic(config.seed, dev):
        net = build_net(encoder.cardinalities, encoder.n_numeric, config).to(dev)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=dev))
        optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        cat = torch.from_numpy(enc_train.categorical).to(dev)
        num = torch.from_numpy(enc_train.numeric).to(dev)
        target = torch.from_numpy(y_train).to(dev)
        val_cat = torch.from_numpy(enc_val.categorical).to(dev)
        val_num = torch.from_numpy(enc_val.numeric).to(dev)
        val_target = torch.from_numpy(y_val).to(dev)
        shuffle = torch.Generator().manual_seed(config.seed)
        action_col = encoder.action_id_position
        n = len(enc_train)
        history: list[dict[str, float]] = []
        best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
        train_seconds = 0.0
        bar = tqdm(range(1, config.epochs + 1), desc="propensity", disable=not progress, unit="epoch")
        for epoch in bar:
            started = time.perf_counter()
            net.train()
            order = torch.randperm(n, generator=shuffle).to(dev)
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                optimiser.zero_grad(set_to_none=True)
                batch_cat = cat[idx]
                if config.action_dropout > 0:
                    hide = torch.rand(idx.numel(), device=dev) < config.action_dropout
                    batch_cat[:, action_col] = torch.where(hide, 0, batch_cat[:, action_col])
                loss = loss_fn(net(batch_cat, num[idx]), target[idx])
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * idx.numel()
            net.eval()
            with torch.inference_mode():
                val_loss = float(_batched_loss(net, loss_fn, val_cat, val_num, val_target))
            seconds = time.perf_counter() - started
            train_seconds += seconds
            history.append(
                {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss, "seconds": seconds}
            )
            bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, val_loss)
            if val_loss < best_loss - 1e-6:
                best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
        bar.close()
        net.load_state_dict(best_state)
        net.eval()

    model = PropensityModel(config, encoder, net, Calibration(), info={}, affinity=data.affinity)
    val_logits = model.logits(enc_val)
    model.calibration = fit_calibration(val_logits, y_val, config.calibration)
    model.info = {
        "target": data.target,
        "validation_start": data.validation_start.isoformat(),
        "test_start": data.test_start.isoformat(),
        "rows_train": data.train.height,
        "rows_validation": data.validation.height,
        "best_epoch": best_epoch,
        "pos_weight": pos_weight,
        "trained_at": datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds"),
        "affinity": None if model.affinity is None else model.affinity.source,
    }
    epochs_run = len(history)
    return PropensityFit(
        model=model,
        history=history,
        best_epoch=best_epoch,
        train_seconds=train_seconds,
        rows_per_second=n * epochs_run / train_seconds if train_seconds > 0 else float("nan"),
        pos_weight=pos_weight,
        device=str(dev),
        encoded_train=enc_train,
        encoded_validation=enc_val,
    )


def _batched_loss(
    net: nn.Module,
    loss_fn: nn.Module,
    cat: torch.Tensor,
    num: torch.Tensor,
    target: torch.Tensor,
    batch_size: int = 65_536,
) -> float:
    total = 0.0
    n = cat.shape[0]
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        total += float(loss_fn(net(cat[sl], num[sl]), target[sl])) * min(batch_size, n - start)
    return total / max(n, 1)


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


# --- online scoring ----------------------------------------------------------------------------------------


class PropensityScorer:
    """Scores actions for one customer in one forward pass (the service's path), on CPU.

    Build with :meth:`load` from a saved model directory or an MLflow model URI.
    """

    def __init__(self, model: PropensityModel) -> None:
        self.model = model.to("cpu")
        self.model.net.eval()
        self.encoder = model.encoder

    @classmethod
    def load(cls, path_or_uri: str | Path) -> PropensityScorer:
        """Load from a directory written by :meth:`PropensityModel.save`, or an MLflow URI (``models:/name@alias``,
        ``models:/m-…``, ``runs:/…``) of a model logged by :func:`training.propensity_tuning.train_propensity`."""
        return cls(load_propensity_model(path_or_uri))

    @property
    def action_ids(self) -> list[str]:
        return self.encoder.action_ids

    @property
    def affinity(self) -> ActionAffinity | None:
        """The customer–action affinity model the network reads (None: it reads none)."""
        return self.model.affinity

    def affinities(self, item_weights: Mapping[str, float]) -> dict[str, float] | None:
        """The customer's ``cf_affinity`` per action from their interaction weights by item id (all their
        events so far, weighted as the features weight them); None when the model reads no affinity."""
        return None if self.affinity is None else self.affinity.score_items(item_weights)

    def score(
        self,
        customer_features: Mapping[str, Any],
        action_ids: Sequence[str] | None = None,
        channel: str | None = None,
        *,
        now: datetime | None = None,
        affinities: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Calibrated response probabilities of ``action_ids`` (default: the whole catalogue) for one customer.

        Args:
            customer_features: the customer's profile row (``profiles.parquet`` columns; missing keys are
                treated as unknown).
            action_ids: actions to score; ids the model's catalogue does not know are left out of the answer.
            channel: the request's channel.
            now: the request time (default: the current UTC time).
            affinities: action id → the customer's ``cf_affinity`` (:meth:`affinities`); without it the
                affinity counts as missing.

        Returns:
            action id → probability, in the order asked.
        """
        at = now or datetime.now(UTC).replace(tzinfo=None)
        ids = self.encoder.action_ids if action_ids is None else self.encoder.known_actions(action_ids)
        if not ids:
            return {}
        rows = self.encoder.encode_one(customer_features, ids, channel, at, affinities=affinities)
        return dict(zip(ids, self.probabilities([rows]).tolist(), strict=True))

    def probabilities(self, batches: Sequence[EncodedRows]) -> np.ndarray:
        """Calibrated probabilities of encoded rows (:meth:`FeatureEncoder.encode_one` of one or more customers),
        in one forward pass: what :meth:`score` and the service's batched decisions both call."""
        rows = EncodedRows(
            np.concatenate([b.categorical for b in batches]), np.concatenate([b.numeric for b in batches])
        )
        return self.model.predict_rows(rows)

    def score_frame(self, frame: pl.DataFrame) -> np.ndarray:
        """Probabilities of exposure rows (the offline path), for comparison with :meth:`score`."""
        return self.model.predict_proba(frame)


def find_model_dir(root: Path) -> Path:
    """The directory under ``root`` that holds a saved propensity model (``model.json`` beside ``model.pt``).

    Raises:
        PropensityModelError: there is none.
    """
    if (root / META_FILE).exists() and (root / MODEL_FILE).exists():
        return root
    for meta in sorted(root.rglob(META_FILE)):
        if (meta.parent / MODEL_FILE).exists():
            return meta.parent
    raise PropensityModelError(f"no saved propensity model (model.json and model.pt) under {root}")


def load_propensity_model(path_or_uri: str | Path, *, device: str = "cpu") -> PropensityModel:
    """Load a :class:`PropensityModel` from a directory or an MLflow artifact/model URI."""
    text = str(path_or_uri)
    if "://" in text or text.startswith(("models:/", "runs:/")):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        return PropensityModel.load(find_model_dir(local), device=device)
    return PropensityModel.load(find_model_dir(Path(text)), device=device)
