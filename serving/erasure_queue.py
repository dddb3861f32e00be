"""The service's durable queue of dataset erasures.

``POST /forget`` erases a customer from the service's live state and logs at once, and queues the erasure of
the dataset (raw tables, quarantine, truth, features rebuilt: :func:`features.pipeline.erase_customer`, what
``nextbest forget`` runs). One background thread works the queue in order, starting each erasure within a second
of its request and taking about one feature build; an erasure left unfinished by a crash or a restart is taken
up again when the service starts, and one that fails is tried again every minute. ``POST /erasure`` reports
its state.

Two files in the state directory:

* ``erasure_queue.jsonl`` — the erasures still to do. It holds the customer's id (the dataset cannot be searched
  without it) only until that erasure is done, when the line is removed (the file rewritten atomically);
* ``erasures.jsonl`` — the state of every erasure (queued, running, done, failed, with times and rows removed),
  by erasure id only: never a customer id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.api import ErasureState, ErasureStatus
from serving.jsonl import JsonLinesFile
from serving.times import older_than

logger = logging.getLogger("nextbest.erasure")

RETRY_SECONDS = 60.0
"""A failed erasure stays first in the queue and is tried again after this pause."""
QUEUE_FILE = "erasure_queue.jsonl"
STATUS_FILE = "erasures.jsonl"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ErasureQueue:
    """Dataset erasures, queued durably and worked by one background thread.

    Args:
        state_dir: where the queue and the status files live.
        erase: erases customers from the dataset (one feature rebuild for all of them) and returns a report
            with ``total_rows_removed``.
    """

    def __init__(self, state_dir: Path, erase: Callable[[list[str]], dict[str, Any]]) -> None:
        self._erase = erase
        self._queue = JsonLinesFile(state_dir / QUEUE_FILE)
        self._log = JsonLinesFile(state_dir / STATUS_FILE)
        self._status: dict[str, ErasureStatus] = {}
        for record in self._log.read():
            status = ErasureStatus.model_validate(record)
            self._status[status.erasure_id] = status
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker (it first takes up what an earlier run left in the queue)."""
        self._thread = threading.Thread(target=self._run, name="nextbest-erasure", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, customer_id: str) -> ErasureStatus:
        """Queue the dataset erasure of ``customer_id`` (durable when this returns)."""
        status = ErasureStatus(erasure_id=uuid.uuid4().hex, state="queued", requested_at=_now())
        with self._wake:
            self._queue.append({"erasure_id": status.erasure_id, "customer_id": customer_id})
            self._record(status)
            self._wake.notify_all()
        return status

    def status(self, erasure_id: str) -> ErasureStatus | None:
        with self._wake:
            return self._status.get(erasure_id)

    def pending(self) -> int:
        """Erasures queued or running."""
        with self._wake:
            return len(self._queue.read())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty; True if it is."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._queue.read():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.1))
        return True

    def trim(self, before: datetime) -> int:
        """Forget the states of erasures requested before ``before`` (retention)."""
        with self._wake:
            removed = self._log.rewrite(older_than("requested_at", before))
            self._status = {k: v for k, v in self._status.items() if v.requested_at >= before}
            return removed

    def _record(self, status: ErasureStatus) -> None:
        self._log.append(status.model_dump(mode="json"))
        self._status[status.erasure_id] = status

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._queue.read():
                    self._wake.wait(1.0)
                if self._stopped:
                    return
                # Everything queued so far goes in one batch: one feature rebuild for all of it.
                batch = self._queue.read()
            self._work(batch)

    def _work(self, batch: list[dict[str, Any]]) -> None:
        ids = [entry["erasure_id"] for entry in batch]
        with self._wake:
            requested = {i: (s.requested_at if (s := self._status.get(i)) else _now()) for i in ids}
            self._mark(requested, "running")
        try:
            report = self._erase([entry["customer_id"] for entry in batch])
        except Exception as e:  # the batch stays in the queue: retried after a pause, and at the next start
            logger.exception("the dataset erasure of %d customer(s) failed", len(batch))
            with self._wake:
                self._mark(requested, "failed", error=" ".join(str(e).split())[:500] or type(e).__name__)
                self._wake.wait(RETRY_SECONDS)
            return
        done = set(ids)
        with self._wake:
            self._queue.rewrite(lambda r: r.get("erasure_id") not in done)
            rows = int(report.get("total_rows_removed", 0)) if len(ids) == 1 else None
            self._mark(requested, "done", rows_removed=rows)
            self._wake.notify_all()
        logger.info("dataset erasure of %d customer(s) done", len(ids))

    def _mark(self, requested: dict[str, datetime], state: ErasureState, **fields: Any) -> None:
        """Record the new state of each erasure of ``requested`` (erasure id → when it was requested)."""
        finished = _now() if state in ("done", "failed") else None
        for erasure_id, at in requested.items():
            self._record(
                ErasureStatus(
                    erasure_id=erasure_id, state=state, requested_at=at, finished_at=finished, **fields
                )
            )
