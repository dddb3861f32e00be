"""Working on a dataset while the service reads it: one retrain at a time, and features swapped in whole.

* :class:`DatasetLock` — an exclusive lock on ``DIR/.retrain.lock`` (``flock``: released by the kernel when the
  holder exits, even by ``kill -9``, so it never goes stale). A second retrain is refused at once with the
  holder's pid and start time.
* :func:`write_lock` — whoever rewrites the dataset's raw files or builds its features holds
  ``DIR/.write.lock`` (the others wait for it): a retrain's fold and feature build, an erasure from
  ``nextbest forget`` or from any worker or replica of a service sharing the dataset. Two of them never rewrite
  one file at the same moment, and a build never reads a raw file that an erasure replaces under it (a lazy
  Parquet scan that meets a file replaced between its plan and its read fails).
* :func:`build_features_atomically` — ``features.pipeline.build_features`` writes each output file atomically
  but one after the other into ``DIR/features/``, so a reader in the middle of a build could see a new matrix
  beside old vocabularies. Here the features are built into a staging dataset beside it (``DIR/.features-next``,
  whose ``raw`` and erasure log are links to the dataset's own), and the finished folder takes the place of
  ``features/`` in one ``renameat2(RENAME_EXCHANGE)`` (two renames a few microseconds apart where the kernel or
  file system lacks it), under the write lock.
* :func:`erase_customers_atomically` — what ``nextbest forget`` and the service's erasure queue run: the
  erasure of :func:`~features.pipeline.erase_customers` under the write lock, with the features rebuilt whole.
* :func:`advisory_lock_key` — the key of a named PostgreSQL advisory lock, one derivation for every lock of ours
  in a shared database (the state store's per-customer locks, the registry's write lock).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from nextbest.features.dataset import Dataset, write_json_atomic
from nextbest.features.errors import NextbestError
from nextbest.features.pipeline import FeatureConfig, build_features, erase_customers
from nextbest.features.privacy import ERASURE_LOG

LOCK_FILE = ".retrain.lock"
WRITE_LOCK_FILE = ".write.lock"
STAGING = ".features-next"
RETIRED = ".features-previous"


def advisory_lock_key(name: str) -> int:
    """A PostgreSQL advisory-lock key for ``name``: the first 8 bytes of its BLAKE2b digest, as a signed 64-bit
    integer (``pg_advisory_lock`` takes a ``bigint``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


class RetrainLockedError(NextbestError, RuntimeError):
    """Another job holds the dataset's lock; the message names it."""


class DatasetLock:
    """An exclusive lock on a dataset (``with DatasetLock(ds, "retrain"): …``).

    Args:
        ds: the dataset.
        job: what the holder does, for the message a refused job gets.
        lock_file: the lock's file in the dataset's folder (one lock per kind of job).
        wait: wait for the holder to finish instead of refusing at once.

    Raises:
        RetrainLockedError: on entry, when another process (or another ``DatasetLock`` in this one) holds it and
            ``wait`` is False.
    """

    def __init__(
        self, ds: Dataset, job: str = "retrain", *, lock_file: str = LOCK_FILE, wait: bool = False
    ) -> None:
        self.path = ds.root / lock_file
        self.job = job
        self.wait = wait
        self._handle: Any = None

    def __enter__(self) -> DatasetLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # held for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise RetrainLockedError(
                f"another {holder.get('job', 'retrain')} of {self.path.parent} is running "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}): "
                f"wait for it to finish ({self.path} is free once it exits)"
            ) from None
        handle.seek(0)
        handle.truncate()
        holder = {
            "job": self.job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import fcntl

        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _holder(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    kernel, C library or file system cannot (nothing changed then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    return done == 0


def swap_in(new: Path, live: Path) -> None:
    """Make the folder ``new`` the folder ``live`` (atomically where the system allows), removing the old one."""
    retired = live.with_name(RETIRED)
    if retired.exists():
        shutil.rmtree(retired)
    if not live.exists():
        os.rename(new, live)
        return
    if exchange_paths(new, live):
        os.rename(new, retired)  # ``new`` now holds the old features
    else:
        os.rename(live, retired)
        os.rename(new, live)
    shutil.rmtree(retired)


def write_lock(ds: Dataset, job: str) -> DatasetLock:
    """The lock held while the dataset's raw files are rewritten or its features built (waits for the holder;
    see the module docstring). Not re-entrant: a holder passes ``locked=True`` to the functions below."""
    return DatasetLock(ds, job, lock_file=WRITE_LOCK_FILE, wait=True)


def build_features_atomically(
    ds: Dataset, config: FeatureConfig | None = None, *, progress: bool = False, locked: bool = False
) -> dict[str, Any]:
    """:func:`~features.pipeline.build_features` into a staging folder, then swapped in whole (see the module
    docstring), under :func:`write_lock` unless the caller holds it (``locked``); returns the manifest. Nothing
    of the live features changes when the build fails."""
    ds.require()
    with nullcontext() if locked else write_lock(ds, "feature build"):
        staging = Dataset.at(ds.root / STAGING)
        if staging.root.exists():
            shutil.rmtree(staging.root)  # left by a build that did not finish
        staging.root.mkdir()
        try:
            _link(ds.raw_dir, staging.raw_dir)
            if (ds.root / ERASURE_LOG).exists():
                _link(ds.root / ERASURE_LOG, staging.root / ERASURE_LOG)
            manifest = build_features(staging, config, progress=progress)
            # The manifest names the dataset it describes, not the staging folder it was written in.
            manifest["dataset"] = str(ds.root)
            write_json_atomic(manifest, staging.manifest_path)
            swap_in(staging.features_dir, ds.features_dir)
        finally:
            shutil.rmtree(staging.root, ignore_errors=True)
    return manifest


def erase_customers_atomically(
    ds: Dataset,
    customer_ids: Sequence[str],
    *,
    config: FeatureConfig | None = None,
    rebuild: bool = True,
    progress: bool = False,
    locked: bool = False,
) -> dict[str, Any]:
    """:func:`~features.pipeline.erase_customers` under :func:`write_lock` (unless the caller holds it:
    ``locked``), the features rebuilt once into a staging folder and swapped in whole, so that a service reading
    them meanwhile never sees half a build. Same arguments and report."""
    with nullcontext() if locked else write_lock(ds, "erasure"):
        return erase_customers(
            ds,
            customer_ids,
            config=config,
            rebuild=rebuild,
            progress=progress,
            build=functools.partial(build_features_atomically, locked=True),
        )
