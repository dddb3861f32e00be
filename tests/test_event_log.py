"""The service's event log: all-or-nothing validation, durable appends, replay and erasure."""

from __future__ import annotations

from datetime import datetime

import pytest

from serving.event_log import EventLog, EventRejected


def _ev(cid="C1", item="I1", etype="view", ts="2026-03-01T10:00:00"):
    return {"customer_id": cid, "item_id": item, "event_type": etype, "timestamp": ts}


def test_append_and_replay(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    assert log.append([_ev(), _ev(etype="purchase")])[0].height == 2
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
    assert log.append([ev])[0]["timestamp"][0] is not None


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


def test_events_with_a_stored_event_id_are_not_stored_again_even_after_a_restart(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    accepted, duplicates = log.append(
        [{**_ev(item="I1"), "event_id": "e1"}, {**_ev(item="I2"), "event_id": "e2"}]
    )
    assert accepted.height == 2 and duplicates == 0
    # A retry of e2 with a new e3, and e3 twice in the same batch; an event without an id is always new.
    accepted, duplicates = log.append(
        [
            {**_ev(item="I2"), "event_id": "e2"},
            {**_ev(item="I3"), "event_id": "e3"},
            {**_ev(item="I3"), "event_id": "e3"},
            _ev(),
        ]
    )
    assert accepted["item_id"].to_list() == ["I3", "I1"] and duplicates == 2
    restarted = EventLog(path)
    assert restarted.replay()["item_id"].to_list() == ["I1", "I2", "I3", "I1"]
    assert restarted.append([{**_ev(), "event_id": "e1"}])[1] == 1
    assert path.read_text().count('"e1"') == 1
    # Nothing of a batch with an invalid new event is stored, its ids included.
    with pytest.raises(EventRejected):
        restarted.append([{**_ev(item="I9"), "event_id": "e9"}, {**_ev(etype="stare"), "event_id": "e10"}])
    assert restarted.append([{**_ev(item="I9"), "event_id": "e9"}])[0].height == 1


def test_retention_drops_old_events_from_the_log(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log.append([_ev(ts="2025-01-01T00:00:00"), _ev(ts="2026-03-01T00:00:00"), _ev(ts="2024-06-01T00:00:00")])
    assert log.trim(datetime(2025, 6, 1)) == 2
    assert log.replay()["timestamp"].dt.year().to_list() == [2026]
