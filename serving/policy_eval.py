"""Offline policy evaluation: the acceptance rate and value per decision candidate policies would have had.

:mod:`serving.policy_replay` replays each logged decision under each candidate; here the responses give each
decision its reward: *acceptance* = 1 when the chosen action got an ``accepted`` or ``converted`` response,
*value* = the converted value when given, else the action's logged V when accepted, else 0; a no-action decision
(or one where nothing passed) earns 0. The reward model of doubly robust is the service's own prediction at
decision time: q̂(x, a) = P(a) (acceptance) or P(a) · V(a) (value), 0 for doing nothing. The estimators (IPS,
SNIPS, DR, with bootstrap intervals) are :mod:`training.ope`'s; :func:`policy_report` is what
``nextbest report policy`` prints and the dashboard shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.serving.decision_log import DecisionLog, DecisionRecord
from nextbest.serving.policy import NO_ACTION_KIND, ActionPolicy
from nextbest.serving.policy_replay import (
    NOTHING,
    CandidatePolicy,
    ReplayedDecision,
    candidates_for,
    logging_probability,
    replay,
)
from nextbest.training.ope import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    ESTIMATORS,
    Estimate,
    doubly_robust,
    ips,
    snips,
)

METRICS: tuple[str, ...] = ("acceptance", "value")
ACCEPTING_KINDS = frozenset({"accepted", "converted"})


class PolicyEvalError(NextbestError, ValueError):
    """The log cannot be evaluated: it is empty, the store has no responses, a column or a date is wrong."""


# --- rewards and the estimator inputs -----------------------------------------------------------------------


def decision_rewards(records: Sequence[DecisionRecord], responses: pl.DataFrame) -> pl.DataFrame:
    """The reward of each logged decision: ``decision_id, accepted (0/1), value``.

    Accepted: the chosen action got a response of kind ``accepted`` or ``converted`` for this decision.
    Value: the converted response's value when given, else the chosen action's logged V when accepted, else 0.
    A no-action decision, or one where nothing was chosen, earns 0.

    Raises:
        PolicyEvalError: ``responses`` lacks one of decision_id, action_id, kind, value.
    """
    missing = [c for c in ("decision_id", "action_id", "kind", "value") if c not in responses.columns]
    if missing:
        raise PolicyEvalError(
            f"the responses need column(s) {', '.join(missing)}; found {', '.join(responses.columns)}"
        )
    # Responses that name no decision (the ledger's earlier form) cannot be tied to a logged choice.
    hits = responses.filter(
        pl.col("kind").is_in(sorted(ACCEPTING_KINDS)) & pl.col("decision_id").is_not_null()
    )
    by_decision: dict[tuple[str, str], float | None] = {}
    for row in hits.select("decision_id", "action_id", "kind", "value").iter_rows(named=True):
        key = (str(row["decision_id"]), str(row["action_id"]))
        converted = row["value"] if row["kind"] == "converted" and row["value"] is not None else None
        if converted is not None or key not in by_decision:
            by_decision[key] = float(converted) if converted is not None else by_decision.get(key)
    ids, accepted, values = [], [], []
    for r in records:
        ids.append(r.decision_id)
        key = (r.decision_id, r.chosen or "")
        if r.chosen is None or r.chosen_kind == NO_ACTION_KIND or key not in by_decision:
            accepted.append(0.0)
            values.append(0.0)
            continue
        logged_v = next((c.value for c in r.candidates if c.action_id == r.chosen), 0.0)
        converted = by_decision[key]
        accepted.append(1.0)
        values.append(converted if converted is not None else float(logged_v))
    return pl.DataFrame(
        {"decision_id": ids, "accepted": accepted, "value": values},
        schema={"decision_id": pl.String, "accepted": pl.Float64, "value": pl.Float64},
    )


@dataclass(frozen=True)
class LoggedBandit:
    """The estimator inputs of one candidate and metric (rows: decisions; columns: :attr:`actions`)."""

    actions: list[str]
    rewards: np.ndarray
    logging_probability: np.ndarray
    logged_action: np.ndarray
    reward_model: np.ndarray
    target_distribution: np.ndarray

    @property
    def target_probability(self) -> np.ndarray:
        """π(a_i | x_i) of each logged action."""
        return self.target_distribution[np.arange(self.logged_action.size), self.logged_action]


def logged_bandit(
    records: Sequence[DecisionRecord],
    rewards: pl.DataFrame,
    replayed: Sequence[ReplayedDecision],
    metric: str,
) -> LoggedBandit:
    """Estimator inputs: rewards, μ, the logged action, q̂ (P, or P · V; 0 for doing nothing) and π per decision.

    q̂ of an action is the logged P (and V) when it was a logged candidate, else what the replay scored it.

    Raises:
        ValueError: an unknown metric, or lengths that differ.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (len(records) == len(replayed) == rewards.height):
        raise ValueError(
            f"{len(records)} records, {rewards.height} rewards and {len(replayed)} replays differ"
        )
    names: dict[str, int] = {NOTHING: 0}
    for r, t in zip(records, replayed, strict=True):
        for a in (*(c.action_id for c in r.candidates), *t.target):
            names.setdefault(a, len(names))
    n, k = len(records), len(names)
    q = np.zeros((n, k))
    p = np.zeros((n, k))
    logged = np.zeros(n, dtype=np.int64)
    for i, (r, t) in enumerate(zip(records, replayed, strict=True)):
        predicted = dict(t.predicted)
        predicted.update({c.action_id: (c.propensity, c.value) for c in r.candidates})
        no_action = set(t.no_action) | ({r.chosen} if r.chosen_kind == NO_ACTION_KIND and r.chosen else set())
        for a, (prop, v) in predicted.items():
            if a not in no_action:
                q[i, names[a]] = prop if metric == "acceptance" else prop * v
        for a, share in t.target.items():
            p[i, names[a]] = share
        logged[i] = names[r.chosen if r.chosen is not None else NOTHING]
    column = "accepted" if metric == "acceptance" else "value"
    return LoggedBandit(
        actions=list(names),
        rewards=rewards[column].to_numpy().astype(np.float64),
        logging_probability=np.array([logging_probability(r) for r in records], dtype=np.float64),
        logged_action=logged,
        reward_model=q,
        target_distribution=p,
    )


def estimate(
    bandit: LoggedBandit,
    estimator: str,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Estimate:
    """One estimator (``ips``, ``snips`` or ``dr``) on the inputs of :func:`logged_bandit`."""
    options = {"resamples": resamples, "level": level, "seed": seed}
    if estimator == "ips":
        return ips(bandit.rewards, bandit.logging_probability, bandit.target_probability, **options)
    if estimator == "snips":
        return snips(bandit.rewards, bandit.logging_probability, bandit.target_probability, **options)
    if estimator == "dr":
        return doubly_robust(
            bandit.rewards,
            bandit.logging_probability,
            bandit.reward_model,
            bandit.target_distribution,
            bandit.logged_action,
            **options,
        )
    raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")


def evaluate_policies(
    records: Sequence[DecisionRecord],
    responses: pl.DataFrame,
    candidates: Iterable[CandidatePolicy],
    logging_policy: ActionPolicy,
    *,
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
    estimators: Sequence[str] = ESTIMATORS,
    metrics: Sequence[str] = METRICS,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Estimate each candidate's acceptance rate and value per decision from the log.

    Returns:
        one row per candidate, metric and estimator: ``candidate, estimator, metric, estimate, low, high,
        decisions, support, effective_sample_size`` (None where an estimate is undefined, e.g. SNIPS without
        support), candidates in the order given.

    Raises:
        PolicyEvalError: no logged decisions.
    """
    if not records:
        raise PolicyEvalError(
            "the decision log is empty: nothing to evaluate (serve next-best-action decisions first)"
        )
    rewards = decision_rewards(records, responses)
    rows: list[dict[str, Any]] = []
    for candidate in candidates:
        replayed = replay(records, candidate, logging_policy, profiles=profiles)
        for metric in metrics:
            bandit = logged_bandit(records, rewards, replayed, metric)
            for name in estimators:
                e = estimate(bandit, name, resamples=resamples, level=level, seed=seed).to_dict()
                rows.append(
                    {
                        "candidate": candidate.name,
                        "estimator": name,
                        "metric": metric,
                        "estimate": e["estimate"],
                        "low": e["low"],
                        "high": e["high"],
                        "decisions": e["decisions"],
                        "support": e["support"],
                        "effective_sample_size": e["effective_sample_size"],
                    }
                )
    return rows


# --- reading the log ----------------------------------------------------------------------------------------


def read_log(store: Any, *, since: datetime | None = None) -> tuple[list[DecisionRecord], pl.DataFrame]:
    """The logged decisions (at or after ``since``) and the responses, from the service's state store.

    Raises:
        PolicyEvalError: the store has no responses table.
    """
    records = DecisionLog(store).records()
    if since is not None:
        records = [r for r in records if r.timestamp >= since]
    reader = getattr(store, "responses_frame", None)
    if reader is None:
        raise PolicyEvalError(
            "this state store has no responses table yet: upgrade the service so it records responses to decisions"
        )
    return records, reader(since=since)


def load_profiles(path: str | Path, customer_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Profiles (``features/profiles.parquet``) of the given customers by id; empty when the file is missing."""
    path = Path(path)
    if not path.exists():
        return {}
    wanted = sorted(set(customer_ids))
    frame = pl.scan_parquet(path).filter(pl.col("customer_id").is_in(wanted)).collect()
    return {str(row["customer_id"]): row for row in frame.iter_rows(named=True)}


def parse_since(text: str) -> datetime:
    """A ``--since`` date or date-time (ISO 8601, naive UTC; an offset is converted to UTC).

    Raises:
        PolicyEvalError: the text is not a date.
    """
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PolicyEvalError(f"--since {text!r} is not a date (YYYY-MM-DD or an ISO date-time)") from None
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at


# --- the report ---------------------------------------------------------------------------------------------


def policy_report(
    store: Any,
    current: ActionPolicy,
    specs: Sequence[str] = (),
    *,
    catalog: pl.DataFrame | None = None,
    profiles_path: str | Path | None = None,
    since: datetime | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`evaluate_policies` over the service's state store (what ``nextbest report policy`` prints).

    Args:
        store: the :class:`~serving.state_store.StateStore` with the decision log, the levers and the responses.
        current: the champion policy (catalogue attached); its levers are read from the store.
        specs: candidate SPECs (see :func:`serving.policy_replay.parse_candidate`); the current policy always
            comes first.
        catalog: the action catalogue, attached to candidate policy files.
        profiles_path: ``features/profiles.parquet``, for rules and values the log cannot answer.
        since: only decisions at or after this time.
        resamples: bootstrap resamples.
        level: coverage of the intervals.
        seed: seeds the bootstrap.

    Raises:
        CandidateSpecError: a bad SPEC (checked before the log is read).
        PolicyEvalError: an empty log (after ``since``) or a store without responses.
    """
    from nextbest.serving.levers import PolicyState

    levers = PolicyState(current, store).levers
    candidates = candidates_for(specs, current, levers, catalog=catalog)
    records, responses = read_log(store, since=since)
    if not records:
        after = f" at or after {since.isoformat()}" if since is not None else ""
        raise PolicyEvalError(f"the decision log has no decisions{after}: nothing to evaluate")
    profiles = load_profiles(profiles_path, (r.customer_id for r in records)) if profiles_path else None
    return evaluate_policies(
        records,
        responses,
        candidates,
        current,
        profiles=profiles,
        resamples=resamples,
        level=level,
        seed=seed,
    )


def _number(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if metric == "acceptance" else f"{value:.2f}"


def report_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rows of :func:`evaluate_policies` as a text table: one line per candidate and estimator."""
    keyed = {(r["candidate"], r["estimator"], r["metric"]): r for r in rows}
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    width = max([len("candidate"), *(len(n) for n in names)])
    lines = [
        f"{'candidate':<{width}}  est.   {'acceptance rate [95% interval]':<32} {'value/decision [95% interval]':<32} "
        "decisions  support"
    ]
    for name in names:
        for est in estimators:
            cells = []
            support = decisions = ""
            for metric in METRICS:
                r = keyed.get((name, est, metric))
                if r is None:
                    cells.append(f"{'':<32}")
                    continue
                text = f"{_number(r['estimate'], metric)} [{_number(r['low'], metric)}, {_number(r['high'], metric)}]"
                cells.append(f"{text:<32}")
                decisions, support = str(r["decisions"]), str(r["support"])
            lines.append(f"{name:<{width}}  {est:<5}  {' '.join(cells)} {decisions:>9}  {support:>7}")
    return lines


def evaluation_table(rows: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """The rows of :func:`evaluate_policies` side by side: one row per candidate and estimator.

    Returns:
        ``candidate, estimator, acceptance, acceptance_low, acceptance_high, value, value_low, value_high,
        decisions, support`` (support of the acceptance estimate; both metrics share it), candidates and
        estimators in the order of ``rows``.
    """
    schema: dict[str, Any] = {"candidate": pl.String, "estimator": pl.String}
    for metric in METRICS:
        schema |= {metric: pl.Float64, f"{metric}_low": pl.Float64, f"{metric}_high": pl.Float64}
    schema |= {"decisions": pl.Int64, "support": pl.Int64}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        row = out.setdefault((r["candidate"], r["estimator"]), {k: None for k in schema})
        row |= {"candidate": r["candidate"], "estimator": r["estimator"], "decisions": r["decisions"]}
        row |= {r["metric"]: r["estimate"], f"{r['metric']}_low": r["low"], f"{r['metric']}_high": r["high"]}
        if r["metric"] == METRICS[0] or row["support"] is None:
            row["support"] = r["support"]
    return pl.DataFrame(list(out.values()), schema=schema)
