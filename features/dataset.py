"""The on-disk layout of a dataset directory and the reading and writing of its tables.

A dataset is a directory::

    DIR/raw/<table>.parquet            accepted rows (large tables as <table>-00000.parquet, -00001, …)
    DIR/quarantine/<table>.parquet     rejected rows with row, source and reason
    DIR/truth/                         planted ground truth (generated data only)
    DIR/features/                      pipeline output, with manifest.json
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.features.schema import TABLE_NAMES, ValidationResult, empty_frame, table_spec

DEFAULT_ROOT = Path("data")
"""Default root under which datasets live (``data/<name>``)."""


class DatasetError(NextbestError, FileNotFoundError):
    """A dataset directory, or a table in it, is missing."""


@dataclass(frozen=True)
class Dataset:
    """Paths of one dataset directory.

    Attributes:
        root: the dataset directory.
    """

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Dataset:
        return cls(Path(root))

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def truth_dir(self) -> Path:
        return self.root / "truth"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def manifest_path(self) -> Path:
        return self.features_dir / "manifest.json"

    def ensure(self) -> Dataset:
        """Create the directory skeleton."""
        for d in (self.raw_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def require(self) -> Dataset:
        """Raise :class:`DatasetError` unless this looks like a dataset."""
        if not self.raw_dir.is_dir():
            raise DatasetError(
                f"{self.root} is not a nextbest dataset (no raw/ folder); create one with "
                f"'nextbest data generate --out {self.root}' or 'nextbest data import …'"
            )
        return self

    def table_files(self, table: str) -> list[Path]:
        """The raw parquet files of ``table`` (one file, or numbered parts)."""
        table_spec(table)
        single = self.raw_dir / f"{table}.parquet"
        parts = sorted(self.raw_dir.glob(f"{table}-[0-9]*.parquet"))
        return ([single] if single.exists() else []) + parts

    def has_table(self, table: str) -> bool:
        return bool(self.table_files(table))

    def scan(self, table: str, *, required: bool = True) -> pl.LazyFrame:
        """Lazily scan the raw rows of ``table``.

        Args:
            table: table name.
            required: raise if the table is absent; otherwise an empty frame with the contract schema.

        Raises:
            DatasetError: the table is required and absent.
        """
        files = self.table_files(table)
        if not files:
            if required:
                raise DatasetError(f"{self.raw_dir} has no {table} table ({table}.parquet)")
            return empty_frame(table).lazy()
        return pl.scan_parquet(files)

    def read(self, table: str, *, required: bool = True) -> pl.DataFrame:
        return self.scan(table, required=required).collect()

    def part_path(self, table: str, part: int) -> Path:
        return self.raw_dir / f"{table}-{part:05d}.parquet"

    def clear_table(self, table: str) -> None:
        """Remove the raw and quarantine files of ``table`` (before a fresh import)."""
        for f in self.table_files(table):
            f.unlink()
        q = self.quarantine_path(table)
        if q.exists():
            q.unlink()

    def quarantine_path(self, table: str) -> Path:
        return self.quarantine_dir / f"{table}.parquet"

    def write_table(self, table: str, df: pl.DataFrame, *, part: int | None = None) -> Path:
        """Write accepted rows of ``table`` (a whole table, or one numbered part of it)."""
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        path = self.raw_dir / f"{table}.parquet" if part is None else self.part_path(table, part)
        write_parquet_atomic(df, path)
        return path

    def write_quarantine(self, table: str, frames: list[pl.DataFrame]) -> Path | None:
        """Write the quarantined rows of ``table`` (all sources together); nothing when there are none."""
        frames = [f for f in frames if f.height]
        path = self.quarantine_path(table)
        if not frames:
            if path.exists():
                path.unlink()
            return None
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(pl.concat(frames, how="diagonal_relaxed"), path)
        return path

    def write_validated(self, results: list[ValidationResult], table: str) -> dict[str, Any]:
        """Write validated results of one table (accepted to raw, rejected to quarantine); return counts."""
        accepted = [r.accepted for r in results]
        df = pl.concat(accepted, how="diagonal_relaxed") if accepted else empty_frame(table)
        self.write_table(table, df)
        q = self.write_quarantine(table, [r.quarantined for r in results])
        return {
            "table": table,
            "rows_in": sum(r.rows_in for r in results),
            "rows_accepted": df.height,
            "rows_quarantined": sum(r.rows_quarantined for r in results),
            "path": str(self.raw_dir / f"{table}.parquet"),
            "quarantine": str(q) if q else None,
        }

    def table_counts(self) -> dict[str, int]:
        """Row counts of every raw table present."""
        return {t: self.scan(t).select(pl.len()).collect().item() for t in TABLE_NAMES if self.has_table(t)}

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise DatasetError(
                f"{self.features_dir} has no manifest.json: run 'nextbest features build --data {self.root}' first"
            )
        return json.loads(self.manifest_path.read_text())


def _temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses (process id and a random part): two processes
    writing one file at the same moment each finish their own file, and the last rename wins whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _replace_with(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` through a temporary file, so a crash never leaves half a file and a reader
    never sees one."""
    _replace_with(path, df.write_parquet)


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file (see :func:`write_parquet_atomic`)."""
    _replace_with(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))
