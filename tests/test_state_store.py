"""The SQL state store, the same tests on both of its URLs: an embedded SQLite file and a real PostgreSQL.

Concurrency and durability are shown with real processes: two deciders on one customer at once never exceed the
contact limit, and a writer killed with SIGKILL loses no acknowledged event.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from nextbest.serving.state_store import (
    SCHEMA_VERSION,
    StateStore,
    StateStoreError,
    contacts,
    default_state_url,
    import_state_dir,
)

T0 = datetime(2026, 3, 1, 9, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        (tmp_path / "state").mkdir()
        return default_state_url(tmp_path / "state")
    postgres = request.getfixturevalue("postgres")
    return postgres.database(f"state_{uuid.uuid4().hex[:12]}")


def event(customer: str, item: str = "I1", hours: float = 0, event_type: str = "view") -> dict:
    return {
        "customer_id": customer,
        "item_id": item,
        "event_type": event_type,
        "timestamp": T0 + timedelta(hours=hours),
    }


def contact(customer: str, action: str = "offer", hours: float = 0, **kw) -> dict:
    return {
        "type": "contact",
        "customer_id": customer,
        "action_id": action,
        "channel": "web",
        "at": T0 + timedelta(hours=hours),
        **kw,
    }


def decision(customer: str, n: int, hours: float = 0) -> dict:
    return {
        "decision_id": f"{customer}-{n}",
        "customer_id": customer,
        "timestamp": (T0 + timedelta(hours=hours)).isoformat(),
        "chosen": "offer",
    }


# --- schema ------------------------------------------------------------------------------------------------------


def test_the_schema_is_created_on_first_use_and_versioned(url):
    store = StateStore(url)
    assert store.schema_version == SCHEMA_VERSION
    store.append_events([event("C1")], [None])
    store.close()
    again = StateStore(url, create=False)
    assert len(again.events_after()) == 1
    with again.engine.begin() as c:
        c.execute(sa.text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    again.close()
    with pytest.raises(StateStoreError, match="schema version 99, written by a newer nextbest"):
        StateStore(url)


def test_tables_without_a_schema_version_are_refused(url):
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE events (x INTEGER)"))
    engine.dispose()
    with pytest.raises(StateStoreError, match="not written by nextbest"):
        StateStore(url)


def test_a_url_that_is_not_a_database_is_refused_with_a_message():
    with pytest.raises(StateStoreError, match="not a database URL"):
        StateStore("state.db")
    with pytest.raises(StateStoreError, match="only sqlite and postgresql"):
        StateStore("mysql://u:secret@host/db")


# --- events, contacts, decisions ------------------------------------------------------------------------------


def test_events_are_idempotent_by_event_id(url):
    store = StateStore(url)
    stored, duplicates = store.append_events(
        [event("C1", "I1"), event("C1", "I2"), event("C2")], ["e1", "e2", None]
    )
    assert stored == [0, 1, 2] and duplicates == 0
    stored, duplicates = store.append_events(
        [event("C1", "I2"), event("C3"), event("C3"), event("C4")], ["e2", "e3", "e3", None]
    )
    assert stored == [1, 3] and duplicates == 2
    rows = StateStore(url).events_after()
    assert [(r["customer_id"], r["item_id"], r["event_id"]) for r in rows] == [
        ("C1", "I1", "e1"),
        ("C1", "I2", "e2"),
        ("C2", "I1", None),
        ("C3", "I1", "e3"),
        ("C4", "I1", None),
    ]
    assert rows[0]["timestamp"] == T0 and store.has_event("e3") and not store.has_event("e9")
    assert [r["customer_id"] for r in store.events_after(rows[2]["seq"])] == ["C3", "C4"]


def test_contacts_decisions_and_their_retention(url):
    store = StateStore(url)
    assert store.add_contact(contact("C1", hours=0))
    assert store.add_contact(
        {**contact("C1", hours=1), "type": "response", "accepted": False, "event_id": "r1"}
    )
    assert not store.add_contact(
        {**contact("C1", hours=1), "type": "response", "accepted": False, "event_id": "r1"}
    )
    assert store.add_contact(contact("C2", hours=2))
    assert [c["type"] for c in store.contacts_of("C1")] == ["contact", "response"]
    assert store.has_contact_event("r1") and sorted(store.contact_customers()) == ["C1", "C2"]
    for n, (who, hours) in enumerate([("C1", 0), ("C2", 1), ("C1", 500)]):
        store.add_decision(decision(who, n, hours))
    assert [d["decision_id"] for d in store.decisions_of("C1")] == ["C1-0", "C1-2"]
    store.append_events([event("C1", hours=0), event("C1", hours=600)], [None, None])
    removed = store.trim(T0 + timedelta(hours=100))
    assert removed == {"events": 1, "contacts": 3, "decisions": 2, "responses": 0, "erasures": 0}
    assert [d["decision_id"] for d in store.all_decisions()] == ["C1-2"] and store.contacts_of("C1") == []


def test_erasure_removes_every_id_and_is_recorded_by_digest(url):
    store = StateStore(url)
    store.append_events([event("C1"), event("web:W1"), event("C2")], [None, None, None])
    store.add_contact(contact("C1"))
    store.add_decision(decision("W1", 1))
    removed = store.forget(["C1", "W1", "web:W1"], ["d1", "d2", "d3"])
    assert removed == {"events": 2, "contacts": 1, "decisions": 1, "responses": 0}
    assert [r["customer_id"] for r in store.events_after()] == ["C2"]
    assert store.erased_digests() == {"d1", "d2", "d3"}
    with store.engine.connect() as c:
        assert not c.execute(
            sa.text("SELECT count(*) FROM changes WHERE customer_id IN ('C1', 'W1', 'web:W1')")
        ).scalar()
    assert store.forget(["C1"], ["d1"]) == {"events": 0, "contacts": 0, "decisions": 0, "responses": 0}


def test_the_erasure_queue_holds_an_id_only_until_its_erasure_is_done(url):
    store = StateStore(url)
    status = {"erasure_id": "x1", "state": "queued", "requested_at": T0.isoformat()}
    store.queue_erasure("x1", "C1", status)
    store.queue_erasure("x2", "C2", {**status, "erasure_id": "x2"})
    assert store.queued_erasures() == [("x1", "C1"), ("x2", "C2")]
    store.finish_erasures(["x1"], [{**status, "state": "done"}])
    assert store.queued_erasures() == [("x2", "C2")]
    assert store.erasure_status("x1")["state"] == "done" and store.erasure_status("nope") is None


# --- replicas ----------------------------------------------------------------------------------------------------


def test_a_second_replica_learns_every_write_from_the_change_feed(url):
    a, b = StateStore(url), StateStore(url)
    seen = b.last_change()
    a.append_events([event("C1")], ["e1"])
    a.add_contact(contact("C1"))
    a.set_lever("offer", 2.5, {"action_id": "offer", "old": 1.0, "new": 2.5, "actor": "ops"})
    a.forget(["C9"], ["digest-9"])
    feed = b.changes_since(seen)
    assert [c.kind for c in feed] == ["event", "contact", "lever", "erasure"]
    assert feed[0].customer_id == "C1" and b.events_by_seq([feed[0].ref])[0]["event_id"] == "e1"
    assert b.levers() == {"offer": 2.5} and b.lever_history()[0]["actor"] == "ops"
    assert "digest-9" in b.erased_digests()
    assert b.changes_since(feed[-1].seq) == []


def _decide_many(url: str, customer: str, attempts: int, limit: int, out: multiprocessing.Queue) -> None:
    store = StateStore(url)
    made = 0
    for _ in range(attempts):
        with store.deciding(customer) as c:
            n = len(store.contacts_of(customer, connection=c))
            time.sleep(0.005)  # a decision takes a moment: the other process tries meanwhile
            if n < limit:
                store.add_contact(contact(customer, hours=n), connection=c)
                made += 1
    out.put(made)


@pytest.mark.slow  # processes
def test_two_processes_deciding_for_one_customer_never_exceed_the_limit(url):
    StateStore(url).close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_decide_many, args=(url, "C1", 15, 3, out)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    made = [out.get(timeout=10) for _ in workers]
    assert sum(made) == 3
    assert len(StateStore(url).contacts_of("C1")) == 3


# --- durability --------------------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from datetime import datetime
    from nextbest.serving.state_store import StateStore

    store = StateStore(sys.argv[1])
    for k in range(100_000):
        row = {"customer_id": f"C{k % 7}", "item_id": "I1", "event_type": "view", "timestamp": datetime(2026, 3, 1)}
        store.append_events([row], [f"w-{k}"])
        print(f"w-{k}", flush=True)
    """
)


@pytest.mark.slow  # a writer process killed
def test_an_acknowledged_event_survives_kill_9_and_nothing_half_written_is_read_back(url, tmp_path):
    StateStore(url).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen(
        [sys.executable, str(script), url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    acknowledged = []
    assert writer.stdout is not None
    deadline = time.monotonic() + 60
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        line = writer.stdout.readline().strip()
        if line:
            acknowledged.append(line)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert len(acknowledged) == 150
    rows = StateStore(url).events_after()
    ids = [r["event_id"] for r in rows]
    assert set(acknowledged) <= set(ids)
    assert len(ids) == len(set(ids)) and len(ids) <= len(acknowledged) + 1
    assert all(r["customer_id"] and r["timestamp"] == datetime(2026, 3, 1) for r in rows)


# --- the state directories of earlier versions -----------------------------------------------------------------


def test_a_state_directory_of_the_old_format_is_imported_once(url, tmp_path):
    old = tmp_path / "old-state"
    old.mkdir()

    def lines(name: str, rows: list[dict]) -> None:
        (old / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # What versions before the store wrote (the torn last line of a crash included: never acknowledged).
    lines(
        "events.jsonl",
        [
            {**event("C1"), "timestamp": T0.isoformat(), "event_id": "e1"},
            {**event("C2"), "timestamp": T0.isoformat()},
        ],
    )
    (old / "events.jsonl").write_text((old / "events.jsonl").read_text() + '{"customer_id": "C3", "item')
    lines(
        "contacts.jsonl",
        [
            {
                "type": "contact",
                "customer_id": "C1",
                "action_id": "offer",
                "channel": "web",
                "at": T0.isoformat(),
            },
            {
                "type": "response",
                "customer_id": "C1",
                "action_id": "offer",
                "at": (T0 + timedelta(hours=1)).isoformat() + "Z",
                "accepted": False,
                "event_id": "r1",
            },
        ],
    )
    lines("decisions.jsonl", [{**decision("C1", 1), "arm": "champion"}])
    (old / "levers.json").write_text(
        json.dumps(
            {
                "levers": {"offer": 3.0},
                "history": [
                    {
                        "action_id": "offer",
                        "old": 1.0,
                        "new": 3.0,
                        "actor": "ops",
                        "at": T0.isoformat(),
                        "policy_version": "p1",
                    }
                ],
            }
        )
    )
    kept = (old / "events.jsonl").read_bytes()

    store = StateStore(url)
    counts = import_state_dir(store, old)
    assert counts == {"events.jsonl": 2, "contacts.jsonl": 2, "decisions.jsonl": 1, "levers.json": 1}
    assert [r["event_id"] for r in store.events_after()] == ["e1", None]
    assert [c["type"] for c in store.contacts_of("C1")] == [
        "contact",
        "response",
    ] and store.has_contact_event("r1")
    assert store.decisions_of("C1")[0]["arm"] == "champion"
    assert store.levers() == {"offer": 3.0} and store.lever_history()[0]["actor"] == "ops"
    assert not any(old.glob("*.json*")), "the imported files hold personal data: they go"
    assert import_state_dir(store, old) == {}
    # The same files again (a backup put back): refused, not imported twice, not ignored.
    (old / "events.jsonl").write_bytes(kept)
    assert len(store.events_after()) == 2
    with pytest.raises(StateStoreError):
        import_state_dir(store, old)
    with store.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(contacts)).scalar() == 2
    assert json.loads(json.dumps(store.erasure_status("none"))) is None
