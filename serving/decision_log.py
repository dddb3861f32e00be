"""The decision log: every next-best-action decision stored durably in the state store, erasable, and summarised.

Each line records the customer, every candidate with its P, V, L and score (and why it was filtered), the chosen
action, the model versions, the champion/challenger arm and the latency, so policies can be audited and
evaluated offline. :func:`summarise_decisions` joins the log with the responses that followed and reports
acceptance by arm and by action (what ``nextbest report decisions`` prints).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection

from nextbest.features.schema import (
    ACTION_ID,
    CUSTOMER_ID,
    RESPONDED,
    TIMESTAMP,
    TIMESTAMP_COL,
    parse_timestamp,
)
from nextbest.serving.decisions import Decision
from nextbest.serving.jsonl import read_lines
from nextbest.serving.policy import NO_ACTION_KIND
from nextbest.serving.state_store import StateStore

ALL_ACTIONS = "(all actions)"
"""The ``action_id`` of the per-arm total rows in :func:`summarise_decisions`."""


class CandidateRecord(BaseModel):
    """One action considered in a decision."""

    action_id: str
    propensity: float
    value: float
    lever: float
    score: float
    offered: bool
    """In the returned ranking (the no-action entry included)."""
    reason: str | None = None
    """Why it was not offered."""


class DecisionRecord(BaseModel):
    """One line of the decision log."""

    decision_id: str
    timestamp: datetime
    customer_id: str
    channel: str | None = None
    arm: str
    model_versions: dict[str, str] = Field(default_factory=dict)
    policy_version: str
    personalised: bool
    candidates: list[CandidateRecord]
    chosen: str | None
    chosen_kind: str | None
    latency_ms: float

    @classmethod
    def from_decision(
        cls,
        decision: Decision,
        *,
        arm: str,
        latency_ms: float,
        model_versions: Mapping[str, str] | None = None,
        decision_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> DecisionRecord:
        """The log record of an :func:`~serving.decisions.arbitrate` result."""
        candidates = [
            CandidateRecord(
                action_id=a.action_id,
                propensity=a.propensity,
                value=a.value,
                lever=a.lever,
                score=a.score,
                offered=a.reason is None,
                reason=a.reason,
            )
            for a in [*decision.actions, *decision.filtered]
        ]
        chosen = decision.actions[0] if decision.actions else None
        return cls(
            decision_id=decision_id or uuid.uuid4().hex,
            timestamp=timestamp or datetime.now(UTC).replace(tzinfo=None),
            customer_id=decision.customer_id,
            channel=decision.channel,
            arm=arm,
            model_versions=dict(model_versions or {}),
            policy_version=decision.policy_version,
            personalised=decision.personalised,
            candidates=candidates,
            chosen=chosen.action_id if chosen else None,
            chosen_kind=chosen.kind if chosen else None,
            latency_ms=latency_ms,
        )


class DecisionLog:
    """The decision log in the state store (one record per decision), read by customer through an index."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def append(self, record: DecisionRecord, connection: Connection | None = None) -> None:
        """Store one decision; durable when this returns (or when ``connection``'s transaction commits)."""
        self.store.add_decision(record.model_dump(mode="json"), connection=connection)

    def records(self) -> list[DecisionRecord]:
        """Every logged decision, oldest first."""
        return [DecisionRecord.model_validate(r) for r in self.store.all_decisions()]

    def records_of(self, customer_id: str) -> list[DecisionRecord]:
        """The decisions about one customer, oldest first, read through the index (no scan of the log)."""
        return [DecisionRecord.model_validate(r) for r in self.store.decisions_of(customer_id)]

    def customers(self) -> list[str]:
        """Every customer with a logged decision."""
        return self.store.decision_customers()


_LOG_SCHEMA = {
    "decision_id": pl.String,
    "timestamp": pl.String,
    CUSTOMER_ID: pl.String,
    "arm": pl.String,
    "chosen": pl.String,
    "chosen_kind": pl.String,
}


def read_decisions(source: StateStore | str | Path) -> pl.DataFrame:
    """The decision log as a frame: decision_id, timestamp, customer_id, arm, chosen, chosen_kind.

    Args:
        source: the state store, or a JSON-lines export of the log (one decision record a line).

    Raises:
        LogError: a line other than a torn last one is not a JSON object.
    """
    if isinstance(source, StateStore):
        rows = [{k: r.get(k) for k in _LOG_SCHEMA} for r in source.all_decisions()]
        frame = pl.DataFrame(rows, schema=_LOG_SCHEMA)
        return frame.with_columns(parse_timestamp(pl.col("timestamp")).alias("timestamp"))
    path = Path(source)
    if not path.exists() or path.stat().st_size == 0:
        frame = pl.DataFrame(schema=_LOG_SCHEMA)
    else:
        try:
            frame = pl.scan_ndjson(path, schema=_LOG_SCHEMA).collect()
        except pl.exceptions.PolarsError:
            # The fast reader stops at the first bad line; the line reader tolerates a torn last line
            # and names any other bad one.
            rows = [{k: r.get(k) for k in _LOG_SCHEMA} for r in read_lines(path)]
            frame = pl.DataFrame(rows, schema=_LOG_SCHEMA)
    return frame.with_columns(parse_timestamp(pl.col("timestamp")).alias("timestamp"))


def summarise_decisions(
    log: StateStore | str | Path,
    events: pl.DataFrame | pl.LazyFrame,
    *,
    window_days: float = 7.0,
) -> pl.DataFrame:
    """Acceptance by arm and by chosen action.

    A decision is *accepted* when ``events`` holds a response for the same customer and the chosen action
    within ``window_days`` after the decision (at or after its timestamp). Purchases count only once the
    caller has attributed them to an action (e.g. a brand discount ← a purchase of that brand).

    Args:
        log: the state store holding the decision log, or a JSON-lines export of it.
        events: ``customer_id, action_id, timestamp`` and optionally ``responded`` (only true rows count) —
            e.g. the ``actions`` table or the offer responses posted to the service.
        window_days: how long after a decision a response still counts.

    Returns:
        ``arm, action_id, decisions, offers, accepted, acceptance_rate``: one row per arm and chosen action
        (``action_id`` null when nothing was chosen), plus a row per arm with ``action_id`` =
        :data:`ALL_ACTIONS`. ``offers`` leaves out no-action decisions; ``acceptance_rate`` = accepted / offers
        (null without offers). Sorted by arm, then action (totals last).

    Raises:
        ValueError: ``events`` lacks a required column.
    """
    lf = events.lazy() if isinstance(events, pl.DataFrame) else events
    names = lf.collect_schema().names()
    missing = [c for c in (CUSTOMER_ID, ACTION_ID, TIMESTAMP_COL) if c not in names]
    if missing:
        raise ValueError(f"events need column(s) {', '.join(missing)}; found {', '.join(names) or 'none'}")
    if RESPONDED in names:
        lf = lf.filter(pl.col(RESPONDED))
    responses = lf.select(
        pl.col(CUSTOMER_ID).cast(pl.String),
        pl.col(ACTION_ID).cast(pl.String).alias("chosen"),
        pl.col(TIMESTAMP_COL).cast(TIMESTAMP).alias("__response_at"),
    )
    decisions = read_decisions(log).lazy()
    window = timedelta(days=window_days)
    accepted_ids = (
        decisions.join(responses, on=[CUSTOMER_ID, "chosen"], how="inner")
        .filter(
            (pl.col("__response_at") >= pl.col("timestamp"))
            & (pl.col("__response_at") <= pl.col("timestamp") + window)
        )
        .select("decision_id")
        .unique()
        .with_columns(pl.lit(True).alias("__accepted"))
    )
    scored = decisions.join(accepted_ids, on="decision_id", how="left").with_columns(
        pl.col("__accepted").fill_null(False),
        (pl.col("chosen").is_not_null() & (pl.col("chosen_kind").fill_null("") != NO_ACTION_KIND)).alias(
            "__offer"
        ),
    )
    aggs = [
        pl.len().cast(pl.Int64).alias("decisions"),
        pl.col("__offer").sum().cast(pl.Int64).alias("offers"),
        (pl.col("__accepted") & pl.col("__offer")).sum().cast(pl.Int64).alias("accepted"),
    ]
    by_action = scored.group_by("arm", pl.col("chosen").alias(ACTION_ID)).agg(aggs)
    by_arm = scored.group_by("arm").agg(aggs).with_columns(pl.lit(ALL_ACTIONS).alias(ACTION_ID))
    out = pl.concat([by_action, by_arm.select(by_action.collect_schema().names())]).with_columns(
        pl.when(pl.col("offers") > 0)
        .then(pl.col("accepted") / pl.col("offers"))
        .otherwise(None)
        .alias("acceptance_rate"),
        (pl.col(ACTION_ID) == ALL_ACTIONS).alias("__total"),
    )
    return (
        out.sort(["arm", "__total", ACTION_ID], nulls_last=True)
        .drop("__total")
        .select("arm", ACTION_ID, "decisions", "offers", "accepted", "acceptance_rate")
        .collect()
    )
