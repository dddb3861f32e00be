"""The service's event log: all-or-nothing validation, durable appends, replay and erasure."""

from __future__ import annotations

from datetime import datetime

import pytest

from nextbest.serving.event_log import EventLog, EventRejected
from nextbest.serving.state_store import StateStore, default_state_url, events


def _ev(cid="C1", item="I1", etype="view", ts="2026-03-01T10:00:00"):
    return {"customer_id": cid, "item_id": item, "event_type": etype, "timestamp": ts}


def _url(tmp_path) -> str:
    return default_state_url(tmp_path / "state")


def _log(tmp_path) -> EventLog:
    """An event log on the embedded store in tmp_path (a new StateStore each call, as after a restart)."""
    return EventLog(StateStore(_url(tmp_path)))


def test_append_and_replay(tmp_path):
    log = _log(tmp_path)
    assert log.append([_ev(), _ev(etype="purchase")])[0].height == 2
    again = _log(tmp_path).replay()
    assert again["event_type"].to_list() == ["view", "purchase"]


def test_a_bad_event_rejects_the_batch_and_names_position_field_and_value(tmp_path):
    log = _log(tmp_path)
    with pytest.raises(EventRejected) as err:
        log.append([_ev(), _ev(etype="purchse"), _ev(cid="")])
    assert err.value.reasons == [
        "events[1]: event_type 'purchse' is not one of view, click, add_to_cart, purchase",
        "events[2]: customer_id is missing",
    ]
    assert log.replay().height == 0  # nothing of the batch was stored
    assert log.store.events_after() == []
    with pytest.raises(EventRejected, match="the list is empty"):
        log.append([])


def test_missing_timestamp_is_stamped_on_arrival(tmp_path):
    log = _log(tmp_path)
    ev = _ev()
    del ev["timestamp"]
    assert log.append([ev])[0]["timestamp"][0] is not None


def test_an_uncommitted_write_is_not_seen_and_later_events_survive(tmp_path):
    log = _log(tmp_path)
    log.append([_ev()])
    # A crash mid-write: the transaction never commits, so the write was never acknowledged.
    with pytest.raises(RuntimeError), log.store.engine.begin() as c:
        c.execute(
            events.insert().values(
                customer_id="C1", item_id="I9", event_type="view", timestamp=datetime(2026, 3, 1)
            )
        )
        raise RuntimeError("crash")
    reopened = _log(tmp_path)
    assert reopened.replay()["item_id"].to_list() == ["I1"]
    reopened.append([_ev(item="I2")])
    assert _log(tmp_path).replay()["item_id"].to_list() == ["I1", "I2"]


def test_forget_removes_only_that_customer(tmp_path):
    log = _log(tmp_path)
    log.append([_ev("C1"), _ev("C2"), _ev("C1", "I3")])
    assert log.store.forget(["C1"], ["d" * 64])["events"] == 2
    assert _log(tmp_path).replay()["customer_id"].to_list() == ["C2"]
    assert [r["customer_id"] for r in StateStore(_url(tmp_path)).events_after()] == ["C2"]
    # Nothing of C1 is left in the database's files (deleted rows are overwritten, the WAL checkpointed).
    for f in (tmp_path / "state").iterdir():
        assert b"C1" not in f.read_bytes(), f


def test_events_with_a_stored_event_id_are_not_stored_again_even_after_a_restart(tmp_path):
    log = _log(tmp_path)
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
    restarted = _log(tmp_path)
    assert restarted.replay()["item_id"].to_list() == ["I1", "I2", "I3", "I1"]
    assert restarted.append([{**_ev(), "event_id": "e1"}])[1] == 1
    assert [r["event_id"] for r in restarted.store.events_after()].count("e1") == 1
    # Nothing of a batch with an invalid new event is stored, its ids included.
    with pytest.raises(EventRejected):
        restarted.append([{**_ev(item="I9"), "event_id": "e9"}, {**_ev(etype="stare"), "event_id": "e10"}])
    assert not restarted.store.known_event_ids(["e9", "e10"])
    assert restarted.append([{**_ev(item="I9"), "event_id": "e9"}])[0].height == 1


def test_retention_drops_old_events_from_the_log(tmp_path):
    log = _log(tmp_path)
    log.append([_ev(ts="2025-01-01T00:00:00"), _ev(ts="2026-03-01T00:00:00"), _ev(ts="2024-06-01T00:00:00")])
    assert log.store.trim(datetime(2025, 6, 1))["events"] == 2
    assert log.replay()["timestamp"].dt.year().to_list() == [2026]
    assert _log(tmp_path).replay()["timestamp"].dt.year().to_list() == [2026]
