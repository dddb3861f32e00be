"""The decision log: durable appends, erasure, torn tails, and the acceptance summary by arm and action."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from nextbest.serving.decision_log import (
    ALL_ACTIONS,
    DecisionLog,
    DecisionRecord,
    read_decisions,
    summarise_decisions,
)
from nextbest.serving.decisions import ActionCandidate, arbitrate
from nextbest.serving.jsonl import JsonLinesFile, LogError
from nextbest.serving.policy import policy_from_dict
from nextbest.serving.state_store import StateStore, default_state_url

T0 = datetime(2026, 3, 1, 9, 0)
POLICY = policy_from_dict(
    {
        "version": "p7",
        "actions": {
            "a": {"value": 10},
            "b": {"value": 4, "eligibility": {"adult": "age >= 18"}},
            "no_action": {"kind": "none", "value": 1},
        },
    }
)


def decide(customer: str, pa: float, pb: float, pn: float, age: int = 30):
    return arbitrate(
        [ActionCandidate("a", pa), ActionCandidate("b", pb), ActionCandidate("no_action", pn)],
        POLICY,
        {"customer_id": customer, "age": age},
        {"channel": "web"},
        {"personalisation": True, "marketing": True},
        None,
        2,
    )


def record(customer: str, arm: str, chosen: str, at: datetime, *, decision_id: str | None = None):
    probs = {"a": (0.5, 0.1, 0.01), "b": (0.01, 0.9, 0.01), "no_action": (0.01, 0.01, 0.9)}[chosen]
    d = decide(customer, *probs)
    assert d.chosen.action_id == chosen
    return DecisionRecord.from_decision(
        d,
        arm=arm,
        latency_ms=2.5,
        model_versions={"propensity": "3", "recommender": "7"},
        decision_id=decision_id or f"{customer}-{at:%d%H}",
        timestamp=at,
    )


def store(tmp_path) -> StateStore:
    """The embedded store in tmp_path (a new StateStore each call, as after a restart)."""
    return StateStore(default_state_url(tmp_path / "state"))


def export(records: list[DecisionRecord], path) -> None:
    """A JSON-lines export of a decision log: one record a line."""
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))


def test_a_record_carries_every_candidate_and_the_choice():
    d = decide("C1", 0.5, 0.9, 0.1, age=16)  # a: 5.0, no_action: 0.1, b filtered (a minor)
    r = DecisionRecord.from_decision(d, arm="challenger", latency_ms=3.25, model_versions={"propensity": "3"})
    assert (r.customer_id, r.arm, r.chosen, r.chosen_kind, r.policy_version) == (
        "C1",
        "challenger",
        "a",
        "offer",
        "p7",
    )
    assert r.channel == "web" and r.personalised and r.latency_ms == 3.25
    assert len(r.decision_id) == 32
    assert [(c.action_id, c.propensity, c.value, c.lever, c.score, c.offered) for c in r.candidates] == [
        ("a", 0.5, 10.0, 1.0, 5.0, True),
        ("no_action", 0.1, 1.0, 1.0, pytest.approx(0.1), True),
        ("b", 0.9, 4.0, 1.0, pytest.approx(3.6), False),
    ]
    assert r.candidates[2].reason == "eligibility rule adult (age >= 18) failed: age = 16"


def test_appends_are_durable_and_reload(tmp_path):
    log = DecisionLog(store(tmp_path))
    first = record("C1", "champion", "a", T0)
    second = record("C2", "challenger", "no_action", T0 + timedelta(hours=1))
    log.append(first)
    log.append(second)
    rows = store(tmp_path).all_decisions()
    assert len(rows) == 2 and rows[0]["decision_id"] == first.decision_id
    # A fresh reader (as after a restart) sees both, equal field for field.
    assert DecisionLog(store(tmp_path)).records() == [first, second]


def test_an_uncommitted_decision_is_not_seen(tmp_path):
    log = DecisionLog(store(tmp_path))
    first = record("C1", "champion", "a", T0)
    log.append(first)
    # A crash mid-write: the transaction never commits.
    with pytest.raises(RuntimeError), log.store.deciding("C2") as tx:
        log.append(record("C2", "champion", "a", T0), connection=tx)
        raise RuntimeError("crash")
    assert DecisionLog(store(tmp_path)).records() == [first]


def test_forget_removes_a_customers_decisions(tmp_path):
    log = DecisionLog(store(tmp_path))
    for i, c in enumerate(["C1", "C2", "C1", "C12"]):
        log.append(record(c, "champion", "a", T0 + timedelta(hours=i)))
    assert log.store.forget(["C1"], ["d" * 64])["decisions"] == 2
    assert all(r["customer_id"] != "C1" for r in store(tmp_path).all_decisions())
    assert [r.customer_id for r in log.records()] == ["C2", "C12"]
    log.append(record("C3", "champion", "a", T0))
    assert [r.customer_id for r in DecisionLog(store(tmp_path)).records()] == ["C2", "C12", "C3"]
    assert log.store.forget(["nobody"], ["e" * 64])["decisions"] == 0


def test_json_lines_file_cuts_a_torn_tail_and_rejects_corruption(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3, "trunc')
    f = JsonLinesFile(path)
    assert f.read() == [{"n": 1}, {"n": 2}]
    f.append_many([{"n": 4}, {"n": 5}])
    assert [r["n"] for r in JsonLinesFile(path).read()] == [1, 2, 4, 5]
    # A file that is nothing but a torn line becomes empty.
    only = tmp_path / "only.jsonl"
    only.write_bytes(b'{"n": 1')
    assert JsonLinesFile(only).read() == [] and only.read_bytes() == b""
    # Damage before the last line is not a crash artefact: it is reported, with the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"n": 1}\nnot json\n{"n": 3}\n')
    with pytest.raises(LogError, match=f"{bad} line 2: not valid JSON"):
        JsonLinesFile(bad).read()


def test_summarise_decisions_by_arm_and_action(tmp_path):
    log = DecisionLog(store(tmp_path))
    day = timedelta(days=1)
    log.append(record("C1", "champion", "a", T0))  # accepted on day 2
    log.append(record("C2", "champion", "a", T0))  # response on day 10: outside the 7-day window
    log.append(record("C3", "champion", "b", T0))  # response before the decision: does not count
    log.append(record("C4", "challenger", "b", T0))  # responded = false
    log.append(record("C5", "challenger", "b", T0))  # accepted on day 1, twice: counted once
    log.append(record("C6", "challenger", "no_action", T0))  # no offer
    log.append(record("C7", "challenger", "a", T0))  # responded to b, not to the chosen a
    events = pl.DataFrame(
        {
            "customer_id": ["C1", "C2", "C3", "C4", "C5", "C5", "C7"],
            "action_id": ["a", "a", "b", "b", "b", "b", "b"],
            "timestamp": [T0 + 2 * day, T0 + 10 * day, T0 - day, T0 + day, T0 + day, T0 + 2 * day, T0 + day],
            "responded": [True, True, True, False, True, True, True],
        }
    )
    out = summarise_decisions(log.store, events, window_days=7)
    assert out.columns == ["arm", "action_id", "decisions", "offers", "accepted", "acceptance_rate"]
    assert out.rows() == [
        ("challenger", "a", 1, 1, 0, 0.0),
        ("challenger", "b", 2, 2, 1, 0.5),
        ("challenger", "no_action", 1, 0, 0, None),
        ("challenger", ALL_ACTIONS, 4, 3, 1, pytest.approx(1 / 3)),
        ("champion", "a", 2, 2, 1, 0.5),
        ("champion", "b", 1, 1, 0, 0.0),
        ("champion", ALL_ACTIONS, 3, 3, 1, pytest.approx(1 / 3)),
    ]
    # A decision whose write never committed (a crash mid-write) is left out, not an error.
    with pytest.raises(RuntimeError), log.store.deciding("C8") as tx:
        log.append(record("C8", "champion", "a", T0), connection=tx)
        raise RuntimeError("crash")
    assert summarise_decisions(store(tmp_path), events, window_days=7).equals(out)
    # A JSON-lines export of the log reads the same, and a line being written to it is left out.
    path = tmp_path / "decisions.jsonl"
    export(log.records(), path)
    assert summarise_decisions(path, events, window_days=7).equals(out)
    with open(path, "a") as f:
        f.write('{"decision_id": "half", "timestamp": "2026-03-0')
    assert summarise_decisions(path, events, window_days=7).equals(out)
    # A longer window takes in C2's late response; no responded column means every row is a response.
    for source in (log.store, path):
        wide = summarise_decisions(source, events.drop("responded").lazy(), window_days=30)
        assert wide.filter(pl.col("action_id") == ALL_ACTIONS)["accepted"].to_list() == [2, 2]


def test_a_damaged_export_is_reported_with_its_line(tmp_path):
    path = tmp_path / "decisions.jsonl"
    export([record("C1", "champion", "a", T0)], path)
    with open(path, "a") as f:
        f.write("{oops\n")
        f.write(record("C2", "champion", "a", T0).model_dump_json() + "\n")
    with pytest.raises(LogError, match=f"{path} line 2: not valid JSON"):
        read_decisions(path)


def test_summarise_needs_the_response_columns(tmp_path):
    log = DecisionLog(store(tmp_path))
    log.append(record("C1", "champion", "a", T0))
    with pytest.raises(ValueError, match="events need column\\(s\\) action_id; found customer_id, timestamp"):
        summarise_decisions(log.store, pl.DataFrame({"customer_id": ["C1"], "timestamp": [T0]}))
    responses = pl.DataFrame({"customer_id": ["C1"], "action_id": ["a"], "timestamp": [T0]})
    # No decisions yet: an empty store, or a missing export.
    empty_store = StateStore(default_state_url(tmp_path / "empty"))
    assert summarise_decisions(empty_store, responses).height == 0
    assert summarise_decisions(tmp_path / "none.jsonl", responses).height == 0


def test_a_customers_decisions_are_read_through_the_index(tmp_path):
    log = DecisionLog(store(tmp_path))
    plan = [("c1", "a", 0), ("c2", "b", 1), ("c1", "no_action", 2), ("c3", "a", 3), ("c1", "b", 4)]
    for customer, chosen, hour in plan:
        log.append(record(customer, "champion", chosen, T0 + timedelta(hours=hour)))
    assert [r.chosen for r in log.records_of("c1")] == ["a", "no_action", "b"]
    assert [r.chosen for r in log.records_of("c2")] == ["b"]
    assert log.records_of("nobody") == []
    assert sorted(log.customers()) == ["c1", "c2", "c3"]
    # Erasure deletes the rows; the index follows, and a reopened store reads the same.
    assert log.store.forget(["c2"], ["d" * 64])["decisions"] == 1
    assert [r.chosen for r in log.records_of("c1")] == ["a", "no_action", "b"] and log.records_of("c2") == []
    assert sorted(log.customers()) == ["c1", "c3"]
    log.append(record("c3", "champion", "b", T0 + timedelta(hours=5)))
    reopened = DecisionLog(store(tmp_path))
    assert [r.chosen for r in reopened.records_of("c3")] == ["a", "b"]
    assert [r.decision_id for r in reopened.records_of("c1")] == [
        r.decision_id for r in reopened.records() if r.customer_id == "c1"
    ]


def test_retention_drops_decisions_older_than_the_cutoff(tmp_path):
    log = DecisionLog(store(tmp_path))
    for day in (0, 10, 400, 500):
        log.append(record(f"c{day}", "champion", "a", T0 + timedelta(days=day)))
    assert log.store.trim(T0 + timedelta(days=365))["decisions"] == 2
    assert [r.customer_id for r in log.records()] == ["c400", "c500"]
    assert log.records_of("c0") == [] and len(log.records_of("c400")) == 1
    assert sorted(log.customers()) == ["c400", "c500"]
    assert log.store.trim(T0 + timedelta(days=365))["decisions"] == 0
