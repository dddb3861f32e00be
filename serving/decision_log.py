"""The decision log: every next-best-action decision stored durably in the state store, erasable, and summarised.

Each line records the customer, every candidate with its P, V, L and score (and why it was filtered), whether it
was an arm (passed every check) and its probability of being chosen, the chosen action with the probability
with which it was chosen and whether the choice explored, the model versions, the champion/challenger arm and
the latency, so policies can be audited and evaluated offline (with the responses that name the decision:
:meth:`StateStore.responses_frame`). :func:`check_responses` ties responses to their decisions;
:func:`summarise_decisions` joins the log with the responses that followed and reports acceptance by arm and by
action (what ``nextbest report decisions`` prints).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.engine import Connection

from nextbest.features.errors import NextbestError
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
from nextbest.serving.state_store import ResponseConflict, StateStore

ALL_ACTIONS = "(all actions)"
"""The ``action_id`` of the per-arm total rows in :func:`summarise_decisions`."""
ResponseKind = Literal["shown", "accepted", "dismissed", "converted"]
RESPONSE_KINDS: tuple[str, ...] = ("shown", "accepted", "dismissed", "converted")
"""What a customer did with an offered action: saw it, took it, turned it down, bought through it."""
_RANKED_OUT = ("scores ", "ranked below the top ")
"""How the reasons of actions that passed every check but were not offered begin (records before version 2)."""


def new_decision_id() -> str:
    """A fresh decision id (32 hexadecimal digits)."""
    return uuid.uuid4().hex


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
    eligible: bool = False
    """An arm: it passed every rule, consent and contact check (offered, or ranked out)."""
    probability: float = 0.0
    """Its probability of being chosen under the policy that decided (0 for an action that was not an arm)."""


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
    probability: float = 1.0
    """The probability with which ``chosen`` was chosen: 1.0 for a deterministic choice; with ε-greedy
    exploration 1 − ε + ε / k for the best of k arms, ε / k for another."""
    explored: bool = False
    """The choice was an exploration draw."""

    @model_validator(mode="before")
    @classmethod
    def _earlier_records(cls, data: Any) -> Any:
        # Records logged before exploration (store version 1) were deterministic: the chosen action had
        # probability 1; the arms were the offered actions and those ranked out.
        if not isinstance(data, Mapping) or not isinstance(data.get("candidates"), list):
            return data
        if all(isinstance(c, Mapping) and "eligible" in c for c in data["candidates"]):
            return data
        chosen = data.get("chosen")
        candidates = []
        for c in data["candidates"]:
            if isinstance(c, Mapping) and "eligible" not in c:
                reason = c.get("reason")
                arm = bool(c.get("offered")) or (isinstance(reason, str) and reason.startswith(_RANKED_OUT))
                c = {**c, "eligible": arm, "probability": 1.0 if c.get("action_id") == chosen else 0.0}
            candidates.append(c)
        return {**data, "candidates": candidates}

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
        """The log record of an :func:`~serving.decisions.arbitrate` (or :func:`~serving.decisions.explore`)
        result."""
        arms = set(decision.arms)
        candidates = [
            CandidateRecord(
                action_id=a.action_id,
                propensity=a.propensity,
                value=a.value,
                lever=a.lever,
                score=a.score,
                offered=a.reason is None,
                reason=a.reason,
                eligible=a.action_id in arms,
                probability=decision.arm_probabilities.get(a.action_id, 0.0),
            )
            for a in [*decision.actions, *decision.filtered]
        ]
        chosen = decision.actions[0] if decision.actions else None
        return cls(
            decision_id=decision_id or new_decision_id(),
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
            probability=decision.probability,
            explored=decision.explored,
        )


class DecisionLog:
    """The decision log in the state store (one record per decision), read by customer through an index."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def append(self, record: DecisionRecord, connection: Connection | None = None) -> None:
        """Store one decision; durable when this returns (or when ``connection``'s transaction commits)."""
        self.store.add_decision(record.model_dump(mode="json"), connection=connection)

    def records(self, since: datetime | None = None) -> list[DecisionRecord]:
        """Every logged decision (at or after ``since``, naive UTC, when given), oldest first."""
        if since is None:
            return [DecisionRecord.model_validate(r) for r in self.store.all_decisions()]
        frame = self.store.decisions_frame(since)
        return [DecisionRecord.model_validate_json(r) for r in frame["record"]]

    def records_of(self, customer_id: str) -> list[DecisionRecord]:
        """The decisions about one customer, oldest first, read through the index (no scan of the log)."""
        return [DecisionRecord.model_validate(r) for r in self.store.decisions_of(customer_id)]

    def customers(self) -> list[str]:
        """Every customer with a logged decision."""
        return self.store.decision_customers()


# --- responses to decisions ----------------------------------------------------------------------------------


class ResponseError(NextbestError, ValueError):
    """A response that cannot be tied to its decision; the message names the response's field and value."""


class UnknownDecision(ResponseError):
    """The response names a decision the log does not hold."""


class ResponseMismatch(ResponseError):
    """The response is about another customer, or an action the decision did not offer."""


class RepeatedResponse(ResponseError, ResponseConflict):
    """The decision has a response of the same kind for the same action already."""


def check_responses(
    rows: Sequence[Mapping[str, Any]],
    decisions: Mapping[str, DecisionRecord],
    recorded: set[tuple[str, str, str]],
    known_ids: set[str],
) -> list[int]:
    """Tie responses to their decisions: which of ``rows`` to store, or the first reason none may be.

    A response whose ``response_id`` is stored already (``known_ids``) or given earlier in ``rows`` is a retry:
    acknowledged, left out, not checked again. Every other response that names a decision must name a logged
    one, about the same customer, and an action that decision offered; a decision takes one response of each
    kind per action.

    Args:
        rows: responses, each with ``response_id``, ``decision_id`` (None: tied to no decision),
            ``customer_id``, ``action_id`` and ``kind``.
        decisions: the logged decisions the rows name, by id (those missing are unknown).
        recorded: ``(decision_id, action_id, kind)`` of the responses stored already.
        known_ids: the response ids stored already.

    Returns:
        the positions in ``rows`` to store.

    Raises:
        UnknownDecision: ``decision_id`` is not in the log.
        ResponseMismatch: the response's customer is not the decision's, or its action was not offered.
        RepeatedResponse: a second response of one kind for one decision and action.
    """
    positions: list[int] = []
    seen_ids = set(known_ids)
    seen_kinds = set(recorded)
    for k, row in enumerate(rows):
        response_id = row["response_id"]
        if response_id in seen_ids:
            continue
        seen_ids.add(response_id)
        decision_id, action_id, kind = row["decision_id"], row["action_id"], row["kind"]
        if decision_id is not None:
            record = decisions.get(decision_id)
            if record is None:
                raise UnknownDecision(
                    f"responses[{k}].decision_id: no decision {decision_id!r} is logged (a preview is not logged; "
                    "an erased customer's decisions and those past the retention window are gone)"
                )
            if record.customer_id != row["customer_id"]:
                raise ResponseMismatch(
                    f"responses[{k}].customer_id: {row['customer_id']!r} is not the customer decision "
                    f"{decision_id!r} was made for"
                )
            offered = [c.action_id for c in record.candidates if c.offered]
            if action_id not in offered:
                raise ResponseMismatch(
                    f"responses[{k}].action_id: {action_id!r} was not offered in decision {decision_id!r} "
                    f"(offered: {', '.join(offered) or 'nothing'})"
                )
            key = (decision_id, action_id, kind)
            if key in seen_kinds:
                raise RepeatedResponse(
                    f"responses[{k}].kind: decision {decision_id!r} has a {kind!r} response for {action_id!r} "
                    "already (give each response an event_id: a retry with the same id is acknowledged)"
                )
            seen_kinds.add(key)
        positions.append(k)
    return positions


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
        return source.decisions_frame().select(list(_LOG_SCHEMA))
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
