"""The rule that turns the service's decision log and the responses to it into exposures (a pure transform).

A decision is an exposure of its chosen action once that action was **shown** and the decision is **settled**;
:func:`exposures_from_decisions` says exactly when. ``features.live_fold`` appends what it returns to the
``actions`` table the propensity model trains on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EXPOSURE_ID,
    RESPONDED,
    RESPONDED_AT,
    TIMESTAMP,
    TIMESTAMP_COL,
)

DECISION_ID = "decision_id"
SHOWN = "shown"
ACCEPTED = "accepted"
DISMISSED = "dismissed"
CONVERTED = "converted"
RESPONSE_KINDS: tuple[str, ...] = (SHOWN, ACCEPTED, DISMISSED, CONVERTED)
RESPONDED_KINDS: tuple[str, ...] = (ACCEPTED, CONVERTED)
"""Kinds that make an exposure ``responded``."""
FINAL_KINDS: tuple[str, ...] = (ACCEPTED, DISMISSED, CONVERTED)
"""Kinds after which a decision is settled at once (no need to wait for the response window)."""
NO_ACTION_KIND = "none"
"""The catalogue kind of "no action" (as ``serving.policy`` names it): never delivered by a channel."""

DECISION_COLUMNS: dict[str, pl.DataType] = {
    DECISION_ID: pl.String(),
    CUSTOMER_ID: pl.String(),
    TIMESTAMP_COL: TIMESTAMP,
    CHANNEL: pl.String(),
    "chosen": pl.String(),
    "chosen_kind": pl.String(),
}
"""The decision log as :func:`exposures_from_decisions` reads it."""
RESPONSE_COLUMNS: dict[str, pl.DataType] = {
    DECISION_ID: pl.String(),
    CUSTOMER_ID: pl.String(),
    ACTION_ID: pl.String(),
    "kind": pl.String(),
    TIMESTAMP_COL: TIMESTAMP,
}
"""The responses columns :func:`exposures_from_decisions` needs (``StateStore.responses_frame`` has more)."""


class ExposureInputError(NextbestError, ValueError):
    """The decisions or responses lack a column the rule needs."""


@dataclass
class ExposureSplit:
    """The decisions of a log, sorted by what a fold does with them.

    Attributes:
        exposures: one row per settled, shown decision (the ``actions`` table's columns).
        pending: shown decisions still waiting for a response (folded by a later retrain).
        not_shown: decisions with no response whose window is over (not exposures).
        no_choice: decisions that chose nothing.
        responses_ignored: responses for another action than the decision's chosen one, or for no logged
            decision.
    """

    exposures: pl.DataFrame
    pending: int = 0
    not_shown: int = 0
    no_choice: int = 0
    responses_ignored: int = 0


def _require(frame: pl.DataFrame, columns: dict[str, pl.DataType], what: str) -> pl.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ExposureInputError(
            f"{what} need column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}"
        )
    return frame.select(pl.col(c).cast(t) for c, t in columns.items())


def exposures_from_decisions(
    decisions: pl.DataFrame,
    responses: pl.DataFrame,
    *,
    as_of: datetime,
    window: timedelta = timedelta(days=7),
    delivered_channels: Iterable[str] = (),
) -> ExposureSplit:
    """The exposures the decision log and the responses make (a pure function).

    The rule: a decision is an exposure of its chosen action when that action was **shown** — a response of
    any kind (``shown``, ``accepted``, ``dismissed``, ``converted``) for the decision and its chosen action says
    so; on a channel in ``delivered_channels`` (one that delivers what the service chose, such as an e-mail
    send) the decision itself counts as shown. It is ``responded`` when a response is ``accepted`` or
    ``converted``. It is folded once **settled**: at its first ``accepted``, ``dismissed`` or ``converted``
    response, or when ``window`` has passed since the decision (at ``as_of``); a shown decision not yet settled
    waits for a later retrain. The exposure takes the decision's id as ``exposure_id``, its time and its
    channel (the response's where the decision names none), and ``responded_at``: when the outcome became known
    (the first accepted, dismissed or converted response, else the end of the window), so that training never
    counts a response before it happened.

    Args:
        decisions: :data:`DECISION_COLUMNS`.
        responses: :data:`RESPONSE_COLUMNS` (more columns are ignored).
        as_of: now, for the response window (the data's time, not the wall clock).
        window: how long after a decision a response may still come.
        delivered_channels: channels whose decisions count as shown without a response.

    Raises:
        ExposureInputError: a required column is missing.
    """
    d = _require(decisions, DECISION_COLUMNS, "decisions").unique(
        DECISION_ID, keep="first", maintain_order=True
    )
    r = _require(responses, RESPONSE_COLUMNS, "responses")
    channel_of = responses.select(
        pl.col(DECISION_ID).cast(pl.String),
        pl.col(CHANNEL).cast(pl.String)
        if CHANNEL in responses.columns
        else pl.lit(None, pl.String).alias(CHANNEL),
    )
    chosen = d.filter(pl.col("chosen").is_not_null())
    matched = r.join(
        chosen.select(
            DECISION_ID, pl.col(CUSTOMER_ID).alias("__customer"), pl.col("chosen").alias("__chosen")
        ),
        on=DECISION_ID,
        how="left",
    )
    valid = (pl.col(ACTION_ID) == pl.col("__chosen")) & (pl.col(CUSTOMER_ID) == pl.col("__customer"))
    ignored = matched.filter(~valid.fill_null(False)).height
    per_decision = (
        matched.filter(valid.fill_null(False))
        .group_by(DECISION_ID)
        .agg(
            pl.len().alias("__responses"),
            pl.col("kind").is_in(list(RESPONDED_KINDS)).any().alias(RESPONDED),
            pl.col("kind").is_in(list(FINAL_KINDS)).any().alias("__final"),
            pl.col(TIMESTAMP_COL).filter(pl.col("kind").is_in(list(FINAL_KINDS))).min().alias("__final_at"),
        )
    )
    response_channel = (
        channel_of.drop_nulls()
        .unique(DECISION_ID, keep="first", maintain_order=True)
        .rename({CHANNEL: "__rc"})
    )
    delivered = list(delivered_channels)
    scored = (
        chosen.join(per_decision, on=DECISION_ID, how="left", maintain_order="left")
        .join(response_channel, on=DECISION_ID, how="left", maintain_order="left")
        .with_columns(
            (
                pl.col("__responses").is_not_null()
                | (pl.col(CHANNEL).is_in(delivered) & (pl.col("chosen_kind").fill_null("") != NO_ACTION_KIND))
            ).alias("__shown"),
            (pl.col("__final").fill_null(False) | (pl.col(TIMESTAMP_COL) + window <= as_of)).alias(
                "__settled"
            ),
        )
    )
    exposures = scored.filter(pl.col("__shown") & pl.col("__settled")).select(
        pl.col(DECISION_ID).alias(EXPOSURE_ID),
        CUSTOMER_ID,
        pl.col("chosen").alias(ACTION_ID),
        pl.coalesce(CHANNEL, "__rc").alias(CHANNEL),
        TIMESTAMP_COL,
        pl.col(RESPONDED).fill_null(False),
        pl.coalesce("__final_at", pl.col(TIMESTAMP_COL) + window).alias(RESPONDED_AT),
    )
    return ExposureSplit(
        exposures=exposures,
        pending=scored.filter(pl.col("__shown") & ~pl.col("__settled")).height,
        not_shown=scored.filter(~pl.col("__shown") & pl.col("__settled")).height,
        no_choice=d.height - chosen.height,
        responses_ignored=ignored,
    )
