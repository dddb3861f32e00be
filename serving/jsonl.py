"""Durable append-only JSON-lines files: the event log, the decision log and the contact ledger all use one."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nextbest.features.errors import NextbestError


class LogError(NextbestError, ValueError):
    """A JSON-lines file is corrupt somewhere other than a torn last line; names the file and line."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonLinesFile:
    """A durable, append-only JSON-lines file (what versions before the state store kept the
    service's state in; :func:`read_lines` reads their files and JSON-lines exports).

    ``append`` returns only once the line is flushed and (by default) fsynced, so an acknowledged write survives
    a crash. A torn last line left by a crash mid-write (never acknowledged) is cut off when the file is opened.
    ``rewrite`` replaces the file atomically (write a copy, fsync, rename), which is how erasure and retention
    remove lines.
    Thread-safe within one process; one writer process per file.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self._file = open(self.path, "ab")  # noqa: SIM115 -- held open for appends

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Walk back to the last complete line and cut the partial one.
            pos = size - 1
            chunk = 4096
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                buf = f.read(pos - start)
                nl = buf.rfind(b"\n")
                if nl >= 0:
                    f.truncate(start + nl + 1)
                    break
                pos = start
            else:
                f.truncate(0)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line; durable when this returns."""
        self.append_many([record])

    def append_many(self, records: list[Mapping[str, Any]]) -> None:
        """Append several records with one flush and fsync."""
        if not records:
            return
        lines = [(json.dumps(r, ensure_ascii=False, default=str) + "\n").encode("utf-8") for r in records]
        with self._lock:
            self._file.write(b"".join(lines))
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every record, in file order.

        Raises:
            LogError: a line is not a JSON object.
        """
        with self._lock:
            return list(read_lines(self.path))

    def rewrite(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Atomically rewrite the file with only the records ``keep`` accepts; returns how many were removed."""
        with self._lock:
            records = list(read_lines(self.path))
            kept = [r for r in records if keep(r)]
            removed = len(records) - len(kept)
            if removed == 0:
                return 0
            self._file.close()
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
            finally:
                self._file = open(self.path, "ab")  # noqa: SIM115 -- held open for appends
            return removed

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):
                    return  # a line still being written (or torn by a crash): never acknowledged
                raise LogError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise LogError(f"{path} line {n}: expected a JSON object")
            yield record
