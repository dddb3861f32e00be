"""Arbitration: choose the next best actions by propensity × value × lever, within rules, consent and contact limits.

For each candidate action the model supplies a calibrated propensity P; the policy gives its value V and lever L;
the score is P × V × L. An action is offered only if every check lets it through, in this order:

1. it is in the policy; 2. marketing consent, for marketing actions; 3. the request channel is one of its
channels; 4. its eligibility, applicability and suitability rules; 5. the contact policy for its delivery
channel. The no-action alternative (kind ``none``) competes with its own P × V × L (e.g. the organic purchase
probability × the value of that purchase) and skips consent and contact checks. The ranking is score descending;
ties go to the no-action alternative, then to the smaller action_id, so a decision is reproducible. Actions that
score below no-action are not offered ("no action" is the better answer for them).

Exploration (:func:`explore`, after :func:`arbitrate`) chooses among the k *arms* — the actions that passed every
check above, no-action included — from a generator seeded by the decision's id. ε-greedy draws whether it
explores (probability ε) and which arm it then takes, uniformly; Thompson sampling draws each arm's propensity from
a Beta around the model's P and takes the arm with the best drawn score. The chosen arm is put first; the rest of
the ranking follows. Each arm's probability of being chosen is recorded (ε-greedy: 1 − ε + ε / k for the best,
ε / k for the others; Thompson: the share of its draws each arm wins), so that the decision log can evaluate other
policies offline.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from nextbest.features.schema import CHANNEL, CUSTOMER_ID, ITEM_ID
from nextbest.serving.policy import NO_ACTION_KIND, ActionPolicy, Exploration
from nextbest.serving.policy_rules import RuleScope

MARKETING = "marketing"
PERSONALISATION = "personalisation"


@dataclass(frozen=True)
class ActionCandidate:
    """An action the propensity model scored for this customer.

    Attributes:
        action_id: as in the policy and ``action_catalog``.
        propensity: calibrated P(response), in [0, 1].
    """

    action_id: str
    propensity: float


class ContactGate(Protocol):
    """What arbitration asks the contact state (:class:`serving.contact.ContactLedger` implements it)."""

    def allowed(
        self, customer_id: str, action_id: str, channel: str | None, now: datetime
    ) -> tuple[bool, str]: ...


class ScoredAction(BaseModel):
    """One action with its score and why it was, or was not, offered."""

    action_id: str
    kind: str
    propensity: float
    value: float
    lever: float
    score: float
    value_basis: str = ""
    """How V was worked out (e.g. ``margin 0.25 × expected basket 48.00``)."""
    delivery_channel: str | None = None
    rules_passed: list[str] = Field(default_factory=list)
    """Names of the checks and rules that let it through, in evaluation order."""
    reason: str | None = None
    """Why it is not offered (None for offered actions)."""
    rank: int | None = None
    """1-based position among offered actions."""


class Decision(BaseModel):
    """The answer of :func:`arbitrate`."""

    customer_id: str
    channel: str | None
    policy_version: str
    personalised: bool
    """False without personalisation consent: P was segment-level and the answer says so."""
    actions: list[ScoredAction]
    """Offered actions, best first (at most n; ends at the no-action entry when that ranks within n)."""
    filtered: list[ScoredAction]
    """Everything else, each with its reason, in candidate order."""
    arms: list[str] = Field(default_factory=list)
    """Every action that passed every check (the no-action alternative included), best first: what exploration
    chooses among."""
    arm_probabilities: dict[str, float] = Field(default_factory=dict)
    """Each arm's probability of being chosen under the policy that decided (the best arm 1.0 without
    exploration)."""
    explored: bool = False
    """The choice was an exploration draw (uniform among the arms; two arms or more)."""

    @property
    def probability(self) -> float:
        """The probability with which :attr:`chosen` was chosen (1.0 when nothing is chosen)."""
        chosen = self.chosen
        return 1.0 if chosen is None else self.arm_probabilities.get(chosen.action_id, 1.0)

    @property
    def chosen(self) -> ScoredAction | None:
        """The best action (possibly the no-action alternative); None when nothing at all passes."""
        return self.actions[0] if self.actions else None

    @property
    def is_no_action(self) -> bool:
        """True when the answer is to do nothing."""
        return self.chosen is None or self.chosen.kind == NO_ACTION_KIND


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
    return None


def _check_candidates(candidates: Sequence[ActionCandidate]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in candidates:
        p = c.propensity
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or not 0 <= p <= 1:
            raise ValueError(f"propensity of {c.action_id!r} must be a probability in [0, 1], got {p!r}")
        if c.action_id in out:
            raise ValueError(f"action {c.action_id!r} appears twice among the candidates")
        out[c.action_id] = float(p)
    return out


def arbitrate(
    candidates: Sequence[ActionCandidate],
    policy: ActionPolicy,
    profile: Mapping[str, Any],
    context: Mapping[str, Any],
    consent: Mapping[str, bool],
    contact_state: ContactGate | None,
    n: int,
    *,
    levers: Mapping[str, float] | None = None,
    customer_id: str | None = None,
    now: datetime | None = None,
) -> Decision:
    """Rank the candidate actions by P × V × L within the policy's rules, consent and contact limits.

    Args:
        candidates: one calibrated propensity per action. Policy actions missing from them enter with their
            ``default_propensity`` if they have one; the no-action alternative always enters (P = 0 at worst).
        policy: the action policy.
        profile: the customer's profile (a ``profiles.parquet`` row plus live fields such as ``bought_brand``).
        context: the request context; ``channel`` is the request channel and ``now`` (datetime or ISO text)
            the decision time.
        consent: granted purposes (``personalisation``, ``marketing``); a missing purpose counts as not granted.
        contact_state: the contact ledger (None: no contact limits, e.g. offline replays).
        n: how many actions to return at most.
        levers: run-time lever overrides by action (:attr:`serving.levers.PolicyState.levers`).
        customer_id: defaults to ``profile["customer_id"]``.
        now: defaults to ``context["now"]``, else the current UTC time.

    Returns:
        the decision: offered actions ranked, the rest with their reasons, and the personalisation flag.

    Raises:
        ValueError: ``n`` < 1, a propensity outside [0, 1], or a duplicate candidate.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    propensities = _check_candidates(candidates)
    levers = levers or {}
    customer = customer_id if customer_id is not None else str(profile.get(CUSTOMER_ID, ""))
    channel = context.get(CHANNEL)
    at = now or _as_datetime(context.get("now")) or _utcnow()
    # Policy actions the model gave no P for enter with their default_propensity, if they have one; the
    # no-action alternative always enters (with P = 0 at worst), so "do nothing" is always an answer.
    for action_id, rule in policy.actions.items():
        if action_id not in propensities and (rule.default_propensity is not None or rule.is_no_action):
            propensities[action_id] = rule.default_propensity or 0.0

    passing: list[ScoredAction] = []
    filtered: list[ScoredAction] = []
    for action_id, p in propensities.items():
        rule = policy.actions.get(action_id)
        if rule is None:
            filtered.append(
                ScoredAction(
                    action_id=action_id,
                    kind="unknown",
                    propensity=p,
                    value=0.0,
                    lever=0.0,
                    score=0.0,
                    reason=f"not in policy {policy.version}",
                )
            )
            continue
        value, basis = rule.value.compute(profile, policy.defaults, rule.attributes)
        lever = float(levers.get(action_id, rule.lever if rule.lever is not None else 1.0))
        delivery = rule.delivery_channel or channel
        scored = ScoredAction(
            action_id=action_id,
            kind=rule.kind or "offer",
            propensity=p,
            value=value,
            lever=lever,
            score=p * value * lever,
            value_basis=basis,
            delivery_channel=None if rule.is_no_action else delivery,
        )
        reasons: list[str] = []
        if not rule.is_no_action and rule.marketing:
            if consent.get(MARKETING, False):
                scored.rules_passed.append("marketing_consent")
            else:
                reasons.append("no marketing consent")
        if rule.channels is not None:
            if channel in rule.channels:
                scored.rules_passed.append("channel")
            else:
                reasons.append(f"channel {channel!r} not allowed (allowed: {', '.join(rule.channels)})")
        scope = RuleScope(profile=profile, context=context, action=rule.attributes)
        for group, name, cond in rule.rules():
            outcome = cond.evaluate(scope)
            if outcome.passed:
                scored.rules_passed.append(name)
            else:
                detail = f": {outcome.detail}" if outcome.detail else ""
                reasons.append(f"{group} rule {name} ({cond.text}) failed{detail}")
        # The ledger is asked last: it is the only check that may touch more than this request's data.
        if not reasons and not rule.is_no_action and contact_state is not None:
            ok, why = contact_state.allowed(customer, action_id, delivery, at)
            if ok:
                scored.rules_passed.append("contact_policy")
            else:
                reasons.append(why)
        if reasons:
            scored.reason = "; ".join(reasons)
            filtered.append(scored)
        else:
            passing.append(scored)

    passing.sort(key=lambda a: (-a.score, a.kind != NO_ACTION_KIND, a.action_id))
    floor = next((a for a in passing if a.kind == NO_ACTION_KIND), None)
    offered: list[ScoredAction] = []
    below_floor = False
    for a in passing:
        if below_floor:
            a.reason = f"scores {a.score:.4g}, below no action ({floor.score if floor else 0.0:.4g})"
        elif len(offered) >= n:
            a.reason = f"ranked below the top {n}"
        else:
            a.rank = len(offered) + 1
            offered.append(a)
        below_floor = below_floor or a is floor
        if a.reason is not None:
            filtered.append(a)
    order = {a: i for i, a in enumerate(propensities)}
    filtered.sort(key=lambda a: order[a.action_id])
    return Decision(
        customer_id=customer,
        channel=channel,
        policy_version=policy.version,
        personalised=bool(consent.get(PERSONALISATION, False)),
        actions=offered,
        filtered=filtered,
        arms=[a.action_id for a in passing],
        arm_probabilities={a.action_id: 1.0 if k == 0 else 0.0 for k, a in enumerate(passing)},
    )


def decision_rng(decision_id: str, seed: int = 0) -> random.Random:
    """The random generator of one decision: the same id (and seed) always draws the same numbers."""
    digest = hashlib.blake2b(f"{seed}:{decision_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def epsilon_greedy_probabilities(arms: Sequence[str], epsilon: float) -> dict[str, float]:
    """Each arm's probability of being chosen by ε-greedy: 1 − ε + ε / k for the first (best), ε / k for the
    others (k arms)."""
    k = len(arms)
    out = {a: epsilon / k for a in arms}
    if arms:
        out[arms[0]] = (1.0 - epsilon) + epsilon / k
    return out


def thompson_draws(
    propensities: Sequence[float],
    payoffs: Sequence[float],
    prior_strength: float,
    samples: int,
    rng: np.random.Generator,
) -> tuple[int, dict[int, float]]:
    """Thompson sampling over k arms: each arm's P is drawn from Beta(P·s, (1 − P)·s), its score is the drawn P ×
    its payoff (V × L); the best drawn score wins.

    Returns:
        the arm the first draw chooses, and each arm's share of the ``samples`` draws it wins (its probability
        of being chosen, estimated; ties go to the earlier arm).
    """
    p = np.clip(np.asarray(propensities, dtype=np.float64), 1e-6, 1 - 1e-6)
    draws = rng.beta(p * prior_strength, (1 - p) * prior_strength, size=(samples, len(p)))
    winners = (draws * np.asarray(payoffs, dtype=np.float64)).argmax(axis=1)
    counts = np.bincount(winners, minlength=len(p))
    return int(winners[0]), {k: float(c) / samples for k, c in enumerate(counts)}


def explore(
    decision: Decision,
    exploration: Exploration,
    decision_id: str,
    n: int,
    *,
    may_explore: bool = True,
) -> Decision:
    """The decision after exploration: ε-greedy (the best arm, or — with probability ε — a uniformly drawn one) or
    Thompson sampling (:func:`thompson_draws`), as the policy's ``[exploration]`` says.

    The draws come from :func:`decision_rng` (ε-greedy: whether to explore, then which arm; Thompson: a numpy
    generator seeded from it), so the same decision id always gives the same answer. Exploration chooses among
    :attr:`Decision.arms` only: an action filtered by a rule, consent or the contact policy is never chosen.
    The explored arm becomes rank 1 and the best arms follow (ending at the no-action alternative, at most n);
    one explored to no-action stands alone, as no-action always does.

    Args:
        decision: what :func:`arbitrate` answered.
        exploration: the policy's ``[exploration]``.
        decision_id: the id the decision is logged under.
        n: the most actions to return (as given to :func:`arbitrate`).
        may_explore: False when the budget is spent or the decision is not logged (a preview): the best arm,
            with probability 1.0.

    Returns:
        a new decision (``decision`` is left as it is) with :attr:`Decision.arm_probabilities` and
        :attr:`Decision.explored` set.
    """
    arms = decision.arms
    if not (may_explore and exploration.active and arms):
        return decision
    rng = decision_rng(decision_id, exploration.seed)
    scored = {a.action_id: a for a in [*decision.filtered, *decision.actions]}
    if exploration.method == "thompson":
        first, shares = thompson_draws(
            [scored[a].propensity for a in arms],
            [scored[a].value * scored[a].lever for a in arms],
            exploration.prior_strength,
            exploration.samples,
            np.random.default_rng(rng.getrandbits(64)),
        )
        pick = arms[first]
        probabilities = {a: shares[k] for k, a in enumerate(arms)}
        explored = pick != arms[0]
    else:
        fires = rng.random() < exploration.epsilon
        drawn = arms[rng.randrange(len(arms))]
        probabilities = epsilon_greedy_probabilities(arms, exploration.epsilon)
        pick = drawn if fires else arms[0]
        explored = fires and len(arms) > 1
    update: dict[str, Any] = {"arm_probabilities": probabilities, "explored": explored}
    if pick == arms[0]:
        return decision.model_copy(update=update)
    picked = scored[pick].model_copy(
        update={"reason": None, "rules_passed": [*scored[pick].rules_passed, "exploration"]}
    )
    rest = [] if picked.kind == NO_ACTION_KIND else [a for a in decision.actions if a.action_id != pick]
    offered = [picked, *rest[: n - 1]]
    offered = [a.model_copy(update={"rank": k + 1}) for k, a in enumerate(offered)]
    why = "not offered: exploration chose no action" if not rest else f"ranked below the top {n}"
    pushed_out = [
        a.model_copy(update={"rank": None, "reason": why})
        for a in decision.actions
        if a.action_id != pick and a.action_id not in {o.action_id for o in offered}
    ]
    filtered = [a for a in decision.filtered if a.action_id != pick] + pushed_out
    return decision.model_copy(update={**update, "actions": offered, "filtered": filtered})


def bought_attributes(
    item_ids: Iterable[str],
    items: pl.DataFrame,
    attributes: Sequence[str] = ("brand", "sport"),
) -> dict[str, list[Any]]:
    """``bought_<attr>``: the distinct values of each attribute among items the customer bought recently.

    Merge the result into the profile so a rule can say "does not already own it", e.g.
    ``action.brand not in bought_brand``. Unknown items and null values are skipped; an attribute the items
    table lacks gives an empty list.

    Args:
        item_ids: items the customer bought in the window that counts as "recently".
        items: the items table.
        attributes: which attributes to collect.
    """
    ids = list(dict.fromkeys(item_ids))
    present = [a for a in attributes if a in items.columns]
    if not ids or not present:
        return bought_values([], attributes)
    return bought_values(
        items.filter(pl.col(ITEM_ID).is_in(ids)).select(present).iter_rows(named=True), attributes
    )


def bought_values(bought: Iterable[Mapping[str, Any]], attributes: Sequence[str]) -> dict[str, list[Any]]:
    """The rule of ``bought_<attr>``: for each attribute, the distinct values (sorted, nulls and absent
    attributes skipped) among the attributes of the items bought. :func:`bought_attributes` (from the items
    table) and the service's rule profile (from its item attributes) both call it."""
    values: dict[str, set[Any]] = {a: set() for a in attributes}
    for item in bought:
        for a in attributes:
            v = item.get(a)
            if v is not None:
                values[a].add(v)
    return {f"bought_{a}": sorted(v) for a, v in values.items()}
