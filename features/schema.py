"""The data contract: every table nextbest accepts, its columns, Polars dtypes, validation and vocabularies.

This is the one place that names columns and dtypes. Everything else imports the constants from here.
Validation never drops a row silently: a row either passes, or goes to quarantine with a ``reason`` that
names the file, the row and the offending value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from nextbest.features.errors import NextbestError

TIMESTAMP = pl.Datetime("us")
"""Every timestamp is stored as naive UTC with microsecond precision."""

# Column names used across the project.
CUSTOMER_ID = "customer_id"
ITEM_ID = "item_id"
EVENT_TYPE = "event_type"
TIMESTAMP_COL = "timestamp"
SESSION_ID = "session_id"
CHANNEL = "channel"
QUANTITY = "quantity"
PRICE = "price"
SOURCE_SYSTEM = "source_system"
SOURCE_ID = "source_id"
PURPOSE = "purpose"
GRANTED = "granted"
EXPOSURE_ID = "exposure_id"
ACTION_ID = "action_id"
RESPONDED = "responded"
KIND = "kind"
VALUE = "value"

ROW = "row"
"""1-based row number in the source file, kept on quarantined rows."""
REASON = "reason"
SOURCE = "source"

DEFAULT_EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
CONSENT_PURPOSES: tuple[str, ...] = ("personalisation", "profiling", "marketing")

TABLE_NAMES: tuple[str, ...] = (
    "events",
    "items",
    "customers",
    "consent",
    "identities",
    "actions",
    "action_catalog",
)
OPTIONAL_TABLE_NAMES: tuple[str, ...] = ("action_targets",)
"""Tables of the contract that a dataset may lack even when it has an action log (generated worlds have none):
``action_targets`` lists each action's target items where the catalogue's attributes cannot say them."""
RESPONDED_AT = "responded_at"
"""Optional ``actions`` column: when the response happened (when the outcome became known). Without it, an
earlier exposure's response counts as known from its action's ``end_date``, else a fixed window later."""


class SchemaError(NextbestError, ValueError):
    """A file cannot be read as a table at all (a required column is missing, a table name is unknown).

    Row-level problems never raise: those rows are quarantined with a reason instead.
    """


@dataclass(frozen=True)
class Column:
    """One column of a table.

    Attributes:
        name: column name.
        dtype: the Polars dtype it is stored as.
        required: the column must be present in the input.
        nullable: null values are allowed.
        allowed: if set, the only values accepted (strings only).
        min_value: if set, smaller values are rejected.
        max_value: if set, larger values are rejected.
    """

    name: str
    dtype: pl.DataType
    required: bool = True
    nullable: bool = False
    allowed: tuple[str, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None


@dataclass(frozen=True)
class TableSpec:
    """A table of the contract.

    Attributes:
        name: table name, also the file stem under ``DIR/raw/``.
        columns: the declared columns.
        key: columns whose combination must be unique; later duplicates are quarantined.
        open_columns: whether undeclared columns are kept (attribute tables such as ``items``).
    """

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    open_columns: bool = False

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def dtypes(self) -> dict[str, pl.DataType]:
        return {c.name: c.dtype for c in self.columns}


def _id(name: str, *, nullable: bool = False, required: bool = True) -> Column:
    return Column(name, pl.String(), required=required, nullable=nullable)


EVENTS = TableSpec(
    "events",
    (
        _id(CUSTOMER_ID),
        _id(ITEM_ID),
        Column(EVENT_TYPE, pl.String(), allowed=DEFAULT_EVENT_TYPES),
        Column(TIMESTAMP_COL, TIMESTAMP),
        _id(SESSION_ID, nullable=True, required=False),
        Column(CHANNEL, pl.String(), required=False, nullable=True),
        Column(QUANTITY, pl.Int32(), required=False, nullable=True, min_value=0),
        Column(PRICE, pl.Float64(), required=False, nullable=True, min_value=0),
        Column(SOURCE_SYSTEM, pl.String(), required=False, nullable=True),
    ),
)
ITEMS = TableSpec(
    "items",
    (_id(ITEM_ID), Column(PRICE, pl.Float64(), required=False, nullable=True, min_value=0)),
    key=(ITEM_ID,),
    open_columns=True,
)
CUSTOMERS = TableSpec(
    "customers",
    (
        _id(CUSTOMER_ID),
        Column("age", pl.Int32(), required=False, nullable=True, min_value=0, max_value=120),
        Column("gender", pl.String(), required=False, nullable=True),
        Column("region", pl.String(), required=False, nullable=True),
        Column("signup_date", pl.Date(), required=False, nullable=True),
    ),
    key=(CUSTOMER_ID,),
    open_columns=True,
)
CONSENT = TableSpec(
    "consent",
    (
        _id(CUSTOMER_ID),
        Column(PURPOSE, pl.String(), allowed=CONSENT_PURPOSES),
        Column(GRANTED, pl.Boolean()),
        Column(TIMESTAMP_COL, TIMESTAMP),
    ),
)
IDENTITIES = TableSpec(
    "identities",
    (
        Column(SOURCE_SYSTEM, pl.String()),
        _id(SOURCE_ID),
        _id(CUSTOMER_ID, nullable=True),
    ),
    key=(SOURCE_SYSTEM, SOURCE_ID),
)
ACTIONS = TableSpec(
    "actions",
    (
        _id(EXPOSURE_ID),
        _id(CUSTOMER_ID),
        _id(ACTION_ID),
        Column(CHANNEL, pl.String(), required=False, nullable=True),
        Column(TIMESTAMP_COL, TIMESTAMP),
        Column(RESPONDED, pl.Boolean()),
    ),
    key=(EXPOSURE_ID,),
    open_columns=True,
)
ACTION_CATALOG = TableSpec(
    "action_catalog",
    (
        _id(ACTION_ID),
        Column(KIND, pl.String()),
        Column(VALUE, pl.Float64(), required=False, nullable=True),
    ),
    key=(ACTION_ID,),
    open_columns=True,
)

ACTION_TARGETS = TableSpec(
    "action_targets",
    (_id(ACTION_ID), _id(ITEM_ID)),
    key=(ACTION_ID, ITEM_ID),
    open_columns=True,
)
"""Each action's target items, one row per (action, item): the products a campaign's coupons cover. An action
with rows here targets exactly those items; one without is matched by its catalogue attributes (``brand`` of a
brand discount)."""

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (EVENTS, ITEMS, CUSTOMERS, CONSENT, IDENTITIES, ACTIONS, ACTION_CATALOG, ACTION_TARGETS)
}


def table_spec(name: str, *, event_types: Sequence[str] | None = None) -> TableSpec:
    """The spec of table ``name``; for ``events``, ``event_types`` replaces the allowed event types.

    Raises:
        SchemaError: ``name`` is not a table of the contract.
    """
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}: expected one of {', '.join(TABLES)}")
    spec = TABLES[name]
    if name == "events" and event_types is not None:
        cols = tuple(
            Column(c.name, c.dtype, allowed=tuple(event_types)) if c.name == EVENT_TYPE else c
            for c in spec.columns
        )
        spec = TableSpec(spec.name, cols, spec.key, spec.open_columns)
    return spec


@dataclass
class ValidationResult:
    """The outcome of validating one input.

    Attributes:
        accepted: rows that passed, with the contract's dtypes.
        quarantined: rows that failed: every input column as text, plus ``row``, ``source`` and ``reason``.
        rows_in: rows read.
    """

    accepted: pl.DataFrame
    quarantined: pl.DataFrame
    rows_in: int
    table: str = ""
    source: str = ""
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def rows_accepted(self) -> int:
        return self.accepted.height

    @property
    def rows_quarantined(self) -> int:
        return self.quarantined.height

    def counts(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
        }


_TZ_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%:z")
_NAIVE_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)


def parse_timestamp(text: pl.Expr) -> pl.Expr:
    """Parse ISO-8601 text (date, date-time, with or without offset or ``Z``) to naive UTC; null if unparseable.

    Each row is parsed on its own, so one file may mix formats.
    """
    c = text.str.strip_chars().str.replace(r"Z$", "+00:00")
    with_tz = [
        c.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC").dt.replace_time_zone(None)
        for f in _TZ_FORMATS
    ]
    naive = [c.str.to_datetime(f, strict=False, time_unit="us") for f in _NAIVE_FORMATS]
    return pl.coalesce(with_tz + naive)


def _cast_expr(col: Column, src_dtype: pl.DataType) -> pl.Expr:
    """Cast one input column to its contract dtype, yielding null where the value cannot be converted."""
    c = pl.col(col.name)
    target = col.dtype
    if target == TIMESTAMP:
        if isinstance(src_dtype, pl.Datetime):
            if src_dtype.time_zone is not None:
                c = c.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            return c.cast(TIMESTAMP)
        if isinstance(src_dtype, pl.Date):
            return c.cast(TIMESTAMP)
        if src_dtype == pl.String():
            return parse_timestamp(c)
        return c.cast(TIMESTAMP, strict=False)
    if target == pl.Date() and src_dtype == pl.String():
        return c.str.strip_chars().str.to_date("%Y-%m-%d", strict=False)
    if target == pl.Boolean() and src_dtype == pl.String():
        low = c.str.strip_chars().str.to_lowercase()
        return (
            pl.when(low.is_in(["true", "1", "yes", "y", "t"]))
            .then(True)
            .when(low.is_in(["false", "0", "no", "n", "f"]))
            .then(False)
            .otherwise(None)
        )
    if target == pl.String() and src_dtype != pl.String():
        return c.cast(pl.String, strict=False)
    if src_dtype == pl.String() and target.is_numeric():
        return c.str.strip_chars().cast(target, strict=False)
    return c.cast(target, strict=False)


def _quote(expr: pl.Expr) -> pl.Expr:
    return pl.concat_str([pl.lit("'"), expr.cast(pl.String), pl.lit("'")])


def validate(
    df: pl.DataFrame | pl.LazyFrame,
    table: str,
    *,
    source: str,
    event_types: Sequence[str] | None = None,
    row_offset: int = 0,
) -> ValidationResult:
    """Validate an input against the contract for ``table``.

    Args:
        df: the input, columns already named as in the contract (importers map them first).
        table: the table name (``events``, ``items``, …).
        source: the file name quoted in reasons (e.g. ``events.csv``).
        event_types: the accepted event types for ``events`` (default :data:`DEFAULT_EVENT_TYPES`).
        row_offset: number of rows of the same source already validated, so row numbers stay file-wide.

    Returns:
        accepted rows cast to the contract dtypes, and quarantined rows with their reasons.

    Raises:
        SchemaError: a required column is missing.
    """
    spec = table_spec(table, event_types=event_types)
    lf = df.lazy() if isinstance(df, pl.DataFrame) else df
    schema = lf.collect_schema()
    missing = [c.name for c in spec.columns if c.required and c.name not in schema]
    if missing:
        raise SchemaError(
            f"{source}: table {table!r} needs column(s) {', '.join(missing)}; found {', '.join(schema.names()) or 'none'}"
        )
    present = [c for c in spec.columns if c.name in schema]
    extras = [n for n in schema.names() if n not in spec.column_names] if spec.open_columns else []
    dropped = [n for n in schema.names() if n not in spec.column_names and not spec.open_columns]
    if dropped:
        raise SchemaError(
            f"{source}: table {table!r} does not take column(s) {', '.join(dropped)}; "
            f"its columns are {', '.join(spec.column_names)}"
        )

    lf = lf.with_row_index("__row", offset=row_offset + 1)
    cast_names = {c.name: f"__cast_{c.name}" for c in present}
    lf = lf.with_columns([_cast_expr(c, schema[c.name]).alias(cast_names[c.name]) for c in present])

    reasons: list[pl.Expr] = []
    for c in present:
        raw = pl.col(c.name)
        val = pl.col(cast_names[c.name])
        raw_missing = raw.is_null()
        if schema[c.name] == pl.String():
            raw_missing = raw_missing | (raw.str.strip_chars() == "")
        if not c.nullable:
            reasons.append(pl.when(raw_missing).then(pl.lit(f"{c.name} is missing")))
        reasons.append(
            pl.when(~raw_missing & val.is_null()).then(
                pl.format(
                    "{} {} is not a valid {}", pl.lit(c.name), _quote(raw), pl.lit(_dtype_word(c.dtype))
                )
            )
        )
        if c.allowed is not None:
            reasons.append(
                pl.when(val.is_not_null() & ~val.is_in(list(c.allowed))).then(
                    pl.format(
                        "{} {} is not one of {}", pl.lit(c.name), _quote(val), pl.lit(", ".join(c.allowed))
                    )
                )
            )
        if c.min_value is not None:
            reasons.append(
                pl.when(val < c.min_value).then(
                    pl.format("{} {} is below {}", pl.lit(c.name), _quote(val), pl.lit(str(c.min_value)))
                )
            )
        if c.max_value is not None:
            reasons.append(
                pl.when(val > c.max_value).then(
                    pl.format("{} {} is above {}", pl.lit(c.name), _quote(val), pl.lit(str(c.max_value)))
                )
            )
    if spec.key:
        key_cols = [pl.col(cast_names[k]) for k in spec.key]
        first_row = pl.col("__row").first().over(key_cols)
        key_text = pl.concat_str([_quote(k) for k in key_cols], separator=", ")
        reasons.append(
            pl.when(pl.col("__row") != first_row).then(
                pl.format(
                    "duplicate {} {} (first at row {})", pl.lit(", ".join(spec.key)), key_text, first_row
                )
            )
        )
    problems = pl.concat_list([r.cast(pl.String) for r in reasons]).list.drop_nulls()
    lf = lf.with_columns(
        pl.when(problems.list.len() > 0)
        .then(pl.format("{} row {}: {}", pl.lit(source), pl.col("__row"), problems.list.join("; ")))
        .otherwise(None)
        .alias(REASON)
    )
    annotated = lf.collect()
    bad = annotated[REASON].is_not_null()
    accepted = annotated.filter(~bad).select(
        [pl.col(cast_names[c.name]).alias(c.name) for c in present] + [pl.col(n) for n in extras]
    )
    # Declared optional columns absent from the input are added as nulls, so every accepted frame has the
    # full contract schema and files of one table concatenate.
    accepted = accepted.with_columns(
        [pl.lit(None, dtype=c.dtype).alias(c.name) for c in spec.columns if c.name not in schema]
    ).select(spec.column_names + extras)
    quarantined = annotated.filter(bad).select(
        [pl.col(n).cast(pl.String).alias(n) for n in schema.names()]
        + [pl.col("__row").cast(pl.Int64).alias(ROW), pl.lit(source).alias(SOURCE), pl.col(REASON)]
    )
    return ValidationResult(accepted, quarantined, annotated.height, table=table, source=source)


def _dtype_word(dtype: pl.DataType) -> str:
    if dtype == TIMESTAMP:
        return "timestamp"
    if dtype == pl.Date():
        return "date"
    if dtype == pl.Boolean():
        return "boolean"
    if dtype.is_integer():
        return "integer"
    if dtype.is_float():
        return "number"
    return "text"


def empty_frame(table: str) -> pl.DataFrame:
    """An empty frame with the contract schema of ``table``."""
    return pl.DataFrame(schema=table_spec(table).dtypes)


@dataclass(frozen=True)
class Vocabulary:
    """A dense id ↔ index mapping (row or column indices of a CSR matrix).

    Attributes:
        ids: the ids in index order.
    """

    ids: tuple[str, ...]

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> Vocabulary:
        """Vocabulary of the sorted unique ``ids``."""
        return cls(tuple(sorted(set(ids))))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    @property
    def _index(self) -> dict[str, int]:
        idx = self.__dict__.get("_index_cache")
        if idx is None:
            idx = {v: i for i, v in enumerate(self.ids)}
            object.__setattr__(self, "_index_cache", idx)
        return idx

    def index(self, id_: str) -> int:
        """Index of ``id_``; raises ``KeyError`` for an unknown id."""
        return self._index[id_]

    def get(self, id_: str, default: int = -1) -> int:
        """Index of ``id_``, or ``default`` when unknown."""
        return self._index.get(id_, default)

    def indices(self, ids: Iterable[str]) -> np.ndarray:
        """Indices of ``ids`` (-1 for unknown ones)."""
        idx = self._index
        return np.fromiter((idx.get(i, -1) for i in ids), dtype=np.int64)

    def lookup(self, indices: Iterable[int]) -> list[str]:
        """Ids at ``indices``."""
        return [self.ids[int(i)] for i in indices]

    def enum(self) -> pl.Enum:
        """A Polars Enum whose physical codes are this vocabulary's indices."""
        return pl.Enum(list(self.ids))

    def to_frame(self, column: str) -> pl.DataFrame:
        return pl.DataFrame(
            {"index": np.arange(len(self.ids), dtype=np.int32), column: list(self.ids)},
            schema={"index": pl.Int32, column: pl.String},
        )

    def save(self, path: str | Path, column: str) -> None:
        self.to_frame(column).write_parquet(path)

    @classmethod
    def load(cls, path: str | Path, column: str) -> Vocabulary:
        df = pl.read_parquet(path).sort("index")
        return cls(tuple(df[column].to_list()))
