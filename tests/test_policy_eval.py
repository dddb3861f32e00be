"""Offline policy evaluation of the decision log (serving/policy_replay.py, serving/policy_eval.py): rewards from
responses, the replay of candidate policies through the real arbitration (parity with the engine's own log), the
SPECs, ``nextbest report policy`` on a state store filled through its API, and the dashboard's table."""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.serving.cli import main
from nextbest.serving.decision_log import CandidateRecord, DecisionLog, DecisionRecord
from nextbest.serving.decisions import ActionCandidate, arbitrate
from nextbest.serving.policy import ActionPolicy, load_policy
from nextbest.serving.policy_eval import (
    PolicyEvalError,
    decision_rewards,
    evaluate_policies,
    evaluation_table,
    report_lines,
)
from nextbest.serving.policy_replay import (
    CURRENT,
    NOTHING,
    CandidatePolicy,
    CandidateSpecError,
    candidates_for,
    parse_candidate,
    replay,
)
from nextbest.serving.state_store import StateStore

T0 = datetime(2026, 6, 1, 9, 0)

POLICY_TOML = """
version = "test-1"

[defaults]
marketing = false

[actions.offer_a]
kind = "offer"
value = 10.0
[actions.offer_a.eligibility]
adult = "age >= 18"

[actions.offer_b]
kind = "offer"
value = 10.0

[actions.newsletter]
kind = "content"
value = 4.0
marketing = true

[actions.no_action]
kind = "none"
value = 1.0
default_propensity = 0.05
"""

# What customers really do (the model's P says otherwise: it rates offer_a above offer_b).
TRUE_ACCEPTANCE = {"offer_a": 0.10, "offer_b": 0.50, "newsletter": 0.20}
CONTACT_CAP = "contact cap: 1 contacts with offer_b on web in the last 7 days (max 1)"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML, encoding="utf-8")
    return path


@pytest.fixture
def policy(policy_file: Path) -> ActionPolicy:
    return load_policy(policy_file)


class _CapOfferB:
    """A contact gate that stops offer_b for the customers in ``capped``."""

    def __init__(self, capped: set[str]) -> None:
        self.capped = capped

    def allowed(
        self, customer_id: str, action_id: str, channel: str | None, now: datetime
    ) -> tuple[bool, str]:
        if action_id == "offer_b" and customer_id in self.capped:
            return False, CONTACT_CAP
        return True, "within contact limits"


def make_log(
    policy: ActionPolicy, n: int, *, epsilon: float = 0.0, seed: int = 0
) -> tuple[list[DecisionRecord], pl.DataFrame]:
    """Decisions made by the real arbitration (ε-greedy over the arms when ε > 0) and the responses that the
    planted :data:`TRUE_ACCEPTANCE` draws; a customer under 18, without marketing consent or capped on offer_b
    now and then, so that rules, consent and contact limits all shape the log."""
    rng = random.Random(seed)
    records: list[DecisionRecord] = []
    responses: list[dict[str, object]] = []
    capped: set[str] = set()
    gate = _CapOfferB(capped)
    for i in range(n):
        cid = f"C{i:05d}"
        if rng.random() < 0.2:
            capped.add(cid)
        at = T0 + timedelta(minutes=i)
        candidates = [
            ActionCandidate("offer_a", rng.uniform(0.2, 0.6)),
            ActionCandidate("offer_b", rng.uniform(0.1, 0.5)),
            ActionCandidate("newsletter", rng.uniform(0.3, 0.9)),
        ]
        decision = arbitrate(
            candidates,
            policy,
            {"customer_id": cid, "age": rng.choice([16, 25, 40, 70])},
            {"channel": "web", "now": at},
            {"personalisation": True, "marketing": rng.random() < 0.7},
            gate,
            3,
            customer_id=cid,
            now=at,
        )
        record = DecisionRecord.from_decision(decision, arm="champion", latency_ms=1.0, timestamp=at)
        arms = [a.action_id for a in decision.actions] + [
            a.action_id
            for a in decision.filtered
            if (a.reason or "").startswith(("ranked below the top ", "scores "))
        ]
        chosen, probability = record.chosen, 1.0
        if epsilon > 0 and arms:
            chosen = arms[rng.randrange(len(arms))] if rng.random() < epsilon else arms[0]
            probability = epsilon / len(arms) + (1 - epsilon if chosen == arms[0] else 0.0)
        chosen_kind = policy.actions[chosen].kind if chosen else None
        record = record.model_copy(
            update={"chosen": chosen, "chosen_kind": chosen_kind, "probability": probability}
        )
        records.append(record)
        if chosen is None or chosen_kind == "none":
            continue
        responses.append(_response(record, chosen, "shown"))
        if rng.random() < TRUE_ACCEPTANCE[chosen]:
            responses.append(_response(record, chosen, "accepted"))
            if rng.random() < 0.3:
                responses.append(_response(record, chosen, "converted", 25.0))
    return records, pl.DataFrame(responses, schema=_RESPONSES_SCHEMA)


_RESPONSES_SCHEMA = {
    "response_id": pl.String,
    "decision_id": pl.String,
    "customer_id": pl.String,
    "action_id": pl.String,
    "kind": pl.String,
    "value": pl.Float64,
    "timestamp": pl.Datetime("us"),
    "channel": pl.String,
}


def _response(
    record: DecisionRecord, action_id: str, kind: str, value: float | None = None
) -> dict[str, object]:
    return {
        "response_id": f"{record.decision_id}-{kind}",
        "decision_id": record.decision_id,
        "customer_id": record.customer_id,
        "action_id": action_id,
        "kind": kind,
        "value": value,
        "timestamp": record.timestamp + timedelta(hours=1),
        "channel": "web",
    }


def _record(decision_id: str, chosen: str | None, kind: str | None = "offer") -> DecisionRecord:
    candidates = [
        CandidateRecord(action_id="offer_a", propensity=0.4, value=10.0, lever=1.0, score=4.0, offered=True),
        CandidateRecord(action_id="offer_b", propensity=0.2, value=12.0, lever=1.0, score=2.4, offered=True),
        CandidateRecord(
            action_id="no_action", propensity=0.05, value=1.0, lever=1.0, score=0.05, offered=True
        ),
    ]
    return DecisionRecord(
        decision_id=decision_id,
        timestamp=T0,
        customer_id="C1",
        channel="web",
        arm="champion",
        policy_version="test-1",
        personalised=True,
        candidates=candidates,
        chosen=chosen,
        chosen_kind=kind,
        latency_ms=1.0,
    )


# --- rewards ----------------------------------------------------------------------------------------------------


def test_rewards_are_acceptance_and_value_of_the_chosen_action():
    records = [
        _record("d1", "offer_a"),  # accepted: 1, the action's V 10
        _record("d2", "offer_b"),  # accepted and converted with 25: 1, 25
        _record("d3", "offer_a"),  # dismissed: 0, 0
        _record("d4", "no_action", "none"),  # a no-action decision earns nothing, whatever the responses say
        _record("d5", "offer_a"),  # a response for another action than the chosen one: 0
        _record("d6", None, None),  # nothing passed: 0
        _record("d7", "offer_b"),  # converted without a value (and no accepted row): 1, the action's V 12
    ]
    rows = [
        ("d1", "offer_a", "shown", None),
        ("d1", "offer_a", "accepted", None),
        ("d2", "offer_b", "accepted", None),
        ("d2", "offer_b", "converted", 25.0),
        ("d3", "offer_a", "dismissed", None),
        ("d4", "no_action", "accepted", None),
        ("d5", "offer_b", "accepted", None),
        ("d7", "offer_b", "converted", None),
    ]
    responses = pl.DataFrame(
        [
            {
                "response_id": f"r{k}",
                "decision_id": d,
                "customer_id": "C1",
                "action_id": a,
                "kind": kind,
                "value": v,
                "timestamp": T0,
                "channel": "web",
            }
            for k, (d, a, kind, v) in enumerate(rows)
        ],
        schema=_RESPONSES_SCHEMA,
    )
    out = decision_rewards(records, responses)
    assert out["decision_id"].to_list() == ["d1", "d2", "d3", "d4", "d5", "d6", "d7"]
    assert out["accepted"].to_list() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert out["value"].to_list() == [10.0, 25.0, 0.0, 0.0, 0.0, 0.0, 12.0]


def test_rewards_need_the_response_columns():
    with pytest.raises(PolicyEvalError, match="need column"):
        decision_rewards([_record("d1", "offer_a")], pl.DataFrame({"decision_id": ["d1"]}))


# --- the replay -------------------------------------------------------------------------------------------------


def test_replaying_the_logging_policy_reproduces_every_logged_choice(policy):
    records, responses = make_log(policy, 400, seed=1)
    # Rules, consent and the contact cap all shaped this log.
    reasons = " ".join(c.reason or "" for r in records for c in r.candidates)
    assert "adult" in reasons and "no marketing consent" in reasons and "contact cap" in reasons
    current = CandidatePolicy(CURRENT, policy)
    replayed = replay(records, current, policy)
    assert [t.target for t in replayed] == [{r.chosen or NOTHING: 1.0} for r in records]
    rows = evaluate_policies(records, responses, [current], policy, resamples=50)
    by = {(r["estimator"], r["metric"]): r for r in rows}
    rewards = decision_rewards(records, responses)
    for estimator in ("ips", "snips", "dr"):
        assert by[(estimator, "acceptance")]["estimate"] == pytest.approx(rewards["accepted"].mean())
        assert by[(estimator, "value")]["estimate"] == pytest.approx(rewards["value"].mean())
        assert by[(estimator, "acceptance")]["support"] == len(records)
    assert by[("ips", "acceptance")]["estimate"] == rewards["accepted"].mean()


@pytest.mark.slow  # replays 6,000 logged decisions under three policies: ~6 s
def test_a_candidate_favouring_the_action_the_log_shows_better_is_estimated_higher(policy, tmp_path):
    records, responses = make_log(policy, 6000, epsilon=0.3, seed=2)
    better_b = tmp_path / "better_b.toml"
    better_b.write_text(
        POLICY_TOML.replace(
            '[actions.offer_b]\nkind = "offer"\nvalue = 10.0',
            '[actions.offer_b]\nkind = "offer"\nvalue = 30.0',
        )
    )
    candidates = candidates_for(['levers:{"offer_b": 3.0}', f"policy:{better_b}", "epsilon:0.2"], policy)
    assert [c.name for c in candidates] == [
        CURRENT,
        'levers:{"offer_b": 3.0}',
        f"policy:{better_b}",
        "epsilon:0.2",
    ]
    rows = evaluate_policies(records, responses, candidates, policy, seed=3)
    estimate = {(r["candidate"], r["estimator"], r["metric"]): r for r in rows}
    for name in (candidates[1].name, candidates[2].name):
        for est in ("ips", "snips", "dr"):
            assert (
                estimate[(name, est, "acceptance")]["estimate"]
                > estimate[(CURRENT, est, "acceptance")]["high"]
            ), (name, est)
    # The truth on the same decisions: Σ_a π(a|x) × the planted acceptance of a. With 6,000 decisions, ε = 0.3
    # and weights up to ~13, the standard error of DR here is about 0.02: 0.08 is four of them.
    for candidate in candidates:
        replayed = replay(records, candidate, policy)
        truth = float(
            np.mean([sum(p * TRUE_ACCEPTANCE.get(a, 0.0) for a, p in t.target.items()) for t in replayed])
        )
        dr = estimate[(candidate.name, "dr", "acceptance")]
        assert abs(dr["estimate"] - truth) < 0.08, (candidate.name, dr, truth)
        assert dr["low"] <= truth <= dr["high"], (candidate.name, dr, truth)
        assert 0 < dr["support"] <= dr["decisions"] == len(records)
    # Explored decisions chose other arms than the current policy would: they do not support it.
    current = estimate[(CURRENT, "ips", "acceptance")]
    assert 0.6 * len(records) < current["support"] < len(records)


def test_epsilon_spreads_over_the_arms_and_sums_to_one(policy):
    records, _ = make_log(policy, 200, seed=4)
    greedy = replay(records, CandidatePolicy(CURRENT, policy), policy)
    explored = replay(records, parse_candidate("epsilon:0.1", policy), policy)
    for g, e, r in zip(greedy, explored, records, strict=True):
        assert sum(e.target.values()) == pytest.approx(1.0)
        (best,) = g.target
        k = len(e.target)
        assert e.target[best] == pytest.approx(0.9 + 0.1 / k)
        # Never an action a rule, consent or the contact cap filtered out in the log.
        filtered = {
            c.action_id
            for c in r.candidates
            if c.reason and not c.reason.startswith(("ranked below the top ", "scores "))
        }
        assert not filtered & set(e.target)


def test_a_new_rule_is_evaluated_on_the_profile_and_fails_without_one(policy, tmp_path):
    records, _ = make_log(policy, 300, seed=5)
    stricter = tmp_path / "stricter.toml"
    stricter.write_text(
        POLICY_TOML.replace('adult = "age >= 18"', 'adult = "age >= 18"\nsenior = "age >= 65"')
    )
    candidate = parse_candidate(f"policy:{stricter}", policy)
    without = replay(records, candidate, policy)
    assert all("offer_a" not in t.target for t in without)
    profiles = {r.customer_id: {"age": 70} for r in records}
    with_old = replay(records, candidate, policy, profiles=profiles)
    logged = replay(records, CandidatePolicy(CURRENT, policy), policy)
    # Everyone is 70 in the profiles, but the logged verdict of the adult rule still decides where it failed.
    assert [t.target for t in with_old] == [t.target for t in logged]


# --- SPECs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "is not a SPEC"),
        ("what:ever", "unknown form 'what'"),
        ("epsilon:2", r"ε must be in \[0, 1\]"),
        ("epsilon:lots", "ε must be a number"),
        ("epsilon:0.1:epsilon:0.2", "applied once"),
        ("levers:{not json", "not valid JSON"),
        ('levers:{"no_such_action": 1.0}', "unknown action 'no_such_action'"),
        ('levers:{"offer_a": -1}', "finite number ≥ 0"),
        ("levers:[1, 2]", "cannot read it"),
        ("levers:/no/such/levers.json", "cannot read it"),
        ("policy:/no/such/policy.toml", "cannot read the policy file"),
        ("model:v3", "another propensity model version cannot be judged offline"),
        ("policy:", "is not a SPEC"),
    ],
)
def test_bad_specs_are_clear_errors(policy, spec, message):
    with pytest.raises(CandidateSpecError, match=message):
        parse_candidate(spec, policy)


def test_levers_from_a_file_and_epsilon_over_another_spec(policy, tmp_path):
    path = tmp_path / "levers.json"
    path.write_text(json.dumps({"offer_b": 2.5}))
    c = parse_candidate(f"levers:{path}", policy, {"offer_a": 1.0, "offer_b": 1.0})
    assert c.levers == {"offer_a": 1.0, "offer_b": 2.5} and c.epsilon == 0
    e = parse_candidate(f"epsilon:0.25:levers:{path}", policy)
    assert e.levers == {"offer_b": 2.5} and e.epsilon == 0.25 and e.name == f"epsilon:0.25:levers:{path}"
    assert parse_candidate("epsilon:0.1", policy).policy is policy


def test_an_empty_log_is_a_clear_error(policy):
    with pytest.raises(PolicyEvalError, match="decision log is empty"):
        evaluate_policies(
            [], pl.DataFrame(schema=_RESPONSES_SCHEMA), [CandidatePolicy(CURRENT, policy)], policy
        )


def test_report_lines_show_every_candidate_and_estimator(policy):
    records, responses = make_log(policy, 100, seed=6)
    rows = evaluate_policies(
        records, responses, candidates_for(["epsilon:0.1"], policy), policy, resamples=20
    )
    lines = report_lines(rows)
    assert len(lines) == 1 + 2 * 3
    assert lines[1].startswith("current") and " ips " in lines[1]
    assert any(line.startswith("epsilon:0.1") and " dr " in line for line in lines)


# --- the command on a state store -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """A state store with a logged policy's 150 decisions and their responses, written once per module."""
    folder = tmp_path_factory.mktemp("policy-store")
    (folder / "policy.toml").write_text(POLICY_TOML, encoding="utf-8")
    policy = load_policy(folder / "policy.toml")
    path = folder / "state.db"
    store = StateStore(f"sqlite:///{path}")
    records, responses = make_log(policy, 150, epsilon=0.2, seed=7)
    log = DecisionLog(store)
    for record in records:
        log.append(record)
    for row in responses.iter_rows(named=True):
        store.add_response(row)
    store.close()
    return path


@pytest.fixture
def filled_store(tmp_path: Path, store_template: Path) -> str:
    """A copy of the filled store per test: what one test writes, no other sees."""
    shutil.copyfile(store_template, tmp_path / "state.db")
    return f"sqlite:///{tmp_path / 'state.db'}"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_report_policy_json_on_a_store(tmp_path, policy_file, filled_store, capsys):
    code, out, err = _run(
        capsys,
        "report",
        "policy",
        "--data",
        str(tmp_path / "no-dataset"),
        "--state-url",
        filled_store,
        "--policy",
        str(policy_file),
        "--candidate",
        'levers:{"offer_b": 3}',
        "--candidate",
        "epsilon:0.1",
        "--resamples",
        "100",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["command"] == "report policy"
    rows = summary["rows"]
    assert {r["candidate"] for r in rows} == {CURRENT, 'levers:{"offer_b": 3}', "epsilon:0.1"}
    assert len(rows) == 3 * 3 * 2
    for r in rows:
        assert {"candidate", "estimator", "metric", "estimate", "low", "high", "decisions", "support"} <= set(
            r
        )
        assert r["decisions"] == 150
        assert r["low"] <= r["estimate"] <= r["high"]
    code, out, _ = _run(
        capsys,
        "report",
        "policy",
        "--data",
        str(tmp_path / "no-dataset"),
        "--state-url",
        filled_store,
        "--policy",
        str(policy_file),
        "--resamples",
        "20",
    )
    assert code == 0
    assert "offline policy evaluation" in out and "current" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--candidate", "nonsense"], "is not a SPEC"),
        (["--candidate", "policy:/no/such.toml"], "cannot read the policy file"),
        (["--since", "2030-01-01"], "no decisions at or after 2030-01-01"),
        (["--since", "yesterday"], "is not a date"),
    ],
)
def test_report_policy_errors_are_one_line(tmp_path, policy_file, filled_store, capsys, extra, message):
    code, _, err = _run(
        capsys,
        "report",
        "policy",
        "--data",
        str(tmp_path),
        "--state-url",
        filled_store,
        "--policy",
        str(policy_file),
        *extra,
    )
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_policy_without_a_store_or_with_an_empty_log(tmp_path, policy_file, capsys):
    code, _, err = _run(capsys, "report", "policy", "--data", str(tmp_path), "--policy", str(policy_file))
    assert code == 2 and "no state store" in err
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    StateStore(url).close()
    code, _, err = _run(
        capsys, "report", "policy", "--data", str(tmp_path), "--state-url", url, "--policy", str(policy_file)
    )
    assert code == 2 and "no decisions" in err


# --- the dashboard's table --------------------------------------------------------------------------------------


def test_evaluation_table_puts_both_metrics_side_by_side():
    rows = [
        {
            "candidate": "current",
            "estimator": "ips",
            "metric": "acceptance",
            "estimate": 0.2,
            "low": 0.1,
            "high": 0.3,
            "decisions": 10,
            "support": 10,
        },
        {
            "candidate": "current",
            "estimator": "ips",
            "metric": "value",
            "estimate": 2.0,
            "low": 1.0,
            "high": 3.0,
            "decisions": 10,
            "support": 10,
        },
        {
            "candidate": "epsilon:0.1",
            "estimator": "snips",
            "metric": "acceptance",
            "estimate": None,
            "low": None,
            "high": None,
            "decisions": 10,
            "support": 0,
        },
    ]
    table = evaluation_table(rows)
    assert table.columns == [
        "candidate",
        "estimator",
        "acceptance",
        "acceptance_low",
        "acceptance_high",
        "value",
        "value_low",
        "value_high",
        "decisions",
        "support",
    ]
    assert table.rows() == [
        ("current", "ips", 0.2, 0.1, 0.3, 2.0, 1.0, 3.0, 10, 10),
        ("epsilon:0.1", "snips", None, None, None, None, None, None, 10, 0),
    ]


def test_the_dashboard_section_shows_the_current_policy_and_epsilon(tmp_path, policy_file, filled_store):
    from nextbest.serving.dashboard import DEFAULT_POLICY_CANDIDATES, _policy_evaluation

    store = StateStore(filled_store, create=False)
    ds = Dataset.at(tmp_path / "world")
    html = _policy_evaluation(store, ds, pl.DataFrame(), policy_file, DEFAULT_POLICY_CANDIDATES)
    assert "Offline policy evaluation" in html and 'data-table="policy-evaluation"' in html
    assert html.count("<tr>") == 1 + 2 * 3  # the header, then current and epsilon:0.1 by three estimators
    assert "epsilon:0.1" in html and "current" in html
    # A problem is a note on the page, not an exception.
    note = _policy_evaluation(store, ds, pl.DataFrame(), policy_file, ["nonsense"])
    assert 'data-empty="policy-evaluation"' in note and "is not a SPEC" in note
    assert "state store" in _policy_evaluation(None, ds, pl.DataFrame(), policy_file, [])
    store.close()


# --- parity with the service ------------------------------------------------------------------------------------


@pytest.mark.slow  # generates a world and runs the real engine's decisions: ~6 s
def test_replaying_the_real_engines_log_reproduces_every_choice(tmp_path):
    """Decisions of the real engine (the shipped policy's rules, consent, channels and contact caps on a small
    generated world) replayed under the current policy and levers: every logged choice comes back."""
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import PROFILES_FILE, build_features
    from nextbest.serving import api
    from nextbest.serving.arms import CHAMPION
    from nextbest.serving.engine import (
        PROPENSITY_MODEL,
        RECOMMENDER_MODEL,
        Engine,
        EngineConfig,
        RegisteredModel,
        ServingModels,
    )
    from nextbest.serving.levers import PolicyState
    from nextbest.serving.policy_eval import load_profiles
    from nextbest.training.cf import train_cf
    from nextbest.training.cf_data import prepare_cf_data
    from nextbest.training.propensity import PropensityConfig, fit_propensity
    from nextbest.training.propensity_data import load_propensity_data
    from nextbest.training.tracking import TrackingConfig

    ds = Dataset.at(tmp_path / "world")
    generate_world(WorldConfig(customers=300, days=120, seed=3), ds)
    build_features(ds)
    als = train_cf(
        ds,
        "als",
        {"factors": 16, "iterations": 8},
        tracking=TrackingConfig(enabled=False),
        prepared=prepare_cf_data(ds, with_test=False),
        threads=1,
    )
    fit = fit_propensity(
        load_propensity_data(ds), PropensityConfig(epochs=2, hidden_sizes=[32], batch_size=512), device="cpu"
    )
    models = ServingModels(
        recommender={CHAMPION: RegisteredModel(RECOMMENDER_MODEL, "1", CHAMPION, als.bundle)},
        propensity={CHAMPION: RegisteredModel(PROPENSITY_MODEL, "1", CHAMPION, fit.model)},
    )
    engine = Engine(EngineConfig(data=ds.root, state_dir=tmp_path / "state"), models)
    try:
        customers = pl.read_parquet(ds.features_dir / PROFILES_FILE)["customer_id"].to_list()[:80]
        for _ in range(2):  # twice, so that contact caps stop some actions the second time
            for channel in ("web", "email", "app"):
                for cid in customers:
                    context = {"now": "2026-04-30T12:00:00"}
                    request = api.NextBestActionRequest(
                        customer_id=cid, channel=channel, n=3, context=context
                    )
                    engine.next_best_action(request)
        records = DecisionLog(engine.store).records()
        reasons = " ".join(c.reason or "" for r in records for c in r.candidates)
        assert "rule" in reasons and "no marketing consent" in reasons and "contact cap" in reasons
        current = CandidatePolicy(CURRENT, engine.policy, PolicyState(engine.policy, engine.store).levers)
        profiles = load_profiles(ds.features_dir / PROFILES_FILE, customers)
        replayed = replay(records, current, engine.policy, profiles=profiles)
        assert [t.target for t in replayed] == [{r.chosen or NOTHING: 1.0} for r in records]
    finally:
        engine.close()
