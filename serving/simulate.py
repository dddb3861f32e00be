"""``nextbest simulate``: the whole closed loop, day after day, on the generated world with its planted truth.

1. **World.** One world of ``history_days + days`` days is generated (:mod:`serving.simulate_world`); the service's
   dataset is that world cut at the end of the history. Features are built and both models trained once, with
   the configurations of :class:`~serving.simulate_report.SimulationConfig` (fixed ones by default; a tuning's
   best can be given there), registered and promoted in the simulation's own registry (``OUT/mlruns``: the
   real champions are never touched).
2. **Each day**, hour by hour: each customer whose first online session of the day opens in the hour gets a
   next best action from the real :class:`~serving.engine.Engine` (in process, on the simulation's clock; the
   policy's ``[exploration]`` on: ε-greedy, probabilities logged); the planted truth draws whether they accept,
   and the response goes back tied to the ``decision_id``; then the hour's events of known customers go to the
   engine, so every decision sees the events before its hour.
3. **Each night** :func:`serving.retrain.retrain` folds the day into the dataset, rebuilds the features, trains
   both models with their champions' logged configurations (it never tunes) and promotes through the gate; the
   engine swaps in what changed (:meth:`~serving.engine.Engine.reload_models`).
4. Every decision is also judged against a random eligible policy and an oracle that knows the planted
   propensities (:mod:`serving.simulate_eval`); at the end the offline estimates of candidate policies
   (:mod:`serving.policy_eval`) are set beside their true value on the same log.

The result: ``OUT/simulation.json`` (the summary), ``OUT/simulation.png`` (the curve), ``OUT/dashboard.html`` (the
service dataset's dashboard with the section "The loop, simulated": the same curve, the per-day table and the
offline estimates) and an MLflow run (per-day metrics with ``step = day``, the plot, the dashboard and the summary as
artifacts).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.schema import CUSTOMER_ID, TIMESTAMP_COL
from nextbest.serving import api
from nextbest.serving.dashboard import DEFAULT_OUT_NAME as DASHBOARD_FILE
from nextbest.serving.dashboard import write_dashboard
from nextbest.serving.decision_log import DecisionRecord
from nextbest.serving.engine import Engine, EngineConfig, ServiceError
from nextbest.serving.policy import DEFAULT_POLICY_PATH, ActionPolicy
from nextbest.serving.simulate_eval import DecisionTruth, candidate_truth, summarise, value_ratio
from nextbest.serving.simulate_report import (
    MARKER,
    PLOT_FILE,
    SUMMARY_FILE,
    SimulationConfig,
    SimulationReport,
    log_simulation,
    plot_days,
)
from nextbest.serving.simulate_world import (
    PlantedTruth,
    canonical_ids,
    day_schedule,
    day_start,
    split_world,
)

HOUR = timedelta(hours=1)
RESPONSE_DELAY = timedelta(minutes=2)


class SimulationError(NextbestError, ValueError):
    """The simulation cannot run as asked (an output folder that is not a simulation's, a failed decision)."""


# --- the engine on the simulation's clock -------------------------------------------------------------------


class SimulationClock:
    """The simulated time the engine runs on (naive UTC)."""

    def __init__(self, at: datetime) -> None:
        self.at = at


def clocked_engine(clock: SimulationClock) -> type[Engine]:
    """:class:`Engine` with :meth:`~Engine.now` read from ``clock`` (everything else is the service's code)."""

    class SimulatedEngine(Engine):
        def now(self) -> datetime:
            return clock.at

    return SimulatedEngine


@contextmanager
def seeded_decision_ids(seed: int) -> Iterator[None]:
    """Decision ids drawn from ``seed`` while the simulation runs, so that its exploration draws (seeded by the
    decision id) and thus the whole run repeat for a seed. The engine module's id factory is put back after."""
    from nextbest.serving import engine as engine_module

    rng = np.random.default_rng([seed, 7])
    original = engine_module.new_decision_id
    engine_module.new_decision_id = lambda: rng.bytes(16).hex()
    try:
        yield
    finally:
        engine_module.new_decision_id = original


def exploring_policy(path: Path, epsilon: float) -> Path:
    """Write the shipped policy with ε-greedy ``[exploration]`` turned on to ``path``."""
    text = DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    if re.search(r"^\[exploration\]", text, flags=re.MULTILINE):
        raise SimulationError(f"{DEFAULT_POLICY_PATH} has an [exploration] table already")
    path.write_text(
        text + f'\n[exploration]\nmethod = "epsilon_greedy"\nepsilon = {epsilon!r}\n', encoding="utf-8"
    )
    return path


# --- setting up ---------------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Empty ``out`` for a new simulation: a folder an earlier simulation made is replaced, any other refused.

    Raises:
        SimulationError: ``out`` holds something simulate did not make.
    """
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SimulationError(f"{out} is not empty and not a simulation's folder: give another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by nextbest simulate; replaced by the next simulation here\n")


def train_first_models(ds: Dataset, registry: str, config: SimulationConfig) -> dict[str, Any]:
    """Build features and train, register and promote both models once (the champions the first day serves)."""
    from nextbest.features.pipeline import build_features
    from nextbest.training.cf import train_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.propensity_tuning import promote_propensity, train_propensity
    from nextbest.training.tracking import TrackingConfig

    build_features(ds)
    tracking = TrackingConfig(tracking_uri=registry)
    cf = train_cf(ds, "als", config.recommender_config, tracking=tracking, seed=config.seed, refit="all")
    rec = promote_recommender(tracking, data=ds.root)
    prop = train_propensity(ds, config.propensity_config, tracking=tracking)
    pro = promote_propensity(tracking, data=ds.root)
    if not (rec.promoted and pro.promoted):
        raise SimulationError(f"the first models were not promoted: {rec.reason}; {pro.reason}")
    return {
        "recommender": {"ndcg_at_10": cf.metrics.get("ndcg_at_10"), "version": cf.tracking.get("version")},
        "propensity": {k: prop.get(k) for k in ("auc", "oracle_auc", "log_loss", "val_log_loss", "version")},
    }


# --- one day ------------------------------------------------------------------------------------------------


@dataclass
class DayState:
    """What the loop carries from hour to hour and day to day."""

    engine: Engine
    clock: SimulationClock
    truth: PlantedTruth
    rng: np.random.Generator
    truths: dict[str, DecisionTruth] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _delivery_channels(
    policy: ActionPolicy, actions: Sequence[str], channels: Sequence[str | None]
) -> np.ndarray:
    """(decisions × actions) the channel each action would reach the customer on: its delivery channel, else
    the request's."""
    delivery = [policy.actions[a].delivery_channel if a in policy.actions else None for a in actions]
    return np.array([[d or (c or "") for d in delivery] for c in channels], dtype=object)


def judge(records: Sequence[DecisionRecord], state: DayState) -> list[DecisionTruth]:
    """Each logged decision with the planted truth of its candidates, and the customer's drawn response."""
    if not records:
        return []
    policy = state.engine.policy
    actions = sorted({c.action_id for r in records for c in r.candidates})
    at = np.array([(r.timestamp - datetime(1970, 1, 1)).total_seconds() for r in records])
    p = state.truth.propensity(
        [r.customer_id for r in records],
        at,
        actions,
        _delivery_channels(policy, actions, [r.channel for r in records]),
    )
    column = {a: k for k, a in enumerate(actions)}
    out = []
    for i, r in enumerate(records):
        cands = r.candidates
        ids = tuple(c.action_id for c in cands)
        no_action = np.array(
            [(policy.actions.get(a) is not None and policy.actions[a].is_no_action) for a in ids]
        )
        p_true = np.array([p[i, column[a]] for a in ids])
        chosen = ids.index(r.chosen) if r.chosen is not None and r.chosen in ids else -1
        offered = chosen >= 0 and not no_action[chosen]
        # One draw per decision, whatever was chosen, so the stream of draws does not depend on the choices.
        u = state.rng.random()
        accepted = bool(offered and u < p_true[chosen])
        out.append(
            DecisionTruth(
                decision_id=r.decision_id,
                actions=ids,
                eligible=np.array([c.eligible for c in cands], dtype=bool),
                value=np.array([c.value for c in cands], dtype=np.float64),
                score=np.array([c.score for c in cands], dtype=np.float64),
                p_true=p_true,
                no_action=no_action,
                chosen=chosen,
                accepted=accepted,
            )
        )
    return out


def _responses(
    records: Sequence[DecisionRecord], truths: Sequence[DecisionTruth], policy: ActionPolicy
) -> list[api.OfferResponseIn]:
    """``shown`` and then ``accepted`` or ``dismissed`` for every decision that offered an action."""
    out = []
    for r, t in zip(records, truths, strict=True):
        if t.chosen < 0 or t.no_action[t.chosen] or r.chosen is None:
            continue
        rule = policy.actions.get(r.chosen)
        channel = (rule.delivery_channel if rule is not None else None) or r.channel
        for k, kind in enumerate(("shown", "accepted" if t.accepted else "dismissed")):
            out.append(
                api.OfferResponseIn(
                    customer_id=r.customer_id,
                    action_id=r.chosen,
                    decision_id=r.decision_id,
                    kind=kind,
                    channel=channel,
                    timestamp=r.timestamp + RESPONSE_DELAY * (k + 1),
                    event_id=f"{r.decision_id}-{kind}",
                )
            )
    return out


def _post(
    engine: Engine,
    *,
    events: list[api.EventIn] | None = None,
    responses: list[api.OfferResponseIn] | None = None,
) -> None:
    events, responses = events or [], responses or []
    step = api.MAX_EVENTS
    for k in range(0, max(len(events), len(responses)), step):
        chunk_e, chunk_r = events[k : k + step], responses[k : k + step]
        if chunk_e or chunk_r:
            engine.events(api.EventsRequest(events=chunk_e, responses=chunk_r))


def _event_rows(frame: pl.DataFrame) -> list[api.EventIn]:
    return [
        api.EventIn(**{k: v for k, v in row.items() if v is not None}) for row in frame.iter_rows(named=True)
    ]


def simulate_day(state: DayState, full: Dataset, ids: pl.DataFrame, start: datetime) -> list[DecisionTruth]:
    """Run one day hour by hour: a decision for each visit that opens in the hour (the service has every event
    before the hour), the drawn responses, then the hour's events (see the module docstring)."""
    engine = state.engine
    schedule = day_schedule(full, ids, start)

    def hour_of(column: str) -> pl.Expr:
        return (
            ((pl.col(column) - start).dt.total_seconds() // 3600).clip(0, 23).cast(pl.Int64).alias("__hour")
        )

    events = schedule.events.with_columns(hour_of(TIMESTAMP_COL))
    visits = schedule.visits.with_columns(hour_of("decided_at"))
    day: list[DecisionTruth] = []
    for hour in range(24):
        these = visits.filter(pl.col("__hour") == hour)
        state.clock.at = start + HOUR * hour
        if not these.is_empty():
            requests = [
                api.NextBestActionRequest(customer_id=c, channel=ch, n=1, context={"now": at.isoformat()})
                for c, ch, at in these.select(CUSTOMER_ID, "channel", "decided_at").iter_rows()
            ]
            answers = engine.next_best_action_many(requests)
            failed = [a for a in answers if isinstance(a, ServiceError)]
            state.errors += [f"{start.date()} {hour:02d}h: {a.message}" for a in failed]
            decided = [a.decision_id for a in answers if not isinstance(a, ServiceError)]
            stored = engine.store.decisions_by_id(decided)
            records = [DecisionRecord.model_validate(stored[d]) for d in decided if d in stored]
            truths = judge(records, state)
            day += truths
        else:
            records, truths = [], []
        state.clock.at = start + HOUR * (hour + 1)
        _post(
            engine,
            events=_event_rows(events.filter(pl.col("__hour") == hour).drop("__hour")),
            responses=_responses(records, truths, engine.policy),
        )
    state.truths.update({t.decision_id: t for t in day})
    return day


# --- the offline estimates beside the truth --------------------------------------------------------------


def offline_estimates(
    engine: Engine, ds: Dataset, truths: dict[str, DecisionTruth], config: SimulationConfig
) -> list[dict[str, Any]]:
    """The offline evaluation of each candidate on the whole decision log — exactly what ``nextbest report
    policy`` computes (:func:`serving.policy_eval.evaluate_policies`) — with the candidate's true value on the
    same decisions (``truth``), the relative ``error`` and whether the interval ``covered`` the truth."""
    from nextbest.serving.policy_eval import evaluate_policies, load_profiles, read_log
    from nextbest.serving.policy_replay import candidates_for, replay

    records, responses = read_log(engine.store)
    records = [r for r in records if r.decision_id in truths]
    if not records:
        return []
    judged = [truths[r.decision_id] for r in records]
    catalog = ds.read("action_catalog")
    candidates = candidates_for(config.candidates, engine.policy, engine.levers.levers, catalog=catalog)
    profiles = load_profiles(ds.features_dir / "profiles.parquet", (r.customer_id for r in records))
    rows = evaluate_policies(
        records,
        responses,
        candidates,
        engine.policy,
        profiles=profiles,
        resamples=config.resamples,
        seed=config.seed,
    )
    true_values: dict[tuple[str, str], float] = {}
    for candidate in candidates:
        targets = [t.target for t in replay(records, candidate, engine.policy, profiles=profiles)]
        # The log's value reward counts accepted offers only: its truth is the offer value.
        true_values[candidate.name, "value"] = candidate_truth(targets, judged, "offer_value")
        true_values[candidate.name, "acceptance"] = candidate_truth(targets, judged, "acceptance")
    out = []
    for row in rows:
        truth = true_values[row["candidate"], row["metric"]]
        estimate, low, high = row["estimate"], row["low"], row["high"]
        out.append(
            {
                **row,
                "truth": truth,
                "error": (estimate - truth) / truth if estimate is not None and truth else None,
                "covered": low is not None and high is not None and low <= truth <= high,
            }
        )
    return out


# --- the whole run ------------------------------------------------------------------------------------------


def _champions(engine: Engine) -> dict[str, str]:
    return {kind: arms.get("champion", "") for kind, arms in engine.model_versions().items()}


@dataclass(frozen=True)
class SimulatedWorld:
    """The folders and the registry of one simulation, after :func:`set_up`."""

    full: Dataset
    """The whole generated world, truth included."""
    ds: Dataset
    """The service's dataset (the history, then what retrain folds in)."""
    registry: str
    cutoff: datetime
    setup: dict[str, Any]


def set_up(config: SimulationConfig, out: Path, *, progress: bool = False) -> SimulatedWorld:
    """Generate the world into ``out/full``, cut the service's dataset ``out/world`` at the end of the history,
    build its features and train, register and promote the first champions in ``out/mlruns``."""
    from nextbest.features.generate import WorldConfig, generate_world

    prepare_out(out)
    full, ds = Dataset.at(out / "full"), Dataset.at(out / "world")
    registry = f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve().as_posix()}"
    world = WorldConfig(customers=config.customers, days=config.history_days + config.days, seed=config.seed)
    _say(progress, f"generating {config.customers:,} customers over {world.days} days into {full.root}")
    generate_world(world, full)
    cutoff = day_start(world.start, config.history_days)
    setup: dict[str, Any] = {"cutoff": cutoff.isoformat(), "rows": split_world(full, ds, cutoff)}
    _say(
        progress, f"building features and training the first champions on the history before {cutoff.date()}"
    )
    setup["first_models"] = train_first_models(ds, registry, config)
    return SimulatedWorld(full, ds, registry, cutoff, setup)


def run_days(
    world: SimulatedWorld, config: SimulationConfig, out: Path, *, progress: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """The simulated days (a retrain and a swap each night in between), then the offline estimates.

    Returns:
        the per-day summaries, the offline estimate rows and the seconds spent deciding, retraining and
        estimating.

    Raises:
        SimulationError: the service refused decisions.
    """
    from tqdm.auto import tqdm

    from nextbest.serving.retrain import retrain
    from nextbest.serving.state_store import StateStore

    ds, cutoff = world.ds, world.cutoff
    clock = SimulationClock(cutoff)
    engine_config = EngineConfig(
        data=ds.root,
        tracking_uri=world.registry,
        policy=exploring_policy(out / "policy.toml", config.epsilon),
        model_source="mlflow",
        model_poll_seconds=0,
    )
    truth = PlantedTruth.of_world(world.full)
    ids = canonical_ids(world.full, ds.read("customers")[CUSTOMER_ID].to_list())
    days: list[dict[str, Any]] = []
    seconds = {"days": 0.0, "retrain": 0.0, "ope": 0.0}
    with seeded_decision_ids(config.seed):
        engine = clocked_engine(clock).load(engine_config)
        try:
            state = DayState(engine, clock, truth, np.random.default_rng([config.seed, 3]))
            bar = tqdm(
                range(config.days), desc="simulating", unit="day", disable=not progress, file=sys.stderr
            )
            for d in bar:
                t0 = time.perf_counter()
                start = cutoff + timedelta(days=d)
                models = _champions(engine)
                truths = simulate_day(state, world.full, ids, start)
                if state.errors:
                    raise SimulationError(f"the service refused decisions: {'; '.join(state.errors[:3])}")
                day = {"day": d + 1, "date": start.date().isoformat(), **summarise(truths), "models": models}
                day |= {"retrained": False, "promoted": [], "gate": {}}
                t1 = time.perf_counter()
                seconds["days"] += t1 - t0
                if d + 1 < config.days:  # the night: fold, rebuild, retrain, promote through the gate, swap
                    clock.at = start + timedelta(days=1)
                    store = StateStore(engine.store.url)
                    try:
                        report = retrain(ds, store, tracking_uri=world.registry)
                    finally:
                        store.close()
                    engine.reload_models()
                    day |= {
                        "retrained": report.skipped is None,
                        "folded": {k: report.fold[k]["folded"] for k in ("events", "exposures")},
                        "config_from": {k: m.config_from for k, m in report.models.items()},
                        "promoted": report.promoted,
                        "gate": {
                            k: (m.promotion or {}).get("reason", m.error) for k, m in report.models.items()
                        },
                    }
                    seconds["retrain"] += time.perf_counter() - t1
                days.append(day)
                bar.set_postfix_str(f"learned/oracle {value_ratio([day], 'learned', 'oracle') or 0:.3f}")
            bar.close()
            t0 = time.perf_counter()
            _say(progress, f"offline evaluation of {len(config.candidates)} candidate policies")
            ope = offline_estimates(engine, ds, state.truths, config)
            seconds["ope"] = time.perf_counter() - t0
        finally:
            engine.close()
    return days, ope, seconds


def simulate(
    config: SimulationConfig,
    out: Path,
    *,
    tracking_uri: str | None = None,
    progress: bool = False,
) -> SimulationReport:
    """Run the closed loop (see the module docstring) in ``out`` and log it to MLflow at ``tracking_uri``
    (None: no run is logged).

    Raises:
        SimulationError: ``out`` is not a simulation's folder, or the service refused decisions.
    """
    from nextbest.training.tracking import quiet_mlflow

    started = time.perf_counter()
    with quiet_mlflow():
        world = set_up(config, out, progress=progress)
        setup_seconds = time.perf_counter() - started
        days, ope, seconds = run_days(world, config, out, progress=progress)
    seconds = {"setup": setup_seconds, **seconds}
    report = SimulationReport(config, out, days, ope, seconds, world.setup)
    report.plot = plot_days(days, out / PLOT_FILE)
    summary = out / SUMMARY_FILE
    summary.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    t0 = time.perf_counter()
    _say(progress, f"writing the dashboard of {world.ds.root} with the simulation's curve")
    report.dashboard = write_dashboard(
        world.ds,
        out / DASHBOARD_FILE,
        tracking_uri=world.registry,
        policy=out / "policy.toml",
        simulation=summary,
    ).path
    seconds["dashboard"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    summary.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if tracking_uri:
        report.run_id = log_simulation(report, tracking_uri)
        summary.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
