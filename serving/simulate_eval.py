"""What each policy of ``nextbest simulate`` is worth on a logged decision, from the planted truth (pure functions).

Every decision is judged on its own *arms* — the actions that passed every eligibility, consent and contact
check when the service decided (``eligible`` in the decision log), the no-action alternative included — so the
learned, the random and the oracle policy face the same rules and the same action values V (the V the service
logged for that customer, no-action's included). The true expected reward of choosing an arm:

* ``value``: p_true(customer, action) × V(action) — for the no-action alternative its planted organic purchase
  probability × its V, as the policy's P × V × L scores it (doing nothing is worth the purchase that may come);
* ``acceptance``: p_true(customer, action), 0 for doing nothing (nothing was offered);
* ``offer_value``: p_true × V, 0 for doing nothing — the reward the offline evaluation observes
  (:func:`serving.policy_eval.decision_rewards` counts accepted offers only), so a candidate's truth beside its
  estimates uses this one.

The policies:

* **learned**: the action the service chose (exploration included: what customers were shown);
* **greedy**: the arm the service ranked first (what it would have chosen without exploring);
* **random**: an arm drawn uniformly (its expectation: the mean over the arms);
* **oracle**: the arm with the highest true expected ``value``.

A candidate policy's *truth* on the log (:func:`candidate_truth`) is the same expectation under the candidate's
replayed π(a | x) (:func:`serving.policy_replay.replay`), to set beside the offline estimates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NO_ACTION_KIND = "none"
POLICIES: tuple[str, ...] = ("learned", "greedy", "random", "oracle")
METRICS: tuple[str, ...] = ("acceptance", "value", "offer_value")


@dataclass(frozen=True)
class DecisionTruth:
    """One logged decision with the planted truth of each of its candidate actions (arrays aligned with
    ``actions``).

    Attributes:
        decision_id: the decision log's id.
        actions: every candidate action of the decision.
        eligible: which candidates were arms.
        value: the V the service logged for each.
        score: the score (P × V × L) the service logged for each.
        p_true: the planted response probability of each (on its delivery channel, at the decision's time).
        no_action: which candidates are the no-action alternative.
        chosen: the position of the chosen action (-1: nothing was chosen).
        accepted: whether the customer accepted the chosen action (drawn from the truth).
    """

    decision_id: str
    actions: tuple[str, ...]
    eligible: np.ndarray
    value: np.ndarray
    score: np.ndarray
    p_true: np.ndarray
    no_action: np.ndarray
    chosen: int
    accepted: bool = False

    def expected(self, metric: str) -> np.ndarray:
        """Each candidate's true expected reward under ``metric`` (see the module docstring)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "acceptance":
            return np.where(self.no_action, 0.0, self.p_true)
        value = self.p_true * self.value
        return np.where(self.no_action, 0.0, value) if metric == "offer_value" else value

    def reward_of(self, action_id: str | None, metric: str) -> float:
        """The true expected reward of one action (0 for an action the decision did not consider, or None)."""
        if action_id is None or action_id not in self.actions:
            return 0.0
        return float(self.expected(metric)[self.actions.index(action_id)])


def greedy_position(truth: DecisionTruth) -> int:
    """The arm the service ranks first: highest logged score, ties to doing nothing, then the smaller action id
    (the order of :func:`serving.decisions.arbitrate`); -1 without arms."""
    arms = np.flatnonzero(truth.eligible)
    if arms.size == 0:
        return -1
    return int(min(arms, key=lambda k: (-truth.score[k], not truth.no_action[k], truth.actions[k])))


def oracle_position(truth: DecisionTruth, metric: str = "value") -> int:
    """The arm with the highest true expected reward (ties to the earlier candidate); -1 without arms."""
    arms = np.flatnonzero(truth.eligible)
    if arms.size == 0:
        return -1
    reward = truth.expected(metric)[arms]
    return int(arms[int(np.argmax(reward))])


def policy_rewards(truth: DecisionTruth) -> dict[str, dict[str, float]]:
    """The true expected acceptance and value of each policy of :data:`POLICIES` on one decision.

    Returns:
        policy → {``acceptance``, ``value``}; a decision without arms is worth 0 to every policy.
    """
    arms = np.flatnonzero(truth.eligible)
    out: dict[str, dict[str, float]] = {}
    picks = {
        "learned": truth.chosen,
        "greedy": greedy_position(truth),
        "oracle": oracle_position(truth, "value"),
    }
    for name, pick in picks.items():
        out[name] = {m: float(truth.expected(m)[pick]) if pick >= 0 else 0.0 for m in METRICS}
    out["random"] = {m: float(truth.expected(m)[arms].mean()) if arms.size else 0.0 for m in METRICS}
    return {name: out[name] for name in POLICIES}


def summarise(truths: Sequence[DecisionTruth]) -> dict[str, Any]:
    """Per policy the mean true expected acceptance, value and offer value per decision over ``truths``; the
    learned policy also gets its realised acceptance (the drawn responses).

    Returns:
        ``{"decisions": n, "learned": {"acceptance", "value_per_decision", "offer_value_per_decision",
        "realised_acceptance"}, "greedy": {…}, "random": {…}, "oracle": {…}}`` (zeros for no decisions).
    """
    n = len(truths)
    sums = {p: dict.fromkeys(METRICS, 0.0) for p in POLICIES}
    for truth in truths:
        for policy, rewards in policy_rewards(truth).items():
            for metric, reward in rewards.items():
                sums[policy][metric] += reward
    out: dict[str, Any] = {"decisions": n}
    for policy in POLICIES:
        out[policy] = {
            "acceptance": sums[policy]["acceptance"] / n if n else 0.0,
            "value_per_decision": sums[policy]["value"] / n if n else 0.0,
            "offer_value_per_decision": sums[policy]["offer_value"] / n if n else 0.0,
        }
    out["learned"]["realised_acceptance"] = sum(t.accepted for t in truths) / n if n else 0.0
    return out


def value_ratio(days: Sequence[Mapping[str, Any]], numerator: str, denominator: str) -> float | None:
    """Σ value of ``numerator`` / Σ value of ``denominator`` over ``days`` (each a :func:`summarise` result),
    weighting each day by its decisions: the ratio of values per decision over the whole period. None when the
    denominator's value is 0."""
    top = sum(d[numerator]["value_per_decision"] * d["decisions"] for d in days)
    bottom = sum(d[denominator]["value_per_decision"] * d["decisions"] for d in days)
    return top / bottom if bottom else None


def candidate_truth(
    targets: Sequence[Mapping[str, float]], truths: Sequence[DecisionTruth], metric: str = "offer_value"
) -> float:
    """The true expected reward per decision of a candidate whose π(a | x_i) is ``targets[i]`` (actions the
    decision did not consider, such as :data:`serving.policy_replay.NOTHING`, earn 0).

    Raises:
        ValueError: the lengths differ, or there are no decisions.
    """
    if len(targets) != len(truths):
        raise ValueError(f"{len(targets)} target distributions for {len(truths)} decisions")
    if not truths:
        raise ValueError("no decisions: a candidate's truth needs at least one")
    total = 0.0
    for target, truth in zip(targets, truths, strict=True):
        total += sum(share * truth.reward_of(action, metric) for action, share in target.items())
    return total / len(truths)
