"""The service's queue of dataset erasures: durable, worked in batches, taken up again after a restart or a
failure, and holding a customer's id only until their erasure is done."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import nextbest.serving.erasure_queue as erasure_queue
from nextbest.features.dataset import Dataset
from nextbest.features.dataset_lock import write_lock
from nextbest.serving.erasure_queue import ErasureQueue
from nextbest.serving.state_store import StateStore, default_state_url, erasures


def store(tmp_path) -> StateStore:
    """The embedded store in tmp_path (a new StateStore each call, as after a restart)."""
    return StateStore(default_state_url(tmp_path / "state"))


def stored_states(s: StateStore) -> str:
    """Every row of the erasure states, as text."""
    with s.engine.connect() as c:
        return "\n".join(str(tuple(r)) for r in c.execute(sa.select(erasures)))


class Eraser:
    """Stands in for the dataset erasure: records the batches it is given; can fail or hold."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, ids: list[str]) -> dict[str, Any]:
        self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise OSError("disk full")
        self.batches.append(list(ids))
        return {"total_rows_removed": 7 * len(ids)}


def wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_queued_erasures_are_done_and_the_ids_leave_the_queue(tmp_path):
    eraser = Eraser()
    queue = ErasureQueue(store(tmp_path), eraser)
    eraser.gate.clear()  # hold the worker: the next two requests arrive while the first runs
    queue.start()
    first = queue.submit("C1")
    wait(lambda: queue.status(first.erasure_id).state == "running")
    second, third = queue.submit("C2"), queue.submit("C3")
    assert queue.status(second.erasure_id).state == "queued"
    eraser.gate.set()
    assert queue.wait_idle(10)
    wait(lambda: queue.status(third.erasure_id).state == "done")
    # The first alone, then the two that waited together: one dataset rebuild for both.
    assert eraser.batches == [["C1"], ["C2", "C3"]]
    assert queue.status(first.erasure_id).rows_removed == 7
    assert queue.status(second.erasure_id).rows_removed is None
    assert store(tmp_path).queued_erasures() == [] and queue.pending() == 0
    states = stored_states(store(tmp_path))
    assert states.count('"state": "done"') == 3
    assert all(c not in states for c in ("C1", "C2", "C3"))
    # Nor is any id left in the database's files (deleted rows are overwritten, the WAL checkpointed).
    for f in (tmp_path / "state").iterdir():
        assert all(c.encode() not in f.read_bytes() for c in ("C1", "C2", "C3")), f
    queue.stop()
    # The states outlive a restart.
    assert ErasureQueue(store(tmp_path), eraser).status(first.erasure_id).state == "done"


def test_an_erasure_left_by_a_crash_is_done_at_the_next_start(tmp_path):
    crashed = ErasureQueue(store(tmp_path), Eraser())
    pending = crashed.submit("C9")  # never started: the process died
    eraser = Eraser()
    restarted = ErasureQueue(store(tmp_path), eraser)
    assert restarted.pending() == 1
    restarted.start()
    assert restarted.wait_idle(10)
    assert eraser.batches == [["C9"]] and restarted.status(pending.erasure_id).state == "done"
    restarted.stop()


def test_a_failed_erasure_stays_queued_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(erasure_queue, "RETRY_SECONDS", 0.2)
    eraser = Eraser(fail=1)
    queue = ErasureQueue(store(tmp_path), eraser)
    queue.start()
    status = queue.submit("C4")
    wait(lambda: queue.status(status.erasure_id).state == "failed")
    assert "disk full" in queue.status(status.erasure_id).error
    assert store(tmp_path).queued_erasures() == [(status.erasure_id, "C4")]
    assert queue.wait_idle(10)
    assert queue.status(status.erasure_id).state == "done" and eraser.batches == [["C4"]]
    queue.stop()


def test_queues_sharing_a_store_and_a_dataset_do_each_erasure_once_one_at_a_time(tmp_path):
    """Two workers (or replicas) run a queue each on one state store and one dataset: every erasure is done
    once, by one of them, and never two at the same moment (the dataset's write lock, a real ``flock``)."""
    ds = Dataset.at(tmp_path / "data")
    active, most, lock = [0], [0], threading.Lock()

    class Counting(Eraser):
        def __call__(self, ids: list[str]) -> dict[str, Any]:
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.2)  # a feature rebuild's worth of overlap, if the lock let them overlap
            try:
                return super().__call__(ids)
            finally:
                with lock:
                    active[0] -= 1

    erasers = [Counting(), Counting()]
    queues = [ErasureQueue(store(tmp_path), e, exclusive=lambda: write_lock(ds, "erasure")) for e in erasers]
    for q in queues:
        q.start()
    submitted = [queues[i % 2].submit(f"C{i}") for i in range(6)]
    assert queues[0].wait_idle(20) and queues[1].wait_idle(20)
    for q in queues:
        q.stop()
    done = sorted(c for e in erasers for batch in e.batches for c in batch)
    assert done == [f"C{i}" for i in range(6)]  # each once
    assert most[0] == 1
    assert all(queues[0].status(s.erasure_id).state == "done" for s in submitted)


@pytest.mark.parametrize("days", [0, 1])
def test_erasure_states_follow_retention(tmp_path, days):
    queue = ErasureQueue(store(tmp_path), Eraser())
    status = queue.submit("C5")
    # Requested at the cut-off: kept; a day before it: dropped (its one state).
    assert queue.store.trim(status.requested_at + timedelta(days=days))["erasures"] == days
    assert (queue.status(status.erasure_id) is None) == bool(days)
