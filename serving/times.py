"""Timestamps at the service's edges: naive UTC inside (as in the data contract), explicit UTC in answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, PlainSerializer, WithJsonSchema


def naive_utc(at: datetime) -> datetime:
    """``at`` as naive UTC (aware datetimes are converted, naive ones taken to be UTC already)."""
    if at.tzinfo is not None:
        return at.astimezone(UTC).replace(tzinfo=None)
    return at


def _utc_text(at: datetime) -> str:
    return naive_utc(at).isoformat() + "Z"


UtcDateTime = Annotated[
    datetime,
    AfterValidator(naive_utc),
    PlainSerializer(_utc_text, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A timestamp held as naive UTC and written in JSON with its zone (``2026-05-01T12:00:00Z``), as RFC 3339 and
the OpenAPI ``date-time`` format require; either form reads back."""


def parse_utc(text: str) -> datetime:
    """An ISO timestamp as written in the service's logs (naive, or with a zone) as naive UTC."""
    return naive_utc(datetime.fromisoformat(text))


def older_than(field: str, cutoff: datetime) -> Callable[[dict[str, Any]], bool]:
    """A ``keep`` test for :meth:`serving.jsonl.JsonLinesFile.rewrite`: keeps records whose ``field`` is at or
    after ``cutoff`` (records without a readable time are kept: retention never guesses)."""

    def keep(record: dict[str, Any]) -> bool:
        value = record.get(field)
        if not isinstance(value, str):
            return True
        try:
            return parse_utc(value) >= cutoff
        except ValueError:
            return True

    return keep
