"""Responses tied to decisions (validation, idempotence, storage, erasure, the v1 → v2 store migration) and
ε-greedy exploration with logged probabilities (the formula, the explored share, rules never explored away).

Pure parts are tested on hand-made decisions; the engine on a small world trained without MLflow
(``engine_world``), each test with its own state store.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from nextbest.serving import api
from nextbest.serving.decision_log import DecisionRecord, check_responses
from nextbest.serving.decisions import (
    ActionCandidate,
    arbitrate,
    decision_rng,
    epsilon_greedy_probabilities,
    explore,
)
from nextbest.serving.engine import (
    BadRequest,
    Conflict,
    Engine,
    EngineConfig,
    NotFound,
    ServingData,
)
from nextbest.serving.policy import (
    DEFAULT_POLICY_PATH,
    Exploration,
    PolicyError,
    load_policy,
    policy_from_dict,
)
from nextbest.serving.state_store import (
    RESPONSE_COLUMNS,
    SCHEMA_VERSION,
    StateStore,
    default_state_url,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOKEN = "responses-test-token"
NOW = {"now": "2026-04-30T12:00:00"}
T0 = datetime(2026, 4, 30, 12, 0)

# --- pure: the ε-greedy draw and its probabilities --------------------------------------------------------------

POLICY = policy_from_dict(
    {
        "version": "x1",
        "actions": {
            "a": {"value": 10},
            "b": {"value": 4},
            "minor_only": {"value": 100, "eligibility": {"minor": "age < 18"}},
            "mail": {"value": 50, "marketing": True},
            "no_action": {"kind": "none", "value": 1},
        },
    }
)
"""For an adult without marketing consent the arms are a (score 5), b (2) and no_action (0.1); minor_only and
mail score highest but are filtered (a rule, consent)."""


def _decision(n: int = 3):
    return arbitrate(
        [
            ActionCandidate("a", 0.5),
            ActionCandidate("b", 0.5),
            ActionCandidate("minor_only", 0.9),
            ActionCandidate("mail", 0.9),
            ActionCandidate("no_action", 0.1),
        ],
        POLICY,
        {"customer_id": "C1", "age": 30},
        {"channel": "web"},
        {"personalisation": True, "marketing": False},
        None,
        n,
    )


def test_arbitration_names_the_arms_and_is_deterministic_without_exploration():
    d = _decision()
    assert d.arms == ["a", "b", "no_action"]
    assert d.arm_probabilities == {"a": 1.0, "b": 0.0, "no_action": 0.0}
    assert (d.chosen.action_id, d.probability, d.explored) == ("a", 1.0, False)
    off = Exploration()
    assert explore(d, off, "any-id", 3) is d


def test_epsilon_greedy_probabilities_follow_the_formula():
    assert epsilon_greedy_probabilities(["a", "b", "c", "d"], 0.2) == pytest.approx(
        {"a": 0.85, "b": 0.05, "c": 0.05, "d": 0.05}
    )
    assert epsilon_greedy_probabilities(["a"], 0.7) == {"a": 1.0}


def test_the_same_decision_id_draws_the_same_numbers():
    assert decision_rng("d-1").random() == decision_rng("d-1").random()
    assert decision_rng("d-1").random() != decision_rng("d-2").random()
    assert decision_rng("d-1", seed=1).random() != decision_rng("d-1").random()


def test_epsilon_greedy_explores_about_epsilon_of_decisions_and_logs_the_formula():
    eps, n = 0.2, 4000
    exploration = Exploration(method="epsilon_greedy", epsilon=eps)
    base = _decision()
    outcomes = [explore(base, exploration, f"decision-{k}", 3) for k in range(n)]
    explored = sum(d.explored for d in outcomes)
    # Seeded by the ids, so the count is fixed; the bound says it is the binomial it should be (4 σ).
    assert abs(explored - eps * n) <= 4 * math.sqrt(n * eps * (1 - eps))
    chosen = {d.chosen.action_id for d in outcomes}
    assert chosen == {"a", "b", "no_action"}  # never minor_only or mail: filtered by a rule, by consent
    for d in outcomes:
        expected = 1 - eps + eps / 3 if d.chosen.action_id == "a" else eps / 3
        assert d.probability == pytest.approx(expected)
        assert sum(d.arm_probabilities.values()) == pytest.approx(1.0)
        assert d.explored or d.chosen.action_id == "a"
        assert [a.rank for a in d.actions] == list(range(1, len(d.actions) + 1))
        assert d.actions[-1].action_id == "no_action" or len(d.actions) == 3
    # Explored to b: b first, then the best (a) and no action; explored to no action: it alone.
    to_b = next(d for d in outcomes if d.chosen.action_id == "b")
    assert [a.action_id for a in to_b.actions] == ["b", "a", "no_action"]
    assert "exploration" in to_b.actions[0].rules_passed and to_b.actions[0].reason is None
    to_none = next(d for d in outcomes if d.chosen.action_id == "no_action")
    assert [a.action_id for a in to_none.actions] == ["no_action"]
    assert {a.action_id for a in to_none.filtered} == {"a", "b", "minor_only", "mail"}


def test_thompson_sampling_logs_the_share_of_draws_each_arm_wins():
    base = _decision()  # arms a (P 0.5 × V 10), b (0.5 × 4), no_action (0.1 × 1)
    sure = explore(base, Exploration(method="thompson", prior_strength=1e6), "t-0", 3)
    assert sure.chosen.action_id == "a" and sure.probability == 1.0 and not sure.explored
    loose = Exploration(method="thompson", prior_strength=2.0, samples=2000)
    outcomes = [explore(base, loose, f"t-{k}", 3) for k in range(300)]
    assert {d.chosen.action_id for d in outcomes} <= {"a", "b", "no_action"}
    assert any(d.explored for d in outcomes) and any(not d.explored for d in outcomes)
    for d in outcomes:
        assert sum(d.arm_probabilities.values()) == pytest.approx(1.0)
        assert d.probability > 0 and d.explored == (d.chosen.action_id != "a")
        assert d.arm_probabilities["a"] > d.arm_probabilities["b"]
    again = explore(base, loose, "t-7", 3)
    assert (again.chosen.action_id, again.arm_probabilities) == (
        outcomes[7].chosen.action_id,
        outcomes[7].arm_probabilities,
    )


def test_exploration_with_n_one_keeps_one_action_and_a_spent_budget_does_not_explore():
    exploration = Exploration(method="epsilon_greedy", epsilon=1.0)
    d = explore(_decision(n=1), exploration, "decision-0", 1)
    assert len(d.actions) == 1 and d.explored == (d.chosen.action_id != "a")
    assert d.probability == pytest.approx(1 / 3)
    spent = explore(_decision(), exploration, "decision-0", 3, may_explore=False)
    assert (spent.chosen.action_id, spent.probability, spent.explored) == ("a", 1.0, False)


def test_the_budget_caps_the_share_and_the_count_of_exploring_decisions():
    share = Exploration(method="epsilon_greedy", epsilon=0.5, budget=0.25)
    # explored < 0.25 × (decisions so far + this one)
    assert share.may_explore(0, 0) and not share.may_explore(1, 1) and not share.may_explore(3, 1)
    assert share.may_explore(4, 1) and not share.may_explore(7, 2) and share.may_explore(8, 2)
    count = Exploration(method="epsilon_greedy", epsilon=0.5, budget_per_day=2)
    assert count.may_explore(100, 1) and not count.may_explore(100, 2)
    assert not Exploration(method="epsilon_greedy", epsilon=0.0).may_explore(0, 0)


def test_the_policy_file_takes_exploration_and_refuses_what_is_not_there():
    assert load_policy(DEFAULT_POLICY_PATH).exploration.method == "none"  # off by default
    doc = {"version": "x", "actions": {"no_action": {"kind": "none", "value": 1}}}
    on = policy_from_dict({**doc, "exploration": {"method": "epsilon_greedy", "epsilon": 0.1, "budget": 0.2}})
    assert on.exploration.active and on.exploration.budget == 0.2
    thompson = policy_from_dict({**doc, "exploration": {"method": "thompson", "prior_strength": 20}})
    assert thompson.exploration.active and thompson.exploration.samples == 1000
    with pytest.raises(PolicyError, match="needs method = 'epsilon_greedy'"):
        policy_from_dict({**doc, "exploration": {"epsilon": 0.1}})
    with pytest.raises(PolicyError, match=r"exploration\.epsilon"):
        policy_from_dict({**doc, "exploration": {"method": "epsilon_greedy", "epsilon": 1.5}})
    with pytest.raises(PolicyError, match="not a known field"):
        policy_from_dict({**doc, "exploration": {"method": "epsilon_greedy", "epsilonn": 0.1}})


def test_a_record_carries_the_probabilities_and_records_of_version_one_read_as_deterministic():
    d = explore(_decision(), Exploration(method="epsilon_greedy", epsilon=0.3), "decision-7", 3)
    r = DecisionRecord.from_decision(d, arm="champion", latency_ms=1.0, decision_id="decision-7")
    by_id = {c.action_id: c for c in r.candidates}
    assert {a for a, c in by_id.items() if c.eligible} == {"a", "b", "no_action"}
    assert by_id["a"].probability == pytest.approx(0.8) and by_id["mail"].probability == 0.0
    assert r.probability == by_id[r.chosen].probability and r.explored == d.explored
    old = r.model_dump(mode="json")
    for key in ("probability", "explored"):
        del old[key]
    for c in old["candidates"]:
        del c["eligible"], c["probability"]
    again = DecisionRecord.model_validate(old)
    assert (again.probability, again.explored) == (1.0, False)
    assert {c.action_id: c.probability for c in again.candidates if c.probability} == {r.chosen: 1.0}
    assert {c.action_id for c in again.candidates if c.eligible} == {
        c.action_id for c in r.candidates if c.eligible
    }


# --- pure: tying responses to decisions ---------------------------------------------------------------------------


def _record(decision_id: str = "d1") -> DecisionRecord:
    return DecisionRecord.from_decision(
        _decision(n=2), arm="champion", latency_ms=1.0, decision_id=decision_id
    )


def _answer(k: int, kind: str = "shown", **kw) -> dict:
    return {
        "response_id": f"r{k}",
        "decision_id": "d1",
        "customer_id": "C1",
        "action_id": "a",
        "kind": kind,
        **kw,
    }


def test_check_responses_names_the_field_of_every_bad_response():
    decisions = {"d1": _record()}  # offered: a, b (n = 2)
    assert check_responses([_answer(0), _answer(1, "accepted")], decisions, set(), set()) == [0, 1]
    with pytest.raises(Exception, match=r"responses\[1\]\.decision_id: no decision 'nope'"):
        check_responses([_answer(0), _answer(1, decision_id="nope")], decisions, set(), set())
    with pytest.raises(Exception, match=r"responses\[0\]\.customer_id: 'C2' is not the customer"):
        check_responses([_answer(0, customer_id="C2")], decisions, set(), set())
    with pytest.raises(Exception, match=r"responses\[0\]\.action_id: 'no_action' was not offered.*a, b"):
        check_responses([_answer(0, action_id="no_action")], decisions, set(), set())
    with pytest.raises(Exception, match=r"responses\[1\]\.kind: decision 'd1' has a 'shown' response"):
        check_responses([_answer(0), _answer(1)], decisions, set(), set())
    with pytest.raises(Exception, match=r"responses\[0\]\.kind"):
        check_responses([_answer(0)], decisions, {("d1", "a", "shown")}, set())
    # A retry (a response id stored already, or repeated in the request) is left out, not refused.
    assert check_responses([_answer(0), _answer(0)], decisions, {("d1", "a", "shown")}, {"r0"}) == []
    assert check_responses([_answer(0), _answer(0)], decisions, set(), set()) == [0]
    # A response that names no decision is only stored.
    assert check_responses([_answer(0, decision_id=None, customer_id="C9")], {}, set(), set()) == [0]


def test_a_response_takes_kind_or_accepted_and_they_must_agree():
    base = {"customer_id": "C1", "action_id": "a"}
    assert api.OfferResponseIn(**base, accepted=True).response_kind == "accepted"
    assert api.OfferResponseIn(**base, accepted=False).response_kind == "dismissed"
    assert (
        api.OfferResponseIn(**base, kind="converted", accepted=True, value=12.5).response_kind == "converted"
    )
    for bad, match in (
        ({}, "give kind"),
        ({"kind": "shown", "accepted": True}, "contradicts kind 'shown'"),
        ({"kind": "dismissed", "accepted": True}, "contradicts"),
        ({"kind": "bought"}, "kind"),
        ({"kind": "converted", "value": -1.0}, "value"),
    ):
        with pytest.raises(ValueError, match=match):
            api.OfferResponseIn(**base, **bad)


# --- the store: responses, and the migration from version 1 ----------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path) -> str:
    """An empty database on both of the store's URLs."""
    if request.param == "sqlite":
        return default_state_url(tmp_path / "state")
    return request.getfixturevalue("postgres").database(f"responses_{uuid.uuid4().hex[:12]}")


def _v1_store(url: str) -> None:
    """Make ``url`` a store as version 1 wrote it: no responses table, no exploration columns on decisions; one
    decision, and one response in the contact ledger."""
    StateStore(url).close()
    engine = sa.create_engine(url)
    record = (
        '{"decision_id": "old-1", "customer_id": "C1", "timestamp": "2026-04-01T09:00:00", "chosen": "a"}'
    )
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE responses"))
        c.execute(sa.text("ALTER TABLE decisions DROP COLUMN explored"))
        c.execute(sa.text("ALTER TABLE decisions DROP COLUMN probability"))
        c.execute(sa.text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
        c.execute(
            sa.text(
                "INSERT INTO decisions (decision_id, customer_id, timestamp, record) "
                "VALUES ('old-1', 'C1', :at, :record)"
            ),
            {"record": record, "at": datetime(2026, 4, 1, 9)},
        )
        c.execute(
            sa.text(
                "INSERT INTO contacts (event_id, type, customer_id, action_id, channel, at, accepted) "
                "VALUES ('e-old', 'response', 'C1', 'a', 'web', :at, false)"
            ),
            {"at": datetime(2026, 4, 1, 10)},
        )
    engine.dispose()


def test_a_version_one_store_is_migrated_to_version_two(empty_url):
    url = empty_url
    _v1_store(url)
    store = StateStore(url)
    assert store.schema_version == SCHEMA_VERSION == 2
    frame = store.decisions_frame()
    assert frame.select("decision_id", "explored", "probability").rows() == [("old-1", False, 1.0)]
    responses = store.responses_frame()
    assert responses.columns == list(RESPONSE_COLUMNS)
    assert responses.select("response_id", "decision_id", "kind", "timestamp").rows() == [
        ("e-old", None, "dismissed", datetime(2026, 4, 1, 10))
    ]
    assert store.known_response_ids(["e-old", "e-new"]) == {"e-old"}
    # The migrated store takes the new rows.
    store.add_decision(
        {"decision_id": "new-1", "customer_id": "C1", "timestamp": T0, "explored": True, "probability": 0.25}
    )
    assert store.decisions_frame(since=T0).select("decision_id", "explored", "probability").rows() == [
        ("new-1", True, 0.25)
    ]
    assert store.exploration_counts(T0 - timedelta(hours=1), T0 + timedelta(hours=1)) == (1, 1)


def test_responses_are_stored_once_erased_with_the_customer_and_trimmed(tmp_path):
    store = StateStore(default_state_url(tmp_path / "state"))
    row = {
        "response_id": "r1",
        "decision_id": "d1",
        "customer_id": "C1",
        "action_id": "a",
        "kind": "converted",
        "value": 84.5,
        "timestamp": T0,
        "channel": "web",
    }
    assert store.add_response(row) and not store.add_response(row)
    with pytest.raises(ValueError, match="has a 'converted' response for 'a' already"):
        store.add_response({**row, "response_id": "r2"})
    store.add_response(
        {
            **row,
            "response_id": "r3",
            "customer_id": "C2",
            "decision_id": None,
            "timestamp": T0 - timedelta(days=400),
        }
    )
    frame = store.responses_frame()
    assert frame.schema == pl.Schema(
        {
            "response_id": pl.String,
            "decision_id": pl.String,
            "customer_id": pl.String,
            "action_id": pl.String,
            "kind": pl.String,
            "value": pl.Float64,
            "timestamp": pl.Datetime("us"),
            "channel": pl.String,
        }
    )
    assert frame["response_id"].to_list() == ["r3", "r1"] and store.responses_frame(since=T0).height == 1
    assert store.response_kinds(["d1", "d9"]) == {("d1", "a", "converted")}
    assert store.trim(T0 - timedelta(days=1))["responses"] == 1
    assert store.forget(["C1"], ["f" * 64])["responses"] == 1
    assert store.responses_frame().height == 0


# --- the engine on the trained world -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(engine_world, tmp_path_factory) -> Iterator[Engine]:
    """Models and data loaded once; each test builds its own engine (own state, own policy) on them."""
    state = tmp_path_factory.mktemp("responses-state")
    engine = Engine(EngineConfig(data=engine_world.ds.root, state_dir=state), engine_world.models())
    yield engine
    engine.close()


def _engine(loaded: Engine, folder: Path, exploration: str | None = None) -> Engine:
    policy = None
    if exploration is not None:
        policy = folder / "policy.toml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(DEFAULT_POLICY_PATH.read_text() + "\n[exploration]\n" + exploration + "\n")
    config = loaded.config.model_copy(
        update={"state_dir": folder / "state", "policy": policy, "admin_token": TOKEN}
    )
    return Engine(config, loaded.models, loaded.data)


@pytest.fixture
def engine(loaded, tmp_path) -> Iterator[Engine]:
    e = _engine(loaded, tmp_path)
    yield e
    e.close()


def _customers(engine: Engine, n: int) -> list[str]:
    return sorted(engine.data.customers.keys())[:n]


def _decide(engine: Engine, customer: str, n: int = 3) -> api.NextBestActionResponse:
    return engine.next_best_action(
        api.NextBestActionRequest(customer_id=customer, channel="web", n=n, context=NOW)
    )


def _offering(engine: Engine) -> tuple[str, api.NextBestActionResponse]:
    """A customer and a logged decision that offers an action besides no action."""
    for c in _customers(engine, 400):
        preview = engine.next_best_action(
            api.NextBestActionRequest(customer_id=c, channel="web", n=3, context=NOW, record_contact=False)
        )
        if not preview.no_action:
            return c, _decide(engine, c)
    raise AssertionError("no customer is offered an action")


def _stored(engine: Engine) -> tuple[int, int, int]:
    return (
        engine.store.responses_frame().height,
        len(engine.store.events_after()),
        len(engine.store.all_contacts()),
    )


def _response(customer: str, action: str, decision_id: str | None, **kw) -> api.OfferResponseIn:
    return api.OfferResponseIn(customer_id=customer, action_id=action, decision_id=decision_id, **kw)


def test_bad_responses_get_a_4xx_naming_the_field_and_nothing_of_the_request_is_stored(engine):
    customer, decision = _offering(engine)
    action = decision.actions[0].action_id
    other = next(c for c in _customers(engine, 10) if c != customer)
    not_offered = next(a for a in engine.policy.actions if a not in {x.action_id for x in decision.actions})
    item = engine.data.item_vocab.ids[0]
    event = api.EventIn(customer_id=customer, item_id=item, event_type="view", event_id="ev-1")
    good = _response(customer, action, decision.decision_id, kind="shown", event_id="ok-0")
    before = _stored(engine)
    for bad, error, match in (
        (
            _response(customer, action, "no-such-decision", kind="accepted"),
            NotFound,
            "responses[1].decision_id",
        ),
        (
            _response(other, action, decision.decision_id, kind="accepted"),
            BadRequest,
            "responses[1].customer_id",
        ),
        (
            _response(customer, not_offered, decision.decision_id, kind="accepted"),
            BadRequest,
            "responses[1].action_id",
        ),
        (_response(customer, action, decision.decision_id, kind="shown"), Conflict, "responses[1].kind"),
    ):
        with pytest.raises(error) as refused:
            engine.events(api.EventsRequest(events=[event], responses=[good, bad]))
        assert (
            refused.value.message.startswith(match)
            and "nothing of this request was stored" in refused.value.message
        )
        assert refused.value.status == {NotFound: 404, BadRequest: 400, Conflict: 409}[error]
        assert _stored(engine) == before
    # A second response of a kind the decision has already, in a later request: 409 too.
    assert engine.events(api.EventsRequest(responses=[good])).responses == 1
    again = _response(customer, action, decision.decision_id, kind="shown", event_id="ok-1")
    with pytest.raises(Conflict, match=r"responses\[0\]\.kind: decision '\w+' has a 'shown' response"):
        engine.events(api.EventsRequest(events=[event], responses=[again]))
    assert _stored(engine) == (before[0] + 1, before[1], before[2])


def test_shown_accepted_converted_are_stored_once_each_and_a_retry_is_acknowledged(engine):
    customer, decision = _offering(engine)
    action = decision.actions[0].action_id
    at = datetime(2026, 4, 30, 12, 5)
    sent = [
        _response(
            customer,
            action,
            decision.decision_id,
            kind=kind,
            event_id=f"resp-{k}",
            channel="web",
            timestamp=at + timedelta(minutes=k),
            **({"value": 84.5} if kind == "converted" else {}),
        )
        for k, kind in enumerate(("shown", "accepted", "converted"))
    ]
    for r in sent:
        answer = engine.events(api.EventsRequest(responses=[r]))
        assert (answer.responses, answer.duplicates, answer.customers) == (1, 0, [customer])
    retry = engine.events(api.EventsRequest(responses=[sent[2]]))
    assert (retry.responses, retry.duplicates) == (0, 1)
    frame = engine.store.responses_frame()
    assert frame.select("response_id", "decision_id", "kind", "value").rows() == [
        ("resp-0", decision.decision_id, "shown", None),
        ("resp-1", decision.decision_id, "accepted", None),
        ("resp-2", decision.decision_id, "converted", 84.5),
    ]
    assert set(frame["customer_id"]) == {customer} and set(frame["action_id"]) == {action}
    # The right of access shows them.
    seen = engine.profile(api.CustomerRequest(customer_id=customer)).responses
    assert [(r["kind"], r["value"]) for r in seen] == [
        ("shown", None),
        ("accepted", None),
        ("converted", 84.5),
    ]
    # The contact ledger got the acceptance and the conversion (a showing is not a response to it).
    ledger = [(e.action_id, e.accepted) for e in engine.ledger.entries(customer) if e.type == "response"]
    assert ledger == [(action, True), (action, True)]
    # The earlier form still works: accepted true/false, no decision; stored, and in the ledger.
    legacy = api.OfferResponseIn(customer_id=customer, action_id=action, accepted=False, event_id="legacy-1")
    assert engine.events(api.EventsRequest(responses=[legacy])).responses == 1
    assert engine.events(api.EventsRequest(responses=[legacy])).duplicates == 1
    rows = engine.store.responses_frame().filter(pl.col("response_id") == "legacy-1")
    assert rows.select("decision_id", "kind").rows() == [(None, "dismissed")]
    assert [e.accepted for e in engine.ledger.entries(customer) if e.type == "response"] == [
        True,
        True,
        False,
    ]


def test_erasure_removes_the_customers_responses(engine_world, loaded, tmp_path):
    ds = engine_world.copy(tmp_path / "world")  # erasure edits the dataset
    config = loaded.config.model_copy(
        update={"data": ds.root, "state_dir": tmp_path / "state", "admin_token": TOKEN}
    )
    data = ServingData.load(ds, channels=loaded.data.channels)
    engine = Engine(config, loaded.models, data)
    try:
        customer, decision = _offering(engine)
        action = decision.actions[0].action_id
        engine.events(
            api.EventsRequest(responses=[_response(customer, action, decision.decision_id, kind="shown")])
        )
        assert engine.store.responses_frame().height == 1
        erased = engine.forget(api.CustomerRequest(customer_id=customer), f"Bearer {TOKEN}")
        assert erased.responses_removed == 1 and erased.decisions_removed >= 1
        assert engine.store.responses_frame().height == 0
        with pytest.raises(Exception, match="erased"):
            engine.events(
                api.EventsRequest(
                    responses=[_response(customer, action, decision.decision_id, kind="accepted")]
                )
            )
    finally:
        engine.close()


def _decide_all(engine: Engine, customers: list[str]) -> list[api.NextBestActionResponse]:
    requests = [api.NextBestActionRequest(customer_id=c, channel="web", n=3, context=NOW) for c in customers]
    answers = engine.next_best_action_many(requests)
    assert all(isinstance(a, api.NextBestActionResponse) for a in answers)
    return answers  # type: ignore[return-value]


def test_epsilon_zero_logs_probability_one_and_decides_as_without_exploration(loaded, tmp_path):
    plain = _engine(loaded, tmp_path / "plain")
    zero = _engine(loaded, tmp_path / "zero", 'method = "epsilon_greedy"\nepsilon = 0.0')
    try:
        customers = _customers(plain, 60)
        before = _decide_all(plain, customers)
        after = _decide_all(zero, customers)
        assert [[a.action_id for a in d.actions] for d in after] == [
            [a.action_id for a in d.actions] for d in before
        ]
        assert all(d.probability == 1.0 and not d.explored for d in after)
        records = zero.decision_log.records()
        assert len(records) == 60 and all(r.probability == 1.0 and not r.explored for r in records)
    finally:
        plain.close()
        zero.close()


def test_epsilon_greedy_in_the_engine_logs_the_formula_and_never_explores_rules_away(
    loaded, tmp_path, monkeypatch
):
    eps = 0.3
    ids = iter(f"explore-{k}" for k in range(100_000))
    monkeypatch.setattr("nextbest.serving.engine.new_decision_id", lambda: next(ids))
    engine = _engine(loaded, tmp_path, f'method = "epsilon_greedy"\nepsilon = {eps}')
    try:
        answers = _decide_all(engine, _customers(engine, 300))
        records = {r.decision_id: r for r in engine.decision_log.records()}
        assert len(records) == 300
        multi = 0
        for answer in answers:
            r = records[answer.decision_id]
            arms = [c for c in r.candidates if c.eligible]
            k = len(arms)
            chosen = next(c for c in r.candidates if c.action_id == r.chosen)
            # Never an action that a rule, consent or the contact policy filtered.
            assert chosen.eligible and chosen.reason is None
            assert (answer.probability, answer.explored) == (r.probability, r.explored)
            assert r.probability == pytest.approx(chosen.probability)
            if k > 1:
                multi += 1
                (greedy,) = [c for c in arms if c.probability == pytest.approx(1 - eps + eps / k)]
                assert greedy.score == max(c.score for c in arms)
                assert all(c.probability == pytest.approx(eps / k) for c in arms if c is not greedy)
                assert r.explored or r.chosen == greedy.action_id
                # Reproducible: the decision's id alone says whether it explored.
                assert r.explored == (decision_rng(r.decision_id).random() < eps)
            else:
                assert r.probability == 1.0 and not r.explored
            assert all(c.probability == 0.0 for c in r.candidates if not c.eligible)
        explored = sum(r.explored for r in records.values())
        assert multi > 150
        assert abs(explored - eps * multi) <= 4 * math.sqrt(multi * eps * (1 - eps))
    finally:
        engine.close()


def test_exploration_never_chooses_what_consent_or_rules_filter(loaded, tmp_path, monkeypatch):
    ids = iter(f"planted-{k}" for k in range(100_000))
    monkeypatch.setattr("nextbest.serving.engine.new_decision_id", lambda: next(ids))
    engine = _engine(loaded, tmp_path, 'method = "epsilon_greedy"\nepsilon = 1.0')
    try:
        customers = _customers(engine, 400)
        preview = {
            c: engine.next_best_action(
                api.NextBestActionRequest(
                    customer_id=c, channel="web", n=20, context=NOW, explain=True, record_contact=False
                )
            )
            for c in customers[:120]
        }
        # Planted: a customer without marketing consent (every marketing offer is filtered) …
        unconsented = next(
            c for c, d in preview.items() if any(a.reason == "no marketing consent" for a in d.filtered)
        )
        # … and one with consent for whom some action fails a rule.
        consented = next(
            c
            for c, d in preview.items()
            if not any(a.reason == "no marketing consent" for a in d.filtered)
            and any(a.reason and " rule " in a.reason for a in d.filtered)
            and len(d.actions) > 1
        )
        blocked = {a.action_id for a in preview[consented].filtered if a.reason and " rule " in a.reason}
        chosen: dict[str, set[str]] = {unconsented: set(), consented: set()}
        for _ in range(40):
            for c in chosen:
                d = _decide(engine, c)
                chosen[c].add(d.actions[0].action_id)
        marketing = {
            a for a, rule in engine.policy.actions.items() if rule.marketing and not rule.is_no_action
        }
        assert not chosen[unconsented] & marketing
        assert not chosen[consented] & blocked
        assert len(chosen[consented]) > 1  # it did explore
        for r in engine.decision_log.records():
            c = next(x for x in r.candidates if x.action_id == r.chosen)
            assert c.eligible and c.reason is None
    finally:
        engine.close()


def test_the_budget_per_day_caps_exploring_decisions(loaded, tmp_path, monkeypatch):
    ids = iter(f"budget-{k}" for k in range(100_000))
    monkeypatch.setattr("nextbest.serving.engine.new_decision_id", lambda: next(ids))
    engine = _engine(loaded, tmp_path, 'method = "epsilon_greedy"\nepsilon = 1.0\nbudget_per_day = 5')
    try:
        answers = _decide_all(engine, _customers(engine, 40))
        assert sum(a.explored for a in answers) == 5
        first_five = [a for a in answers if a.explored]
        later = answers[answers.index(first_five[-1]) + 1 :]
        assert later and all(a.probability == 1.0 and not a.explored for a in later)
        assert engine.store.exploration_counts(
            T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=1)
        ) == (40, 5)
    finally:
        engine.close()
