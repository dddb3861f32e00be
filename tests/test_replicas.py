"""Several processes, one customer base: replicas of the service on one PostgreSQL, and workers on one machine.

Real ``bentoml serve`` processes: two replicas (each its own port and state folder) on one real PostgreSQL, and
one service with two BentoML workers on the embedded SQLite store. What one of them is told, the other answers
with: an event, a lever change, an erasure; and two replicas deciding for one customer at the same moment never
exceed the policy's contact limits.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import polars as pl
import psutil
import pytest

from nextbest.serving.state_store import StateStore
from tests.conftest import RunningService

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

ADMIN_KEY = "replica-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NOW = {"now": "2026-04-30T12:00:00"}


def eventually(check, timeout: float = 60.0) -> Any:
    """Poll ``check`` until it returns something truthy (bounded: correctness, not speed, is tested here — the
    delay is measured by ``benchmarks/serving.py --replica-delay``); return it."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def marketable(s: RunningService, k: int) -> list[str]:
    consent = pl.read_parquet(s.ds.features_dir / "consent_state.parquet")
    ok = consent.filter(pl.col("personalisation") & pl.col("profiling") & pl.col("marketing"))
    profiled = set(pl.read_parquet(s.ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    return [c for c in sorted(ok["customer_id"].to_list()) if c in profiled][:k]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, trained_world, postgres) -> tuple[RunningService, RunningService, str]:
    url = postgres.database("replicas")
    root = tmp_path_factory.mktemp("replicas")
    a = RunningService.on_copy(trained_world, root, admin_token=ADMIN_KEY, headers=ADMIN, state_url=url)
    b = RunningService(
        a.ds,
        a.tracking_uri,
        root / "state-b",
        root / "server-b.log",
        admin_token=ADMIN_KEY,
        headers=ADMIN,
        state_url=url,
    )
    a.start()
    b.start()
    yield a, b, url
    a.stop()
    b.stop()


def test_an_event_told_to_one_replica_is_in_the_others_next_answers(replicas):
    a, b, _ = replicas
    c = marketable(a, 3)[2]
    item = a.ds.read("items")["item_id"][11]
    r = a.post(
        "/events",
        {"events": [{"customer_id": c, "item_id": item, "event_type": "purchase", "event_id": "rep-1"}]},
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    seen = eventually(lambda: b.post("/profile", {"customer_id": c}).json()["live_events"])
    assert [e["item_id"] for e in seen] == [item]
    assert item in b.post("/profile", {"customer_id": c}).json()["purchases"]
    # A retry through the other replica is recognised as the same event.
    again = b.post(
        "/events",
        {"events": [{"customer_id": c, "item_id": item, "event_type": "purchase", "event_id": "rep-1"}]},
    )
    assert again.json() == {"accepted": 0, "responses": 0, "duplicates": 1, "customers": []}


def test_a_lever_changed_on_one_replica_applies_on_the_other(replicas):
    a, b, _ = replicas
    assert a.post("/levers", {"action_id": "newsletter", "lever": 7.0, "actor": "ops"}).status_code == 200
    c = marketable(a, 5)[4]

    def lever_on_b() -> bool:
        d = b.post(
            "/next_best_action",
            {
                "customer_id": c,
                "channel": "web",
                "n": 20,
                "context": NOW,
                "explain": True,
                "record_contact": False,
            },
        ).json()
        return next(x for x in d["actions"] + d["filtered"] if x["action_id"] == "newsletter")["lever"] == 7.0

    assert eventually(lever_on_b)
    assert b.post("/levers", {}).json()["levers"]["newsletter"] == 7.0
    a.post("/levers", {"action_id": "newsletter", "lever": 1.0, "actor": "ops"})


def test_an_erasure_through_one_replica_reaches_the_other(replicas):
    a, b, url = replicas
    c = marketable(a, 8)[7]
    item = a.ds.read("items")["item_id"][3]
    b.post("/events", {"events": [{"customer_id": c, "item_id": item, "event_type": "view"}]})
    assert eventually(lambda: a.post("/profile", {"customer_id": c}).json()["live_events"])
    forgot = a.post("/forget", {"customer_id": c})
    assert forgot.status_code == 200
    assert eventually(lambda: not b.post("/profile", {"customer_id": c}).json()["live_events"])
    # The dataset's erasure is done once, by one of the replicas (they share the dataset and take turns on its
    # write lock), and either reports it.
    erasure = {"erasure_id": forgot.json()["erasure_id"]}
    assert eventually(lambda: b.post("/erasure", erasure).json()["state"] == "done", timeout=180)
    assert c not in pl.read_parquet(a.ds.features_dir / "profiles.parquet")["customer_id"].to_list()
    assert a.ds.read("events").filter(pl.col("customer_id") == c).height == 0
    assert not b.post("/profile", {"customer_id": c}).json()["known"]
    r = b.post("/events", {"events": [{"customer_id": c, "item_id": item, "event_type": "view"}]})
    assert r.status_code == 410
    store = StateStore(url, create=False)
    assert not [e for e in store.events_after() if e["customer_id"] == c]
    store.close()


def test_two_replicas_deciding_at_once_never_exceed_the_contact_limits(replicas):
    a, b, url = replicas
    c = marketable(a, 12)[11]
    a.post("/levers", {"action_id": "newsletter", "lever": 1000.0, "actor": "ops"})  # always the best offer
    answers: list[int] = []

    def decide(s: RunningService) -> None:
        for _ in range(6):
            r = s.post("/next_best_action", {"customer_id": c, "channel": "web", "n": 1, "context": NOW})
            answers.append(r.status_code)

    threads = [threading.Thread(target=decide, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    a.post("/levers", {"action_id": "newsletter", "lever": 1.0, "actor": "ops"})
    assert answers == [200] * 24
    store = StateStore(url, create=False)
    made = [e for e in store.contacts_of(c) if e["type"] == "contact"]
    store.close()
    per_action = Counter((e["action_id"], e["channel"]) for e in made)
    per_channel = Counter(e["channel"] for e in made)
    # The shipped policy: at most 2 contacts per action per channel in 7 days, 3 e-mails a week, 1 call a month.
    assert made and max(per_action.values()) <= 2, per_action
    assert per_channel.get("email", 0) <= 3 and per_channel.get("call", 0) <= 1, per_channel
    # Every decision is logged once, whichever replica made it.
    store = StateStore(url, create=False)
    assert len(store.decisions_of(c)) == 24
    store.close()


def test_two_workers_on_one_machine_share_the_embedded_store(tmp_path_factory, trained_world):
    s = RunningService.on_copy(
        trained_world, tmp_path_factory.mktemp("workers"), admin_token=ADMIN_KEY, headers=ADMIN
    )
    s.workers = 2
    s.start()
    try:
        customers = marketable(s, 20)[12:16]
        items = s.ds.read("items")["item_id"].to_list()
        sent: dict[str, list[str]] = {c: [] for c in customers}
        for k in range(24):  # spread over both workers by the server
            c = customers[k % 4]
            r = s.post(
                "/events",
                {
                    "events": [
                        {"customer_id": c, "item_id": items[k], "event_type": "view", "event_id": f"w-{k}"}
                    ]
                },
            )
            assert r.status_code == 200 and r.json()["accepted"] == 1
            sent[c].append(items[k])
        for c in customers:
            # Whichever worker answers has every event, in order.
            for _ in range(4):
                live = eventually(
                    lambda c=c: (
                        [e["item_id"] for e in s.post("/profile", {"customer_id": c}).json()["live_events"]]
                        == sent[c]
                    )
                )
                assert live, c
        pids = {p.pid for p in psutil.Process(s.server.process.pid).children(recursive=True)}
        assert len(pids) >= 2
    finally:
        s.stop()
