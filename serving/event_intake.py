"""``/events``' write path: events and offer responses checked (times, actions, channels, erased ids, the decision
each response names) and stored durably, all or nothing; the live state learns them from the store's change feed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from nextbest.features.schema import TIMESTAMP_COL
from nextbest.serving import api
from nextbest.serving.contact import ContactLedger, naive_utc
from nextbest.serving.decision_log import (
    DecisionRecord,
    RepeatedResponse,
    ResponseMismatch,
    UnknownDecision,
    check_responses,
    new_decision_id,
)
from nextbest.serving.engine_config import BadRequest, Conflict, Gone, NotFound, NotReady
from nextbest.serving.event_log import EventLog, EventRejected
from nextbest.serving.policy import ActionPolicy
from nextbest.serving.state_store import ResponseConflict, StateStore, StateStoreError

FUTURE_TOLERANCE = timedelta(days=1)
"""How far ahead of the service's clock an event or response may be dated (clients' clocks drift, and some send
local time as UTC); later ones are refused. The earliest date taken is the start of the retention window
(:meth:`Engine.retention_start <serving.engine.Engine.retention_start>`): older events would be dropped by the
next feature build."""


def entry_time(
    at: datetime | None, now: datetime, earliest: datetime, latest: datetime, where: str
) -> datetime:
    """An event's or response's time as naive UTC (``now`` when not given), within the accepted bounds.

    Raises:
        BadRequest: the time is after ``latest`` or before ``earliest`` (``where`` names the field).
    """
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


@dataclass(frozen=True)
class EventIntake:
    """Checks and stores an ``/events`` request. Thread-safe.

    Attributes:
        policy: the action policy (the actions a response may name).
        store: the state store (decisions, responses).
        event_log: the durable event log.
        ledger: the contact ledger (accepted, converted and dismissed responses).
        lock: the engine's lock, held while storing.
        is_erased: whether an id was erased (nothing more is stored about it).
        response_id: draws the id of a response sent without one (the engine passes its module's
            ``new_decision_id``, which a seeded run replaces).
    """

    policy: ActionPolicy
    store: StateStore
    event_log: EventLog
    ledger: ContactLedger
    lock: threading.RLock
    is_erased: Callable[[str], bool]
    response_id: Callable[[], str] = new_decision_id

    def store_request(
        self,
        request: api.EventsRequest,
        *,
        now: datetime,
        earliest: datetime,
        check_channel: Callable[[str | None, str], None],
    ) -> tuple[pl.DataFrame, int, int]:
        """Check the request's events and responses and store them, all or nothing.

        Args:
            request: the request.
            now: the service's clock (the time of an entry without one).
            earliest: the start of the retention window (no entry may be older).
            check_channel: raises :class:`BadRequest` for a channel the service does not know.

        Returns:
            the accepted events, how many responses were stored, and how many entries were stored before.

        Raises:
            ServiceError: see :meth:`Engine.events <serving.engine.Engine.events>`.
        """
        latest = now + FUTURE_TOLERANCE
        rows = []
        for k, e in enumerate(request.events):
            row = e.model_dump(exclude_none=True)
            row[TIMESTAMP_COL] = entry_time(e.timestamp, now, earliest, latest, f"events[{k}].timestamp")
            rows.append(row)
        responses = []
        for k, r in enumerate(request.responses):
            if r.action_id not in self.policy.actions:
                raise BadRequest(
                    f"responses[{k}].action_id: unknown action {r.action_id!r}; known: "
                    + ", ".join(sorted(self.policy.actions))
                )
            check_channel(r.channel, f"responses[{k}].channel")
            responses.append((r, entry_time(r.timestamp, now, earliest, latest, f"responses[{k}].timestamp")))
        with self.lock:
            for what, entries in (("events", request.events), ("responses", request.responses)):
                for k, entry in enumerate(entries):
                    if self.is_erased(entry.customer_id):
                        raise Gone(
                            f"{what}[{k}].customer_id: this customer was erased; the service stores nothing more "
                            "about the id (nothing of this request was stored)"
                        )
            answers = [
                {
                    "response_id": r.event_id or self.response_id(),
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
        return accepted, stored, duplicates
