"""The propensity model online: scoring one customer's actions in one forward pass, and loading a saved model
from a directory or an MLflow URI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nextbest.training.affinity import ActionAffinity
from nextbest.training.encoder import EncodedRows
from nextbest.training.propensity import META_FILE, MODEL_FILE, PropensityModel, PropensityModelError


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
