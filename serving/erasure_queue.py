"""The service's durable queue of dataset erasures.

``POST /forget`` erases a customer from the service's live state and logs at once, and queues the erasure of
the dataset (raw tables, quarantine, truth, features rebuilt: :func:`features.pipeline.erase_customer`, what
``nextbest forget`` runs). One background thread works the queue in order, starting each erasure within a second
of its request and taking about one feature build; an erasure left unfinished by a crash or a restart is taken
up again when the service starts, and one that fails is tried again every minute. ``POST /erasure`` reports
its state.

Every worker and replica of a service runs a queue on the one state store, and they may share one dataset: a
batch is worked under an exclusive lock (:func:`features.dataset_lock.write_lock`, shared with ``nextbest
forget``), and whoever gets the lock takes what is still queued then, so one erasure is done once, by one of
them, and two never rewrite the dataset's files at the same moment.

Two tables of the state store (:mod:`serving.state_store`):

* ``erasure_queue`` — the erasures still to do. It holds the customer's id (the dataset cannot be searched
  without it) only until that erasure is done, when the row is deleted;
* ``erasures`` — the state of every erasure (queued, running, done, failed, with times and rows removed), by
  erasure id only: never a customer id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

from nextbest.serving.api import ErasureState, ErasureStatus
from nextbest.serving.state_store import StateStore

logger = logging.getLogger("nextbest.erasure")

RETRY_SECONDS = 60.0
"""A failed erasure stays first in the queue and is tried again after this pause."""


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ErasureQueue:
    """Dataset erasures, queued durably and worked by one background thread.

    Args:
        store: the state store holding the queue and the states.
        erase: erases customers from the dataset (one feature rebuild for all of them) and returns a report
            with ``total_rows_removed``.
        exclusive: the lock a batch is worked under (entered by the worker thread, which waits for it); none by
            default.
    """

    def __init__(
        self,
        store: StateStore,
        erase: Callable[[list[str]], dict[str, Any]],
        exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self._erase = erase
        self._exclusive = exclusive
        self.store = store
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
            self.store.queue_erasure(status.erasure_id, customer_id, status.model_dump(mode="json"))
            self._wake.notify_all()
        return status

    def status(self, erasure_id: str) -> ErasureStatus | None:
        found = self.store.erasure_status(erasure_id)
        return ErasureStatus.model_validate(found) if found is not None else None

    def pending(self) -> int:
        """Erasures queued or running."""
        return len(self.store.queued_erasures())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty; True if it is."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self.store.queued_erasures():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.1))
        return True

    def _run(self) -> None:
        while True:
            with self._wake:
                # Another replica's requests are in the store only: look again every second.
                while not self._stopped and not self.store.queued_erasures():
                    self._wake.wait(1.0)
                if self._stopped:
                    return
            with self._exclusive():
                # Everything still queued once the lock is ours (another worker may have done part of it
                # meanwhile) goes in one batch: one feature rebuild for all of it.
                batch = self.store.queued_erasures()
                done = self._work(batch) if batch else True
            if not done:  # the batch stays in the queue: retried after a pause (the lock free meanwhile)
                with self._wake:
                    if not self._stopped:
                        self._wake.wait(RETRY_SECONDS)

    def _work(self, batch: list[tuple[str, str]]) -> bool:
        """Erase ``batch`` from the dataset and record the outcome; False when it failed."""
        ids = [erasure_id for erasure_id, _ in batch]
        requested = {i: (s.requested_at if (s := self.status(i)) else _now()) for i in ids}
        with self._wake:
            self._mark(requested, "running")
        try:
            report = self._erase([customer_id for _, customer_id in batch])
        except Exception as e:  # the batch stays in the queue: retried after a pause, and at the next start
            logger.exception("the dataset erasure of %d customer(s) failed", len(batch))
            with self._wake:
                self._mark(requested, "failed", error=" ".join(str(e).split())[:500] or type(e).__name__)
            return False
        with self._wake:
            rows = int(report.get("total_rows_removed", 0)) if len(ids) == 1 else None
            finished = self._statuses(requested, "done", rows_removed=rows)
            self.store.finish_erasures(ids, [f.model_dump(mode="json") for f in finished])
            self._wake.notify_all()
        logger.info("dataset erasure of %d customer(s) done", len(ids))
        return True

    @staticmethod
    def _statuses(requested: dict[str, datetime], state: ErasureState, **fields: Any) -> list[ErasureStatus]:
        finished = _now() if state in ("done", "failed") else None
        return [
            ErasureStatus(erasure_id=i, state=state, requested_at=at, finished_at=finished, **fields)
            for i, at in requested.items()
        ]

    def _mark(self, requested: dict[str, datetime], state: ErasureState, **fields: Any) -> None:
        """Record the new state of each erasure of ``requested`` (erasure id → when it was requested)."""
        for status in self._statuses(requested, state, **fields):
            self.store.put_erasure_status(status.erasure_id, status.model_dump(mode="json"))
