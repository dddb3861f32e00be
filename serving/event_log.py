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

_ROW = re.compile(r"^events row (\d+):")


class EventRejected(ValueError):
    """A batch of events with invalid rows; nothing of the batch was stored.

    Attributes:
        reasons: one reason per invalid event, naming its position, field and value.
    """

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


class EventLog:
    """An append-only JSON-lines file of accepted events.

    Args:
        path: the log file (created with its folder when missing).
        event_types: accepted event types.
    """

    def __init__(self, path: Path, *, event_types: Sequence[str] = DEFAULT_EVENT_TYPES):
        self.path = path
        self.event_types = tuple(event_types)
        self._file = JsonLinesFile(path)

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

    def append(self, events: list[dict[str, Any]]) -> pl.DataFrame:
        """Validate, append and fsync; return the accepted events as contract rows."""
        accepted = self.validate(events)
        self._file.append_many(
            [
                {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
                for row in accepted.iter_rows(named=True)
            ]
        )
        return accepted

    def replay(self) -> pl.DataFrame:
        """Every logged event, in order (an empty contract frame when there are none)."""
        rows = self._file.read()
        if not rows:
            return empty_frame("events")
        frame = pl.DataFrame(rows, infer_schema_length=None)
        return validate(frame, "events", source=str(self.path), event_types=self.event_types).accepted

    def forget(self, ids: Sequence[str]) -> int:
        """Rewrite the log without the events of ``ids``; return how many were removed."""
        erased = set(ids)
        return self._file.rewrite(lambda r: r.get(CUSTOMER_ID) not in erased)
