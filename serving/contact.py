"""Contact-policy state: who was contacted with what, on which channel, and how they responded — durably.

:class:`ContactLedger` answers "may we contact this customer with this action on this channel now?" from the
policy's limits (:class:`~serving.policy.ContactLimits` per action, :class:`~serving.policy.ChannelCap` per
channel):

* **cap per action**: at most K contacts with the action on the channel in the last ``period_days``;
* **cap per channel**: at most K contacts with any action on the channel in the last ``period_days``;
* **suppression**: after R rejections of an action in a row (an acceptance resets the count) the action is
  suppressed for D days from the R-th rejection; when that ends the count starts again from zero.

Every contact and response is appended to a JSON-lines file (flushed and fsynced before the call returns), so a
restart reloads the same state; :meth:`ContactLedger.forget` rewrites the file without a customer's lines.
Timestamps are naive UTC, like every timestamp in the data contract.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from serving.jsonl import JsonLinesFile
from serving.policy import ActionPolicy
from serving.times import UtcDateTime, naive_utc, older_than


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

    def __init__(self, path: str | Path | None, policy: ActionPolicy, *, fsync: bool = True) -> None:
        """Open (or create) the ledger.

        Args:
            path: the JSON-lines file (created if missing, reloaded if present); None keeps it in memory.
            policy: whose contact limits apply (assign :attr:`policy` to switch to a reloaded one).
            fsync: fsync every append (turn off only where durability does not matter).
        """
        self.policy = policy
        self._lock = threading.RLock()
        self._entries: dict[str, list[ContactEntry]] = defaultdict(list)
        self._event_ids: set[str] = set()
        self._file = JsonLinesFile(path, fsync=fsync) if path is not None else None
        self._load()

    def _load(self) -> None:
        self._entries.clear()
        self._event_ids.clear()
        if self._file is None:
            return
        for raw in self._file.read():
            entry = ContactEntry.model_validate(raw)
            self._entries[entry.customer_id].append(entry)
            if entry.event_id is not None:
                self._event_ids.add(entry.event_id)
        for entries in self._entries.values():
            entries.sort(key=lambda e: e.at)

    def _add(self, entry: ContactEntry) -> ContactEntry:
        # One lock over file and memory, so an erasure running beside an append cannot leave either behind.
        with self._lock:
            if entry.event_id is not None:
                self._event_ids.add(entry.event_id)
            # Durable first, then visible: a crash in between loses nothing that was acknowledged.
            if self._file is not None:
                self._file.append(entry.model_dump(mode="json"))
            entries = self._entries[entry.customer_id]
            entries.append(entry)
            if len(entries) > 1 and entries[-2].at > entry.at:
                entries.sort(key=lambda e: e.at)
        return entry

    def record_contact(
        self, customer_id: str, action_id: str, channel: str | None, at: datetime
    ) -> ContactEntry:
        """Record that ``action_id`` was shown to or sent to the customer on ``channel`` at ``at``."""
        return self._add(
            ContactEntry(
                type="contact",
                customer_id=customer_id,
                action_id=action_id,
                channel=channel,
                at=naive_utc(at),
            )
        )

    def record_response(
        self,
        customer_id: str,
        action_id: str,
        accepted: bool,
        at: datetime,
        channel: str | None = None,
        event_id: str | None = None,
    ) -> ContactEntry:
        """Record the customer's response to ``action_id``: accepted, or rejected."""
        return self._add(
            ContactEntry(
                type="response",
                customer_id=customer_id,
                action_id=action_id,
                channel=channel,
                at=naive_utc(at),
                accepted=bool(accepted),
                event_id=event_id,
            )
        )

    def customers(self) -> list[str]:
        """Every customer with an entry."""
        with self._lock:
            return [c for c, entries in self._entries.items() if entries]

    def has_event(self, event_id: str) -> bool:
        """Whether a response with this client event id is recorded already."""
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
        """Erase every entry about ``customer_id`` from memory and from the file; returns how many."""
        with self._lock:
            removed = len(self._entries.pop(customer_id, ()))
            if self._file is not None:
                removed = max(removed, self._file.rewrite(lambda r: r.get("customer_id") != customer_id))
            return removed

    def trim(self, before: datetime) -> int:
        """Erase the entries older than ``before`` (retention) from memory and the file; returns how many."""
        with self._lock:
            if self._file is None:
                removed = 0
                for cid, entries in list(self._entries.items()):
                    kept = [e for e in entries if e.at >= before]
                    removed += len(entries) - len(kept)
                    self._entries[cid] = kept
                return removed
            removed = self._file.rewrite(older_than("at", before))
            if removed:
                self._load()
            return removed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
