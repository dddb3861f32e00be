"""``/next_best_action`` after the customer view: the model input encoded per request, the propensities of a
batch in one forward pass per model, then each decision arbitrated, explored and recorded (contact and decision
log) in one transaction (:class:`Decider`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from nextbest.features.schema import CHANNEL
from nextbest.serving import api
from nextbest.serving.contact import ContactLedger
from nextbest.serving.customer_view import CustomerView, affinities, model_features
from nextbest.serving.decision_log import DecisionLog, DecisionRecord
from nextbest.serving.decisions import (
    MARKETING,
    PERSONALISATION,
    ActionCandidate,
    Decision,
    arbitrate,
    explore,
)
from nextbest.serving.levers import PolicyState
from nextbest.serving.model_slots import PropensitySlot
from nextbest.serving.policy import ActionPolicy
from nextbest.serving.state_store import StateStore


@dataclass
class DecisionPlan:
    """A next-best-action request with its encoded model input, waiting for the batch's forward pass."""

    position: int
    request: api.NextBestActionRequest
    arm: str
    pslot: PropensitySlot
    now: datetime
    view: CustomerView
    wanted: list[str]
    rows: Any
    scores: dict[str, float] = field(default_factory=dict)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run a forward pass on one thread. The propensity network is tiny: torch's intra-op threads on a couple
    of cores cost ten times more than the work (measured: 24 ms against 0.6 ms per call). Restored after, so
    the process's other torch work (training in the same process) keeps its threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def plan_decision(
    position: int,
    request: api.NextBestActionRequest,
    arm: str,
    pslot: PropensitySlot,
    now: datetime,
    view: CustomerView,
    actions: Iterable[str],
) -> DecisionPlan:
    """The request's plan: the policy's ``actions`` the model knows, encoded for the model."""
    wanted = [a for a in actions if a in pslot.action_ids]
    rows = (
        pslot.scorer.encoder.encode_one(
            model_features(view),
            wanted,
            request.channel,
            now,
            affinities=affinities(pslot, view),
        )
        if wanted
        else None
    )
    return DecisionPlan(position, request, arm, pslot, now, view, wanted, rows)


def score_plans(plans: Sequence[DecisionPlan]) -> None:
    """Calibrated propensities of every plan: one forward pass per propensity model."""

    groups: dict[int, list[DecisionPlan]] = {}
    for plan in plans:
        if plan.rows is not None:
            groups.setdefault(id(plan.pslot), []).append(plan)
    for group in groups.values():
        with one_torch_thread():
            probabilities = group[0].pslot.scorer.probabilities([p.rows for p in group])
        offset = 0
        for plan in group:
            n = len(plan.wanted)
            plan.scores = dict(zip(plan.wanted, probabilities[offset : offset + n].tolist(), strict=True))
            offset += n


@dataclass(frozen=True)
class Decider:
    """Decides for a scored plan and records the decision that counts. Thread-safe.

    Attributes:
        policy: the action policy.
        levers: its levers.
        ledger: the contact ledger (limits; the chosen action's contact).
        decision_log: where a decision that counts is logged.
        store: the state store (the decision's transaction, the exploration budget).
        lock: the engine's lock, held while deciding.
        is_erased: whether an id was erased (nothing is stored about it).
    """

    policy: ActionPolicy
    levers: PolicyState
    ledger: ContactLedger
    decision_log: DecisionLog
    store: StateStore
    lock: threading.RLock
    is_erased: Callable[[str], bool]

    def decide(
        self,
        plan: DecisionPlan,
        *,
        decision_id: str,
        profile: dict[str, Any],
        versions: dict[str, str],
        started: float,
    ) -> api.NextBestActionResponse:
        """Arbitrate and explore the plan's candidates, record the contact and log the decision.

        Args:
            plan: a scored plan (:func:`score_plans`).
            decision_id: the decision's id; it seeds the exploration draw, so the decision can be replayed.
            profile: what the policy's rules read about the customer.
            versions: the model versions deciding (``recommender``, ``propensity``).
            started: :func:`time.perf_counter` when the request came (the logged latency).
        """
        request, view, now = plan.request, plan.view, plan.now
        cid = request.customer_id
        candidates = [ActionCandidate(a, min(max(float(p), 0.0), 1.0)) for a, p in plan.scores.items()]
        context = {**request.context, CHANNEL: request.channel, "now": now}
        consent = {PERSONALISATION: view.consent[PERSONALISATION], MARKETING: view.consent[MARKETING]}
        exploration = self.policy.exploration

        def decide(may_explore: bool) -> Decision:
            ranked = arbitrate(
                candidates,
                self.policy,
                profile,
                context,
                consent,
                self.ledger,
                request.n,
                levers=self.levers.levers,
                customer_id=cid,
                now=now,
            )
            return explore(ranked, exploration, decision_id, request.n, may_explore=may_explore)

        def within_budget(tx: Any) -> bool:
            if not exploration.active or not exploration.budgeted:
                return exploration.active
            day = datetime(now.year, now.month, now.day)
            decided, explored = self.store.exploration_counts(day, day + timedelta(days=1), connection=tx)
            return exploration.may_explore(decided, explored)

        def logged(decision: Decision) -> DecisionRecord:
            return DecisionRecord.from_decision(
                decision,
                arm=plan.arm,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                model_versions=versions,
                decision_id=decision_id,
                timestamp=now,
            )

        recorded = False
        # A preview (record_contact false) is not a decision: neither a contact nor a line of the decision log.
        # Nothing at all is stored about an erased id. A decision that counts is made in a transaction that no
        # other replica deciding for the customer can enter: the contact limits hold across replicas.
        with self.lock:
            if request.record_contact and not self.is_erased(cid):
                try:
                    with self.store.deciding(cid) as tx:
                        self.ledger.refresh(cid, connection=tx)
                        decision = decide(within_budget(tx))
                        chosen = decision.chosen
                        if chosen is not None and not decision.is_no_action:
                            self.ledger.record_contact(
                                cid, chosen.action_id, chosen.delivery_channel, now, connection=tx
                            )
                            recorded = True
                        record = logged(decision)
                        self.decision_log.append(record, connection=tx)
                except Exception:
                    self.ledger.refresh(cid)  # the transaction was rolled back: so is the contact in memory
                    raise
            else:
                decision = decide(False)  # a preview never explores
                record = logged(decision)
        return api.NextBestActionResponse(
            decision_id=record.decision_id,
            customer_id=cid,
            channel=request.channel,
            actions=decision.actions,
            no_action=decision.is_no_action,
            personalised=decision.personalised,
            policy_version=decision.policy_version,
            model_versions=versions,
            arm=plan.arm,
            contact_recorded=recorded,
            filtered=decision.filtered if request.explain else [],
            explored=decision.explored,
            probability=decision.probability,
        )
