"""Timestamps at the service's edges: naive UTC inside (as in the data contract), explicit UTC in answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

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
