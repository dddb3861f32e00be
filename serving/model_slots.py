"""The registry models as the service holds them: each recommender and propensity model mapped onto the service's
item space (a slot), and the set of slots and data that answers requests and is swapped as one (:class:`Served`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from nextbest.features.dataset import Dataset
from nextbest.serving.engine_config import EngineConfig
from nextbest.serving.explain import ItemAttributes, unit_rows
from nextbest.serving.hot_swap import features_stamp
from nextbest.serving.models import RegisteredModel, ServingModels
from nextbest.serving.serving_data import ServingData


def _item_factors(model: Any) -> np.ndarray | None:
    implicit_model = getattr(model, "implicit_model", None)
    factors = getattr(implicit_model, "item_factors", None)
    if factors is not None:
        return np.asarray(factors)
    cf = getattr(model, "cf", None)
    return _item_factors(cf) if cf is not None else None


def _folds_in(model: Any) -> bool:
    # BPR cannot recalculate a user from their history; popularity has nothing to recalculate.
    name = getattr(model, "name", "")
    if name == "blend":
        return _folds_in(model.cf)
    return name not in ("bpr", "popularity")


@dataclass
class RecommenderSlot:
    """A recommender bundle mapped onto the service's item space."""

    registered: RegisteredModel
    items: ItemAttributes
    from_base: np.ndarray
    """Service item index → the model's item index (−1: the model does not know the item)."""
    to_base: np.ndarray
    """The model's item index → service item index."""
    item_factors: np.ndarray | None
    unit_factors: np.ndarray | None
    """Item factors scaled to unit length (cosine similarity by one product), for reasons."""
    folds_in: bool

    @classmethod
    def create(cls, registered: RegisteredModel, data: ServingData) -> RecommenderSlot:
        bundle = registered.model
        # One customer per call and many calls at once: implicit's work stays on the calling thread.
        bundle.model.set_threads(1)
        vocab = bundle.history.items
        factors = _item_factors(bundle.model)
        return cls(
            registered=registered,
            items=ItemAttributes.from_frame(data.items, vocab),
            from_base=vocab.indices(data.item_vocab.ids),
            to_base=data.item_vocab.indices(vocab.ids),
            item_factors=factors,
            unit_factors=None if factors is None else unit_rows(factors),
            folds_in=_folds_in(bundle.model),
        )

    @property
    def model(self) -> Any:
        return self.registered.model.model

    @property
    def n_items(self) -> int:
        return len(self.to_base)

    def customer_row(self, customer_id: str) -> int:
        """The customer's fitted row, or −1 when the model was not fitted on them (or they had no history)."""
        row = self.registered.model.history.customers.get(customer_id)
        if row < 0 or not bool(self.model.known(np.array([row]))[0]):
            return -1
        return row

    def to_model(self, base: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
        """Service item indices and values → the model's indices and values (unknown items left out)."""
        if not base:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        idx = np.fromiter(base.keys(), dtype=np.int64, count=len(base))
        val = np.fromiter(base.values(), dtype=np.float32, count=len(base))
        mapped = self.from_base[idx]
        keep = mapped >= 0
        return mapped[keep], val[keep]

    def model_mask(self, mask: np.ndarray) -> np.ndarray:
        """A mask over the service's items as a mask over the model's (items the service lacks are left out)."""
        model_mask = np.zeros(self.n_items, dtype=bool)
        ok = self.to_base >= 0
        model_mask[ok] = mask[self.to_base[ok]]
        return model_mask

    def row_matrix(self, base: Mapping[int, float]) -> sp.csr_matrix:
        idx, val = self.to_model(base)
        order = np.argsort(idx)
        return sp.csr_matrix(
            (val[order], idx[order], np.array([0, len(idx)])), shape=(1, self.n_items), dtype=np.float32
        )


@dataclass
class PropensitySlot:
    registered: RegisteredModel
    scorer: Any
    action_ids: frozenset[str]
    affinity_items: np.ndarray | None = None
    """Service item index → the item index of the model's customer–action affinity (−1: unknown); None when
    the model reads no affinity. The affinity's item factors travel with the propensity model, so it is the CF
    model the propensity model was trained with, whichever recommender the service ranks with."""

    @classmethod
    def create(cls, registered: RegisteredModel, data: ServingData) -> PropensitySlot:
        from nextbest.training.propensity_scorer import PropensityScorer

        scorer = PropensityScorer(registered.model)
        affinity = scorer.affinity
        items = None if affinity is None else affinity.items.indices(data.item_vocab.ids)
        return cls(registered, scorer, frozenset(registered.model.encoder.action_ids), items)


@dataclass(frozen=True)
class Served:
    """What answers requests, swapped as one (:meth:`Engine.reload_models <serving.engine.Engine.reload_models>`)."""

    models: ServingModels
    data: ServingData
    recommenders: dict[str, RecommenderSlot]
    propensities: dict[str, PropensitySlot]
    features: str
    """:func:`~serving.hot_swap.features_stamp` of the features ``data`` was read from."""


def serve(config: EngineConfig, models: ServingModels, data: ServingData | None = None) -> Served:
    """The models with the dataset side they serve from (loaded from ``config.data`` unless given) and their
    slots."""
    channels = sorted(
        {c for slot in models.propensity.values() for c in slot.model.encoder.activity_channels}
    )
    stamp = features_stamp(config.data)
    data = data or ServingData.load(
        Dataset.at(config.data),
        channels=channels,
        segment_column=config.segment_column,
        min_segment_customers=config.min_segment_customers,
    )
    return Served(
        models=models,
        data=data,
        recommenders={arm: RecommenderSlot.create(r, data) for arm, r in models.recommender.items()},
        propensities={arm: PropensitySlot.create(r, data) for arm, r in models.propensity.items()},
        features=stamp,
    )
