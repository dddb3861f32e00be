"""The serving runtime: registry models, the dataset's features and live state, and every endpoint's logic.

:class:`Engine` is plain Python (the BentoML class in :mod:`serving.service` only parses, calls and serialises):

* **Models** — the ``champion`` (and, when a share of customers is assigned to it, the ``challenger``) of
  ``nextbest-recommender`` and ``nextbest-propensity`` from the MLflow registry, or from the BentoML model
  store where ``nextbest promote`` exported them (inside a built Bento, the ones it packages):
  :func:`load_serving_models` (in :mod:`serving.models`; the configuration and the named errors live in
  :mod:`serving.engine_config`, both re-exported here).
* **Data** — the dataset's feature output (interaction matrix, profiles, consent state, manifest), its items,
  customers and action catalogue, and its retained events, indexed by customer (:class:`ServingData`).
* **Live state** — in the state store (:mod:`serving.state_store`, SQLite or PostgreSQL), shared by every worker
  and replica: events received through ``/events`` are stored durably first (:class:`~serving.event_log.EventLog`),
  then, through the store's change feed (this process's writes and every other replica's, in commit order),
  added to the customer's live interaction row; their profile is recomputed in the background with the same
  :func:`~features.profiles.build_profiles` the pipeline uses (or by the first answer that needs it). On
  start-up the store's events are replayed. The contact ledger, the decision log, the levers and the erasures
  live in the same store.

How a recommendation is made: without personalisation consent, items popular in the customer's segment (the
answer says so); a customer the model was fitted on gets the model's ranking, their fresh events folded in
(ALS ``recalculate_user``); a customer the model never saw gets item similarity to the items of their history
and session; a customer with nothing known gets segment popularity — never an error.

Errors a client can fix raise :class:`ServiceError` subclasses carrying an HTTP status (400, 401, 403, 404, 409);
start-up problems raise :class:`EngineLoadError` with one line saying what to run first.
"""

from __future__ import annotations

import functools
import gc
import hmac
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from nextbest.features.dataset import Dataset, DatasetError
from nextbest.features.identity import UNLINKED_SEPARATOR
from nextbest.features.interactions import Interactions
from nextbest.features.live_fold import FoldError, features_watermark
from nextbest.features.pipeline import (
    CONSENT_FILE,
    PROFILES_FILE,
    FeatureConfig,
    erase_customers,
    resolved_events,
)
from nextbest.features.privacy import (
    ERASURE_KEY_FILE_ENV,
    ERASURE_LOG,
    ErasedIds,
    apply_retention,
    erased_digests,
    erasure_ids,
    erasure_key,
    id_digest,
    log_erasure,
)
from nextbest.features.profiles import AGE_BANDS, DEMOGRAPHICS, SEGMENT_FEATURES, build_profiles
from nextbest.features.schema import (
    CHANNEL,
    CONSENT_PURPOSES,
    CUSTOMER_ID,
    EVENT_TYPE,
    ITEM_ID,
    TIMESTAMP_COL,
    Vocabulary,
)
from nextbest.serving import api
from nextbest.serving.arms import CHAMPION, Arm, assign_arm
from nextbest.serving.contact import ContactLedger, naive_utc
from nextbest.serving.decision_log import (
    DecisionLog,
    DecisionRecord,
    RepeatedResponse,
    ResponseMismatch,
    UnknownDecision,
    check_responses,
    new_decision_id,
)
from nextbest.serving.decisions import (
    MARKETING,
    PERSONALISATION,
    ActionCandidate,
    Decision,
    arbitrate,
    explore,
)

# The configuration, the named errors and the model loading live in their own modules; the rest of the service,
# the CLI and the tests import them from here too.
from nextbest.serving.engine_config import (  # noqa: F401
    DEFAULT_STATE_DIR,
    PROPENSITY_MODEL,
    RECOMMENDER_MODEL,
    BadRequest,
    Conflict,
    EngineConfig,
    EngineLoadError,
    Forbidden,
    Gone,
    NotFound,
    NotReady,
    ServiceError,
    Unauthorized,
    one_line,
)
from nextbest.serving.erasure_queue import ErasureQueue
from nextbest.serving.event_log import EventLog, EventRejected
from nextbest.serving.explain import FilterError, ItemAttributes, ItemFilters, item_reasons
from nextbest.serving.hot_swap import SwapLock, features_stamp
from nextbest.serving.models import (  # noqa: F401
    RegisteredModel,
    ServingModels,
    check_models,
    check_registry,
    load_serving_models,
    resolve_model_source,
    served_labels,
)
from nextbest.serving.policy import (
    DEFAULT_POLICY_PATH,
    ActionPolicy,
    PolicyError,
    PolicyState,
    attach_catalog,
    load_policy,
    unpoliced_actions,
)
from nextbest.serving.state_store import (
    EVENT_COLUMNS,
    ResponseConflict,
    StateStore,
    StateStoreError,
    import_state_dir,
    redact,
    store_key,
)

logger = logging.getLogger("nextbest.serving")

PROFILING = "profiling"
FUTURE_TOLERANCE = timedelta(days=1)
"""How far ahead of the service's clock an event or response may be dated (clients' clocks drift, and some send
local time as UTC); later ones are refused. The earliest date taken is the start of the retention window
(:meth:`Engine.retention_start`): older events would be dropped by the next feature build."""
CHECKPOINT_SECONDS = 30.0
"""How often the embedded store's write-ahead log is folded into the database (:meth:`StateStore.checkpoint`)."""
TRIM_INTERVAL_SECONDS = 3600.0
"""How often the service drops log entries that fell out of the retention window (also done at start)."""

EVENT_RANK: dict[str, int] = {"view": 1, "click": 2, "add_to_cart": 3, "purchase": 4}
"""Which event says most about a customer's interest in an item (the strongest one explains a recommendation)."""
RANK_EVENT: dict[int, str] = {v: k for k, v in EVENT_RANK.items()}
PURCHASE = "purchase"
SIMILAR_ATTRIBUTES: tuple[str, ...] = ("category", "sport", "brand", "colour")
SESSION_ITEMS = 20
"""At most this many of a customer's items (strongest first) seed session-based item similarity."""


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# --- the dataset's side ---------------------------------------------------------------------------------------


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


def _row(matrix: sp.csr_matrix, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of row ``i`` (zeros left out: erasure zeroes rows in place)."""
    if i < 0 or i >= matrix.shape[0]:
        return np.empty(0, np.int64), np.empty(0, matrix.dtype)
    lo, hi = matrix.indptr[i], matrix.indptr[i + 1]
    idx, val = matrix.indices[lo:hi], matrix.data[lo:hi]
    keep = val != 0
    return idx[keep].astype(np.int64), val[keep]


def _age_band(age: Any) -> str | None:
    if not isinstance(age, int | float) or isinstance(age, bool) or not math.isfinite(age):
        return None
    for lo, hi, name in AGE_BANDS:
        if lo <= age <= hi:
            return name
    return None


def _epoch_seconds(ts: datetime) -> float:
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

        binary = inter.copy()
        binary.data = (binary.data > 0).astype(np.float32)
        popularity = np.asarray(binary.sum(axis=0)).ravel().astype(np.float32)
        segment_popularity: dict[str, np.ndarray] = {}
        if segment_column in profiles.columns and inter.shape[0]:
            seg = (
                pl.DataFrame({CUSTOMER_ID: list(interactions.customers.ids)})
                .join(
                    profiles.select(CUSTOMER_ID, pl.col(segment_column).cast(pl.String)),
                    on=CUSTOMER_ID,
                    how="left",
                )
                .get_column(segment_column)
            )
            values = sorted(v for v in seg.unique().to_list() if v is not None)
            code = {v: k for k, v in enumerate(values)}
            codes = np.array([code.get(v, -1) for v in seg.to_list()], dtype=np.int64)
            has = codes >= 0
            indicator = sp.csr_matrix(
                (np.ones(int(has.sum()), np.float32), (codes[has], np.flatnonzero(has))),
                shape=(len(values), inter.shape[0]),
            )
            per_segment = np.asarray((indicator @ binary).todense())
            sizes = np.bincount(codes[has], minlength=len(values))
            for k, v in enumerate(values):
                if sizes[k] >= min_segment_customers:
                    segment_popularity[v] = per_segment[k].astype(np.float32)
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


# --- per-model helpers ------------------------------------------------------------------------------------------


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
        unit = None
        if factors is not None:
            norms = np.linalg.norm(factors, axis=1, keepdims=True)
            unit = (factors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return cls(
            registered=registered,
            items=ItemAttributes.from_frame(data.items, vocab),
            from_base=vocab.indices(data.item_vocab.ids),
            to_base=data.item_vocab.indices(vocab.ids),
            item_factors=factors,
            unit_factors=unit,
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
        from nextbest.training.propensity import PropensityScorer

        scorer = PropensityScorer(registered.model)
        affinity = scorer.affinity
        items = None if affinity is None else affinity.items.indices(data.item_vocab.ids)
        return cls(registered, scorer, frozenset(registered.model.encoder.action_ids), items)


# --- live state -------------------------------------------------------------------------------------------------


@dataclass
class LiveCustomer:
    """What the service learned about a customer from ``/events`` since the dataset was built."""

    events: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    """Service item index → interaction weight added by live events."""
    strongest: dict[int, int] = field(default_factory=dict)
    purchased_at: dict[int, float] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    """The profile recomputed with the live events (None: not recomputed, or no profiling consent)."""
    dirty: bool = True
    version: int = 0
    """Counts applied events, so a profile computed from older events is never stored over a newer one."""


@dataclass
class CustomerView:
    """A customer as one request sees them: consent, profile, history (base data and live events together)."""

    customer_id: str
    consent: dict[str, bool]
    recorded_consent: dict[str, bool | None]
    known: bool
    demographics: dict[str, Any] | None
    profile: dict[str, Any] | None
    live_profile: bool
    items: dict[int, float]
    """Service item index → interaction weight (only with personalisation consent)."""
    strongest: dict[int, int]
    purchased_at: dict[int, float]
    live_event_count: int
    live_events: list[dict[str, Any]]
    """The live events themselves (only when asked for: the right of access)."""

    @property
    def has_live_events(self) -> bool:
        return self.live_event_count > 0


@dataclass
class _RankPlan:
    """A personalised ranking still to be made (model or session based)."""

    slot: RecommenderSlot
    arm: str
    view: CustomerView
    n: int
    mask: np.ndarray | None
    exclude: set[int]
    row: int
    basis: str
    recalc: bool
    position: int = 0
    ranking: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.float32))


@dataclass
class _DecisionPlan:
    """A next-best-action request with its encoded model input, waiting for the batch's forward pass."""

    position: int
    request: api.NextBestActionRequest
    arm: str
    pslot: PropensitySlot
    now: datetime
    view: CustomerView
    wanted: list[str]
    rows: Any
    scores: dict[str, float] = field(default_factory=dict)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run a forward pass on one thread. The propensity network is tiny: torch's intra-op threads on a couple
    of cores cost ten times more than the work (measured: 24 ms against 0.6 ms per call). Restored after, so
    the process's other torch work (training in the same process) keeps its threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _json_value(v.item())
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    return v


def _json_row(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: _json_value(v) for k, v in row.items()}


def _parse_time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return naive_utc(value)
    if isinstance(value, str):
        try:
            return naive_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    raise BadRequest(f"{where}: {value!r} is not an ISO date-time (e.g. 2026-05-01T12:00:00)")


# --- the engine ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Served:
    """What answers requests, swapped as one (:meth:`Engine.reload_models`)."""

    models: ServingModels
    data: ServingData
    recommenders: dict[str, RecommenderSlot]
    propensities: dict[str, PropensitySlot]
    features: str
    """:func:`~serving.hot_swap.features_stamp` of the features ``data`` was read from."""


def _labels_text(labels: Mapping[str, Mapping[str, str]]) -> str:
    return ", ".join(f"{arm} {label}" for arms in labels.values() for arm, label in arms.items())


def _serving(method: Any) -> Any:
    """Run an endpoint's method against one set of models: a model swap waits for it, and it for the swap."""

    @functools.wraps(method)
    def wrapper(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self._swap.reading():
            return method(self, *args, **kwargs)

    return wrapper


class Engine:
    """Every endpoint's logic over the loaded models, the dataset and the live state. Thread-safe.

    Args:
        config: the engine config.
        models: the registry models (:func:`load_serving_models`, or built in code for tests).
        data: the dataset's side; loaded from ``config.data`` when None.
    """

    def __init__(self, config: EngineConfig, models: ServingModels, data: ServingData | None = None) -> None:
        self.config = config
        self._started_wall = _utcnow()
        self._started = time.monotonic()
        self._lock = threading.RLock()
        self._swap = SwapLock()
        self._reload_lock = threading.Lock()
        self._served = self._serve(models, data)
        self.policy = self._load_policy()
        self._bought_attributes = sorted(
            {f.removeprefix("bought_") for f in self.policy.referenced_fields() if f.startswith("bought_")}
        )
        state = config.state_path
        state.mkdir(parents=True, exist_ok=True)
        try:
            self.store = StateStore(config.store_url)
            imported = import_state_dir(self.store, state)
        except StateStoreError as e:
            raise EngineLoadError(" ".join(str(e).split())) from None
        if imported:
            logger.info("imported the state directory %s into the state store: %s", state, imported)
        self.levers = PolicyState(self.policy, self.store)
        self.ledger = ContactLedger(self.store, self.policy)
        self.decision_log = DecisionLog(self.store)
        self.event_log = EventLog(self.store, event_types=self.data.feature_config.event_types)
        self._live: dict[str, LiveCustomer] = {}
        self._erased: set[str] = set()
        """Ids found erased in this process (a cache in front of :attr:`_erasures`)."""
        self._erasures = self._known_erasures()
        self.channels = sorted(set(self.policy.named_channels()) | set(self.data.channels))
        """The channels a request may name: the policy's and those the propensity model knows."""
        self.erasures = ErasureQueue(self.store, lambda ids: erase_customers(self.data.dataset, ids))
        self._sync_lock = threading.Lock()
        self._seen, rows = self.store.snapshot()
        replay = self.event_log.frame(self._not_folded(rows, self.data))
        erased = self._forget_logged_erasures(set(replay[CUSTOMER_ID].to_list()))
        if erased:
            replay = replay.filter(~pl.col(CUSTOMER_ID).is_in(sorted(erased)))
        replayed = self._apply_events(replay)
        self.trim_logs()
        self.erasures.start()
        self._stop = threading.Event()
        self._refreshing: set[str] = set()
        self._refresh_wake = threading.Condition()
        self._background = [
            threading.Thread(target=self._trim_periodically, name="nextbest-retention", daemon=True),
            threading.Thread(target=self._follow, name="nextbest-sync", daemon=True),
            threading.Thread(target=self._refresh_stale, name="nextbest-profiles", daemon=True),
        ]
        for thread in self._background:
            thread.start()
        logger.info(
            "nextbest engine ready: %s, %s; %d live customers replayed from the state store %s",
            self.recommenders[CHAMPION].registered.label,
            self.propensities[CHAMPION].registered.label,
            len(replayed),
            redact(config.store_url),
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load models from the registry and the dataset, then replay the live state.

        Raises:
            EngineLoadError: something is missing; the message says what to run first.
        """
        models = load_serving_models(config)
        try:
            engine = cls(config, models)
        except PolicyError as e:
            raise EngineLoadError(" ".join(str(e).split())) from None
        poll = config.model_poll_seconds
        if poll > 0:  # models handed over in code are not the registry's: only a loaded engine polls it
            watcher = threading.Thread(
                target=engine._watch_models, args=(poll,), name="nextbest-models", daemon=True
            )
            engine._background.append(watcher)
            watcher.start()
        # Everything loaded so far lives as long as the process. Left to the collector, its half a million
        # objects make every full collection a pause of a few hundred milliseconds in the middle of a request.
        gc.collect()
        gc.freeze()
        return engine

    # --- the served models, and swapping them -------------------------------------------------------------

    def _serve(self, models: ServingModels, data: ServingData | None = None) -> _Served:
        """The models with the dataset side they serve from (loaded unless given) and their slots."""
        channels = sorted(
            {
                name.removeprefix("channel_share_")
                for slot in models.propensity.values()
                for name in slot.model.encoder.spec.customer_numeric
                if name.startswith("channel_share_")
            }
        )
        stamp = features_stamp(self.config.data)
        data = data or ServingData.load(
            Dataset.at(self.config.data),
            channels=channels,
            segment_column=self.config.segment_column,
            min_segment_customers=self.config.min_segment_customers,
        )
        return _Served(
            models=models,
            data=data,
            recommenders={arm: RecommenderSlot.create(r, data) for arm, r in models.recommender.items()},
            propensities={arm: PropensitySlot.create(r, data) for arm, r in models.propensity.items()},
            features=stamp,
        )

    @property
    def models(self) -> ServingModels:
        return self._served.models

    @property
    def data(self) -> ServingData:
        return self._served.data

    @property
    def recommenders(self) -> dict[str, RecommenderSlot]:
        return self._served.recommenders

    @property
    def propensities(self) -> dict[str, PropensitySlot]:
        return self._served.propensities

    def model_versions(self) -> dict[str, dict[str, str]]:
        """Kind → arm → ``name/version`` of the models serving now."""
        return self._served.models.labels()

    def reload_models(self, *, force: bool = False) -> api.ReloadResponse:
        """Swap in the registry's current champions (and challengers) and rebuilt features, if they changed.

        The new set is loaded while requests go on and replaces the old one atomically (see
        :mod:`serving.hot_swap`); with ``force`` the models are reloaded even when their versions did not
        change. Thread-safe; concurrent reloads run one after the other.

        Raises:
            EngineLoadError: the registry or a champion is missing (the models serving now stay).
        """
        with self._reload_lock:
            before = self.model_versions()
            wanted = served_labels(self.config)
            stamp = features_stamp(self.config.data)
            new_data = stamp != self._served.features
            if not (force or new_data or wanted != before):
                return api.ReloadResponse(
                    swapped=False, models=before, previous=before, features_reloaded=False
                )
            models = load_serving_models(self.config)
            served = self._serve(models, None if new_data else self._served.data)
            with self._swap.writing():
                self._served = served
                if new_data:
                    # Live state is indexed by the dataset's items: rebuild it over the new dataset.
                    self.channels = sorted(set(self.policy.named_channels()) | set(served.data.channels))
                    with self._lock:
                        self._live.clear()
                    replay = self.event_log.frame(self._not_folded(self.store.snapshot()[1], served.data))
                    erased = {c for c in set(replay[CUSTOMER_ID].to_list()) if self._is_erased(c)}
                    if erased:
                        replay = replay.filter(~pl.col(CUSTOMER_ID).is_in(sorted(erased)))
                    self._apply_events(replay)
            after = self.model_versions()
            logger.info(
                "nextbest: now serving %s (was %s)%s",
                _labels_text(after),
                _labels_text(before),
                "; features reloaded" if new_data else "",
            )
            return api.ReloadResponse(swapped=True, models=after, previous=before, features_reloaded=new_data)

    def _watch_models(self, every: float) -> None:
        """Poll for new champions until the engine closes; a failed look is logged and tried again later."""
        while not self._stop.wait(every):
            try:
                self.reload_models()
            except Exception as e:  # the models serving now stay; the next poll tries again
                logger.warning("nextbest: cannot look for new models: %s", one_line(e))

    def reload_request(self, request: api.ReloadRequest, authorization: str | None) -> api.ReloadResponse:
        """``POST /reload`` (admin)."""
        self.check_admin(authorization)
        try:
            return self.reload_models(force=request.force)
        except EngineLoadError as e:
            raise NotReady(f"the models serving now stay: {one_line(e)}") from None

    def _load_policy(self) -> ActionPolicy:
        policy = load_policy(self.config.policy or DEFAULT_POLICY_PATH)
        ds = self.data.dataset
        if ds.has_table("action_catalog"):
            catalog = ds.read("action_catalog")
        else:
            catalog = self.propensities[CHAMPION].registered.model.encoder.catalog
        try:
            attached = attach_catalog(policy, catalog)
        except PolicyError as e:
            raise PolicyError(
                f"{e} — give a policy for this dataset's actions with NEXTBEST_POLICY"
            ) from None
        lost = unpoliced_actions(attached, catalog)
        if lost:
            logger.warning("actions without a policy entry are never offered: %s", ", ".join(lost))
        return attached

    def close(self) -> None:
        """Stop the background work and close the state store."""
        self._stop.set()
        with self._refresh_wake:
            self._refresh_wake.notify_all()
        self.erasures.stop()
        for thread in self._background:
            thread.join(5)
        self.store.close()

    # --- replicas: what other processes wrote --------------------------------------------------------------

    @_serving
    def sync(self) -> set[str]:
        """Apply what was written to the state store since the last call, by this process or another replica, in
        the order it was committed: events to the live state, contacts to the ledger, lever changes, erasures.

        Returns:
            the customers whose live state changed.
        """
        with self._sync_lock:
            feed = self.store.changes_since(self._seen)
            if not feed:
                return set()
            self._seen = feed[-1].seq
            kinds = {c.kind for c in feed}
            if "erasure" in kinds:
                self._reload_erasures()
            changed: set[str] = set()
            refs = [c.ref for c in feed if c.kind == "event" and c.ref is not None]
            if refs:
                frame = self.event_log.frame(self.store.events_by_seq(refs))
                gone = [c for c in frame[CUSTOMER_ID].unique().to_list() if self._is_erased(c)]
                changed = self._apply_events(
                    frame.filter(~pl.col(CUSTOMER_ID).is_in(gone)) if gone else frame
                )
                self._stale(changed)  # rebuilt in the background, before the next answer asks
            for customer_id in {c.customer_id for c in feed if c.kind == "contact" and c.customer_id}:
                self.ledger.refresh(customer_id)
            if "lever" in kinds or "import" in kinds:
                self.levers.reload()
            return changed

    def _stale(self, customers: Iterable[str]) -> None:
        """Have the background thread rebuild these customers' live profiles."""
        with self._refresh_wake:
            self._refreshing.update(customers)
            self._refresh_wake.notify()

    def _refresh_stale(self) -> None:
        while not self._stop.is_set():
            with self._refresh_wake:
                while not self._refreshing and not self._stop.is_set():
                    self._refresh_wake.wait(0.5)
                batch, self._refreshing = self._refreshing, set()
            for customer_id in batch:
                try:
                    self._refresh(customer_id)
                except Exception:  # a live profile must never stop the service: the next read tries again
                    logger.exception("cannot rebuild a live profile")

    def _follow(self) -> None:
        interval = self.config.sync_interval_ms / 1000.0
        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
        while not self._stop.wait(interval):
            try:
                self.sync()
                if time.monotonic() >= checkpoint_at:
                    checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                    self.store.checkpoint()
            except Exception:  # the store may be out of reach for a moment: try again at the next tick
                logger.exception("cannot follow the state store")

    def _known_erasures(self) -> ErasedIds:
        """The erasures of the dataset's log and of the state store (another replica's, too)."""
        logged = erased_digests(self.data.dataset)
        stored = self.store.erased_digests()
        if stored and logged.key is None:
            key = erasure_key(create=False)
            if key is None:
                raise EngineLoadError(
                    f"the state store records erasures by keyed digest but no erasure key was found: set "
                    f"{ERASURE_KEY_FILE_ENV} to the key the other replicas use"
                )
            logged = ErasedIds(logged.keyed, logged.legacy, key)
        return ErasedIds(logged.keyed | stored, logged.legacy, logged.key)

    def _reload_erasures(self) -> None:
        """Another replica erased someone: drop what this process holds about any erased id."""
        self._erasures = self._known_erasures()
        with self._lock:
            for customer_id in [c for c in self._live if c in self._erasures]:
                del self._live[customer_id]
                self._erased.add(customer_id)
            for customer_id in [c for c in self.ledger.customers() if c in self._erasures]:
                self.ledger.forget(customer_id)
                self._erased.add(customer_id)
        for customer_id in list(self._erased):
            self.data.drop_customer(customer_id)

    # --- retention ------------------------------------------------------------------------------------------

    def retention_start(self) -> datetime:
        """The oldest time the service keeps: ``retention_days`` (the dataset's setting) before its clock, or
        before the dataset's latest event where that is earlier (the service never drops what the dataset it
        serves still retains)."""
        return min(self.now(), self.data.as_of) - timedelta(days=self.data.feature_config.retention_days)

    def trim_logs(self) -> dict[str, int]:
        """Drop what fell out of the retention window from the state store's events, contacts, decisions,
        responses and erasure states; returns how many entries each lost."""
        before = self.retention_start()
        with self._lock:
            removed = self.store.trim(before)
            self.ledger.trim(before)
        if any(removed.values()):
            logger.info("retention: dropped entries older than %s: %s", before.date(), removed)
        return removed

    def _trim_periodically(self) -> None:
        while not self._stop.wait(TRIM_INTERVAL_SECONDS):
            try:
                self.trim_logs()
            except Exception:
                logger.exception("retention: cannot trim the logs")

    def _is_erased(self, customer_id: str) -> bool:
        if customer_id in self._erased:
            return True
        if customer_id in self._erasures:
            self._erased.add(customer_id)
            return True
        return False

    def _check_channel(self, channel: str | None, where: str = "channel") -> None:
        if channel is not None and self.channels and channel not in self.channels:
            raise BadRequest(f"{where}: unknown channel {channel!r}; known: {', '.join(self.channels)}")

    # --- time, arms, consent -------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The decision time: wall-clock UTC, or (``clock="data"``) the dataset's time running on since start."""
        if self.config.clock == "data":
            return self.data.as_of + timedelta(seconds=time.monotonic() - self._started)
        return _utcnow()

    def _request_time(self, context: Mapping[str, Any]) -> datetime:
        if context.get("now") is not None:
            return _parse_time(context["now"], "context.now")
        return self.now()

    def arm(self, customer_id: str) -> Arm:
        """The customer's arm: challenger for a stable share of ids when a challenger is loaded."""
        if len(self.recommenders) == 1 and len(self.propensities) == 1:
            return CHAMPION
        return assign_arm(customer_id, self.config.challenger_share, self.config.arm_salt)

    def _recommender(self, arm: str) -> RecommenderSlot:
        return self.recommenders.get(arm) or self.recommenders[CHAMPION]

    def _propensity(self, arm: str) -> PropensitySlot:
        return self.propensities.get(arm) or self.propensities[CHAMPION]

    def _consent(self, customer_id: str) -> tuple[dict[str, bool], dict[str, bool | None]]:
        recorded = self.data.consent.get(customer_id) if not self._is_erased(customer_id) else None
        recorded_values = {p: (recorded or {}).get(p) for p in CONSENT_PURPOSES}
        default = self.data.consent_default
        unlinked = UNLINKED_SEPARATOR in customer_id
        effective = {}
        for p in CONSENT_PURPOSES:
            value = recorded_values[p]
            if value is None:
                # As the feature pipeline decides: ids of unlinked source systems may be personalised (their own
                # session) but are never profiled or marketed to.
                value = default if (not unlinked or p == PERSONALISATION) else False
            effective[p] = bool(value)
        return effective, recorded_values

    # --- the customer as a request sees them -------------------------------------------------------------------

    def _view(self, customer_id: str, *, with_events: bool = False) -> CustomerView:
        consent, recorded = self._consent(customer_id)
        data = self.data
        erased = self._is_erased(customer_id)
        items: dict[int, float] = {}
        strongest: dict[int, int] = {}
        purchased: dict[int, float] = {}
        demographics = None if erased else data.customers.get(customer_id)
        profile = None
        if not erased:
            r = data.interaction_customers.get(customer_id)
            if r >= 0 and consent[PERSONALISATION]:
                idx, val = _row(data.interactions, r)
                items = dict(zip(idx.tolist(), val.tolist(), strict=True))
            e = data.event_customers.get(customer_id)
            if e >= 0:
                idx, val = _row(data.strongest, e)
                strongest = dict(zip(idx.tolist(), val.tolist(), strict=True))
                idx, val = _row(data.purchased_at, e)
                purchased = dict(zip(idx.tolist(), val.tolist(), strict=True))
            if consent[PROFILING]:
                profile = data.features.get(customer_id)
        live_events: list[dict[str, Any]] = []
        live_count = 0
        live_profile = False
        live = self._live.get(customer_id)
        if live is not None and live.dirty:
            self._refresh(customer_id)
        if live is not None:
            with self._lock:
                live_count = len(live.events)
                if with_events:
                    live_events = list(live.events)
                if consent[PERSONALISATION]:
                    for i, w in live.weights.items():
                        items[i] = items.get(i, 0.0) + w
                for i, k in live.strongest.items():
                    strongest[i] = max(strongest.get(i, 0), k)
                for i, t in live.purchased_at.items():
                    purchased[i] = max(purchased.get(i, 0.0), t)
                if live.profile is not None:
                    profile, live_profile = live.profile, True
        if not consent[PROFILING]:
            profile = None
        return CustomerView(
            customer_id=customer_id,
            consent=consent,
            recorded_consent=recorded,
            known=not erased and data.knows(customer_id),
            demographics=demographics,
            profile=profile,
            live_profile=live_profile,
            items=items,
            strongest=strongest,
            purchased_at=purchased,
            live_event_count=live_count,
            live_events=live_events,
        )

    def _segment(self, view: CustomerView) -> tuple[str | None, np.ndarray]:
        """The customer's segment value and its item popularity (overall popularity when unknown or small)."""
        column = self.data.segment_column
        value = (view.profile or {}).get(column)
        if value is None and column == "age_band":
            value = _age_band((view.demographics or {}).get("age"))
        if value is not None and str(value) in self.data.segment_popularity:
            return str(value), self.data.segment_popularity[str(value)]
        return None, self.data.popularity

    def _segment_text(self, value: str | None) -> str:
        if value is None:
            return "popular right now"
        if self.data.segment_column == "age_band":
            return f"popular with customers aged {value}"
        return f"popular with customers in {self.data.segment_column.replace('_', ' ')} {value}"

    # --- filters ------------------------------------------------------------------------------------------

    def _filter_mask(self, filters: ItemFilters | None) -> np.ndarray | None:
        """Mask over the service's items; unknown attributes, values of include filters and items are 400s."""
        if filters is None or filters.is_empty:
            return None
        attrs = self.data.item_attributes
        for which, table in (("include", filters.include), ("exclude", filters.exclude)):
            for attribute, value in table.items():
                if attribute not in attrs.levels:
                    continue  # the mask names it below
                values = value if isinstance(value, list) else [value]
                unknown = [v for v in values if v not in attrs.levels[attribute]]
                if unknown and (which == "include" or attribute == ITEM_ID):
                    known = sorted(map(str, attrs.levels[attribute]))
                    shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "")
                    what = "item" if attribute == ITEM_ID else f"value of {attribute!r}"
                    raise BadRequest(
                        f"filters.{which}.{attribute}: unknown {what} {', '.join(map(repr, unknown[:5]))}"
                        + ("" if attribute == ITEM_ID else f"; known: {shown}")
                    )
        try:
            return attrs.mask(filters)
        except FilterError as e:
            raise BadRequest(f"filters: {e}") from None

    # --- /recommend -----------------------------------------------------------------------------------------

    @_serving
    def recommend(self, request: api.RecommendRequest) -> api.RecommendResponse:
        """Follow-up purchases for a customer now (see the module docstring for how).

        Raises:
            BadRequest: a filter names an unknown attribute, value or item.
        """
        answer = self.recommend_many([request])[0]
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    @_serving
    def recommend_many(
        self, requests: Sequence[api.RecommendRequest]
    ) -> list[api.RecommendResponse | ServiceError]:
        """Answer several ``/recommend`` requests at once (adaptive batching in the service).

        Customers the model was fitted on are ranked together, one matrix product per model and fold-in
        setting, which is where a batch saves time; the rest are answered one by one. A request that fails
        gets its :class:`ServiceError` in its place, so one bad request never fails the others.
        """
        out: list[api.RecommendResponse | ServiceError | None] = [None] * len(requests)
        pending: list[_RankPlan] = []
        for k, request in enumerate(requests):
            try:
                plan = self._plan(request)
            except ServiceError as e:
                out[k] = e
                continue
            if isinstance(plan, api.RecommendResponse):
                out[k] = plan
            else:
                plan.position = k
                pending.append(plan)
        groups: dict[tuple[int, bool], list[_RankPlan]] = {}
        for plan in pending:
            if plan.basis == "model" and plan.mask is None:
                groups.setdefault((id(plan.slot), plan.recalc), []).append(plan)
            elif plan.basis == "model":
                plan.ranking = self._model_ranking(plan.slot, [plan])[0]
            else:
                plan.ranking = self._session_ranking(plan.slot, plan.view, plan.n, plan.mask, plan.exclude)
        for group in groups.values():
            for plan, ranking in zip(group, self._model_ranking(group[0].slot, group), strict=True):
                plan.ranking = ranking
        for plan in pending:
            ids, scores = plan.ranking
            reasons = self._reasons(plan.slot, plan.view, ids)
            vocab = plan.slot.registered.model.history.items
            out[plan.position] = api.RecommendResponse(
                customer_id=plan.view.customer_id,
                items=[
                    api.RecommendedItem(item_id=vocab.ids[i], score=float(s), reasons=r)
                    for i, s, r in zip(ids.tolist(), scores.tolist(), reasons, strict=True)
                ],
                personalised=True,
                basis=plan.basis,
                model_version=plan.slot.registered.label,
                arm=plan.arm,
            )
        return [o for o in out if o is not None]

    def _plan(self, request: api.RecommendRequest) -> _RankPlan | api.RecommendResponse:
        """Decide how to answer a request; the non-personalised answers are made here at once."""
        cid = request.customer_id
        arm = self.arm(cid)
        slot = self._recommender(arm)
        mask = self._filter_mask(request.filters)
        view = self._view(cid)
        exclude = set(view.purchased_at) if request.exclude_purchased else set()
        if not view.consent[PERSONALISATION] or not view.items:
            consented = view.consent[PERSONALISATION]
            # Without consent their history is not used at all, not even to leave out what they bought.
            items, segment = self._popular(view, request.n, mask, exclude=exclude if consented else None)
            why = "nothing known about this customer yet" if consented else "no consent to personalisation"
            return api.RecommendResponse(
                customer_id=cid,
                items=items,
                personalised=False,
                basis="segment_popularity" if segment else "popularity",
                note=f"not personalised: {why}; {self._segment_text(segment)}",
                model_version=slot.registered.label,
                arm=arm,
            )
        row = slot.customer_row(cid) if not self._is_erased(cid) else -1
        return _RankPlan(
            slot=slot,
            arm=arm,
            view=view,
            n=request.n,
            mask=mask,
            exclude=exclude,
            row=row,
            basis="model" if row >= 0 else "session",
            recalc=view.has_live_events and slot.folds_in,
        )

    def _reasons(self, slot: RecommenderSlot, view: CustomerView, ids: np.ndarray) -> list[list[str]]:
        """Reasons per recommended item: the customer's preferences it matches, and the history item most
        like it (one matrix product for the whole list rather than one per item)."""
        history = {
            int(m): RANK_EVENT.get(view.strongest.get(int(b), 1), "view")
            for b in view.items
            if (m := slot.from_base[b]) >= 0
        }
        because: list[int | None] = [None] * len(ids)
        if slot.unit_factors is not None and history and len(ids):
            rows = np.array(sorted(history), dtype=np.int64)
            sims = slot.unit_factors[ids] @ slot.unit_factors[rows].T
            sims[ids[:, None] == rows[None, :]] = -np.inf
            # Ties go to the smallest item index (rows are sorted), as in serving.explain.most_similar_item.
            best = np.argmax(sims, axis=1)
            found = np.isfinite(sims[np.arange(len(ids)), best]) & (sims[np.arange(len(ids)), best] != 0)
            because = [
                int(rows[b]) if ok else None for b, ok in zip(best.tolist(), found.tolist(), strict=True)
            ]
        out = []
        for i, b in zip(ids.tolist(), because, strict=True):
            out.append(
                item_reasons(
                    view.profile,
                    slot.items.item(slot.items.ids[i]),
                    because_of=None if b is None else slot.items.item(slot.items.ids[b]),
                    because_of_event=history.get(b, PURCHASE) if b is not None else PURCHASE,
                )
            )
        return out

    def _exclusion(self, slot: RecommenderSlot, exclude: set[int]) -> np.ndarray:
        if not exclude:
            return np.empty(0, np.int64)
        idx = slot.from_base[np.fromiter(exclude, dtype=np.int64, count=len(exclude))]
        return np.sort(idx[idx >= 0])

    @staticmethod
    def _stack(rows: list[tuple[np.ndarray, np.ndarray]], n_items: int) -> sp.csr_matrix:
        """One CSR matrix from (sorted indices, values) rows, without scipy's per-row overhead."""
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(i) for i, _ in rows])
        indices = np.concatenate([i for i, _ in rows]) if rows else np.empty(0, np.int64)
        data = np.concatenate([v for _, v in rows]).astype(np.float32) if rows else np.empty(0, np.float32)
        return sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(len(rows), n_items))

    def _model_ranking(
        self, slot: RecommenderSlot, plans: Sequence[_RankPlan]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The model's ranking for customers it was fitted on: one call for the whole group."""
        from nextbest.training.recommenders import MISSING_ID, RecommenderError

        histories = []
        for plan in plans:
            idx, val = slot.to_model(plan.view.items)
            order = np.argsort(idx)
            histories.append((idx[order], val[order]))
        user_items = self._stack(histories, slot.n_items)
        excluded = [self._exclusion(slot, p.exclude) for p in plans]
        exclude = (
            self._stack([(e, np.ones(len(e), np.float32)) for e in excluded], slot.n_items)
            if any(len(e) for e in excluded)
            else None
        )
        candidates = None
        mask = plans[0].mask
        if mask is not None:  # only single plans carry a filter
            model_mask = np.zeros(slot.n_items, dtype=bool)
            ok = slot.to_base >= 0
            model_mask[ok] = mask[slot.to_base[ok]]
            candidates = np.flatnonzero(model_mask)
        rows = np.array([p.row for p in plans], dtype=np.int64)
        n = max(p.n for p in plans)
        recalc = plans[0].recalc
        kwargs = {"filter_already_liked": False, "exclude": exclude, "candidates": candidates}
        try:
            ids, scores = slot.model.recommend(rows, user_items, n, recalculate_user=recalc, **kwargs)
        except RecommenderError:
            if not recalc:
                raise
            ids, scores = slot.model.recommend(rows, user_items, n, **kwargs)
        out = []
        for r, plan in enumerate(plans):
            keep = ids[r] != MISSING_ID
            out.append((ids[r][keep][: plan.n], scores[r][keep][: plan.n]))
        return out

    def _session_ranking(
        self,
        slot: RecommenderSlot,
        view: CustomerView,
        n: int,
        mask: np.ndarray | None,
        exclude: set[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Item similarity to the customer's items (strongest first), popularity after them."""
        from nextbest.training.recommenders import top_n

        model = slot.model
        idx, val = slot.to_model(view.items)
        if len(idx) > SESSION_ITEMS:
            keep = np.argsort(-val, kind="stable")[:SESSION_ITEMS]
            idx, val = idx[keep], val[keep]
        scores = np.zeros(slot.n_items, dtype=np.float64)
        if len(idx):
            k = min(slot.n_items - 1, max(50, 5 * n))
            sim_ids, sims = model.similar_items(idx, n=k)
            ok = (sim_ids >= 0) & np.isfinite(sims)
            weights = np.broadcast_to(val[:, None], sim_ids.shape)
            np.add.at(scores, sim_ids[ok], (weights[ok] * sims[ok]).astype(np.float64))
        # Popularity orders the items no history item points to (and breaks ties).
        scores += 1e-6 * model.popularity_scores()
        s = scores.astype(np.float32)[None, :]
        if mask is not None:
            model_mask = np.zeros(slot.n_items, dtype=bool)
            ok = slot.to_base >= 0
            model_mask[ok] = mask[slot.to_base[ok]]
            s[0, ~model_mask] = -np.inf
        excluded = self._exclusion(slot, exclude)
        if len(excluded):
            s[0, excluded] = -np.inf
        ids, vals = top_n(s, n, model.tie_order)
        keep = ids[0] >= 0
        return ids[0][keep], vals[0][keep]

    def _popular(
        self, view: CustomerView, n: int, mask: np.ndarray | None, *, exclude: set[int] | None
    ) -> tuple[list[api.RecommendedItem], str | None]:
        from nextbest.training.recommenders import top_n

        segment, popularity = self._segment(view)
        s = popularity.astype(np.float32).copy()[None, :]
        if mask is not None:
            s[0, ~mask] = -np.inf
        if exclude:
            s[0, np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = -np.inf
        ids, vals = top_n(s, n)
        reason = self._segment_text(segment)
        top = float(popularity.max()) if popularity.size else 0.0
        return [
            api.RecommendedItem(
                item_id=self.data.item_vocab.ids[i],
                score=float(v) / top if top > 0 else 0.0,
                reasons=[reason],
            )
            for i, v in zip(ids[0].tolist(), vals[0].tolist(), strict=True)
            if i >= 0
        ], segment

    # --- /similar_items ---------------------------------------------------------------------------------------

    @_serving
    def similar_items(self, request: api.SimilarItemsRequest) -> api.SimilarItemsResponse:
        """Items like one item: learned similarity, or shared attributes for an item the model has not seen.

        Raises:
            NotFound: the item is in neither the items table nor the events.
        """
        arm = self.arm(request.customer_id) if request.customer_id else CHAMPION
        slot = self._recommender(arm)
        base = self.data.item_vocab.get(request.item_id)
        if base < 0:
            raise NotFound(f"item_id: unknown item {request.item_id!r}")
        mask = self._filter_mask(request.filters)
        target = self.data.item_attributes.item(request.item_id)
        model_index = int(slot.from_base[base])
        vocab = slot.registered.model.history.items
        if model_index >= 0:
            k = slot.n_items - 1 if mask is not None else min(request.n, slot.n_items - 1)
            ids, sims = slot.model.similar_items(model_index, n=max(k, 0))
            pairs = [
                (vocab.ids[i], float(s))
                for i, s in zip(ids.tolist(), sims.tolist(), strict=True)
                if mask is None or (slot.to_base[i] >= 0 and mask[slot.to_base[i]])
            ][: request.n]
            basis = "model"
        else:
            pairs = self._attribute_neighbours(base, target, request.n, mask)
            basis = "attributes"
        items = [
            api.RecommendedItem(
                item_id=i, score=s, reasons=self._shared_attributes(target, self.data.item_attributes.item(i))
            )
            for i, s in pairs
        ]
        return api.SimilarItemsResponse(
            item_id=request.item_id, items=items, basis=basis, model_version=slot.registered.label, arm=arm
        )

    def _attribute_neighbours(
        self, base: int, target: Mapping[str, Any], n: int, mask: np.ndarray | None
    ) -> list[tuple[str, float]]:
        from nextbest.training.recommenders import top_n

        attrs = self.data.item_attributes
        shared = np.zeros(len(attrs), dtype=np.float32)
        for a in SIMILAR_ATTRIBUTES:
            if a in attrs.codes and target.get(a) is not None:
                code = attrs.levels[a].get(target[a])
                if code is not None:
                    shared += attrs.codes[a] == code
        pop = self.data.popularity
        s = (shared + 1e-3 * pop / max(float(pop.max()), 1.0))[None, :]
        s[0, base] = -np.inf
        s[0, shared == 0] = -np.inf
        if mask is not None:
            s[0, ~mask] = -np.inf
        ids, vals = top_n(s, n)
        return [
            (self.data.item_vocab.ids[i], float(v) / len(SIMILAR_ATTRIBUTES))
            for i, v in zip(ids[0].tolist(), vals[0].tolist(), strict=True)
            if i >= 0
        ]

    @staticmethod
    def _shared_attributes(target: Mapping[str, Any], item: Mapping[str, Any]) -> list[str]:
        return [
            f"same {a}: {item[a]}"
            for a in SIMILAR_ATTRIBUTES
            if item.get(a) is not None and item.get(a) == target.get(a)
        ][:3]

    # --- /propensity and /next_best_action ----------------------------------------------------------------------

    def _model_features(self, view: CustomerView) -> dict[str, Any]:
        """What the propensity model sees: the whole profile, or only the segment without personalisation consent."""
        profile = view.profile or {}
        merged = {**{k: v for k, v in (view.demographics or {}).items() if k in DEMOGRAPHICS}, **profile}
        if view.consent[PERSONALISATION]:
            return merged
        segment = {k: merged.get(k) for k in SEGMENT_FEATURES}
        if segment.get("age_band") is None:
            segment["age_band"] = _age_band(merged.get("age"))
        return segment

    @staticmethod
    def _affinities(slot: PropensitySlot, view: CustomerView) -> dict[str, float] | None:
        """The customer's customer–action affinities from their interaction row (dataset and live events), as
        the propensity model was trained to read them; None (missing) when the model reads none, or without the
        consent to personalise and profile (training rows only see profiling-consented events)."""
        if slot.affinity_items is None or not view.items:
            return None
        if not (view.consent[PERSONALISATION] and view.consent[PROFILING]):
            return None
        base = np.fromiter(view.items.keys(), dtype=np.int64, count=len(view.items))
        weights = np.fromiter(view.items.values(), dtype=np.float64, count=len(view.items))
        return slot.scorer.affinity.score_indexed(slot.affinity_items[base], weights)

    @_serving
    def propensity(self, request: api.PropensityRequest) -> api.PropensityResponse:
        """Calibrated response probabilities of actions for a customer.

        Raises:
            BadRequest: an action id the model does not know.
        """
        cid = request.customer_id
        self._check_channel(request.channel)
        arm = self.arm(cid)
        slot = self._propensity(arm)
        if request.action_ids is not None:
            unknown = [a for a in request.action_ids if a not in slot.action_ids]
            if unknown:
                raise BadRequest(
                    f"action_ids: unknown action(s) {', '.join(map(repr, unknown[:10]))}; known: "
                    + ", ".join(sorted(slot.action_ids))
                )
        now = self._request_time(request.context)
        view = self._view(cid)
        with _one_torch_thread():
            scores = slot.scorer.score(
                self._model_features(view),
                request.action_ids,
                request.channel,
                now=now,
                affinities=self._affinities(slot, view),
            )
        return api.PropensityResponse(
            customer_id=cid,
            propensities=[api.ActionPropensity(action_id=a, propensity=float(p)) for a, p in scores.items()],
            personalised=view.consent[PERSONALISATION],
            model_version=slot.registered.label,
            arm=arm,
        )

    def _rule_profile(self, view: CustomerView, now: datetime) -> dict[str, Any]:
        profile: dict[str, Any] = {CUSTOMER_ID: view.customer_id}
        profile.update({k: v for k, v in (view.demographics or {}).items() if k in DEMOGRAPHICS})
        profile.update(view.profile or {})
        since = _epoch_seconds(now - timedelta(days=self.config.bought_days))
        recent = [self.data.item_vocab.ids[i] for i, t in view.purchased_at.items() if t >= since]
        for a in self._bought_attributes:
            values = {self.data.item_attributes.item(i).get(a) for i in recent}
            profile[f"bought_{a}"] = sorted(v for v in values if v is not None)
        return profile

    @_serving
    def next_best_action(self, request: api.NextBestActionRequest) -> api.NextBestActionResponse:
        """The best actions now by P × V × L; records the chosen action as a contact and logs the decision.

        Raises:
            BadRequest: ``context.now`` is not a date-time.
        """
        answer = self.next_best_action_many([request])[0]
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    @_serving
    def next_best_action_many(
        self, requests: Sequence[api.NextBestActionRequest]
    ) -> list[api.NextBestActionResponse | ServiceError]:
        """Decide for several requests at once: one forward pass of each propensity model for all of them,
        then arbitration, contact and decision log per request, in order."""
        started = time.perf_counter()
        out: list[api.NextBestActionResponse | ServiceError | None] = [None] * len(requests)
        plans: list[_DecisionPlan] = []
        for k, request in enumerate(requests):
            try:
                self._check_channel(request.channel)
                now = self._request_time(request.context)
            except ServiceError as e:
                out[k] = e
                continue
            arm = self.arm(request.customer_id)
            pslot = self._propensity(arm)
            view = self._view(request.customer_id)
            wanted = [a for a in self.policy.actions if a in pslot.action_ids]
            rows = (
                pslot.scorer.encoder.encode_one(
                    self._model_features(view),
                    wanted,
                    request.channel,
                    now,
                    affinities=self._affinities(pslot, view),
                )
                if wanted
                else None
            )
            plans.append(_DecisionPlan(k, request, arm, pslot, now, view, wanted, rows))
        self._score_plans(plans)
        for plan in plans:
            out[plan.position] = self._decide(plan, started)
        return [o for o in out if o is not None]

    @staticmethod
    def _score_plans(plans: Sequence[_DecisionPlan]) -> None:
        """Calibrated propensities of every plan: one forward pass per propensity model."""
        import torch

        groups: dict[int, list[_DecisionPlan]] = {}
        for plan in plans:
            if plan.rows is not None:
                groups.setdefault(id(plan.pslot), []).append(plan)
        for group in groups.values():
            model = group[0].pslot.scorer.model
            categorical = np.concatenate([p.rows.categorical for p in group])
            numeric = np.concatenate([p.rows.numeric for p in group])
            with _one_torch_thread(), torch.inference_mode():
                z = model.net(torch.from_numpy(categorical), torch.from_numpy(numeric)).numpy()
            probabilities = model.calibration.apply(z)
            offset = 0
            for plan in group:
                n = len(plan.wanted)
                plan.scores = dict(zip(plan.wanted, probabilities[offset : offset + n].tolist(), strict=True))
                offset += n

    def _decide(self, plan: _DecisionPlan, started: float) -> api.NextBestActionResponse:
        request, view, now = plan.request, plan.view, plan.now
        cid = request.customer_id
        candidates = [ActionCandidate(a, min(max(float(p), 0.0), 1.0)) for a, p in plan.scores.items()]
        context = {**request.context, CHANNEL: request.channel, "now": now}
        consent = {PERSONALISATION: view.consent[PERSONALISATION], MARKETING: view.consent[MARKETING]}
        versions = {
            "recommender": self._recommender(plan.arm).registered.label,
            "propensity": plan.pslot.registered.label,
        }

        # The id comes first: it seeds the decision's exploration draw, so the decision can be replayed.
        decision_id = new_decision_id()
        exploration = self.policy.exploration

        def decide(may_explore: bool) -> Decision:
            ranked = arbitrate(
                candidates,
                self.policy,
                self._rule_profile(view, now),
                context,
                consent,
                self.ledger,
                request.n,
                levers=self.levers.levers,
                customer_id=cid,
                now=now,
            )
            return explore(ranked, exploration, decision_id, request.n, may_explore=may_explore)

        def within_budget(tx: Any) -> bool:
            if not exploration.active or not exploration.budgeted:
                return exploration.active
            day = datetime(now.year, now.month, now.day)
            decided, explored = self.store.exploration_counts(day, day + timedelta(days=1), connection=tx)
            return exploration.may_explore(decided, explored)

        def logged(decision: Decision) -> DecisionRecord:
            return DecisionRecord.from_decision(
                decision,
                arm=plan.arm,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                model_versions=versions,
                decision_id=decision_id,
                timestamp=now,
            )

        recorded = False
        # A preview (record_contact false) is not a decision: neither a contact nor a line of the decision log.
        # Nothing at all is stored about an erased id. A decision that counts is made in a transaction that no
        # other replica deciding for the customer can enter: the contact limits hold across replicas.
        with self._lock:
            if request.record_contact and not self._is_erased(cid):
                try:
                    with self.store.deciding(cid) as tx:
                        self.ledger.refresh(cid, connection=tx)
                        decision = decide(within_budget(tx))
                        chosen = decision.chosen
                        if chosen is not None and not decision.is_no_action:
                            self.ledger.record_contact(
                                cid, chosen.action_id, chosen.delivery_channel, now, connection=tx
                            )
                            recorded = True
                        record = logged(decision)
                        self.decision_log.append(record, connection=tx)
                except Exception:
                    self.ledger.refresh(cid)  # the transaction was rolled back: so is the contact in memory
                    raise
            else:
                decision = decide(False)  # a preview never explores
                record = logged(decision)
        return api.NextBestActionResponse(
            decision_id=record.decision_id,
            customer_id=cid,
            channel=request.channel,
            actions=decision.actions,
            no_action=decision.is_no_action,
            personalised=decision.personalised,
            policy_version=decision.policy_version,
            model_versions=versions,
            arm=plan.arm,
            contact_recorded=recorded,
            filtered=decision.filtered if request.explain else [],
            explored=decision.explored,
            probability=decision.probability,
        )

    # --- /events ----------------------------------------------------------------------------------------------

    @_serving
    def events(self, request: api.EventsRequest) -> api.EventsResponse:
        """Store events and offer responses durably, then apply them to the live state at once.

        A retry is safe: entries whose ``event_id`` was stored before are acknowledged and not stored again.
        Responses are stored in the responses table (one transaction for all of them); accepted, converted and
        dismissed ones also go to the contact ledger. A response naming a ``decision_id`` is checked against the
        decision log (:func:`~serving.decision_log.check_responses`) before anything of the request is stored.

        Raises:
            BadRequest: an invalid event or response (named by position and field): a time more than
                :data:`FUTURE_TOLERANCE` ahead or before the retention window, a channel or an action not in
                the policy, a response about another customer than its decision's or an action the decision
                did not offer. Nothing of the request is stored.
            NotFound: a response names a decision the log does not hold (nothing of the request is stored).
            Conflict: a second response of one kind for one decision and action (nothing of the request is
                stored, unless another request stored the same response at the same moment: then the events
                are stored, and a retry acknowledges them).
            Gone: an entry is about an erased customer (nothing of the request is stored).
        """
        now = self.now()
        earliest, latest = self.retention_start(), now + FUTURE_TOLERANCE
        rows = []
        for k, e in enumerate(request.events):
            row = e.model_dump(exclude_none=True)
            row[TIMESTAMP_COL] = self._entry_time(
                e.timestamp, now, earliest, latest, f"events[{k}].timestamp"
            )
            rows.append(row)
        responses = []
        for k, r in enumerate(request.responses):
            if r.action_id not in self.policy.actions:
                raise BadRequest(
                    f"responses[{k}].action_id: unknown action {r.action_id!r}; known: "
                    + ", ".join(sorted(self.policy.actions))
                )
            self._check_channel(r.channel, f"responses[{k}].channel")
            responses.append(
                (r, self._entry_time(r.timestamp, now, earliest, latest, f"responses[{k}].timestamp"))
            )
        with self._lock:
            for what, entries in (("events", request.events), ("responses", request.responses)):
                for k, entry in enumerate(entries):
                    if self._is_erased(entry.customer_id):
                        raise Gone(
                            f"{what}[{k}].customer_id: this customer was erased; the service stores nothing more "
                            "about the id (nothing of this request was stored)"
                        )
            answers = [
                {
                    "response_id": r.event_id or new_decision_id(),
                    "decision_id": r.decision_id,
                    "customer_id": r.customer_id,
                    "action_id": r.action_id,
                    "kind": r.response_kind,
                    "value": r.value,
                    "timestamp": at,
                    "channel": r.channel,
                }
                for r, at in responses
            ]
            named = [a["decision_id"] for a in answers if a["decision_id"] is not None]
            decided = {
                d: DecisionRecord.model_validate(v) for d, v in self.store.decisions_by_id(named).items()
            }
            known = self.store.known_response_ids([r.event_id for r, _ in responses if r.event_id])
            try:
                keep = check_responses(answers, decided, self.store.response_kinds(named), known)
            except UnknownDecision as e:
                raise NotFound(f"{e} (nothing of this request was stored)") from None
            except ResponseMismatch as e:
                raise BadRequest(f"{e} (nothing of this request was stored)") from None
            except RepeatedResponse as e:
                raise Conflict(f"{e} (nothing of this request was stored)") from None
            accepted, duplicates = pl.DataFrame(), len(answers) - len(keep)
            if rows:
                try:
                    accepted, repeated = self.event_log.append(rows)
                    duplicates += repeated
                except EventRejected as e:
                    raise BadRequest("; ".join(e.reasons)) from None
                except StateStoreError as e:
                    raise NotReady(f"the state store cannot take the events now: {e}") from None
            stored = 0
            touched = {answers[k]["customer_id"] for k in keep}
            try:
                with self.store.transaction() if keep else nullcontext() as tx:
                    for k in keep:
                        answer, event_id = answers[k], responses[k][0].event_id
                        if not self.store.add_response(answer, connection=tx):
                            duplicates += 1  # the same response, stored by another request a moment ago
                            continue
                        stored += 1
                        if answer["kind"] != "shown":
                            self.ledger.record_response(
                                answer["customer_id"],
                                answer["action_id"],
                                answer["kind"] != "dismissed",
                                answer["timestamp"],
                                channel=answer["channel"],
                                event_id=event_id,
                                connection=tx,
                            )
            except Exception as e:
                for customer_id in touched:  # rolled back: so are the ledger's entries in memory
                    self.ledger.refresh(customer_id)
                if isinstance(e, ResponseConflict):
                    raise Conflict(str(e)) from None
                raise
        # Applied through the change feed, in commit order with every other replica's events: the next answer
        # reflects them.
        self.sync()
        changed = set(accepted[CUSTOMER_ID].to_list()) if accepted.height else set()
        # A profile takes tens of milliseconds to rebuild: a background thread does it, and an answer about the
        # customer that comes first rebuilds it itself (the profile is marked stale), so it always reflects them.
        self._stale(changed)
        customers = sorted(changed | {r.customer_id for r in request.responses})
        return api.EventsResponse(
            accepted=accepted.height, responses=stored, duplicates=duplicates, customers=customers
        )

    @staticmethod
    def _entry_time(
        at: datetime | None, now: datetime, earliest: datetime, latest: datetime, where: str
    ) -> datetime:
        """An event's or response's time as naive UTC (``now`` when not given), within the accepted bounds."""
        if at is None:
            return now
        at = naive_utc(at)
        if at > latest:
            raise BadRequest(
                f"{where}: {at.isoformat()} is more than {FUTURE_TOLERANCE} ahead of the service's clock "
                f"({now.isoformat(timespec='seconds')})"
            )
        if at < earliest:
            raise BadRequest(
                f"{where}: {at.isoformat()} is before the retention window, which starts "
                f"{earliest.isoformat(timespec='seconds')}"
            )
        return at

    def _apply_events(self, frame: pl.DataFrame) -> set[str]:
        """Add accepted events to the live state (rows, strongest event, purchases); marks profiles stale."""
        if frame.is_empty():
            return set()
        weights = self.data.feature_config.interactions.weights
        vocab = self.data.item_vocab
        changed: set[str] = set()
        with self._lock:
            for row in frame.select([c for c in EVENT_COLUMNS if c in frame.columns]).iter_rows(named=True):
                cid = row[CUSTOMER_ID]
                live = self._live.get(cid)
                if live is None:
                    live = self._live[cid] = LiveCustomer()
                live.events.append(row)
                live.dirty = True
                live.version += 1
                changed.add(cid)
                i = vocab.get(row[ITEM_ID])
                if i < 0:
                    continue  # an item the catalogue does not have: kept for the profile, not for the models
                w = float(weights.get(row[EVENT_TYPE], 0.0))
                if w > 0:
                    live.weights[i] = live.weights.get(i, 0.0) + w
                rank = EVENT_RANK.get(row[EVENT_TYPE], 1)
                live.strongest[i] = max(live.strongest.get(i, 0), rank)
                if row[EVENT_TYPE] == PURCHASE:
                    live.purchased_at[i] = max(
                        live.purchased_at.get(i, 0.0), _epoch_seconds(row[TIMESTAMP_COL])
                    )
        return changed

    @_serving
    def _refresh(self, customer_id: str) -> None:
        """Recompute the customer's profile and activity features from their dataset and live events."""
        from nextbest.training.propensity_data import customer_activity

        with self._lock:
            live = self._live.get(customer_id)
            if live is None:
                return
            version = live.version
            live_events = list(live.events)
            erased = self._is_erased(customer_id)
        consent, _ = self._consent(customer_id)
        row: dict[str, Any] | None = None
        if consent[PROFILING]:
            data = self.data
            base = data.customer_events(customer_id) if not erased else data.events.clear()
            fresh = pl.DataFrame(
                [{c: e.get(c) for c in EVENT_COLUMNS} for e in live_events],
                schema={c: data.events.schema[c] for c in EVENT_COLUMNS},
            )
            events = pl.concat([base, fresh]).sort(TIMESTAMP_COL, maintain_order=True)
            as_of = max(data.as_of, events[TIMESTAMP_COL].max())
            customer = data.customers.frame_of(customer_id) if not erased else data.customers.frame.clear()
            try:
                profile = build_profiles(
                    events.lazy(),
                    data.items.lazy(),
                    customer.lazy(),
                    as_of=as_of,
                    config=data.feature_config.profiles,
                    value_thresholds=data.value_thresholds,
                ).collect()
                activity = customer_activity(
                    events,
                    data.items.lazy(),
                    as_of=as_of + timedelta(microseconds=1),
                    channels=data.channels,
                    reference=data.item_references,
                )
                row = profile.row(0, named=True) if profile.height else {CUSTOMER_ID: customer_id}
                if activity.height:
                    row.update(activity.row(0, named=True))
            except Exception:
                # A live profile must never break serving: the dataset's profile stays in use.
                logger.exception("cannot recompute the live profile of a customer")
        with self._lock:
            if self._live.get(customer_id) is live and live.version == version:
                live.profile = row
                live.dirty = False

    # --- /profile ---------------------------------------------------------------------------------------------

    @_serving
    def profile(self, request: api.CustomerRequest) -> api.ProfileResponse:
        """Everything stored and derived about a customer (GDPR access)."""
        cid = request.customer_id
        view = self._view(cid, with_events=True)
        vocab = self.data.item_vocab
        held = self.data.customer_events(cid) if not self._is_erased(cid) else self.data.events.clear()
        decisions = [r.model_dump(mode="json") for r in self.decision_log.records_of(cid)]
        responses = [_json_row(r) or {} for r in self.store.responses_of(cid)]
        return api.ProfileResponse(
            customer_id=cid,
            known=view.known,
            consent=view.recorded_consent,
            consent_effective=view.consent,
            demographics=_json_row(view.demographics),
            profile=_json_row(view.profile),
            live_profile=view.live_profile,
            interactions=[
                {ITEM_ID: vocab.ids[i], "weight": float(w)}
                for i, w in sorted(view.items.items(), key=lambda kv: -kv[1])
            ],
            purchases=sorted(vocab.ids[i] for i in view.purchased_at),
            events=[_json_row(r) or {} for r in held.iter_rows(named=True)],
            live_events=[_json_row(r) or {} for r in view.live_events],
            contacts=self.ledger.entries(cid),
            decisions=decisions,
            responses=responses,
            arm=self.arm(cid),
        )

    # --- admin: /forget and /levers -----------------------------------------------------------------------------

    def check_admin(self, authorization: str | None) -> None:
        """Check an ``Authorization: Bearer <token>`` header against the admin token.

        Raises:
            Forbidden: no admin token is configured (admin endpoints are disabled).
            Unauthorized: the header is missing or the token is wrong.
        """
        token = self.config.admin_token
        if not token:
            raise Forbidden("admin endpoints are disabled: set NEXTBEST_ADMIN_TOKEN to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized(
                "missing or wrong admin token: send 'Authorization: Bearer <NEXTBEST_ADMIN_TOKEN>'"
            )

    @_serving
    def forget(self, request: api.CustomerRequest, authorization: str | None) -> api.ForgetResponse:
        """Erase a customer everywhere: at once from the live state, the event log, the contact ledger, the
        decision log and the responses, under their id, every id linked to it and those ids' unlinked forms; the erasure is logged
        by keyed digest, so that nothing more is stored about any of the ids (before or after a restart); and
        the dataset's erasure is queued (:class:`~serving.erasure_queue.ErasureQueue`)."""
        self.check_admin(authorization)
        cid = request.customer_id
        ds = self.data.dataset
        ids = erasure_ids(ds.scan("identities", required=False), cid)
        with self._lock:
            live = [self._live.pop(i, None) is not None for i in ids]
            for i in ids:
                self.data.drop_customer(i)
                self.ledger.forget(i)
            logged = log_erasure(ds, ids)
            assert logged.key is not None
            self._erased.update(ids)
            removed = self.store.forget(ids, [id_digest(i, logged.key) for i in ids])
            self._erasures = self._known_erasures()
            queued = self.erasures.submit(cid)
        logger.info(
            "erased a customer (%d id(s)) on request; dataset erasure %s queued", len(ids), queued.erasure_id
        )
        return api.ForgetResponse(
            customer_id=cid,
            ids_erased=len(ids),
            live_state=any(live),
            events_removed=removed["events"],
            contacts_removed=removed["contacts"],
            decisions_removed=removed["decisions"],
            responses_removed=removed["responses"],
            erasure_log=str(ds.root / ERASURE_LOG),
            erasure_id=queued.erasure_id,
            dataset=queued.state,
        )

    def erasure_status(self, request: api.ErasureRequest, authorization: str | None) -> api.ErasureStatus:
        """The state of a dataset erasure that :meth:`forget` queued.

        Raises:
            NotFound: no erasure has that id (or its state fell out of the retention window).
        """
        self.check_admin(authorization)
        status = self.erasures.status(request.erasure_id)
        if status is None:
            raise NotFound(f"erasure_id: no erasure {request.erasure_id!r}")
        return status

    def _not_folded(self, rows: list[dict[str, Any]], data: ServingData) -> list[dict[str, Any]]:
        """Stored events less those ``nextbest retrain`` folded into the dataset before its features were built:
        the features count them already, and replaying them as live events would count them twice."""
        try:
            watermark = features_watermark(
                data.dataset, store_key(self.store.url), data.manifest.get("built_at")
            )
        except FoldError as exc:
            logger.warning("cannot read what retrain folded (%s): replaying every stored event", exc)
            return rows
        if not watermark:
            return rows
        folded = self.store.events_through(watermark)
        kept = [r for r in rows if r.get("seq") not in folded]
        logger.info(
            "%d stored events are in the features already (folded by retrain): not replayed",
            len(rows) - len(kept),
        )
        return kept

    def _forget_logged_erasures(self, live_ids: set[str]) -> set[str]:
        """Hide customers whose erasure was logged (by the service, another replica or ``nextbest forget``) and
        purge them from the state store, so a restart never brings an erased customer back."""
        if not self._erasures:
            return set()
        candidates = (
            self.data.all_customer_ids()
            | live_ids
            | set(self.decision_log.customers())
            | set(self.ledger.customers())
        )
        erased = {c for c in candidates if c in self._erasures}
        for c in erased:
            self.data.drop_customer(c)
            self.ledger.forget(c)
        if erased and self._erasures.key is not None:
            self.store.forget(sorted(erased), [id_digest(c, self._erasures.key) for c in erased])
        elif erased:
            self.store.forget(sorted(erased), [])
        self._erased |= erased
        return erased

    def levers_request(self, request: api.LeversRequest, authorization: str | None) -> api.LeversResponse:
        """Read the levers, or change one (logged with who and when, persisted across restarts)."""
        self.check_admin(authorization)
        changed = None
        if request.action_id is not None and request.lever is not None:
            try:
                changed = self.levers.set_lever(request.action_id, request.lever, request.actor)
            except PolicyError as e:
                raise BadRequest(f"action_id: {' '.join(str(e).split())}") from None
            logger.info(
                "lever of %s changed from %g to %g by %s",
                changed.action_id,
                changed.old,
                changed.new,
                changed.actor,
            )
        return api.LeversResponse(
            policy_version=self.policy.version,
            levers=self.levers.levers,
            changed=changed,
            history=self.levers.history,
        )

    # --- introspection --------------------------------------------------------------------------------------

    def live_customers(self) -> list[str]:
        """Customers with live state (events received by the service)."""
        with self._lock:
            return sorted(self._live)
