"""What a candidate policy would have done with each logged decision: the SPECs and the replay.

Each logged decision (:class:`~serving.decision_log.DecisionRecord`) is re-arbitrated by
:func:`serving.decisions.arbitrate` under a candidate policy, with the inputs rebuilt from the record:

* candidates: the logged propensities P of every logged candidate action;
* context: the logged channel and decision time; personalisation consent: the logged ``personalised`` flag;
  marketing consent: granted when a marketing action of the logging policy was logged without the reason
  "no marketing consent" (unknown counts as not granted);
* rules and values: a rule the logging policy also had (same group, name and condition) keeps its logged
  verdict (it failed iff the logged reason names it), an action whose value rule, attributes and default basket
  are unchanged keeps its logged V; anything else is evaluated on the customer's profile when one is given
  (``profiles``), where a missing field fails the rule;
* contact limits: an action the log shows stopped by a contact limit stays stopped; every other is allowed
  (the replay does not re-run the ledger, so contacts a candidate would have made differently are not counted).

The target π(·|x) of a candidate is its choice (probability 1), or with ε-greedy 1 − ε + ε / k on its choice
and ε / k on each other of the k *arms* (the actions that pass every check, the no-action alternative included)
— the service's own exploration rule. :mod:`serving.policy_eval` turns the replays into estimates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.serving.decision_log import DecisionRecord
from nextbest.serving.decisions import MARKETING, PERSONALISATION, ActionCandidate, arbitrate
from nextbest.serving.policy import (
    NO_ACTION_KIND,
    RULE_GROUPS,
    ActionPolicy,
    PolicyDefaults,
    PolicyError,
    attach_catalog,
    load_policy,
)
from nextbest.serving.policy_rules import Condition, RuleOutcome, RuleScope

CURRENT = "current"
"""The name of the baseline candidate: the champion policy with its current levers."""
NOTHING = "(nothing)"
"""The action of decisions where nothing passed (no action at all was chosen)."""
SPEC_FORMS = (
    "current, policy:PATH.toml, levers:{JSON} or levers:PATH.json, epsilon:EPS or epsilon:EPS:SPEC "
    '(e.g. epsilon:0.1:levers:{"offer_x": 1.5})'
)
_CONTACT_REASONS = ("suppressed until ", "contact cap: ", "channel cap: ")
_RANKING_REASONS = ("ranked below the top ", "scores ")
_FACTS = "__nextbest_logged_facts__"
"""Profile key under which a replayed decision carries its logged facts to the rules and values."""


class CandidateSpecError(NextbestError, ValueError):
    """A ``--candidate`` SPEC that cannot be understood; the message shows the forms that can."""


@dataclass(frozen=True)
class CandidatePolicy:
    """A policy to judge offline.

    Attributes:
        name: how reports name it (the SPEC as given, or ``current``).
        policy: its action policy (catalogue attached).
        levers: lever overrides by action (None: the policy file's own levers).
        epsilon: the share of decisions explored uniformly over the eligible actions (0: greedy).
    """

    name: str
    policy: ActionPolicy
    levers: Mapping[str, float] | None = None
    epsilon: float = 0.0


# --- SPECs --------------------------------------------------------------------------------------------------


def _levers_from(text: str, current: ActionPolicy) -> dict[str, float]:
    if text.lstrip().startswith("{"):
        source = "the levers JSON"
        raw = text
    else:
        path = Path(text)
        source = str(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CandidateSpecError(f"levers file {path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CandidateSpecError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise CandidateSpecError(
            f'{source} must be a non-empty object of action → lever, e.g. {{"offer_x": 1.5}}'
        )
    out: dict[str, float] = {}
    for action_id, value in data.items():
        if action_id not in current.actions:
            known = ", ".join(sorted(current.actions))
            raise CandidateSpecError(f"{source}: unknown action {action_id!r}; known: {known}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise CandidateSpecError(
                f"{source}: the lever of {action_id!r} must be a finite number ≥ 0, got {value!r}"
            )
        out[action_id] = float(value)
    return out


def parse_candidate(
    spec: str,
    current: ActionPolicy,
    current_levers: Mapping[str, float] | None = None,
    *,
    catalog: pl.DataFrame | None = None,
) -> CandidatePolicy:
    """The candidate a SPEC names.

    Forms: ``current`` (the champion policy and its levers); ``policy:PATH`` (another policy file, judged with
    its own levers); ``levers:{JSON}`` or ``levers:PATH.json`` (the current policy with these levers changed);
    ``epsilon:EPS`` (the current policy, ε-greedy) or ``epsilon:EPS:SPEC`` (SPEC made ε-greedy). A policy
    file's own ``[exploration]`` is not applied: the replay is greedy unless wrapped in ``epsilon:``.
    ``model:VERSION`` (another propensity model) is refused: the log holds only the serving model's P.

    Args:
        spec: the SPEC.
        current: the champion policy (catalogue attached).
        current_levers: its levers now (:attr:`serving.levers.PolicyState.levers`); None: the file's.
        catalog: the action catalogue, attached to a candidate policy file as the service would.

    Raises:
        CandidateSpecError: an unknown form, a bad ε, a missing or invalid file, unknown actions in levers.
    """
    text = spec.strip()
    head, sep, rest = text.partition(":")
    head = head.strip().lower()
    if text == CURRENT:
        return CandidatePolicy(CURRENT, current, dict(current_levers) if current_levers is not None else None)
    if not sep or not rest.strip():
        raise CandidateSpecError(f"candidate {spec!r} is not a SPEC; use one of: {SPEC_FORMS}")
    if head == "policy":
        try:
            policy = load_policy(rest.strip())
            if catalog is not None:
                policy = attach_catalog(policy, catalog)
        except PolicyError as e:
            raise CandidateSpecError(f"candidate {spec!r}: {' '.join(str(e).split())}") from None
        return CandidatePolicy(text, policy, None)
    if head == "levers":
        levers = {**(current_levers or {}), **_levers_from(rest.strip(), current)}
        return CandidatePolicy(text, current, levers)
    if head == "epsilon":
        number, sep2, inner = rest.partition(":")
        try:
            eps = float(number)
        except ValueError:
            raise CandidateSpecError(
                f"candidate {spec!r}: ε must be a number in [0, 1], got {number!r}"
            ) from None
        if not 0 <= eps <= 1:
            raise CandidateSpecError(f"candidate {spec!r}: ε must be in [0, 1], got {eps:g}")
        base = parse_candidate(inner, current, current_levers, catalog=catalog) if sep2 else None
        if base is not None and base.epsilon:
            raise CandidateSpecError(f"candidate {spec!r}: ε-greedy can be applied once")
        if base is None:
            base = CandidatePolicy(
                CURRENT, current, dict(current_levers) if current_levers is not None else None
            )
        return CandidatePolicy(text, base.policy, base.levers, eps)
    if head == "model":
        raise CandidateSpecError(
            f"candidate {spec!r}: another propensity model version cannot be judged offline yet (the decision log "
            "holds only the serving model's propensities); compare models with the champion/challenger arms"
        )
    raise CandidateSpecError(f"candidate {spec!r}: unknown form {head!r}; use one of: {SPEC_FORMS}")


def candidates_for(
    specs: Sequence[str],
    current: ActionPolicy,
    current_levers: Mapping[str, float] | None = None,
    *,
    catalog: pl.DataFrame | None = None,
) -> list[CandidatePolicy]:
    """The baseline :data:`CURRENT` followed by the candidates ``specs`` name (duplicates and ``current`` once).

    Raises:
        CandidateSpecError: a SPEC that cannot be understood.
    """
    out = [CandidatePolicy(CURRENT, current, dict(current_levers) if current_levers is not None else None)]
    seen = {CURRENT}
    for spec in specs:
        candidate = parse_candidate(spec, current, current_levers, catalog=catalog)
        if candidate.name not in seen:
            seen.add(candidate.name)
            out.append(candidate)
    return out


# --- the replay ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoggedFacts:
    values: dict[str, float]
    reasons: dict[str, str | None]


@dataclass(frozen=True)
class _LoggedCondition:
    """A rule that answers with its logged verdict when the logging policy had it, else evaluates the profile."""

    condition: Condition
    action_id: str
    group: str
    name: str
    known: bool

    @property
    def text(self) -> str:
        return self.condition.text

    def evaluate(self, scope: RuleScope) -> RuleOutcome:
        facts = scope.profile.get(_FACTS)
        if self.known and isinstance(facts, _LoggedFacts) and self.action_id in facts.reasons:
            # arbitrate writes every failed rule into the reason as "<group> rule <name> (<text>) failed".
            failed = f"{self.group} rule {self.name} ({self.text}) failed" in (
                facts.reasons[self.action_id] or ""
            )
            return RuleOutcome(not failed, "as logged" if failed else "")
        return self.condition.evaluate(scope)


@dataclass(frozen=True)
class _LoggedValue:
    """A value rule that answers with the logged V when it is the logging policy's, else computes it."""

    value: Any
    action_id: str
    known: bool

    def compute(
        self, profile: Mapping[str, Any], defaults: PolicyDefaults, attributes: Mapping[str, Any]
    ) -> tuple[float, str]:
        facts = profile.get(_FACTS)
        if self.known and isinstance(facts, _LoggedFacts) and self.action_id in facts.values:
            return facts.values[self.action_id], "as logged"
        return self.value.compute(profile, defaults, attributes)


def _replay_policy(candidate: ActionPolicy, logging: ActionPolicy) -> ActionPolicy:
    """``candidate`` with rules and values that read the logged facts where the logging policy had them."""
    out = candidate.model_copy(deep=True)
    for action_id, rule in list(out.actions.items()):
        old = logging.actions.get(action_id)
        same_value = (
            old is not None
            and old.value == rule.value
            and old.attributes == rule.attributes
            and logging.defaults.expected_basket == candidate.defaults.expected_basket
        )
        logged_rules = {(g, n, c.text) for g, n, c in old.rules()} if old is not None else set()
        update: dict[str, Any] = {"value": _LoggedValue(rule.value, action_id, same_value)}
        for group in RULE_GROUPS:
            update[group] = {
                name: _LoggedCondition(cond, action_id, group, name, (group, name, cond.text) in logged_rules)
                for name, cond in getattr(rule, group).items()
            }
        # model_copy(update=...) skips validation: the stand-ins only need what arbitrate calls on them.
        out.actions[action_id] = rule.model_copy(update=update)
    return out


class _LoggedContacts:
    """The contact gate of a replay: an action the log shows stopped by a contact limit stays stopped."""

    def __init__(self, reasons: Mapping[str, str | None]) -> None:
        self.reasons = reasons

    def allowed(
        self, customer_id: str, action_id: str, channel: str | None, now: datetime
    ) -> tuple[bool, str]:
        reason = self.reasons.get(action_id) or ""
        for part in reason.split("; "):
            if part.startswith(_CONTACT_REASONS):
                return False, part
        return True, "as logged"


def _marketing_consent(record: DecisionRecord, logging: ActionPolicy) -> bool:
    seen = [
        c
        for c in record.candidates
        if (rule := logging.actions.get(c.action_id)) is not None and rule.marketing and not rule.is_no_action
    ]
    return bool(seen) and all("no marketing consent" not in (c.reason or "") for c in seen)


def logging_probability(record: DecisionRecord) -> float:
    """μ(chosen | x): the probability with which the service chose the logged action (1.0 if not logged)."""
    p = getattr(record, "probability", None)
    return 1.0 if p is None else float(p)


@dataclass(frozen=True)
class ReplayedDecision:
    """What a candidate does with one logged decision.

    Attributes:
        target: π(a | x) over actions (:data:`NOTHING` when nothing passes); sums to 1.
        predicted: (P, V) of every action the candidate's arbitration scored (V 0 for doing nothing).
        no_action: the ids of the no-action alternative.
    """

    target: dict[str, float]
    predicted: dict[str, tuple[float, float]] = field(default_factory=dict)
    no_action: frozenset[str] = frozenset()


def replay(
    records: Sequence[DecisionRecord],
    candidate: CandidatePolicy,
    logging_policy: ActionPolicy,
    *,
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ReplayedDecision]:
    """Re-arbitrate each logged decision under ``candidate`` (see the module docstring for the inputs).

    Args:
        records: the logged decisions.
        candidate: the policy to replay.
        logging_policy: the policy the log was made with (the champion policy file).
        profiles: customer profiles by id, for rules and values the log cannot answer; None: such rules fail.

    Returns:
        one :class:`ReplayedDecision` per record, in order.
    """
    policy = _replay_policy(candidate.policy, logging_policy)
    eps = candidate.epsilon
    out: list[ReplayedDecision] = []
    for record in records:
        # An action the logging policy did not know has no logged verdicts or value to reuse.
        known = [c for c in record.candidates if not (c.reason or "").startswith("not in policy ")]
        facts = _LoggedFacts(
            values={c.action_id: c.value for c in known},
            reasons={c.action_id: c.reason for c in known},
        )
        profile: dict[str, Any] = {**(profiles or {}).get(record.customer_id, {})}
        profile["customer_id"] = record.customer_id
        profile[_FACTS] = facts
        decision = arbitrate(
            [
                ActionCandidate(c.action_id, min(max(float(c.propensity), 0.0), 1.0))
                for c in record.candidates
            ],
            policy,
            profile,
            {"channel": record.channel, "now": record.timestamp},
            {PERSONALISATION: record.personalised, MARKETING: _marketing_consent(record, logging_policy)},
            _LoggedContacts(facts.reasons),
            1,
            levers=candidate.levers,
            customer_id=record.customer_id,
            now=record.timestamp,
        )
        scored = [*decision.actions, *decision.filtered]
        greedy = decision.chosen.action_id if decision.chosen is not None else NOTHING
        eligible = getattr(decision, "arms", None)
        if eligible is None:  # a Decision without arms: those offered and those only ranked out
            eligible = [a.action_id for a in decision.actions] + [
                a.action_id for a in decision.filtered if (a.reason or "").startswith(_RANKING_REASONS)
            ]
        target: dict[str, float] = {greedy: 1.0}
        if eps > 0 and eligible:
            target = {a: eps / len(eligible) for a in eligible}
            target[greedy] = target.get(greedy, 0.0) + (1.0 - eps)
        out.append(
            ReplayedDecision(
                target=target,
                predicted={a.action_id: (a.propensity, a.value) for a in scored},
                no_action=frozenset(a.action_id for a in scored if a.kind == NO_ACTION_KIND),
            )
        )
    return out
