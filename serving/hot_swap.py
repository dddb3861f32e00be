"""Swapping the served models (and the dataset they were trained with) under a running service.

A running service polls the registry (or the BentoML model store) for a new ``@champion`` or ``@challenger``
and for rebuilt features, every ``NEXTBEST_MODEL_POLL_SECONDS`` (default 30 s; 0 turns polling off), and the
admin endpoint ``POST /reload`` makes it look at once. The new models and data are loaded beside the old ones
while requests go on; then, for the moment of one assignment, new requests wait while the ones in flight
finish (:class:`SwapLock`), the new set replaces the old, and every answer from then on names the new
versions. No request fails and none is answered by a mix of old and new.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODEL_POLL_ENV = "NEXTBEST_MODEL_POLL_SECONDS"
"""Seconds between two looks at the registry for new champions; 0 turns polling off (``POST /reload`` still
works)."""
DEFAULT_MODEL_POLL_SECONDS = 30.0


class SwapLock:
    """A readers–writer lock: requests read (many at once, re-entrant per thread), a swap writes.

    A writer waiting keeps new readers out (so a swap cannot starve under load), but a thread already reading
    may read again (an endpoint that calls another) without deadlocking against that writer.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._local = threading.local()

    @contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError("a thread serving a request cannot swap the models it is using")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def features_stamp(data: Path) -> str:
    """A fingerprint of the dataset's built features (their manifest): it changes when the features are
    rebuilt, e.g. by ``nextbest retrain``. Empty when there is no manifest."""
    manifest = Path(data) / "features" / "manifest.json"
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return ""
