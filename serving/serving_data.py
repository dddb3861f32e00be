"""The dataset's side of the service: its features, tables and retained events, indexed for one-customer lookups
(:class:`ServingData`), and the effective consent a customer's records give."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from nextbest.features.dataset import Dataset, DatasetError
from nextbest.features.interactions import Interactions
from nextbest.features.pipeline import CONSENT_FILE, PROFILES_FILE, FeatureConfig, resolved_events
from nextbest.features.popularity import (
    interaction_pairs,
    item_popularity,
    popularity_vector,
    segment_vectors,
)
from nextbest.features.popularity import segment_popularity as popularity_per_segment
from nextbest.features.privacy import apply_retention, effective_consent
from nextbest.features.schema import (
    CONSENT_PURPOSES,
    CUSTOMER_ID,
    EVENT_TYPE,
    ITEM_ID,
    TIMESTAMP_COL,
    Vocabulary,
)
from nextbest.serving.contact import naive_utc
from nextbest.serving.engine_config import EngineLoadError
from nextbest.serving.explain import ItemAttributes
from nextbest.serving.state_store import EVENT_COLUMNS

PROFILING = "profiling"

EVENT_RANK: dict[str, int] = {"view": 1, "click": 2, "add_to_cart": 3, "purchase": 4}
"""Which event says most about a customer's interest in an item (the strongest one explains a recommendation)."""
RANK_EVENT: dict[int, str] = {v: k for k, v in EVENT_RANK.items()}
PURCHASE = "purchase"


class _RowIndex:
    """A frame with a key column and a dict from key to row, for one-row lookups in microseconds."""

    def __init__(self, frame: pl.DataFrame, key: str = CUSTOMER_ID) -> None:
        self.frame = frame
        self.index: dict[str, int] = (
            {k: i for i, k in enumerate(frame[key].to_list())} if key in frame else {}
        )

    def get(self, key: str) -> dict[str, Any] | None:
        i = self.index.get(key)
        return None if i is None else self.frame.row(i, named=True)

    def frame_of(self, key: str) -> pl.DataFrame:
        i = self.index.get(key)
        return self.frame.slice(i, 1) if i is not None else self.frame.clear()

    def drop(self, key: str) -> bool:
        return self.index.pop(key, None) is not None

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self) -> Iterable[str]:
        return self.index.keys()


def sparse_row(matrix: sp.csr_matrix, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of row ``i`` (zeros left out: erasure zeroes rows in place)."""
    if i < 0 or i >= matrix.shape[0]:
        return np.empty(0, np.int64), np.empty(0, matrix.dtype)
    lo, hi = matrix.indptr[i], matrix.indptr[i + 1]
    idx, val = matrix.indices[lo:hi], matrix.data[lo:hi]
    keep = val != 0
    return idx[keep].astype(np.int64), val[keep]


def epoch_seconds(ts: datetime) -> float:
    return (naive_utc(ts) - datetime(1970, 1, 1)).total_seconds()


@dataclass
class ServingData:
    """Everything the service reads from a dataset, indexed for per-customer lookups.

    The item space of the service (``item_vocab``) is every item of the items table and of the events; each
    model's own item vocabulary is mapped onto it.

    Attributes:
        dataset: the dataset.
        manifest: the feature manifest.
        feature_config: the config the features were built with.
        as_of: the dataset's "now" (its last event).
        items: the items table.
        item_vocab: the service's item space.
        item_attributes: item attributes aligned with ``item_vocab`` (filters, reasons).
        interactions: personalisation-consented interaction weights, customers × ``item_vocab``.
        interaction_customers: rows of ``interactions``.
        events: retained, identity-resolved events of every customer, sorted by customer and time.
        event_customers: customers of ``events``; ``event_starts``/``event_counts`` locate their rows.
        purchased_at: epoch seconds of each customer's latest purchase of each item (``event_customers`` rows).
        strongest: the strongest event type (:data:`EVENT_RANK`) per customer and item.
        features: profile and activity columns per customer (what rules and the propensity model read).
        customers: the customers table (demographics).
        consent: recorded consent per purpose.
        popularity: distinct consenting customers per item.
        segment_popularity: the same within each segment (``segment_column`` value).
        channels: event channels whose shares are activity features of the propensity models.
        item_references: the catalogue's reference prices (computed once; live profile refreshes reuse them).
    """

    dataset: Dataset
    manifest: dict[str, Any]
    feature_config: FeatureConfig
    as_of: datetime
    items: pl.DataFrame
    item_vocab: Vocabulary
    item_attributes: ItemAttributes
    interactions: sp.csr_matrix
    interaction_customers: Vocabulary
    events: pl.DataFrame
    event_customers: Vocabulary
    event_starts: np.ndarray
    event_counts: np.ndarray
    purchased_at: sp.csr_matrix
    strongest: sp.csr_matrix
    features: _RowIndex
    customers: _RowIndex
    consent: _RowIndex
    popularity: np.ndarray
    segment_popularity: dict[str, np.ndarray]
    segment_column: str
    channels: list[str]
    value_thresholds: tuple[float, float]
    item_references: pl.DataFrame | None = None

    @classmethod
    def load(
        cls,
        dataset: Dataset,
        *,
        channels: Sequence[str] = (),
        segment_column: str = "age_band",
        min_segment_customers: int = 20,
    ) -> ServingData:
        """Read a dataset's features and tables.

        Args:
            dataset: the dataset (features built).
            channels: event channels whose shares the propensity models read as activity features.
            segment_column: profile column that defines the popularity segments.
            min_segment_customers: smaller segments use overall popularity.

        Raises:
            EngineLoadError: the dataset or its features are missing (the message says what to run).
        """
        from nextbest.training.propensity_data import customer_activity, item_reference_prices

        try:
            dataset.require()
            manifest = dataset.read_manifest()
        except DatasetError as e:
            raise EngineLoadError(" ".join(str(e).split())) from None
        feats = dataset.features_dir
        for name in (PROFILES_FILE, "interactions.npz"):
            if not (feats / name).exists():
                raise EngineLoadError(
                    f"{feats} has no {name}: run 'nextbest features build --data {dataset.root}' first"
                )
        config = FeatureConfig.model_validate(manifest.get("config", {}))
        as_of = datetime.fromisoformat(manifest["as_of"])
        items = dataset.read("items", required=False)
        interactions = Interactions.load(feats)
        events = (
            apply_retention(resolved_events(dataset), as_of=as_of, days=config.retention_days)
            .filter(pl.col(TIMESTAMP_COL) <= as_of)
            .select(EVENT_COLUMNS)
            .collect()
            .sort(CUSTOMER_ID, TIMESTAMP_COL, maintain_order=True)
        )
        item_ids = set(items[ITEM_ID].to_list()) | set(interactions.items.ids)
        item_ids |= set(events[ITEM_ID].unique().to_list())
        item_vocab = Vocabulary.from_ids(item_ids)
        # The feature matrix is re-indexed onto the service's item space once.
        column_map = item_vocab.indices(interactions.items.ids)
        m = interactions.matrix.tocsr()
        inter = sp.csr_matrix(
            (m.data, column_map[m.indices], m.indptr), shape=(m.shape[0], len(item_vocab)), dtype=np.float32
        )
        inter.sort_indices()

        runs = events.group_by(CUSTOMER_ID, maintain_order=True).len()
        event_customers = Vocabulary(tuple(runs[CUSTOMER_ID].to_list()))
        counts = runs["len"].to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        coded = events.select(
            pl.Series("u", np.repeat(np.arange(len(event_customers), dtype=np.int64), counts)),
            pl.col(ITEM_ID).cast(item_vocab.enum()).to_physical().cast(pl.Int64).alias("i"),
            pl.col(EVENT_TYPE).replace_strict(EVENT_RANK, default=1, return_dtype=pl.Int32).alias("rank"),
            (pl.col(TIMESTAMP_COL).dt.epoch("us") / 1e6).alias("t"),
        )
        shape = (len(event_customers), len(item_vocab))
        strongest_pairs = coded.group_by("u", "i").agg(pl.col("rank").max())
        strongest = sp.csr_matrix(
            (
                strongest_pairs["rank"].to_numpy(),
                (strongest_pairs["u"].to_numpy(), strongest_pairs["i"].to_numpy()),
            ),
            shape=shape,
            dtype=np.int8,
        )
        bought = (
            coded.filter(pl.col("rank") == EVENT_RANK[PURCHASE]).group_by("u", "i").agg(pl.col("t").max())
        )
        purchased_at = sp.csr_matrix(
            (bought["t"].to_numpy(), (bought["u"].to_numpy(), bought["i"].to_numpy())),
            shape=shape,
            dtype=np.float64,
        )

        consent_path = feats / CONSENT_FILE
        consent = (
            pl.read_parquet(consent_path)
            if consent_path.exists()
            else pl.DataFrame(schema={CUSTOMER_ID: pl.String, **{p: pl.Boolean for p in CONSENT_PURPOSES}})
        )
        profiles = pl.read_parquet(feats / PROFILES_FILE)
        customers = dataset.read("customers", required=False)
        # Activity features (what the propensity model reads besides the profile) of every profiled customer,
        # from their events before the dataset's "now".
        profiled = events.join(profiles.select(CUSTOMER_ID), on=CUSTOMER_ID, how="semi")
        references = item_reference_prices(items)
        activity = customer_activity(
            profiled,
            items.lazy(),
            as_of=as_of + timedelta(microseconds=1),
            channels=list(channels),
            reference=references,
        )
        features = profiles.join(activity, on=CUSTOMER_ID, how="left")

        # Overall and per-segment popularity: the one rule (features/popularity.py) the dashboard shows too.
        pairs = interaction_pairs(inter, interactions.customers, item_vocab)
        popularity = popularity_vector(item_popularity(pairs).collect(), item_vocab)
        segment_popularity: dict[str, np.ndarray] = {}
        if segment_column in profiles.columns:
            per_segment = popularity_per_segment(
                pairs, profiles.lazy(), column=segment_column, min_customers=min_segment_customers
            )
            segment_popularity = segment_vectors(per_segment.collect(), item_vocab)
        thresholds = manifest.get("value_tier_thresholds") or [0.0, 0.0]
        return cls(
            dataset=dataset,
            manifest=manifest,
            feature_config=config,
            as_of=as_of,
            items=items,
            item_vocab=item_vocab,
            item_attributes=ItemAttributes.from_frame(items, item_vocab),
            interactions=inter,
            interaction_customers=interactions.customers,
            events=events,
            event_customers=event_customers,
            event_starts=starts,
            event_counts=counts,
            purchased_at=purchased_at,
            strongest=strongest,
            features=_RowIndex(features),
            customers=_RowIndex(customers),
            consent=_RowIndex(consent),
            popularity=popularity,
            segment_popularity=segment_popularity,
            segment_column=segment_column,
            channels=list(channels),
            value_thresholds=(float(thresholds[0]), float(thresholds[1])),
            item_references=references,
        )

    @property
    def consent_default(self) -> bool:
        return self.feature_config.consent_default

    def effective_consent(
        self, customer_id: str, *, erased: bool
    ) -> tuple[dict[str, bool], dict[str, bool | None]]:
        """The consent the service applies per purpose, and the recorded one (None: no record; an erased
        customer has none)."""
        recorded = self.consent.get(customer_id) if not erased else None
        recorded_values = {p: (recorded or {}).get(p) for p in CONSENT_PURPOSES}
        return effective_consent(customer_id, recorded_values, default=self.consent_default), recorded_values

    def customer_events(self, customer_id: str) -> pl.DataFrame:
        """The customer's retained events in the dataset (empty when none or erased)."""
        i = self.event_customers.get(customer_id)
        if i < 0 or self.event_counts[i] == 0:
            return self.events.clear()
        return self.events.slice(int(self.event_starts[i]), int(self.event_counts[i]))

    def knows(self, customer_id: str) -> bool:
        """Whether the dataset holds anything about the customer."""
        i = self.event_customers.get(customer_id)
        return (
            (i >= 0 and self.event_counts[i] > 0)
            or customer_id in self.features
            or customer_id in self.customers
            or customer_id in self.consent
        )

    def all_customer_ids(self) -> set[str]:
        ids = {c for i, c in enumerate(self.event_customers.ids) if self.event_counts[i] > 0}
        return ids | set(self.features.keys()) | set(self.customers.keys()) | set(self.consent.keys())

    def drop_customer(self, customer_id: str) -> bool:
        """Make everything about the customer unreachable (erasure); True if anything was held."""
        held = False
        for index in (self.features, self.customers, self.consent):
            held = index.drop(customer_id) or held
        i = self.event_customers.get(customer_id)
        if i >= 0 and self.event_counts[i] > 0:
            self.event_counts[i] = 0
            for m in (self.purchased_at, self.strongest):
                m.data[m.indptr[i] : m.indptr[i + 1]] = 0
            held = True
        r = self.interaction_customers.get(customer_id)
        if r >= 0:
            self.interactions.data[self.interactions.indptr[r] : self.interactions.indptr[r + 1]] = 0
            held = True
        return held
