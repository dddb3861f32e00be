"""Contact-policy state: who was contacted with what, on which channel, and how they responded — durably.

:class:`ContactLedger` answers "may we contact this customer with this action on this channel now?" from the
policy's limits (:class:`~serving.policy.ContactLimits` per action, :class:`~serving.policy.ChannelCap` per
channel):

* **cap per action**: at most K contacts with the action on the channel in the last ``period_days``;
* **cap per channel**: at most K contacts with any action on the channel in the last ``period_days``;
* **suppression**: after R rejections of an action in a row (an acceptance resets the count) the action is
  suppressed for D days from the R-th rejection; when that ends the count starts again from zero.

Every contact and response is stored in the state store (:mod:`serving.state_store`) before the call returns, so
a restart (or another replica) reads the same state. :func:`offer_responses` reads the recorded responses back
as a table (from the store, or from a JSON-lines export of the ledger) for reports and the dashboard.
Timestamps are naive UTC, like every timestamp in the data contract.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel
from sqlalchemy.engine import Connection

from nextbest.features.schema import ACTION_ID, CUSTOMER_ID, RESPONDED, TIMESTAMP_COL, parse_timestamp
from nextbest.serving.jsonl import read_lines
from nextbest.serving.policy import ActionPolicy
from nextbest.serving.state_store import StateStore
from nextbest.serving.times import UtcDateTime, naive_utc


class ContactEntry(BaseModel):
    """One line of the ledger: a contact made, or a response to one."""

    type: Literal["contact", "response"]
    customer_id: str
    action_id: str
    channel: str | None = None
    at: UtcDateTime
    accepted: bool | None = None
    """For responses: accepted (True) or rejected (False)."""
    event_id: str | None = None
    """The client's id of a response: a retry with the same id is not recorded twice."""


def _fmt(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M")


class ContactLedger:
    """Contacts and responses per customer, with the policy's contact limits applied."""

    def __init__(self, store: StateStore | None, policy: ActionPolicy) -> None:
        """Open the ledger.

        Args:
            store: the state store that holds it (its entries are loaded); None keeps it in memory.
            policy: whose contact limits apply (assign :attr:`policy` to switch to a reloaded one).
        """
        self.policy = policy
        self.store = store
        self._lock = threading.RLock()
        self._entries: dict[str, list[ContactEntry]] = defaultdict(list)
        self._event_ids: set[str] = set()
        if store is not None:
            for row in store.all_contacts():
                self._entries[row["customer_id"]].append(ContactEntry.model_validate(row))

    def refresh(self, customer_id: str, connection: Connection | None = None) -> None:
        """Reload one customer's entries from the store (another replica may have added some); inside
        :meth:`StateStore.deciding`, pass its connection so that the read is the one the decision holds."""
        if self.store is None:
            return
        rows = self.store.contacts_of(customer_id, connection=connection)
        with self._lock:
            self._entries[customer_id] = [ContactEntry.model_validate(r) for r in rows]
            if not self._entries[customer_id]:
                del self._entries[customer_id]

    def _add(self, entry: ContactEntry, connection: Connection | None = None) -> ContactEntry | None:
        # One lock over store and memory, so an erasure running beside an append cannot leave either behind.
        with self._lock:
            # Durable first, then visible: a crash in between loses nothing that was acknowledged.
            if self.store is not None:
                if not self.store.add_contact(entry.model_dump(), connection=connection):
                    return None  # its event id was stored already (a retry)
            elif entry.event_id is not None:
                if entry.event_id in self._event_ids:
                    return None
                self._event_ids.add(entry.event_id)
            entries = self._entries[entry.customer_id]
            entries.append(entry)
            if len(entries) > 1 and entries[-2].at > entry.at:
                entries.sort(key=lambda e: e.at)
        return entry

    def record_contact(
        self,
        customer_id: str,
        action_id: str,
        channel: str | None,
        at: datetime,
        connection: Connection | None = None,
    ) -> ContactEntry | None:
        """Record that ``action_id`` was shown to or sent to the customer on ``channel`` at ``at``."""
        return self._add(
            ContactEntry(
                type="contact",
                customer_id=customer_id,
                action_id=action_id,
                channel=channel,
                at=naive_utc(at),
            ),
            connection,
        )

    def record_response(
        self,
        customer_id: str,
        action_id: str,
        accepted: bool,
        at: datetime,
        channel: str | None = None,
        event_id: str | None = None,
        connection: Connection | None = None,
    ) -> ContactEntry | None:
        """Record the customer's response to ``action_id``: accepted, or rejected; None (nothing recorded) when a
        response with the same ``event_id`` is recorded already. With ``connection`` the entry is stored in its
        transaction (the caller refreshes the customer when that transaction rolls back)."""
        return self._add(
            ContactEntry(
                type="response",
                customer_id=customer_id,
                action_id=action_id,
                channel=channel,
                at=naive_utc(at),
                accepted=bool(accepted),
                event_id=event_id,
            ),
            connection,
        )

    def customers(self) -> list[str]:
        """Every customer with an entry."""
        with self._lock:
            return [c for c, entries in self._entries.items() if entries]

    def has_event(self, event_id: str) -> bool:
        """Whether a response with this client event id is recorded already (by any replica)."""
        if self.store is not None:
            return self.store.has_contact_event(event_id)
        with self._lock:
            return event_id in self._event_ids

    def entries(self, customer_id: str) -> list[ContactEntry]:
        """Everything recorded about ``customer_id``, oldest first (for the right of access)."""
        with self._lock:
            return list(self._entries.get(customer_id, ()))

    def suppressed_until(self, customer_id: str, action_id: str) -> tuple[datetime | None, int]:
        """When the latest suppression of ``action_id`` for this customer ends, and the rejections behind it.

        Returns:
            ``(end, rejections)``; ``(None, 0)`` if the action's policy never suppresses or it never triggered.
        """
        limits = self.policy.action(action_id).contact
        if limits is None or limits.max_rejections is None:
            return None, 0
        until: datetime | None = None
        streak = 0
        for e in self.entries(customer_id):
            if e.type != "response" or e.action_id != action_id:
                continue
            if e.accepted:
                streak = 0
            elif until is None or e.at >= until:
                streak += 1
                if streak >= limits.max_rejections:
                    until = e.at + timedelta(days=limits.suppress_days)
                    streak = 0
        return until, (limits.max_rejections if until is not None else 0)

    def allowed(
        self, customer_id: str, action_id: str, channel: str | None, now: datetime
    ) -> tuple[bool, str]:
        """Whether the policy allows contacting the customer with ``action_id`` on ``channel`` at ``now``.

        Returns:
            ``(allowed, reason)``: the reason names the limit that stops the action, or says it is within limits.

        Raises:
            PolicyError: ``action_id`` is not in the policy.
        """
        rule = self.policy.action(action_id)
        if rule.is_no_action:
            return True, "no contact"
        now = naive_utc(now)
        until, rejections = self.suppressed_until(customer_id, action_id)
        if until is not None and now < until:
            return False, f"suppressed until {_fmt(until)} after {rejections} rejections"
        contacts = [e for e in self.entries(customer_id) if e.type == "contact" and e.channel == channel]
        limits = rule.contact
        if limits is not None and limits.max_contacts is not None:
            start = now - timedelta(days=limits.period_days)
            n = sum(1 for e in contacts if e.action_id == action_id and start < e.at <= now)
            if n >= limits.max_contacts:
                return False, (
                    f"contact cap: {n} contacts with {action_id} on {channel} in the last "
                    f"{limits.period_days:g} days (max {limits.max_contacts})"
                )
        cap = self.policy.channel_caps.get(channel) if channel is not None else None
        if cap is not None:
            start = now - timedelta(days=cap.period_days)
            n = sum(1 for e in contacts if start < e.at <= now)
            if n >= cap.max_contacts:
                return False, (
                    f"channel cap: {n} contacts on {channel} in the last {cap.period_days:g} days "
                    f"(max {cap.max_contacts})"
                )
        return True, "within contact limits"

    def forget(self, customer_id: str) -> int:
        """Drop every entry about ``customer_id`` from memory (the store erases its rows:
        :meth:`StateStore.forget`); returns how many."""
        with self._lock:
            return len(self._entries.pop(customer_id, ()))

    def trim(self, before: datetime) -> int:
        """Drop the entries older than ``before`` from memory (retention; the store trims its rows)."""
        with self._lock:
            removed = 0
            for cid, entries in list(self._entries.items()):
                kept = [e for e in entries if e.at >= before]
                removed += len(entries) - len(kept)
                if kept:
                    self._entries[cid] = kept
                else:
                    del self._entries[cid]
            return removed


# --- reading the ledger back ------------------------------------------------------------------------------------

LEDGER_EXPORT = "contacts.jsonl"
"""The name of a JSON-lines export of the ledger, beside an export of the decision log."""


def ledger_beside(decision_log: StateStore | str | Path) -> StateStore | Path:
    """Where the contact ledger of a decision log is: the state store holds both; a JSON-lines export of the
    decision log has the ledger's export (:data:`LEDGER_EXPORT`) in its folder."""
    return (
        decision_log if isinstance(decision_log, StateStore) else Path(decision_log).with_name(LEDGER_EXPORT)
    )


def response_rows(entries: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """The responses among ledger entries (rows of the store's ``contacts`` table or of an export, with ``type``,
    ``customer_id``, ``action_id``, ``at`` and ``accepted``) as ``customer_id, action_id, timestamp, responded``.

    ``at`` may be a datetime or ISO text; a response without ``accepted`` counts as not accepted.
    """
    schema = {CUSTOMER_ID: pl.String, ACTION_ID: pl.String, TIMESTAMP_COL: pl.String, RESPONDED: pl.Boolean}
    rows = [
        {
            CUSTOMER_ID: r.get(CUSTOMER_ID),
            ACTION_ID: r.get(ACTION_ID),
            TIMESTAMP_COL: r["at"].isoformat() if isinstance(r.get("at"), datetime) else r.get("at"),
            RESPONDED: bool(r.get("accepted")),
        }
        for r in entries
        if r.get("type") == "response"
    ]
    return pl.DataFrame(rows, schema=schema).with_columns(parse_timestamp(pl.col(TIMESTAMP_COL)))


def offer_responses(source: StateStore | str | Path) -> pl.DataFrame:
    """The offer responses recorded in the contact ledger, as ``customer_id, action_id, timestamp, responded``
    rows in the ledger's order (what :func:`serving.decision_log.summarise_decisions` joins on).

    Args:
        source: the :class:`~serving.state_store.StateStore`, or a JSON-lines export of the ledger (no
            responses when the file is missing).
    """
    return response_rows(
        source.all_contacts() if isinstance(source, StateStore) else read_lines(Path(source))
    )
