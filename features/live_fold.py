"""Folding what the service saw into a dataset: live events and exposures appended to ``raw/`` as new parts.

What ``nextbest retrain`` folds, and how (the store is read by ``serving.retrain``; this module only sees frames):

* **Events** received live are validated like an import (:func:`features.schema.validate`): invalid rows go to
  ``quarantine/events.parquet`` with a reason naming the event id, e.g. ``state store event 'e-17' (seq 42):
  event_type 'purchse' is not one of view, click, add_to_cart, purchase``. Accepted rows are appended as a new
  numbered part (``raw/events-NNNNN.parquet``): the user's raw files are never rewritten.
* **Exposures** come from the decision log and the responses (:mod:`features.live_exposures`) and are appended
  to the ``actions`` table the propensity model trains on, checked against the contract and the action
  catalogue the same way.
* **Duplicates**: an event id or a decision id folded (or quarantined) by an earlier retrain is never folded
  again (``raw/service/folded_ids.parquet``); decisions are also checked against the exposure ids already in
  ``actions``.
* **Erasure**: rows of erased customers (the dataset's erasure log, and the service's own erasures) are left
  out and only counted.
* **Consent** is applied where it is for imported rows: by the feature build and the training tables, which read
  the consent in force.

``raw/service/fold_manifest.json`` keeps the watermark (the last change of each state store already read) and a
history of the folds. A fold first names the part files it is about to write (``pending``), then writes them,
then commits the new watermark; a fold interrupted in between is rolled back at the next start (its parts
removed) and read again from the store.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, Field

from nextbest.features.dataset import Dataset, write_json_atomic, write_parquet_atomic
from nextbest.features.errors import NextbestError
from nextbest.features.importers import validate_with_checks
from nextbest.features.privacy import ErasedIds
from nextbest.features.schema import (
    ACTION_ID,
    CUSTOMER_ID,
    EXPOSURE_ID,
    REASON,
    ROW,
    SOURCE,
    table_spec,
)

FOLD_DIR = "service"
"""``raw/service/``: what the folds of live data keep (no customer ids)."""
FOLD_MANIFEST = "fold_manifest.json"
FOLDED_IDS = "folded_ids.parquet"
EVENT_ID = "event_id"
SEQ = "seq"
EVENTS_SOURCE = "state store"
"""How reasons name the origin of a live event."""
DECISIONS_SOURCE = "decision log"
"""How reasons name the origin of an exposure."""


class FoldError(NextbestError, ValueError):
    """Live rows cannot be folded into the dataset as they are (a column is missing, the state is unreadable)."""


# --- the fold state ---------------------------------------------------------------------------------------------


class FoldState(BaseModel):
    """``raw/service/fold_manifest.json``.

    Attributes:
        watermarks: state store (its URL without password) → the last change already read from it.
        pending: part files (relative to the dataset) a fold began to write and has not committed.
        folds: one summary per committed fold, oldest first.
    """

    version: int = 1
    watermarks: dict[str, int] = Field(default_factory=dict)
    pending: list[str] = Field(default_factory=list)
    folds: list[dict[str, Any]] = Field(default_factory=list)


def fold_dir(ds: Dataset) -> Path:
    return ds.raw_dir / FOLD_DIR


def read_fold_state(ds: Dataset) -> FoldState:
    """The dataset's fold state (empty before the first fold).

    Raises:
        FoldError: the manifest exists but cannot be read.
    """
    path = fold_dir(ds) / FOLD_MANIFEST
    if not path.exists():
        return FoldState()
    try:
        return FoldState.model_validate_json(path.read_text())
    except ValueError as exc:
        raise FoldError(f"{path} is not a fold manifest ({' '.join(str(exc).split())[:200]})") from None


def write_fold_state(ds: Dataset, state: FoldState) -> None:
    write_json_atomic(state.model_dump(mode="json"), fold_dir(ds) / FOLD_MANIFEST)


def roll_back_pending(ds: Dataset) -> list[str]:
    """Remove the parts of a fold that never committed (a crash between writing them and the watermark); the
    rows are still in the store and are read again. Returns the files removed."""
    state = read_fold_state(ds)
    if not state.pending:
        return []
    removed = []
    for rel in state.pending:
        path = ds.root / rel
        if path.exists():
            path.unlink()
            removed.append(rel)
    write_fold_state(ds, state.model_copy(update={"pending": []}))
    return removed


def features_watermark(ds: Dataset, store: str, built_at: str | None) -> int:
    """The last change of ``store`` whose events the dataset's features include: the watermark of the latest fold
    from that store committed at or before the features were built (``built_at``, the feature manifest's ISO
    time); 0 when none. A service replaying its store skips the events up to it, which the features count
    already. A fold whose features were never rebuilt (a retrain that stopped after folding) does not count.

    Raises:
        FoldError: the fold manifest cannot be read.
    """
    if not built_at:
        return 0
    built = datetime.fromisoformat(built_at)
    folds = [
        f
        for f in read_fold_state(ds).folds
        if f.get("store") == store
        and f.get("changes")
        and f.get("folded_at")
        and datetime.fromisoformat(str(f["folded_at"])) <= built
    ]
    return max((int(f["changes"][1]) for f in folds), default=0)


def folded_ids(ds: Dataset, table: str) -> set[str]:
    """The ids (event ids for ``events``, decision ids for ``actions``) earlier folds took or quarantined."""
    path = fold_dir(ds) / FOLDED_IDS
    if not path.exists():
        return set()
    return set(pl.read_parquet(path).filter(pl.col("table") == table)["id"].to_list())


def record_folded_ids(ds: Dataset, ids: dict[str, Iterable[str]]) -> None:
    """Add ``table → ids`` to the folded ids."""
    path = fold_dir(ds) / FOLDED_IDS
    fresh = pl.DataFrame(
        [(table, i) for table, values in ids.items() for i in values],
        schema={"table": pl.String, "id": pl.String},
        orient="row",
    )
    if not fresh.height:
        return
    old = pl.read_parquet(path) if path.exists() else fresh.clear()
    write_parquet_atomic(pl.concat([old, fresh]).unique(maintain_order=True), path)


# --- results ----------------------------------------------------------------------------------------------------


@dataclass
class FoldBatch:
    """Live rows of one table, sorted out: what is appended, quarantined, skipped.

    Attributes:
        table: ``events`` or ``actions``.
        accepted: rows to append (contract dtypes).
        quarantined: rejected rows as text, with ``row``, ``source``, ``reason`` and the row's id.
        rows_in: rows read from the store.
        duplicates: rows left out because their id was folded before (or repeated in the batch).
        erased: rows of erased customers, left out.
        handled_ids: ids to record as folded (accepted and quarantined rows).
    """

    table: str
    accepted: pl.DataFrame
    quarantined: pl.DataFrame
    rows_in: int
    duplicates: int = 0
    erased: int = 0
    handled_ids: list[str] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Quarantine reasons without the row's id, counted (``event_type 'x' is not one of …`` → 2)."""
        if not self.quarantined.height:
            return {}
        plain = [r.split(": ", 1)[-1] for r in self.quarantined[REASON].to_list()]
        return dict(Counter(plain).most_common())

    def counts(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "folded": self.accepted.height,
            "quarantined": self.quarantined.height,
            "duplicates": self.duplicates,
            "erased": self.erased,
            "quarantine_reasons": self.reasons(),
        }


# --- events -----------------------------------------------------------------------------------------------------


def _drop_known(frame: pl.DataFrame, id_column: str, known: set[str]) -> tuple[pl.DataFrame, int]:
    """Rows whose id is neither in ``known`` nor repeated earlier in ``frame`` (rows without an id are kept)."""
    ids = pl.col(id_column)
    fresh = frame.filter(ids.is_null() | ~ids.is_in(list(known))).filter(
        ids.is_null() | ids.is_first_distinct()
    )
    return fresh, frame.height - fresh.height


def _drop_erased(frame: pl.DataFrame, erased: ErasedIds) -> tuple[pl.DataFrame, int]:
    if not erased or not frame.height:
        return frame, 0
    gone = [c for c in frame[CUSTOMER_ID].unique().to_list() if c is not None and c in erased]
    if not gone:
        return frame, 0
    kept = frame.filter(~pl.col(CUSTOMER_ID).is_in(gone))
    return kept, frame.height - kept.height


def _name_rows(
    quarantined: pl.DataFrame, ids: pl.DataFrame, *, source: str, id_column: str, what: str
) -> pl.DataFrame:
    """Reasons that name the row's id instead of its position in the batch: ``state store event 'e-1' (seq 4):
    …``; the id columns are kept beside the input columns."""
    if not quarantined.height:
        return quarantined.with_columns(
            *(pl.lit(None, dtype=pl.String).alias(c) for c in ids.columns if c != ROW)
        )
    prefix = "^" + re.escape(source) + r" row \d+: "
    extra = [c for c in ids.columns if c not in (ROW, id_column)]
    named = quarantined.join(ids, on=ROW, how="left", maintain_order="left")
    where = [
        pl.lit(f"{source} {what} '"),
        pl.col(id_column).cast(pl.String).fill_null("(no id)"),
        pl.lit("'"),
    ]
    if extra:
        where += [pl.lit(f" ({extra[0]} "), pl.col(extra[0]).cast(pl.String), pl.lit(")")]
    return named.with_columns(
        pl.concat_str([*where, pl.lit(": "), pl.col(REASON).str.replace(prefix, "")]).alias(REASON),
        *(pl.col(c).cast(pl.String) for c in ids.columns if c != ROW),
    )


def sort_live_events(
    events: pl.DataFrame,
    *,
    known_ids: set[str],
    erased: ErasedIds,
    event_types: Sequence[str] | None = None,
    source: str = EVENTS_SOURCE,
) -> FoldBatch:
    """Sort live events into rows to fold, to quarantine and to skip (a pure function: nothing is written).

    Args:
        events: the contract's event columns plus ``event_id`` and ``seq`` (the store's row number), in order.
        known_ids: event ids folded or quarantined before (duplicates are skipped, as are repeats in ``events``).
        erased: erased ids; their customers' rows are skipped.
        event_types: the event types the dataset accepts (its feature config's).
        source: how reasons name the origin.

    Raises:
        FoldError: ``events`` lacks ``event_id`` or ``seq``.
    """
    missing = [c for c in (EVENT_ID, SEQ, CUSTOMER_ID) if c not in events.columns]
    if missing:
        raise FoldError(f"live events need column(s) {', '.join(missing)}; found {', '.join(events.columns)}")
    rows_in = events.height
    fresh, duplicates = _drop_known(events.sort(SEQ), EVENT_ID, known_ids)
    fresh, erased_rows = _drop_erased(fresh, erased)
    contract = [c for c in fresh.columns if c not in (EVENT_ID, SEQ)]
    result = validate_with_checks(
        fresh.select(contract), None, "events", source=source, event_types=event_types
    )
    ids = fresh.select(
        pl.int_range(1, fresh.height + 1, dtype=pl.Int64).alias(ROW), pl.col(EVENT_ID), pl.col(SEQ)
    )
    quarantined = _name_rows(result.quarantined, ids, source=source, id_column=EVENT_ID, what="event")
    handled = [i for i in fresh[EVENT_ID].to_list() if i is not None]
    return FoldBatch("events", result.accepted, quarantined, rows_in, duplicates, erased_rows, handled)


# --- exposures --------------------------------------------------------------------------------------------------


def sort_exposures(
    exposures: pl.DataFrame,
    *,
    known_ids: set[str],
    erased: ErasedIds,
    catalog_actions: set[str] | None,
    source: str = DECISIONS_SOURCE,
) -> FoldBatch:
    """Sort exposures into rows to fold, quarantine and skip, as :func:`sort_live_events` does for events; an
    action missing from the action catalogue is quarantined too (the propensity model could not describe it).

    Args:
        exposures: the ``actions`` table's columns (from :func:`exposures_from_decisions`).
        known_ids: exposure ids already in ``actions`` or folded before.
        erased: erased ids.
        catalog_actions: the catalogue's action ids (None: no catalogue, nothing checked).
        source: how reasons name the origin.
    """
    rows_in = exposures.height
    fresh, duplicates = _drop_known(exposures, EXPOSURE_ID, known_ids)
    fresh, erased_rows = _drop_erased(fresh, erased)
    checks = None
    if catalog_actions is not None and fresh.height:
        checks = pl.Series(
            [
                None
                if a is None or a in catalog_actions
                else f"action_id '{a}' is not in the action catalogue"
                for a in fresh[ACTION_ID].to_list()
            ],
            dtype=pl.String,
        )
    result = validate_with_checks(fresh, checks, "actions", source=source)
    ids = fresh.select(pl.int_range(1, fresh.height + 1, dtype=pl.Int64).alias(ROW), pl.col(EXPOSURE_ID))
    quarantined = _name_rows(result.quarantined, ids, source=source, id_column=EXPOSURE_ID, what="decision")
    handled = [i for i in fresh[EXPOSURE_ID].to_list() if i is not None]
    return FoldBatch("actions", result.accepted, quarantined, rows_in, duplicates, erased_rows, handled)


# --- writing ----------------------------------------------------------------------------------------------------


def next_part(ds: Dataset, table: str) -> int:
    """The number of the next part of ``table`` (after every numbered part present)."""
    numbers = [
        int(m.group(1)) for p in ds.table_files(table) if (m := re.search(r"-(\d+)\.parquet$", p.name))
    ]
    return max(numbers, default=-1) + 1


def align_to_table(ds: Dataset, table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the columns and dtypes of ``table``'s existing files (so that every part scans as one
    table): missing columns as nulls, extra ones dropped; where the table has no file yet, the contract's columns
    and the frame's extra ones."""
    files = ds.table_files(table)
    if files:
        target = dict(pl.read_parquet_schema(files[0]))
    else:
        target = {**table_spec(table).dtypes, **{c: t for c, t in frame.schema.items()}}
    return frame.select(
        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c) for c, t in target.items()
    )


def append_quarantine(ds: Dataset, table: str, quarantined: pl.DataFrame, *, id_column: str) -> Path | None:
    """Add rows to ``quarantine/<table>.parquet`` (beside an import's), leaving out ids already there."""
    if not quarantined.height:
        return None
    path = ds.quarantine_path(table)
    old = pl.read_parquet(path) if path.exists() else None
    if old is not None and id_column in old.columns:
        seen = old.filter(pl.col(SOURCE) == quarantined[SOURCE][0])[id_column].drop_nulls().to_list()
        quarantined = quarantined.filter(~pl.col(id_column).is_in(seen))
    return ds.write_quarantine(table, [f for f in (old, quarantined) if f is not None])


@dataclass
class FoldCommit:
    """What :func:`commit_fold` wrote."""

    parts: dict[str, str] = field(default_factory=dict)
    quarantine: dict[str, str] = field(default_factory=dict)


def commit_fold(
    ds: Dataset,
    batches: Sequence[FoldBatch],
    *,
    store: str,
    watermark: int,
    summary: dict[str, Any],
) -> FoldCommit:
    """Write a fold: each batch's accepted rows as a new part of its table, its ids as folded, the store's new
    watermark, then its quarantined rows. Crash-safe: parts are named ``pending`` in the manifest first, and a
    fold that never committed is rolled back by :func:`roll_back_pending`.

    Args:
        ds: the dataset.
        batches: the sorted rows of each table.
        store: the store's key in the watermarks (its URL without password).
        watermark: the last change read from the store.
        summary: what the fold did, kept in the manifest's history.
    """
    ds.ensure()
    state = read_fold_state(ds)
    planned = {b.table: ds.part_path(b.table, next_part(ds, b.table)) for b in batches if b.accepted.height}
    pending = [str(p.relative_to(ds.root)) for p in planned.values()]
    write_fold_state(ds, state.model_copy(update={"pending": pending}))
    out = FoldCommit()
    for b in batches:
        if b.table in planned:
            write_parquet_atomic(align_to_table(ds, b.table, b.accepted), planned[b.table])
            out.parts[b.table] = str(planned[b.table].relative_to(ds.root))
    record_folded_ids(ds, {b.table: b.handled_ids for b in batches})
    state.watermarks[store] = max(watermark, state.watermarks.get(store, 0))
    state.folds.append({**summary, "parts": out.parts})
    write_fold_state(ds, state.model_copy(update={"pending": []}))
    # After the commit: a crash here re-quarantines nothing (ids are recorded) but may lose these rows' record.
    for b in batches:
        id_column = EVENT_ID if b.table == "events" else EXPOSURE_ID
        q = append_quarantine(ds, b.table, b.quarantined, id_column=id_column)
        if q is not None:
            out.quarantine[b.table] = str(q.relative_to(ds.root))
    return out


def scrub_parts(ds: Dataset, parts: Iterable[str], erased: ErasedIds) -> int:
    """Remove the rows of erased customers from freshly folded parts (an erasure that arrived while the fold ran,
    after its rows were read); returns the rows removed."""
    removed = 0
    for rel in parts:
        path = ds.root / rel
        frame = pl.read_parquet(path)
        kept, gone = _drop_erased(frame, erased)
        if gone:
            write_parquet_atomic(kept, path)
            removed += gone
    return removed


def missing_parts(ds: Dataset) -> list[str]:
    """Parts earlier folds wrote that are no longer there (a re-import replaces the whole table)."""
    return [
        rel
        for fold in read_fold_state(ds).folds
        for rel in fold.get("parts", {}).values()
        if not (ds.root / rel).exists()
    ]
