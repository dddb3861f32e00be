"""Erased ids made to disappear from what this process and the state store hold — the live state, the dataset's
side, the contact ledger and the logs — on an erasure request, at start-up, and when another replica erased
someone (:class:`Purge`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nextbest.features.dataset import Dataset
from nextbest.features.privacy import (
    ERASURE_KEY_FILE_ENV,
    ErasedIds,
    erased_digests,
    erasure_key,
    id_digest,
    log_erasure,
)
from nextbest.serving.contact import ContactLedger
from nextbest.serving.decision_log import DecisionLog
from nextbest.serving.engine_config import EngineLoadError
from nextbest.serving.live_state import LiveState
from nextbest.serving.serving_data import ServingData
from nextbest.serving.state_store import StateStore


def known_erasures(dataset: Dataset, store: StateStore) -> ErasedIds:
    """The erasures of the dataset's log and of the state store (another replica's, too).

    Raises:
        EngineLoadError: the store records keyed digests but this process has no erasure key.
    """
    logged = erased_digests(dataset)
    stored = store.erased_digests()
    if stored and logged.key is None:
        key = erasure_key(create=False)
        if key is None:
            raise EngineLoadError(
                f"the state store records erasures by keyed digest but no erasure key was found: set "
                f"{ERASURE_KEY_FILE_ENV} to the key the other replicas use"
            )
        logged = ErasedIds(logged.keyed, logged.legacy, key)
    return ErasedIds(logged.keyed | stored, logged.legacy, logged.key)


@dataclass(frozen=True)
class Purge:
    """Drops erased ids from the live state (which also keeps the erased ids), the ledger and the store."""

    live: LiveState
    ledger: ContactLedger
    decision_log: DecisionLog
    store: StateStore

    def erase(self, data: ServingData, ids: Sequence[str]) -> tuple[bool, dict[str, int]]:
        """Erase these ids (a customer and the ids linked to it) now, and log the erasure by keyed digest so
        that nothing more is stored about them; call it holding the engine's lock.

        Returns:
            whether any of them had live state, and how many entries the store lost per table.
        """
        ds = data.dataset
        live = self.live.forget(ids)
        for i in ids:
            data.drop_customer(i)
            self.ledger.forget(i)
        logged = log_erasure(ds, ids)
        assert logged.key is not None
        self.live.erased.update(ids)
        removed = self.store.forget(ids, [id_digest(i, logged.key) for i in ids])
        self.live.erasures = known_erasures(ds, self.store)
        return any(live), removed

    def logged(self, data: ServingData, live_ids: set[str]) -> set[str]:
        """Hide customers whose erasure was logged (by the service, another replica or ``nextbest forget``) and
        purge them from the state store, so a restart never brings an erased customer back."""
        erasures = self.live.erasures
        if not erasures:
            return set()
        candidates = (
            data.all_customer_ids()
            | live_ids
            | set(self.decision_log.customers())
            | set(self.ledger.customers())
        )
        erased = {c for c in candidates if c in erasures}
        for c in erased:
            data.drop_customer(c)
            self.ledger.forget(c)
        if erased and erasures.key is not None:
            self.store.forget(sorted(erased), [id_digest(c, erasures.key) for c in erased])
        elif erased:
            self.store.forget(sorted(erased), [])
        self.live.erased |= erased
        return erased

    def reported(self, data: ServingData) -> None:
        """Another replica erased someone: drop what this process holds about any erased id."""
        live = self.live
        live.erasures = known_erasures(data.dataset, self.store)
        with live.lock:
            live.drop_erased()
            for customer_id in [c for c in self.ledger.customers() if c in live.erasures]:
                self.ledger.forget(customer_id)
                live.erased.add(customer_id)
        for customer_id in list(live.erased):
            data.drop_customer(customer_id)
