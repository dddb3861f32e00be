"""The contact ledger: caps per channel and period, suppression after rejections, durability and erasure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from nextbest.serving.contact import ContactLedger, ledger_beside, offer_responses
from nextbest.serving.policy import PolicyError, policy_from_dict
from nextbest.serving.state_store import StateStore, default_state_url

T0 = datetime(2026, 1, 1)


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


POLICY = policy_from_dict(
    {
        "version": "c1",
        "defaults": {"contact": {"max_contacts": 2, "period_days": 7}},
        "channel_caps": {"email": {"max_contacts": 3, "period_days": 7}},
        "actions": {
            "offer": {"value": 1, "contact": {"max_rejections": 2, "suppress_days": 30}},
            "other": {"value": 1},
            "third": {"value": 1},
            "no_action": {"kind": "none", "value": 1},
        },
    }
)


def store(tmp_path) -> StateStore:
    """The embedded store in tmp_path (a new StateStore each call, as after a restart)."""
    return StateStore(default_state_url(tmp_path / "state"))


@pytest.fixture
def ledger(tmp_path) -> ContactLedger:
    return ContactLedger(store(tmp_path), POLICY)


def test_cap_per_action_per_channel_per_period(ledger):
    ledger.record_contact("C1", "offer", "web", day(0))
    ledger.record_contact("C1", "offer", "web", day(1))
    assert ledger.allowed("C1", "offer", "web", day(2)) == (
        False,
        "contact cap: 2 contacts with offer on web in the last 7 days (max 2)",
    )
    # Other channels, other actions and other customers are counted apart.
    assert ledger.allowed("C1", "offer", "app", day(2)) == (True, "within contact limits")
    assert ledger.allowed("C1", "other", "web", day(2))[0]
    assert ledger.allowed("C2", "offer", "web", day(2))[0]
    # The contact of day 0 leaves the window at day 7 exactly (the window is (now − 7 days, now]).
    assert not ledger.allowed("C1", "offer", "web", day(6.99))[0]
    assert ledger.allowed("C1", "offer", "web", day(7))[0]


def test_cap_per_channel_across_actions(ledger):
    ledger.record_contact("C1", "offer", "email", day(0))
    ledger.record_contact("C1", "other", "email", day(1))
    assert ledger.allowed("C1", "third", "email", day(2))[0]
    ledger.record_contact("C1", "third", "email", day(2))
    assert ledger.allowed("C1", "third", "email", day(3)) == (
        False,
        "channel cap: 3 contacts on email in the last 7 days (max 3)",
    )
    assert ledger.allowed("C1", "third", "web", day(3))[0]
    assert ledger.allowed("C1", "third", "email", day(7.5))[0]  # the day-0 contact has expired


def test_suppression_after_r_rejections_and_its_expiry(ledger):
    ledger.record_response("C1", "offer", False, day(1))
    assert ledger.allowed("C1", "offer", "web", day(2))[0]  # one rejection is not enough
    ledger.record_response("C1", "offer", False, day(3))
    assert ledger.allowed("C1", "offer", "web", day(4)) == (
        False,
        "suppressed until 2026-02-03 00:00 after 2 rejections",
    )
    assert ledger.suppressed_until("C1", "offer") == (day(33), 2)
    assert ledger.allowed("C1", "other", "web", day(4))[0]  # suppression is per action
    assert not ledger.allowed("C1", "offer", "web", day(32.9))[0]
    assert ledger.allowed("C1", "offer", "web", day(33))[0]  # D = 30 days after the 2nd rejection
    # After the suppression the count starts again: one new rejection does not suppress, two do.
    ledger.record_response("C1", "offer", False, day(40))
    assert ledger.allowed("C1", "offer", "web", day(41))[0]
    ledger.record_response("C1", "offer", False, day(42))
    assert ledger.suppressed_until("C1", "offer") == (day(72), 2)
    assert not ledger.allowed("C1", "offer", "web", day(43))[0]


def test_an_acceptance_resets_the_rejection_count(ledger):
    ledger.record_response("C1", "offer", False, day(1))
    ledger.record_response("C1", "offer", True, day(2))
    ledger.record_response("C1", "offer", False, day(3))
    assert ledger.allowed("C1", "offer", "web", day(4))[0]
    assert ledger.suppressed_until("C1", "offer") == (None, 0)
    ledger.record_response("C1", "offer", False, day(3.5))
    assert ledger.suppressed_until("C1", "offer") == (day(33.5), 2)


def test_responses_count_in_time_order_not_in_arrival_order(ledger):
    ledger.record_response("C1", "offer", False, day(1))
    ledger.record_response("C1", "offer", False, day(3))
    assert ledger.suppressed_until("C1", "offer") == (day(33), 2)
    ledger.record_response("C1", "offer", True, day(2))  # arrives late, happened in between
    assert ledger.suppressed_until("C1", "offer") == (None, 0)
    assert [e.at for e in ledger.entries("C1")] == [day(1), day(2), day(3)]


def test_actions_without_suppression_and_no_action(ledger):
    for d in range(5):
        ledger.record_response("C1", "other", False, day(d))
    assert ledger.allowed("C1", "other", "web", day(6))[0]
    assert ledger.suppressed_until("C1", "other") == (None, 0)
    assert ledger.allowed("C1", "no_action", "web", day(6)) == (True, "no contact")
    with pytest.raises(PolicyError, match="unknown action 'ghost'"):
        ledger.allowed("C1", "ghost", "web", day(6))


def test_timezone_aware_times_are_stored_as_naive_utc(ledger):
    plus_two = timezone(timedelta(hours=2))
    entry = ledger.record_contact("C1", "offer", "web", datetime(2026, 1, 1, 12, 0, tzinfo=plus_two))
    assert entry.at == datetime(2026, 1, 1, 10, 0)
    ledger.record_contact("C1", "offer", "web", datetime(2026, 1, 1, 11, 0))
    assert not ledger.allowed("C1", "offer", "web", datetime(2026, 1, 1, 13, 0, tzinfo=UTC))[0]


def test_the_ledger_survives_a_restart(tmp_path):
    first = ContactLedger(store(tmp_path), POLICY)
    first.record_contact("C1", "other", "web", day(0))
    first.record_contact("C1", "other", "web", day(1))
    first.record_response("C1", "offer", False, day(1))
    first.record_response("C1", "offer", False, day(2))
    before = first.entries("C1")
    # No close(): a crashed process never gets to; every append was already committed.
    second = ContactLedger(store(tmp_path), POLICY)
    assert second.entries("C1") == before
    assert second.allowed("C1", "offer", "app", day(3))[1].startswith("suppressed until")
    assert second.allowed("C1", "other", "web", day(3))[1].startswith("contact cap: 2 contacts")
    assert second.allowed("C1", "other", "app", day(3))[0]
    assert len(store(tmp_path).all_contacts()) == 4


def test_an_uncommitted_contact_is_not_seen_on_reload(tmp_path):
    ledger = ContactLedger(store(tmp_path), POLICY)
    ledger.record_contact("C1", "offer", "web", day(0))
    # A crash mid-write: the transaction never commits.
    with pytest.raises(RuntimeError), ledger.store.deciding("C1") as tx:
        ledger.record_contact("C1", "offer", "web", day(0.5), connection=tx)
        raise RuntimeError("crash")
    reloaded = ContactLedger(store(tmp_path), POLICY)
    assert len(reloaded.entries("C1")) == 1
    reloaded.record_contact("C1", "offer", "web", day(1))
    assert [e.at for e in ContactLedger(store(tmp_path), POLICY).entries("C1")] == [day(0), day(1)]


def test_forget_removes_a_customer_from_memory_and_store(tmp_path):
    ledger = ContactLedger(store(tmp_path), POLICY)
    ledger.record_contact("C1", "offer", "web", day(0))
    ledger.record_response("C1", "offer", False, day(1))
    ledger.record_contact("C10", "offer", "web", day(0))
    assert ledger.store.forget(["C1"], ["d" * 64])["contacts"] == 2
    assert ledger.forget("C1") == 2
    assert ledger.entries("C1") == []
    assert "C1" not in {r["customer_id"] for r in store(tmp_path).all_contacts()}
    assert len(ledger.entries("C10")) == 1
    assert ledger.forget("C1") == 0
    # Appends after the erasure are stored, and a reload sees no trace of C1.
    ledger.record_contact("C10", "other", "web", day(2))
    reloaded = ContactLedger(store(tmp_path), POLICY)
    assert reloaded.entries("C1") == [] and reloaded.customers() == ["C10"]
    assert [e.action_id for e in reloaded.entries("C10")] == ["offer", "other"]


def test_an_in_memory_ledger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ledger = ContactLedger(None, POLICY)
    ledger.record_contact("C1", "offer", "web", day(0))
    assert ledger.forget("C1") == 1
    # Retries are recognised in memory too.
    assert ledger.record_response("C1", "offer", True, day(1), event_id="r-1") is not None
    assert ledger.record_response("C1", "offer", True, day(1), event_id="r-1") is None
    assert ledger.has_event("r-1") and len(ledger.entries("C1")) == 1
    assert list(tmp_path.iterdir()) == []


def test_retention_drops_old_entries_from_memory_and_store(tmp_path):
    ledger = ContactLedger(store(tmp_path), POLICY)
    ledger.record_contact("C1", "other", "web", day(0))
    ledger.record_response("C1", "offer", False, day(1))
    ledger.record_contact("C2", "other", "web", day(0))
    ledger.record_contact("C1", "third", "web", day(400))
    assert ledger.store.trim(day(365))["contacts"] == 3
    assert ledger.trim(day(365)) == 3
    assert [e.action_id for e in ledger.entries("C1")] == ["third"] and ledger.entries("C2") == []
    assert ledger.customers() == ["C1"]
    assert [e.action_id for e in ContactLedger(store(tmp_path), POLICY).entries("C1")] == ["third"]


def test_a_response_with_a_known_event_id_is_recognised_after_a_restart(tmp_path):
    ledger = ContactLedger(store(tmp_path), POLICY)
    assert ledger.record_response("C1", "offer", True, day(1), event_id="r-1") is not None
    assert ledger.has_event("r-1") and not ledger.has_event("r-2")
    restarted = ContactLedger(store(tmp_path), POLICY)
    assert restarted.has_event("r-1")
    # A retry with the same event id, even after the restart, is not recorded twice.
    assert restarted.record_response("C1", "offer", True, day(1), event_id="r-1") is None
    assert len(restarted.entries("C1")) == 1
    # Answers carry the zone; the store reads back as naive UTC either way.
    aware = datetime(2026, 1, 2, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    restarted.record_response("C2", "offer", True, aware, event_id="r-2")
    rows = store(tmp_path).all_contacts()
    assert [(r["event_id"], r["at"]) for r in rows] == [("r-1", day(1)), ("r-2", day(1))]
    assert all(r["at"].tzinfo is None for r in rows)
    assert ContactLedger(store(tmp_path), POLICY).entries("C1")[0].at == day(1)
    assert ContactLedger(store(tmp_path), POLICY).entries("C2")[0].at == day(1)


# --- reading the responses back ---------------------------------------------------------------------------------


def test_offer_responses_from_the_store_and_from_an_export_agree(tmp_path):
    ledger = ContactLedger(store(tmp_path), POLICY)
    ledger.record_contact("C1", "offer", "email", day(0))  # a contact is not a response
    ledger.record_response("C1", "offer", True, day(1))
    ledger.record_response("C2", "other", False, day(2) + timedelta(hours=6))
    expected = [("C1", "offer", day(1), True), ("C2", "other", day(2) + timedelta(hours=6), False)]
    from_store = offer_responses(store(tmp_path))
    assert from_store.columns == ["customer_id", "action_id", "timestamp", "responded"]
    assert from_store.rows() == expected
    export = tmp_path / "export" / "decisions.jsonl"
    export.parent.mkdir()
    lines = [
        {
            "type": "contact",
            "customer_id": "C1",
            "action_id": "offer",
            "channel": "email",
            "at": "2026-01-01T00:00:00",
        },
        {
            "type": "response",
            "customer_id": "C1",
            "action_id": "offer",
            "at": "2026-01-02T00:00:00",
            "accepted": True,
        },
        {"type": "response", "customer_id": "C2", "action_id": "other", "at": "2026-01-03T06:00:00"},
    ]
    ledger_beside(export).write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert ledger_beside(export) == tmp_path / "export" / "contacts.jsonl"
    assert offer_responses(ledger_beside(export)).rows() == expected  # no "accepted": not accepted
    # No export: no responses (the same columns).
    missing = offer_responses(tmp_path / "nowhere" / "contacts.jsonl")
    assert missing.is_empty() and missing.schema == from_store.schema
    assert ledger_beside(s := store(tmp_path)) is s
