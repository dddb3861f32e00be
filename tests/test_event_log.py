"""The service's event log: all-or-nothing validation, durable appends, replay and erasure."""

from __future__ import annotations

import pytest

from serving.event_log import EventLog, EventRejected


def _ev(cid="C1", item="I1", etype="view", ts="2026-03-01T10:00:00"):
    return {"customer_id": cid, "item_id": item, "event_type": etype, "timestamp": ts}


def test_append_and_replay(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    assert log.append([_ev(), _ev(etype="purchase")]).height == 2
    again = EventLog(tmp_path / "events.jsonl").replay()
    assert again["event_type"].to_list() == ["view", "purchase"]


def test_a_bad_event_rejects_the_batch_and_names_position_field_and_value(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(EventRejected) as err:
        log.append([_ev(), _ev(etype="purchse"), _ev(cid="")])
    assert err.value.reasons == [
        "events[1]: event_type 'purchse' is not one of view, click, add_to_cart, purchase",
        "events[2]: customer_id is missing",
    ]
    assert log.replay().height == 0  # nothing of the batch was stored
    with pytest.raises(EventRejected, match="the list is empty"):
        log.append([])


def test_missing_timestamp_is_stamped_on_arrival(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    ev = _ev()
    del ev["timestamp"]
    assert log.append([ev])["timestamp"][0] is not None


def test_a_torn_last_line_is_cut_and_later_events_survive(tmp_path):
    path = tmp_path / "events.jsonl"
    EventLog(path).append([_ev()])
    with path.open("a") as fh:
        fh.write('{"customer_id": "C1", "item_')  # a crash mid-write: never acknowledged
    log = EventLog(path)
    log.append([_ev(item="I2")])
    assert EventLog(path).replay()["item_id"].to_list() == ["I1", "I2"]


def test_forget_removes_only_that_customer(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.append([_ev("C1"), _ev("C2"), _ev("C1", "I3")])
    assert log.forget(["C1"]) == 2
    assert EventLog(tmp_path / "events.jsonl").replay()["customer_id"].to_list() == ["C2"]
    assert "C1" not in (tmp_path / "events.jsonl").read_text()
