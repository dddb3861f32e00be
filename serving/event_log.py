"""The service's events: validated against the contract and stored in the state store (durably) before the call
that sent them returns, replayed on start-up, idempotent by the client's event id."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl

from nextbest.features.schema import DEFAULT_EVENT_TYPES, TIMESTAMP_COL, empty_frame, validate
from nextbest.serving.state_store import StateStore

_ROW = re.compile(r"^events row (\d+):")


class EventRejected(ValueError):
    """A batch of events with invalid rows; nothing of the batch was stored.

    Attributes:
        reasons: one reason per invalid event, naming its position, field and value.
    """

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


EVENT_ID = "event_id"
"""The client's optional id of an event, stored beside the contract's columns (idempotent retries)."""


class EventLog:
    """The events received live, validated against the contract and stored in the state store, idempotent by the
    client's ``event_id``.

    Args:
        store: the state store.
        event_types: accepted event types.
    """

    def __init__(self, store: StateStore, *, event_types: Sequence[str] = DEFAULT_EVENT_TYPES):
        self.store = store
        self.event_types = tuple(event_types)

    def validate(self, events: list[dict[str, Any]]) -> pl.DataFrame:
        """Validate a batch against the events contract (all or nothing).

        Raises:
            EventRejected: any event is invalid; the reasons cite ``events[i]``, the field and the value.
        """
        if not events:
            raise EventRejected(["events: the list is empty"])
        try:
            frame = pl.DataFrame(events, infer_schema_length=None)
        except (TypeError, ValueError, pl.exceptions.PolarsError) as exc:
            raise EventRejected(
                [f"events: not a list of flat objects ({' '.join(str(exc).split())[:200]})"]
            ) from exc
        # Timestamps may be omitted: the service stamps them on arrival.
        if TIMESTAMP_COL not in frame.columns:
            frame = frame.with_columns(
                pl.lit(datetime.now(UTC).replace(tzinfo=None).isoformat()).alias(TIMESTAMP_COL)
            )
        try:
            result = validate(frame, "events", source="events", event_types=self.event_types)
        except ValueError as exc:
            raise EventRejected([str(exc)]) from exc
        if result.rows_quarantined:
            # Row numbers are 1-based in files; in a JSON list the position is 0-based.
            raise EventRejected(
                [
                    _ROW.sub(lambda m: f"events[{int(m.group(1)) - 1}]:", r)
                    for r in result.quarantined["reason"].to_list()
                ]
            )
        return result.accepted

    def append(self, events: list[dict[str, Any]]) -> tuple[pl.DataFrame, int]:
        """Validate and store (durably) the events whose ``event_id`` is new (or absent).

        Returns:
            the stored events as contract rows, and how many were left out as stored already (by event id,
            earlier, in the same batch, or by another replica at the same moment).

        Raises:
            EventRejected: any new event is invalid; nothing of the batch was stored.
        """
        if not events:
            raise EventRejected(["events: the list is empty"])
        given = [e.get(EVENT_ID) for e in events]
        known = self.store.known_event_ids([i for i in given if i is not None])
        rows, ids, duplicates = [], [], 0
        seen: set[str] = set()
        for event, event_id in zip(events, given, strict=True):
            if event_id is not None and (event_id in known or event_id in seen):
                duplicates += 1
                continue
            if event_id is not None:
                seen.add(event_id)
            rows.append({k: v for k, v in event.items() if k != EVENT_ID})
            ids.append(event_id)
        if not rows:
            return empty_frame("events"), duplicates
        accepted = self.validate(rows)
        stored, raced = self.store.append_events(list(accepted.iter_rows(named=True)), ids)
        if raced:
            accepted = accepted[stored]
        return accepted, duplicates + raced

    def frame(self, rows: list[dict[str, Any]]) -> pl.DataFrame:
        """Stored event rows (as :meth:`StateStore.events_after` gives them) as contract rows, in order."""
        if not rows:
            return empty_frame("events")
        schema = empty_frame("events").schema
        columns = [c for c in schema.names() if any(c in r for r in rows[:1])]
        # Validated when they were stored: read back, they are only typed (validating again cost as much as the
        # first time, on every event every replica applies).
        return pl.DataFrame(
            [{c: r.get(c) for c in columns} for r in rows], schema={c: schema[c] for c in columns}
        )

    def replay(self) -> pl.DataFrame:
        """Every stored event, in order (an empty contract frame when there are none)."""
        return self.frame(self.store.events_after(0))
