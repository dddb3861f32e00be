"""The action propensity model: a calibrated PyTorch cross network, how it is trained and how it is saved.

P(responded | customer, action, context) feeds the next best action's P × V × L, so what matters beyond ranking
(AUC) is calibration: a 0.2 must mean one in five. The network is trained with a positive-class weight (rare
responses), which shifts its raw probabilities; a calibration map fitted on the validation period (Platt scaling
by default) undoes the shift, and the later test period shows whether it holds.

Learned state is saved without pickling objects: ``model.pt`` holds the network's tensors (loaded with
``weights_only=True``), ``model.json`` the config, encoder vocabularies, normalisation and calibration,
``catalog.parquet`` the action catalogue and, when the model reads the customer–action affinity,
``affinity.npz``/``affinity.json`` the CF item factors and target items it is computed from (the directory is
self-contained: serving needs no recommender to compute it).

Beside it: its metrics (:mod:`training.propensity_metrics`), its evaluation beside the baselines
(:mod:`training.propensity_eval`) and the online scorer (:mod:`training.propensity_scorer`).

Why it is a little longer than the project's ~600 lines: the network, its calibration, its file format and the
loop that fits it change together (a new layer is a new config field, a new tensor to save and a new step in the
fit); everything that reads a fitted model (metrics, evaluation, scoring) already lives in the modules above.
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
from torch import nn
from tqdm.auto import tqdm

from nextbest.features.errors import NextbestError
from nextbest.features.moved_names import moved_names
from nextbest.features.schema import RESPONDED
from nextbest.training.affinity import AFFINITY, ActionAffinity
from nextbest.training.device import select_device
from nextbest.training.encoder import EncodedRows, EncoderState, FeatureEncoder
from nextbest.training.numeric_encoding import PiecewiseLinearEncoding, quantile_edges
from nextbest.training.propensity_metrics import log_loss
from nextbest.training.propensity_targets import PropensityData

MODEL_FILE = "model.pt"
META_FILE = "model.json"
CATALOG_FILE = "catalog.parquet"
FORMAT_VERSION = 1


class PropensityModelError(NextbestError, ValueError):
    """A saved propensity model cannot be read (missing file, unknown format version)."""


# Moved out by the split, still importable from here: each is imported from its new module on first use (the
# evaluation and the scorer import this module, so importing them back at the top would be a cycle).
__getattr__ = moved_names(
    __name__,
    {
        "nextbest.training.propensity_metrics": "ECE_BINS brier_score classification_metrics "
        "expected_calibration_error log_loss per_action_metrics reliability_table roc_auc",
        "nextbest.training.propensity_eval": "BaseRateBaseline PropensityReport evaluate_propensity "
        "fit_logistic_regression reliability_plot",
        "nextbest.training.propensity_scorer": "PropensityScorer find_model_dir load_propensity_model",
    },
)


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
        numeric_bins: each numeric input is also given piecewise-linearly over this many quantile bins of the
            training rows (:mod:`training.numeric_encoding`), so the network can cut an input where a tree
            would; 0: the normalised value only.
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
    numeric_bins: int = Field(0, ge=0, le=64)

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
        numeric_bins: piecewise-linear bins per numeric input, beside its value (0: none); the edges are a
            buffer set from the training rows (:meth:`set_numeric_edges`).
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
        numeric_bins: int = 0,
    ) -> None:
        super().__init__()
        self.numeric_encoding = PiecewiseLinearEncoding(n_numeric, numeric_bins) if numeric_bins else None
        cards = torch.tensor(list(cardinalities), dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(cards, 0)[:-1]])
        # Offsets follow from the cardinalities, which the saved metadata holds: not part of the state dict.
        self.register_buffer("offsets", offsets, persistent=False)
        self.embedding = nn.Embedding(int(cards.sum()), embedding_dim)
        # Small initial embeddings: an action or value never seen in training stays near "no effect".
        nn.init.normal_(self.embedding.weight, std=0.01)
        width = len(cardinalities) * embedding_dim + n_numeric * (1 + numeric_bins)

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

    def set_numeric_edges(self, numeric: np.ndarray) -> None:
        """Set the piecewise-linear bins from the training rows' encoded numerics (no-op without bins)."""
        if self.numeric_encoding is not None:
            bins = self.numeric_encoding.edges.shape[1] - 1
            self.numeric_encoding.set_edges(quantile_edges(numeric, bins))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(categorical + self.offsets).flatten(1)
        if self.numeric_encoding is not None:
            numeric = torch.cat([numeric, self.numeric_encoding(numeric)], dim=1)
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
        numeric_bins=config.numeric_bins,
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
        net = build_net(encoder.cardinalities, encoder.n_numeric, config)
        net.set_numeric_edges(enc_train.numeric)
        net = net.to(dev)
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
