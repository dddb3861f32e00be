"""The service's durable event log: events are validated against the contract, appended and fsynced before
the call that sent them returns, and replayed on start-up."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from features.schema import CUSTOMER_ID, DEFAULT_EVENT_TYPES, TIMESTAMP_COL, empty_frame, validate
from serving.jsonl import JsonLinesFile
from serving.times import older_than

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
"""The client's optional id of an event, kept in the log beside the contract's columns (idempotent retries)."""


class EventLog:
    """An append-only JSON-lines file of accepted events, idempotent by the client's ``event_id``.

    Args:
        path: the log file (created with its folder when missing).
        event_types: accepted event types.
    """

    def __init__(self, path: Path, *, event_types: Sequence[str] = DEFAULT_EVENT_TYPES):
        self.path = path
        self.event_types = tuple(event_types)
        self._file = JsonLinesFile(path)
        self._ids: set[str] = set()

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
        """Validate, append and fsync the events whose ``event_id`` is new (or absent).

        Returns:
            the accepted events as contract rows, and how many were left out as already stored (by event id,
            earlier or in the same batch).

        Raises:
            EventRejected: any new event is invalid; nothing of the batch was stored.
        """
        if not events:
            raise EventRejected(["events: the list is empty"])
        rows, ids, duplicates = [], [], 0
        seen: set[str] = set()
        for event in events:
            row = dict(event)
            event_id = row.pop(EVENT_ID, None)
            if event_id is not None and (event_id in self._ids or event_id in seen):
                duplicates += 1
                continue
            if event_id is not None:
                seen.add(event_id)
            rows.append(row)
            ids.append(event_id)
        if not rows:
            return empty_frame("events"), duplicates
        accepted = self.validate(rows)
        self._file.append_many(
            [
                {
                    **{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()},
                    **({EVENT_ID: i} if i is not None else {}),
                }
                for row, i in zip(accepted.iter_rows(named=True), ids, strict=True)
            ]
        )
        self._ids |= seen
        return accepted, duplicates

    def replay(self) -> pl.DataFrame:
        """Every logged event, in order (an empty contract frame when there are none); remembers their ids."""
        rows = self._file.read()
        self._ids = set()
        for r in rows:
            event_id = r.pop(EVENT_ID, None)
            if isinstance(event_id, str):
                self._ids.add(event_id)
        if not rows:
            return empty_frame("events")
        frame = pl.DataFrame(rows, infer_schema_length=None)
        return validate(frame, "events", source=str(self.path), event_types=self.event_types).accepted

    def trim(self, before: datetime) -> int:
        """Remove the events older than ``before`` (retention); returns how many were removed."""
        return self._file.rewrite(older_than(TIMESTAMP_COL, before))

    def forget(self, ids: Sequence[str]) -> int:
        """Rewrite the log without the events of ``ids``; return how many were removed."""
        erased = set(ids)
        return self._file.rewrite(lambda r: r.get(CUSTOMER_ID) not in erased)
