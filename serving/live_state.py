"""What this process learned since its dataset was built: each customer's events received through ``/events``
(interaction weights, strongest events, purchases, a rebuilt profile) and the ids it found erased.

The events come from the state store's change feed (or its replay at start-up); a live profile is rebuilt with the
same :func:`~features.profiles.build_profiles` the pipeline uses, by a background thread or by the first answer
that needs it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import polars as pl

from nextbest.features.live_fold import FoldError, features_watermark
from nextbest.features.privacy import ErasedIds
from nextbest.features.profiles import build_profiles
from nextbest.features.schema import CUSTOMER_ID, EVENT_TYPE, ITEM_ID, TIMESTAMP_COL
from nextbest.serving.serving_data import EVENT_RANK, PROFILING, PURCHASE, ServingData, epoch_seconds
from nextbest.serving.state_store import EVENT_COLUMNS, StateStore, store_key

logger = logging.getLogger("nextbest.serving")


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


def not_folded(rows: list[dict[str, Any]], data: ServingData, store: StateStore) -> list[dict[str, Any]]:
    """Stored events less those ``nextbest retrain`` folded into the dataset before its features were built:
    the features count them already, and replaying them as live events would count them twice."""
    try:
        watermark = features_watermark(data.dataset, store_key(store.url), data.manifest.get("built_at"))
    except FoldError as exc:
        logger.warning("cannot read what retrain folded (%s): replaying every stored event", exc)
        return rows
    if not watermark:
        return rows
    folded = store.events_through(watermark)
    kept = [r for r in rows if r.get("seq") not in folded]
    logger.info(
        "%d stored events are in the features already (folded by retrain): not replayed",
        len(rows) - len(kept),
    )
    return kept


class LiveState:
    """The live customers, the erased ids and the queue of profiles to rebuild. Thread-safe.

    Args:
        lock: the engine's lock, which guards the live customers (and, in the engine, the ledger and the store's
            writes that go with them).
        erasures: the erasures known at start (:func:`~serving.erasure_purge.known_erasures`).
    """

    def __init__(self, lock: threading.RLock, erasures: ErasedIds) -> None:
        self.lock = lock
        self.customers: dict[str, LiveCustomer] = {}
        self.erased: set[str] = set()
        """Ids found erased in this process (a cache in front of :attr:`erasures`)."""
        self.erasures = erasures
        self._refreshing: set[str] = set()
        self._refresh_wake = threading.Condition()

    def is_erased(self, customer_id: str) -> bool:
        if customer_id in self.erased:
            return True
        if customer_id in self.erasures:
            self.erased.add(customer_id)
            return True
        return False

    def forget(self, ids: Iterable[str]) -> list[bool]:
        """Drop the live state of these ids (an erasure); whether each had any."""
        with self.lock:
            return [self.customers.pop(i, None) is not None for i in ids]

    def drop_erased(self) -> None:
        """Drop the live state of every id :attr:`erasures` holds (another replica erased someone)."""
        with self.lock:
            for customer_id in [c for c in self.customers if c in self.erasures]:
                del self.customers[customer_id]
                self.erased.add(customer_id)

    def apply(self, frame: pl.DataFrame, data: ServingData) -> set[str]:
        """Add stored events to the live state (rows, strongest event, purchases) and mark the profiles stale;
        the events of erased ids are left out. Returns the customers whose live state changed."""
        if frame.is_empty():
            return set()
        gone = [c for c in frame[CUSTOMER_ID].unique().to_list() if self.is_erased(c)]
        if gone:
            frame = frame.filter(~pl.col(CUSTOMER_ID).is_in(gone))
        weights = data.feature_config.interactions.weights
        vocab = data.item_vocab
        changed: set[str] = set()
        with self.lock:
            for row in frame.select([c for c in EVENT_COLUMNS if c in frame.columns]).iter_rows(named=True):
                cid = row[CUSTOMER_ID]
                live = self.customers.get(cid)
                if live is None:
                    live = self.customers[cid] = LiveCustomer()
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
                        live.purchased_at.get(i, 0.0), epoch_seconds(row[TIMESTAMP_COL])
                    )
        return changed

    def rebuild_profile(self, customer_id: str, data: ServingData) -> None:
        """Recompute the customer's profile and activity features from their dataset and live events."""
        from nextbest.training.propensity_data import customer_activity

        with self.lock:
            live = self.customers.get(customer_id)
            if live is None:
                return
            version = live.version
            live_events = list(live.events)
            erased = self.is_erased(customer_id)
        consent, _ = data.effective_consent(customer_id, erased=self.is_erased(customer_id))
        row: dict[str, Any] | None = None
        if consent[PROFILING]:
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
        with self.lock:
            if self.customers.get(customer_id) is live and live.version == version:
                live.profile = row
                live.dirty = False

    def mark_stale(self, customers: Iterable[str]) -> None:
        """Have the background thread rebuild these customers' live profiles."""
        with self._refresh_wake:
            self._refreshing.update(customers)
            self._refresh_wake.notify()

    def refresh_stale(self, stop: threading.Event, refresh: Callable[[str], None]) -> None:
        """The background thread: ``refresh`` every customer marked stale, until ``stop`` is set."""
        while not stop.is_set():
            with self._refresh_wake:
                while not self._refreshing and not stop.is_set():
                    self._refresh_wake.wait(0.5)
                batch, self._refreshing = self._refreshing, set()
            for customer_id in batch:
                try:
                    refresh(customer_id)
                except Exception:  # a live profile must never stop the service: the next read tries again
                    logger.exception("cannot rebuild a live profile")

    def wake(self) -> None:
        """Wake the background thread (to see that it should stop)."""
        with self._refresh_wake:
            self._refresh_wake.notify_all()
