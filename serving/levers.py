"""Run-time levers: an action's lever changed while the service runs, kept in the state store so that a restart
and every replica see it, and the audit log of every change.
"""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from nextbest.serving.policy import ActionPolicy, PolicyError
from nextbest.serving.policy_rules import _is_number
from nextbest.serving.times import UtcDateTime


class LeverChange(BaseModel):
    """One change of a lever, for the audit log."""

    action_id: str
    old: float
    new: float
    actor: str
    at: UtcDateTime
    policy_version: str


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class PolicyState:
    """A policy plus its run-time lever overrides, kept in the state store so a restart and every replica see them.

    Overrides for actions the current policy no longer has are left out on load and listed in
    :attr:`dropped_overrides`.
    """

    def __init__(self, policy: ActionPolicy, store: Any = None) -> None:
        """Load the saved levers, if any.

        Args:
            policy: the loaded policy.
            store: the :class:`~serving.state_store.StateStore` holding the levers; None keeps them in memory.
        """
        self.policy = policy
        self.store = store
        self._lock = threading.Lock()
        self._overrides: dict[str, float] = {}
        self._history: list[dict[str, Any]] = []
        self.dropped_overrides: dict[str, float] = {}
        self.reload()

    def reload(self) -> None:
        """Read the levers and their history from the store again (another replica may have changed one)."""
        if self.store is None:
            return
        saved, history = self.store.levers(), self.store.lever_history()
        with self._lock:
            self._overrides = {a: v for a, v in saved.items() if a in self.policy.actions}
            self.dropped_overrides = {a: v for a, v in saved.items() if a not in self.policy.actions}
            self._history = history

    @property
    def levers(self) -> dict[str, float]:
        """The effective lever of every action (override, else the policy's)."""
        with self._lock:
            return {a: self._overrides.get(a, float(r.lever or 0.0)) for a, r in self.policy.actions.items()}

    def lever(self, action_id: str) -> float:
        rule = self.policy.action(action_id)
        with self._lock:
            return self._overrides.get(action_id, float(rule.lever or 0.0))

    @property
    def history(self) -> list[LeverChange]:
        with self._lock:
            return [LeverChange.model_validate(h) for h in self._history]

    def set_lever(
        self, action_id: str, value: float, actor: str, *, at: datetime | None = None
    ) -> LeverChange:
        """Change the lever of one action now and persist it.

        Returns:
            the change record (old and new value, who, when), for the caller to log.

        Raises:
            PolicyError: unknown action, a negative or non-finite value, or an empty actor.
        """
        rule = self.policy.action(action_id)
        if isinstance(value, bool) or not _is_number(value) or not math.isfinite(value) or value < 0:
            raise PolicyError(f"lever of {action_id!r} must be a finite number ≥ 0, got {value!r}")
        if not actor or not actor.strip():
            raise PolicyError("a lever change needs an actor (who made it)")
        with self._lock:
            old = self._overrides.get(action_id, float(rule.lever or 0.0))
            change = LeverChange(
                action_id=action_id,
                old=old,
                new=float(value),
                actor=actor,
                at=at or _utcnow(),
                policy_version=self.policy.version,
            )
            if self.store is not None:
                self.store.set_lever(action_id, float(value), change.model_dump(mode="json"))
            self._overrides[action_id] = float(value)
            self._history.append(change.model_dump(mode="json"))
        return change
