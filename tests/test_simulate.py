"""``nextbest simulate``: the planted truth reproduced, the world cut at the cut-off, the policies' values on
hand-made decisions whose answers are worked out by hand, and one end-to-end run of the command on a tiny world."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.serving.policy import load_policy
from nextbest.serving.policy_replay import NOTHING
from nextbest.serving.simulate import (
    MARKER,
    SimulationError,
    exploring_policy,
    prepare_out,
    seeded_decision_ids,
)
from nextbest.serving.simulate_eval import (
    DecisionTruth,
    candidate_truth,
    greedy_position,
    oracle_position,
    policy_rewards,
    summarise,
    value_ratio,
)
from nextbest.serving.simulate_world import (
    PlantedTruth,
    canonical_ids,
    day_schedule,
    day_start,
    epoch_seconds,
    split_world,
)


def decision(
    *,
    p_true: list[float],
    value: list[float],
    eligible: list[bool],
    score: list[float] | None = None,
    chosen: int = 0,
    accepted: bool = False,
    actions: tuple[str, ...] = ("a", "b", "c", "no_action"),
) -> DecisionTruth:
    """A decision over actions a, b, c and no_action (the last)."""
    return DecisionTruth(
        decision_id="d",
        actions=actions,
        eligible=np.array(eligible),
        value=np.array(value, dtype=float),
        score=np.array(score if score is not None else [0.0] * len(actions), dtype=float),
        p_true=np.array(p_true, dtype=float),
        no_action=np.array([a == "no_action" for a in actions]),
        chosen=chosen,
        accepted=accepted,
    )


# --- the policies' values (pure) --------------------------------------------------------------------------------


def test_the_oracle_picks_the_best_p_true_times_value_among_the_eligible_actions_only():
    # p × V: a 0.2 × 10 = 2.0, b 0.5 × 6 = 3.0, c 0.9 × 50 = 45 (not eligible), no_action 0.05 × 24 = 1.2.
    d = decision(p_true=[0.2, 0.5, 0.9, 0.05], value=[10, 6, 50, 24], eligible=[True, True, False, True])
    assert oracle_position(d) == 1
    # Doing nothing wins when its organic purchase is worth more than every offer.
    d = decision(p_true=[0.02, 0.01, 0.9, 0.1], value=[10, 6, 50, 24], eligible=[True, True, False, True])
    assert oracle_position(d) == 3
    # By offer value (no-action earns nothing) the offer wins; without arms there is no choice.
    assert oracle_position(d, "offer_value") == 0
    assert oracle_position(decision(p_true=[0.1] * 4, value=[1] * 4, eligible=[False] * 4)) == -1


def test_each_policys_true_expected_reward_on_a_hand_made_decision():
    d = decision(
        p_true=[0.2, 0.5, 0.9, 0.05],
        value=[10, 6, 50, 24],
        eligible=[True, True, False, True],
        score=[1.5, 1.4, 30.0, 1.0],  # the model ranks a first (c scores most but is filtered)
        chosen=1,  # an exploration draw chose b
    )
    rewards = policy_rewards(d)
    assert rewards["learned"] == pytest.approx({"acceptance": 0.5, "value": 3.0, "offer_value": 3.0})
    assert rewards["greedy"] == pytest.approx({"acceptance": 0.2, "value": 2.0, "offer_value": 2.0})
    assert rewards["oracle"] == pytest.approx({"acceptance": 0.5, "value": 3.0, "offer_value": 3.0})
    # Random: the mean over the three arms a, b, no_action (no_action accepts nothing and offers nothing).
    assert rewards["random"] == pytest.approx(
        {"acceptance": 0.7 / 3, "value": (2.0 + 3.0 + 1.2) / 3, "offer_value": 5.0 / 3}
    )


def test_greedy_follows_the_engines_order_ties_to_no_action_then_the_smaller_id():
    tie = decision(p_true=[0.1] * 4, value=[1] * 4, eligible=[True, True, True, True], score=[2, 2, 1, 2])
    assert greedy_position(tie) == 3
    no_floor = decision(
        p_true=[0.1] * 4, value=[1] * 4, eligible=[True, True, False, False], score=[2, 2, 5, 0]
    )
    assert greedy_position(no_floor) == 0


def test_a_day_summary_and_the_ratio_of_values_per_decision():
    days_truths = [
        decision(p_true=[0.2, 0.5, 0.9, 0.05], value=[10, 6, 50, 24], eligible=[True, True, False, True]),
        decision(
            p_true=[0.4, 0.1, 0.0, 0.0], value=[10, 6, 50, 24], eligible=[True, True, True, True], chosen=3
        ),
    ]
    day = summarise(days_truths)
    assert day["decisions"] == 2
    # learned: a (2.0), then no_action (0.0) → 1.0; oracle: b (3.0), then a (4.0) → 3.5.
    assert day["learned"]["value_per_decision"] == pytest.approx(1.0)
    assert day["oracle"]["value_per_decision"] == pytest.approx(3.5)
    assert day["learned"]["realised_acceptance"] == 0.0
    other = {"decisions": 6, **{p: {"value_per_decision": v} for p, v in (("learned", 2.0), ("oracle", 2.5))}}
    # Weighted by decisions: (1.0·2 + 2.0·6) / (3.5·2 + 2.5·6) = 14 / 22.
    assert value_ratio([day, other], "learned", "oracle") == pytest.approx(14 / 22)
    assert value_ratio([{"decisions": 0, "a": {"value_per_decision": 0.0}}], "a", "a") is None


def test_a_candidates_truth_on_hand_made_logged_decisions():
    first = decision(p_true=[0.2, 0.5, 0.9, 0.05], value=[10, 6, 50, 24], eligible=[True, True, False, True])
    second = decision(p_true=[0.4, 0.1, 0.0, 0.3], value=[10, 6, 50, 24], eligible=[True, True, True, True])
    targets = [{"a": 0.9, "b": 0.05, "no_action": 0.05}, {NOTHING: 1.0}]
    # First: 0.9·2.0 + 0.05·3.0 + 0.05·0 (doing nothing is no accepted offer); second: nothing chosen, 0.
    assert candidate_truth(targets, [first, second]) == pytest.approx((1.8 + 0.15) / 2)
    assert candidate_truth(targets, [first, second], "acceptance") == pytest.approx((0.18 + 0.025) / 2)
    with pytest.raises(ValueError, match="1 target distributions for 2 decisions"):
        candidate_truth(targets[:1], [first, second])


# --- the world and its truth -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("sim-world") / "full")
    generate_world(WorldConfig(customers=300, days=40, seed=3), ds)
    return ds


def test_the_planted_truth_reproduces_the_generators_p_true_of_every_exposure(small_world):
    truth = PlantedTruth.of_world(small_world)
    exposures = (
        small_world.read("actions")
        .join(pl.read_parquet(small_world.truth_dir / "propensity.parquet"), on="exposure_id")
        .with_columns(epoch_seconds().alias("t"))
    )
    assert exposures.height > 500
    got = np.concatenate(
        [
            truth.propensity([c], np.array([t]), [a], np.array([[ch]]))[0]
            for c, t, a, ch in exposures.select("customer_id", "t", "action_id", "channel").iter_rows()
        ]
    )
    np.testing.assert_allclose(got, exposures["p_true"].to_numpy(), rtol=0, atol=1e-12)
    # Vectorised over decisions × actions, a row is the same as asking one action at a time.
    first = exposures.row(0, named=True)
    actions = list(truth.actions.ids)
    row = truth.propensity(
        [first["customer_id"]], np.array([first["t"]]), actions, np.array([["web"] * len(actions)])
    )
    single = [
        truth.propensity([first["customer_id"]], np.array([first["t"]]), [a], np.array([["web"]]))[0, 0]
        for a in actions
    ]
    np.testing.assert_allclose(row[0], single)


def test_the_served_dataset_is_the_world_cut_at_the_cutoff(small_world, tmp_path):
    served = Dataset.at(tmp_path / "world")
    cutoff = day_start(WorldConfig().start, 30)
    counts = split_world(small_world, served, cutoff)
    for table in ("events", "consent", "actions"):
        latest = served.scan(table).select(pl.col("timestamp").max()).collect().item()
        assert latest < cutoff and counts[table] == served.read(table).height
    customers = served.read("customers")
    assert customers["signup_date"].max() < cutoff.date()
    known = set(customers["customer_id"].to_list())
    assert set(served.read("identities")["customer_id"].to_list()) <= known
    assert set(served.read("actions")["customer_id"].to_list()) <= known
    assert served.read("action_catalog").equals(small_world.read("action_catalog"))


def test_a_days_visits_open_with_each_customers_first_online_session(small_world):
    customers = small_world.read("customers")["customer_id"].to_list()
    ids = canonical_ids(small_world, customers)
    start = day_start(WorldConfig().start, 35)
    day = day_schedule(small_world, ids, start)
    assert day.events.height > 0 and day.visits.height > 0
    assert set(day.events["customer_id"].to_list()) <= set(customers)  # cookies resolved, anonymous left out
    assert day.events["event_id"].n_unique() == day.events.height
    assert day.visits["customer_id"].n_unique() == day.visits.height
    assert set(day.visits["channel"].to_list()) <= {"web", "app"}
    for row in day.visits.iter_rows(named=True):
        online = day.events.filter(
            (pl.col("customer_id") == row["customer_id"]) & pl.col("channel").is_in(["web", "app"])
        ).sort("timestamp")
        # The decision comes as the customer's first online session of the day opens, on its channel.
        assert (row["decided_at"], row["channel"]) == (online["timestamp"][0], online["channel"][0])


# --- setting up ---------------------------------------------------------------------------------------------------


def test_the_policy_explores_and_the_decision_ids_repeat_for_a_seed(tmp_path):
    policy = load_policy(exploring_policy(tmp_path / "policy.toml", 0.25))
    assert (policy.exploration.method, policy.exploration.epsilon) == ("epsilon_greedy", 0.25)
    from nextbest.serving import engine as engine_module

    original = engine_module.new_decision_id
    with seeded_decision_ids(7):
        first = [engine_module.new_decision_id() for _ in range(3)]
    with seeded_decision_ids(7):
        again = [engine_module.new_decision_id() for _ in range(3)]
    assert first == again and len(set(first)) == 3 and all(len(i) == 32 for i in first)
    assert engine_module.new_decision_id is original


def test_an_output_folder_that_is_not_a_simulations_is_refused(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    with pytest.raises(SimulationError, match="not a simulation's folder"):
        prepare_out(tmp_path / "theirs")
    prepare_out(tmp_path / "ours")
    (tmp_path / "ours" / "old.txt").write_text("from the last run")
    prepare_out(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [MARKER]


# --- the command, end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_simulate_runs_the_loop_and_prints_the_json_contract(tmp_path, capsys):
    from mlflow import MlflowClient

    from nextbest.serving.cli import main

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = ["--customers", "200", "--days", "3", "--seed", "5", "--history-days", "60", "--resamples", "100"]
    code = main(
        ["simulate", *args, "--out", str(tmp_path / "sim"), "--tracking-uri", uri, "--json", "--quiet"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    summary = json.loads(out[-1])
    for key in ("learned_vs_oracle_last_week", "learned_vs_random_last_week"):
        assert isinstance(summary[key], float) and summary[key] > 0
    days = summary["days"]
    assert [d["day"] for d in days] == [1, 2, 3]
    assert [d["retrained"] for d in days] == [True, True, False]
    for d in days:
        assert isinstance(d["decisions"], int) and d["decisions"] > 0
        for policy in ("learned", "random", "oracle"):
            assert set(d[policy]) >= {"acceptance", "value_per_decision"}
            assert all(isinstance(v, float) and math.isfinite(v) for v in d[policy].values())
        assert d["oracle"]["value_per_decision"] >= d["random"]["value_per_decision"]
        assert d["oracle"]["value_per_decision"] >= d["learned"]["value_per_decision"]
        assert set(d["models"]) == {"recommender", "propensity"}
    ope = summary["ope"]
    assert {r["candidate"] for r in ope} >= {"current"} and len({r["candidate"] for r in ope}) >= 3
    for r in ope:
        assert set(r) >= {"candidate", "estimator", "estimate", "low", "high", "truth", "decisions"}
        assert r["estimator"] in ("ips", "snips", "dr")
        assert isinstance(r["truth"], float) and r["decisions"] == sum(d["decisions"] for d in days)

    # The MLflow run: one point per day of the curve, and the plot.
    client = MlflowClient(uri, uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "learned_value_per_decision")
    assert sorted(m.step for m in history) == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"simulation.png", "simulation.json", "dashboard.html"} <= artifacts
    # The dashboard of the simulated service's dataset draws the curve: one point per day per policy.
    page = (tmp_path / "sim" / "dashboard.html").read_text()
    assert summary["dashboard"] == str(tmp_path / "sim" / "dashboard.html")
    assert '<section id="simulation">' in page
    learned = [d["learned"]["value_per_decision"] for d in days]
    points = re.findall(r'<circle[^>]*data-series="learned" data-x="(\d+)" data-value="([^"]+)"', page)
    assert [(int(x), float(v)) for x, v in points[:3]] == [
        (d, pytest.approx(v)) for d, v in zip([1, 2, 3], learned, strict=True)
    ]
    assert datetime.fromisoformat(summary["setup"]["cutoff"]) == day_start(WorldConfig().start, 60)
