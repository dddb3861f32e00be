"""The service's live state in one SQL store: SQLite on one machine, PostgreSQL beyond it.

One implementation (SQLAlchemy Core) behind two URLs:

* ``sqlite:///DATA/service/state.db`` — the embedded default, nothing to start. WAL journal, ``synchronous=FULL``
  (a commit is on disk before it returns) and writes serialised by ``BEGIN IMMEDIATE``: several processes on one
  machine may share it;
* ``postgresql://user:pass@host/db`` — several replicas on several machines. Contact decisions for one customer
  are serialised by a transaction-scoped advisory lock on the customer, so that two replicas deciding at the
  same moment cannot both spend the last contact the policy allows.

What it holds: the events received live (idempotent by ``event_id``), the contact ledger (contacts and
responses), the decision log (with each decision's logging probability and whether it explored), the responses
to decisions (shown, accepted, dismissed, converted: idempotent by ``response_id``, at most one of each kind per
decision and action), the levers and their history, the erasures (by keyed digest), the erasure queue and its
states. Every write also appends to ``changes``, in the same transaction: a replica asks for the
changes after the last one it applied (:meth:`StateStore.changes_since`), one indexed query, and so learns of
another replica's events, contacts, erasures and lever changes.

The schema is created on first use and versioned (``meta.schema_version``): a store written by a newer nextbest
is refused with a message saying so, one written by an older version is migrated (:data:`MIGRATIONS`), and
tables without a version (not ours) are refused. A state directory of the JSON-lines format of earlier versions
is imported once (:func:`import_state_dir`).

Why it is longer than the project's ~600 lines: it is the one place that writes the store, and every write keeps
one discipline: the write lock first (PostgreSQL's advisory lock, SQLite's ``BEGIN IMMEDIATE``), then the row and
its ``changes`` entry in the same transaction, so that replicas apply changes in commit order. Erasure, retention
and the migrations cross every table in one transaction. Split by table, each file would need the lock, the
change feed and the schema version of all the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nextbest.features.dataset_lock import advisory_lock_key
from nextbest.features.errors import NextbestError
from nextbest.features.schema import (
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    ITEM_ID,
    PRICE,
    QUANTITY,
    SESSION_ID,
    TIMESTAMP_COL,
)

SCHEMA_VERSION = 2
"""1: the first; 2: the ``responses`` table, and ``explored`` and ``probability`` on ``decisions``."""
STATE_DB = "state.db"
"""The embedded store's file in the state directory."""


class StateStoreError(NextbestError, RuntimeError):
    """The store cannot be used as it is; the message says what to run or set."""


class ResponseConflict(ValueError):
    """A response of the same kind for the same decision and action is stored already."""


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def default_state_url(state_dir: Path) -> str:
    """The embedded store of a state directory: ``sqlite:///STATE_DIR/state.db``."""
    return f"sqlite:///{(Path(state_dir) / STATE_DB).as_posix()}"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(an invalid URL)"


def store_key(url: str) -> str:
    """How a store is named where its changes are remembered (the fold manifest of ``nextbest retrain``): its URL
    without password, a SQLite path made absolute."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return redact(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return f"sqlite:///{Path(parsed.database).resolve().as_posix()}"
    return redact(url)


# --- the schema ----------------------------------------------------------------------------------------------

metadata = sa.MetaData()
Id = sa.String(128)
Seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""Row numbers: 64-bit on PostgreSQL; SQLite's INTEGER PRIMARY KEY is its rowid (64-bit already)."""

meta = sa.Table(
    "meta", metadata, sa.Column("key", sa.String(200), primary_key=True), sa.Column("value", sa.Text)
)
changes = sa.Table(
    "changes",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("customer_id", Id),
    sa.Column("ref", Seq),
    sa.Column("at", sa.DateTime, nullable=False),
)
events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("event_id", Id, unique=True),
    sa.Column("customer_id", Id, nullable=False, index=True),
    sa.Column("item_id", Id, nullable=False),
    sa.Column("event_type", sa.String(32), nullable=False),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("session_id", Id),
    sa.Column("channel", sa.String(32)),
    sa.Column("quantity", sa.Integer),
    sa.Column("price", sa.Float),
)
contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("event_id", Id, unique=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("customer_id", Id, nullable=False),
    sa.Column("action_id", Id, nullable=False),
    sa.Column("channel", sa.String(32)),
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("accepted", sa.Boolean),
    sa.Index("contacts_by_customer", "customer_id", "at"),
)
decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(64), nullable=False, unique=True),
    sa.Column("customer_id", Id, nullable=False, index=True),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("record", sa.Text, nullable=False),
    # Version 2. Also in ``record``; as columns so that the exploration budget counts without reading records.
    sa.Column("explored", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("probability", sa.Float, nullable=False, server_default=sa.text("1.0")),
)
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("response_id", Id, nullable=False, unique=True),
    sa.Column("decision_id", Id),  # null: a response that names no decision (the form of earlier versions)
    sa.Column("customer_id", Id, nullable=False, index=True),
    sa.Column("action_id", Id, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("channel", sa.String(32)),
    # Also the index by decision: its first column is decision_id.
    sa.UniqueConstraint("decision_id", "action_id", "kind", name="responses_once_per_kind"),
)
levers = sa.Table(
    "levers",
    metadata,
    sa.Column("action_id", Id, primary_key=True),
    sa.Column("lever", sa.Float, nullable=False),
)
lever_changes = sa.Table(
    "lever_changes",
    metadata,
    sa.Column("seq", Seq, primary_key=True, autoincrement=True),
    sa.Column("change", sa.Text, nullable=False),
)
erased = sa.Table(
    "erased",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("erased_at", sa.DateTime, nullable=False),
)
erasure_queue = sa.Table(
    "erasure_queue",
    metadata,
    sa.Column("erasure_id", sa.String(64), primary_key=True),
    sa.Column("customer_id", Id, nullable=False),
    sa.Column("queued_at", sa.DateTime, nullable=False),
)
erasures = sa.Table(
    "erasures",
    metadata,
    sa.Column("erasure_id", sa.String(64), primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("requested_at", sa.DateTime, nullable=False, index=True),
)

EVENT_COLUMNS: tuple[str, ...] = (
    CUSTOMER_ID,
    ITEM_ID,
    EVENT_TYPE,
    TIMESTAMP_COL,
    SESSION_ID,
    CHANNEL,
    QUANTITY,
    PRICE,
)
"""The columns of an event the service keeps: the contract's, less ``source_system`` (ids arrive resolved)."""
CONTACT_COLUMNS = ("type", "customer_id", "action_id", "channel", "at", "accepted", "event_id")
RESPONSE_COLUMNS: tuple[str, ...] = (
    "response_id",
    "decision_id",
    "customer_id",
    "action_id",
    "kind",
    "value",
    "timestamp",
    "channel",
)
"""The columns of :meth:`StateStore.responses_frame`, in order."""
RESPONSES_SCHEMA: dict[str, pl.DataType] = {
    "response_id": pl.String(),
    "decision_id": pl.String(),
    "customer_id": pl.String(),
    "action_id": pl.String(),
    "kind": pl.String(),
    "value": pl.Float64(),
    "timestamp": pl.Datetime("us"),
    "channel": pl.String(),
}
DECISIONS_SCHEMA: dict[str, pl.DataType] = {
    "decision_id": pl.String(),
    "timestamp": pl.Datetime("us"),
    "customer_id": pl.String(),
    "arm": pl.String(),
    "chosen": pl.String(),
    "chosen_kind": pl.String(),
    "policy_version": pl.String(),
    "explored": pl.Boolean(),
    "probability": pl.Float64(),
    "record": pl.String(),
}
"""The columns of :meth:`StateStore.decisions_frame`; ``record`` is the whole decision record as JSON
(:class:`~serving.decision_log.DecisionRecord` reads it back)."""


# --- migrations ------------------------------------------------------------------------------------------------


def _migrate_1_to_2(c: Connection) -> None:
    """Version 2: the ``responses`` table (the responses of the contact ledger copied in, tied to no decision),
    and ``explored`` / ``probability`` on ``decisions`` (every earlier decision was deterministic: false, 1.0)."""
    responses.create(c)
    c.execute(sa.text("ALTER TABLE decisions ADD COLUMN explored BOOLEAN NOT NULL DEFAULT false"))
    c.execute(sa.text("ALTER TABLE decisions ADD COLUMN probability FLOAT NOT NULL DEFAULT 1.0"))
    kind = sa.case((contacts.c.accepted, "accepted"), else_="dismissed")
    response_id = sa.func.coalesce(
        contacts.c.event_id, sa.literal("contact-", sa.String) + sa.cast(contacts.c.seq, sa.String)
    )
    earlier = sa.select(
        response_id.label("response_id"),
        sa.literal(None, Id).label("decision_id"),
        contacts.c.customer_id,
        contacts.c.action_id,
        kind.label("kind"),
        sa.literal(None, sa.Float).label("value"),
        contacts.c.at.label("timestamp"),
        contacts.c.channel,
    ).where(contacts.c.type == "response")
    columns = [responses.c[name] for name in RESPONSE_COLUMNS]
    c.execute(responses.insert().from_select(columns, earlier))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2}
"""Version N → the step that brings a store of version N to N + 1."""


# --- the store -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One write, as other replicas learn of it."""

    seq: int
    kind: str
    """``event``, ``contact``, ``decision``, ``response``, ``lever``, ``erasure``, ``forget`` or ``trim``."""
    customer_id: str | None
    ref: int | None
    """The row the change wrote (events, contacts), where there is one."""


class StateStore:
    """The live state of the service in a SQL database (see the module doc). Thread-safe; share one per process.

    Args:
        url: ``sqlite:///path/state.db`` or ``postgresql://…``.
        create: create the schema when the database has none (otherwise a missing schema is an error).

    Raises:
        StateStoreError: the database cannot be reached, or holds a schema this version cannot use.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise StateStoreError(
                f"state store URL {url!r} is not a database URL: use sqlite:///PATH/state.db or "
                "postgresql://user:password@host/database"
            ) from None
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise StateStoreError(f"state store {redact(url)}: only sqlite and postgresql are supported")
        if self.dialect == "sqlite":
            path = parsed.database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            args = {"timeout": 30, "check_same_thread": False}
            self.engine = sa.create_engine(url, connect_args=args)
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin_immediate)
            # Reads begin DEFERRED: in WAL mode they see the last commit and never wait for a writer.
            self.readers = sa.create_engine(url, connect_args=args)
            sa.event.listen(self.readers, "connect", _sqlite_connect)
            sa.event.listen(self.readers, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
            self.readers = self.engine
        try:
            try:
                self._prepare(create)
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                # Another replica created the schema at the same moment: it is there now.
                self._prepare(create)
        except sa.exc.OperationalError as e:
            raise StateStoreError(
                f"cannot open the state store {redact(url)}: {' '.join(str(e.orig).split())}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()
        self.readers.dispose()

    def _lock_writes(self, c: Connection) -> None:
        """Writes commit in the order of their change numbers: a replica that has applied change N never misses
        a change below N committed later. PostgreSQL: one transaction-scoped advisory lock (re-entrant) taken
        before the first write; SQLite: the IMMEDIATE transaction holds the database's write lock already."""
        if self.dialect == "postgresql":
            c.execute(sa.text("SELECT pg_advisory_xact_lock(0)"))

    @contextmanager
    def _writing(self, connection: Connection | None = None) -> Iterator[Connection]:
        if connection is not None:
            self._lock_writes(connection)
            yield connection
            return
        with self.engine.begin() as c:
            self._lock_writes(c)
            yield c

    # --- schema ---------------------------------------------------------------------------------------------

    def _prepare(self, create: bool) -> None:
        with self.engine.begin() as c:
            names = set(sa.inspect(c).get_table_names())
            if "meta" not in names:
                ours = names & set(metadata.tables)
                if ours:
                    raise StateStoreError(
                        f"state store {redact(self.url)} has tables {', '.join(sorted(ours))} but no schema version: "
                        "it was not written by nextbest; give an empty database"
                    )
                if not create:
                    raise StateStoreError(
                        f"state store {redact(self.url)} is empty: start the service once to create it"
                    )
                metadata.create_all(c)
                c.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(
                c.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one()
            )
            if version > SCHEMA_VERSION:
                raise StateStoreError(
                    f"state store {redact(self.url)} has schema version {version}, written by a newer nextbest "
                    f"(this one knows {SCHEMA_VERSION}): upgrade nextbest (pip install -U nextbest) to use it"
                )
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](c)
                version += 1
                c.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(version)))

    @property
    def schema_version(self) -> int:
        with self.readers.connect() as c:
            return int(c.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())

    def get_meta(self, key: str) -> str | None:
        with self.readers.connect() as c:
            return c.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()

    # --- changes --------------------------------------------------------------------------------------------

    @staticmethod
    def _changed(c: Connection, kind: str, customer_id: str | None = None, ref: int | None = None) -> None:
        c.execute(changes.insert().values(kind=kind, customer_id=customer_id, ref=ref, at=_utcnow()))

    def last_change(self) -> int:
        """The number of the latest change (0 before any)."""
        with self.readers.connect() as c:
            return int(c.execute(sa.select(sa.func.coalesce(sa.func.max(changes.c.seq), 0))).scalar_one())

    def changes_since(self, seq: int, limit: int = 10_000) -> list[Change]:
        """The changes after ``seq``, oldest first."""
        query = sa.select(changes.c.seq, changes.c.kind, changes.c.customer_id, changes.c.ref)
        with self.readers.connect() as c:
            rows = c.execute(query.where(changes.c.seq > seq).order_by(changes.c.seq).limit(limit)).all()
        return [Change(int(r.seq), r.kind, r.customer_id, r.ref) for r in rows]

    # --- events ---------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """The latest change and every stored event as of that change, read in one consistent snapshot (what a
        replica replays at start before following :meth:`changes_since`)."""
        with self.readers.connect() as c:
            if self.dialect == "postgresql":
                c = c.execution_options(isolation_level="REPEATABLE READ")
            with c.begin():
                last = int(c.execute(sa.select(sa.func.coalesce(sa.func.max(changes.c.seq), 0))).scalar_one())
                rows = [dict(r) for r in c.execute(sa.select(events).order_by(events.c.seq)).mappings()]
        return last, rows

    def known_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` are stored already."""
        with self.readers.connect() as c:
            return self._known(c, events.c.event_id, list(event_ids))

    def append_events(
        self, rows: Sequence[Mapping[str, Any]], event_ids: Sequence[str | None]
    ) -> tuple[list[int], int]:
        """Store events (contract rows) in one transaction, leaving out those whose ``event_id`` is stored already
        (or repeated in the batch).

        Returns:
            the positions in ``rows`` that were stored, and how many were left out as duplicates.
        """
        stored: list[int] = []
        duplicates = 0
        with self._writing() as c:
            known = self._known(c, events.c.event_id, [i for i in event_ids if i is not None])
            for k, (row, event_id) in enumerate(zip(rows, event_ids, strict=True)):
                if event_id is not None and event_id in known:
                    duplicates += 1
                    continue
                if event_id is not None:
                    known.add(event_id)
                values = {col: row.get(col) for col in EVENT_COLUMNS}
                seq = c.execute(events.insert().values(event_id=event_id, **values)).inserted_primary_key[0]
                self._changed(c, "event", values["customer_id"], seq)
                stored.append(k)
        return stored, duplicates

    @staticmethod
    def _known(c: Connection, column: sa.Column, ids: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            known |= set(c.execute(sa.select(column).where(column.in_(chunk))).scalars())
        return known

    def events_after(self, seq: int = 0) -> list[dict[str, Any]]:
        """Events stored after row ``seq`` (all of them by default), in order, each with its ``seq``."""
        with self.readers.connect() as c:
            rows = (
                c.execute(sa.select(events).where(events.c.seq > seq).order_by(events.c.seq)).mappings().all()
            )
        return [dict(r) for r in rows]

    def events_through(self, change: int) -> set[int]:
        """The event rows (``events.seq``) recorded by the changes up to and including ``change``: the events a
        reader that has read the changes up to ``change`` has seen (what ``nextbest retrain`` folded)."""
        with self.readers.connect() as c:
            query = sa.select(changes.c.ref).where(
                changes.c.kind == "event", changes.c.seq <= change, changes.c.ref.is_not(None)
            )
            return {int(r) for r in c.execute(query).scalars()}

    def events_by_seq(self, seqs: Iterable[int]) -> list[dict[str, Any]]:
        wanted = sorted(set(seqs))
        out: list[dict[str, Any]] = []
        with self.readers.connect() as c:
            for start in range(0, len(wanted), 500):
                query = (
                    sa.select(events)
                    .where(events.c.seq.in_(wanted[start : start + 500]))
                    .order_by(events.c.seq)
                )
                out += [dict(r) for r in c.execute(query).mappings()]
        return out

    def has_event(self, event_id: str) -> bool:
        with self.readers.connect() as c:
            return c.execute(sa.select(events.c.seq).where(events.c.event_id == event_id)).first() is not None

    # --- contacts -------------------------------------------------------------------------------------------

    def add_contact(self, entry: Mapping[str, Any], connection: Connection | None = None) -> bool:
        """Store a contact or a response; False (nothing stored) when its ``event_id`` is stored already."""
        values = {col: entry.get(col) for col in CONTACT_COLUMNS}
        with self._transaction(connection) as c:
            if values["event_id"] is not None and self._known(c, contacts.c.event_id, [values["event_id"]]):
                return False
            seq = c.execute(contacts.insert().values(**values)).inserted_primary_key[0]
            self._changed(c, "contact", values["customer_id"], seq)
        return True

    def contacts_of(self, customer_id: str, connection: Connection | None = None) -> list[dict[str, Any]]:
        """A customer's contacts and responses, oldest first."""
        query = (
            sa.select(contacts)
            .where(contacts.c.customer_id == customer_id)
            .order_by(contacts.c.at, contacts.c.seq)
        )
        with self._reading(connection) as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def all_contacts(self) -> list[dict[str, Any]]:
        """Every contact and response, oldest first."""
        with self.readers.connect() as c:
            return [
                dict(r)
                for r in c.execute(sa.select(contacts).order_by(contacts.c.at, contacts.c.seq)).mappings()
            ]

    def contact_customers(self) -> list[str]:
        with self.readers.connect() as c:
            return list(c.execute(sa.select(contacts.c.customer_id).distinct()).scalars())

    def has_contact_event(self, event_id: str) -> bool:
        with self.readers.connect() as c:
            return (
                c.execute(sa.select(contacts.c.seq).where(contacts.c.event_id == event_id)).first()
                is not None
            )

    @contextmanager
    def deciding(self, customer_id: str) -> Iterator[Connection]:
        """A transaction in which nobody else decides for ``customer_id``: read the customer's contacts, decide
        and record the contact and the decision through the connection it yields; all of it commits together."""
        with self.engine.begin() as c:
            if self.dialect == "postgresql":
                c.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_lock_key(customer_id)}
                )
            # SQLite: the transaction began IMMEDIATE, which holds the database's write lock until the commit.
            yield c

    # --- decisions ------------------------------------------------------------------------------------------

    def add_decision(self, record: Mapping[str, Any], connection: Connection | None = None) -> None:
        """Store one decision (its JSON form, as :class:`~serving.decision_log.DecisionRecord` writes it)."""
        with self._transaction(connection) as c:
            c.execute(
                decisions.insert().values(
                    decision_id=record["decision_id"],
                    customer_id=record["customer_id"],
                    timestamp=_as_datetime(record["timestamp"]),
                    record=json.dumps(record, ensure_ascii=False, default=str),
                    explored=bool(record.get("explored", False)),
                    probability=float(record.get("probability", 1.0)),
                )
            )
            self._changed(c, "decision", record["customer_id"])

    def decisions_by_id(self, decision_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored records of those of ``decision_ids`` that are stored, by id."""
        wanted = sorted(set(decision_ids))
        out: dict[str, dict[str, Any]] = {}
        with self.readers.connect() as c:
            for start in range(0, len(wanted), 500):
                query = sa.select(decisions.c.decision_id, decisions.c.record).where(
                    decisions.c.decision_id.in_(wanted[start : start + 500])
                )
                out.update({r.decision_id: json.loads(r.record) for r in c.execute(query)})
        return out

    def decisions_frame(self, since: datetime | None = None) -> pl.DataFrame:
        """The decision log as a frame, oldest first: one row per decision (:data:`DECISIONS_SCHEMA`).

        Args:
            since: only decisions at or after this time (naive UTC); None: all of them.
        """
        query = sa.select(decisions.c.record, decisions.c.explored, decisions.c.probability).order_by(
            decisions.c.seq
        )
        if since is not None:
            query = query.where(decisions.c.timestamp >= _as_datetime(since))
        rows = []
        with self.readers.connect() as c:
            for r in c.execute(query):
                record = json.loads(r.record)
                rows.append(
                    {
                        "decision_id": record["decision_id"],
                        "timestamp": _as_datetime(record["timestamp"]),
                        "customer_id": record["customer_id"],
                        "arm": record.get("arm"),
                        "chosen": record.get("chosen"),
                        "chosen_kind": record.get("chosen_kind"),
                        "policy_version": record.get("policy_version"),
                        "explored": bool(r.explored),
                        "probability": float(r.probability),
                        "record": r.record,
                    }
                )
        return pl.DataFrame(rows, schema=DECISIONS_SCHEMA)

    def exploration_counts(
        self, start: datetime, end: datetime, connection: Connection | None = None
    ) -> tuple[int, int]:
        """How many decisions were logged in ``[start, end)``, and how many of them explored."""
        explored = sa.func.coalesce(sa.func.sum(sa.case((decisions.c.explored, 1), else_=0)), 0)
        query = sa.select(sa.func.count(), explored).where(
            decisions.c.timestamp >= start, decisions.c.timestamp < end
        )
        with self._reading(connection) as c:
            total, n_explored = c.execute(query).one()
        return int(total), int(n_explored)

    # --- responses to decisions -----------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One writing transaction: pass its connection to the writes that must commit (or fail) together."""
        with self._writing() as c:
            yield c

    def known_response_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored already: as a response's id, or as the event id of a response in the
        contact ledger (what versions before 2 stored)."""
        wanted = list(dict.fromkeys(ids))
        with self.readers.connect() as c:
            return self._known(c, responses.c.response_id, wanted) | self._known(
                c, contacts.c.event_id, wanted
            )

    def response_kinds(self, decision_ids: Sequence[str]) -> set[tuple[str, str, str]]:
        """``(decision_id, action_id, kind)`` of every response stored for ``decision_ids``."""
        wanted = sorted(set(decision_ids))
        out: set[tuple[str, str, str]] = set()
        with self.readers.connect() as c:
            for start in range(0, len(wanted), 500):
                query = sa.select(responses.c.decision_id, responses.c.action_id, responses.c.kind).where(
                    responses.c.decision_id.in_(wanted[start : start + 500])
                )
                out |= {(r.decision_id, r.action_id, r.kind) for r in c.execute(query)}
        return out

    def add_response(self, row: Mapping[str, Any], connection: Connection | None = None) -> bool:
        """Store one response (the :data:`RESPONSE_COLUMNS` of ``row``).

        Returns:
            False (nothing stored) when its ``response_id`` is stored already (a retry).

        Raises:
            ResponseConflict: the decision has a response of this kind for this action already.
        """
        values = {col: row.get(col) for col in RESPONSE_COLUMNS}
        values["timestamp"] = _as_datetime(values["timestamp"])
        with self._writing(connection) as c:
            if self._known(c, responses.c.response_id, [values["response_id"]]):
                return False
            if values["decision_id"] is not None:
                same = sa.select(responses.c.seq).where(
                    responses.c.decision_id == values["decision_id"],
                    responses.c.action_id == values["action_id"],
                    responses.c.kind == values["kind"],
                )
                if c.execute(same).first() is not None:
                    raise ResponseConflict(
                        f"decision {values['decision_id']!r} has a {values['kind']!r} response for "
                        f"{values['action_id']!r} already"
                    )
            seq = c.execute(responses.insert().values(**values)).inserted_primary_key[0]
            self._changed(c, "response", values["customer_id"], seq)
        return True

    def responses_of(self, customer_id: str) -> list[dict[str, Any]]:
        """A customer's responses (:data:`RESPONSE_COLUMNS`), oldest first, read through the index."""
        query = (
            sa.select(*(responses.c[name] for name in RESPONSE_COLUMNS))
            .where(responses.c.customer_id == customer_id)
            .order_by(responses.c.timestamp, responses.c.seq)
        )
        with self.readers.connect() as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def responses_frame(self, since: datetime | None = None) -> pl.DataFrame:
        """Every stored response, oldest first, with exactly the :data:`RESPONSE_COLUMNS`.

        Args:
            since: only responses at or after this time (naive UTC); None: all of them.
        """
        query = sa.select(*(responses.c[name] for name in RESPONSE_COLUMNS)).order_by(
            responses.c.timestamp, responses.c.seq
        )
        if since is not None:
            query = query.where(responses.c.timestamp >= _as_datetime(since))
        with self.readers.connect() as c:
            rows = [tuple(r) for r in c.execute(query)]
        return pl.DataFrame(rows, schema=RESPONSES_SCHEMA, orient="row")

    def decisions_of(self, customer_id: str) -> list[dict[str, Any]]:
        query = (
            sa.select(decisions.c.record)
            .where(decisions.c.customer_id == customer_id)
            .order_by(decisions.c.seq)
        )
        with self.readers.connect() as c:
            return [json.loads(r) for r in c.execute(query).scalars()]

    def all_decisions(self) -> list[dict[str, Any]]:
        with self.readers.connect() as c:
            return [
                json.loads(r)
                for r in c.execute(sa.select(decisions.c.record).order_by(decisions.c.seq)).scalars()
            ]

    def decision_customers(self) -> list[str]:
        with self.readers.connect() as c:
            return list(c.execute(sa.select(decisions.c.customer_id).distinct()).scalars())

    # --- levers ---------------------------------------------------------------------------------------------

    def levers(self) -> dict[str, float]:
        with self.readers.connect() as c:
            return {r.action_id: float(r.lever) for r in c.execute(sa.select(levers))}

    def lever_history(self) -> list[dict[str, Any]]:
        with self.readers.connect() as c:
            return [
                json.loads(r)
                for r in c.execute(sa.select(lever_changes.c.change).order_by(lever_changes.c.seq)).scalars()
            ]

    def set_lever(self, action_id: str, value: float, change: Mapping[str, Any]) -> None:
        """Set one lever and log the change (who, when, old and new) in one transaction."""
        with self._writing() as c:
            updated = c.execute(
                levers.update().where(levers.c.action_id == action_id).values(lever=value)
            ).rowcount
            if not updated:
                c.execute(levers.insert().values(action_id=action_id, lever=value))
            c.execute(lever_changes.insert().values(change=json.dumps(change, default=str)))
            self._changed(c, "lever")

    # --- erasure --------------------------------------------------------------------------------------------

    def forget(self, ids: Sequence[str], digests: Sequence[str]) -> dict[str, int]:
        """Erase ``ids`` from events, contacts, decisions and responses and record their keyed ``digests`` as
        erased, in one transaction; returns the rows removed per table."""
        removed: dict[str, int] = {}
        now = _utcnow()
        with self._writing() as c:
            for name, table in (
                ("events", events),
                ("contacts", contacts),
                ("decisions", decisions),
                ("responses", responses),
            ):
                removed[name] = c.execute(table.delete().where(table.c.customer_id.in_(list(ids)))).rowcount
            known = self._known(c, erased.c.digest, list(digests))
            for d in digests:
                if d not in known:
                    c.execute(erased.insert().values(digest=d, erased_at=now))
            # The change names no id: replicas learn the digests from ``erased``.
            c.execute(changes.update().where(changes.c.customer_id.in_(list(ids))).values(customer_id=None))
            self._changed(c, "erasure")
        self._scrub()
        return removed

    def checkpoint(self) -> None:
        """SQLite: move the write-ahead log into the database and truncate it. Readers that follow the store
        every few milliseconds can keep SQLite's own checkpoints from ever resetting the log, which then grows,
        and every read with it; the service calls this every half minute. (Nothing to do on PostgreSQL.)"""
        self._scrub()

    def _scrub(self) -> None:
        """After an erasure: SQLite overwrites deleted rows (``secure_delete``); the checkpoint then moves the
        write-ahead log into the database and truncates it, so no earlier copy of the rows stays in a file.
        (PostgreSQL keeps deleted rows on disk until their space is reused: run VACUUM, see the README.)"""
        if self.dialect != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()

    def erased_digests(self) -> set[str]:
        with self.readers.connect() as c:
            return set(c.execute(sa.select(erased.c.digest)).scalars())

    def queue_erasure(self, erasure_id: str, customer_id: str, status: Mapping[str, Any]) -> None:
        with self._writing() as c:
            c.execute(
                erasure_queue.insert().values(
                    erasure_id=erasure_id, customer_id=customer_id, queued_at=_utcnow()
                )
            )
            self._put_status(c, erasure_id, status)

    def queued_erasures(self) -> list[tuple[str, str]]:
        """``(erasure_id, customer_id)`` of every erasure still to do, oldest first."""
        with self.readers.connect() as c:
            rows = c.execute(
                sa.select(erasure_queue.c.erasure_id, erasure_queue.c.customer_id).order_by(
                    erasure_queue.c.queued_at
                )
            )
            return [(r.erasure_id, r.customer_id) for r in rows]

    def finish_erasures(self, erasure_ids: Sequence[str], statuses: Sequence[Mapping[str, Any]]) -> None:
        """Take done erasures out of the queue (their customer ids go with them) and record their states."""
        with self._writing() as c:
            c.execute(erasure_queue.delete().where(erasure_queue.c.erasure_id.in_(list(erasure_ids))))
            for erasure_id, status in zip(erasure_ids, statuses, strict=True):
                self._put_status(c, erasure_id, status)
        self._scrub()

    def put_erasure_status(self, erasure_id: str, status: Mapping[str, Any]) -> None:
        with self._writing() as c:
            self._put_status(c, erasure_id, status)

    @staticmethod
    def _put_status(c: Connection, erasure_id: str, status: Mapping[str, Any]) -> None:
        text = json.dumps(status, default=str)
        requested = _as_datetime(status["requested_at"])
        if (
            c.execute(
                erasures.update().where(erasures.c.erasure_id == erasure_id).values(status=text)
            ).rowcount
            == 0
        ):
            c.execute(erasures.insert().values(erasure_id=erasure_id, status=text, requested_at=requested))

    def erasure_status(self, erasure_id: str) -> dict[str, Any] | None:
        with self.readers.connect() as c:
            text = c.execute(
                sa.select(erasures.c.status).where(erasures.c.erasure_id == erasure_id)
            ).scalar_one_or_none()
        return json.loads(text) if text is not None else None

    # --- retention ------------------------------------------------------------------------------------------

    def trim(self, before: datetime) -> dict[str, int]:
        """Drop what is older than ``before`` from events, contacts, decisions, responses and erasure states."""
        with self._writing() as c:
            removed = {
                "events": c.execute(events.delete().where(events.c.timestamp < before)).rowcount,
                "contacts": c.execute(contacts.delete().where(contacts.c.at < before)).rowcount,
                "decisions": c.execute(decisions.delete().where(decisions.c.timestamp < before)).rowcount,
                "responses": c.execute(responses.delete().where(responses.c.timestamp < before)).rowcount,
                "erasures": c.execute(erasures.delete().where(erasures.c.requested_at < before)).rowcount,
            }
            c.execute(changes.delete().where(changes.c.at < before))
            if any(removed.values()):
                self._changed(c, "trim")
        return removed

    # --- plumbing -------------------------------------------------------------------------------------------

    def _transaction(self, connection: Connection | None) -> Any:
        return self._writing(connection)

    @contextmanager
    def _reading(self, connection: Connection | None) -> Iterator[Connection]:
        if connection is not None:
            yield connection
        else:
            with self.readers.connect() as c:
                yield c


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return (
            value.replace(tzinfo=None) if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
        )
    text = str(value)
    parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    return _as_datetime(parsed)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by hand (IMMEDIATE, below), not by the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


# --- the JSON-lines state of earlier versions --------------------------------------------------------------------

OLD_STATE_FILES = ("events.jsonl", "contacts.jsonl", "decisions.jsonl", "levers.json")


def import_state_dir(store: StateStore, state_dir: Path) -> dict[str, int]:
    """Import a state directory written by versions before the store (JSON-lines files) into ``store``, once.

    Everything goes in one transaction; then the files are removed, so that nothing about a customer lingers
    outside the store (an erasure reaches the store only). A torn last line (a crash mid-write, never
    acknowledged) is left out, as those versions did; any other unreadable line stops the import with a message
    naming the file and the line, and nothing is imported.

    Returns:
        rows imported per file (empty when the directory holds none of those files).

    Raises:
        StateStoreError: a file cannot be read, or the store already holds an import of the same files.
    """
    from nextbest.serving.jsonl import LogError, read_lines

    present = [state_dir / name for name in OLD_STATE_FILES if (state_dir / name).exists()]
    if not present:
        return {}
    fingerprints = {
        p.name: f"imported:{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in present
    }
    again = [name for name, key in fingerprints.items() if store.get_meta(key) is not None]
    if again:
        raise StateStoreError(
            f"{state_dir} holds {', '.join(again)} again, already imported into the state store "
            f"{redact(store.url)}: remove the file(s) (what they hold is in the store)"
        )
    try:
        rows = {
            p.name: (list(read_lines(p)) if p.suffix == ".jsonl" else [json.loads(p.read_text())])
            for p in present
        }
    except (LogError, json.JSONDecodeError) as e:
        raise StateStoreError(f"cannot import {state_dir}: {e}") from None
    counts: dict[str, int] = {}
    with store.engine.begin() as c:
        for row in rows.get("events.jsonl", []):
            values = {col: row.get(col) for col in EVENT_COLUMNS}
            values["timestamp"] = _as_datetime(values["timestamp"])
            c.execute(events.insert().values(event_id=row.get("event_id"), **values))
        for row in rows.get("contacts.jsonl", []):
            values = {col: row.get(col) for col in CONTACT_COLUMNS}
            values["at"] = _as_datetime(values["at"])
            c.execute(contacts.insert().values(**values))
        for row in rows.get("decisions.jsonl", []):
            c.execute(
                decisions.insert().values(
                    decision_id=row["decision_id"],
                    customer_id=row["customer_id"],
                    timestamp=_as_datetime(row["timestamp"]),
                    record=json.dumps(row, ensure_ascii=False),
                )
            )
        for saved in rows.get("levers.json", []):
            for action_id, value in saved.get("levers", {}).items():
                c.execute(levers.insert().values(action_id=action_id, lever=float(value)))
            for change in saved.get("history", []):
                c.execute(lever_changes.insert().values(change=json.dumps(change, default=str)))
        for key in fingerprints.values():
            c.execute(meta.insert().values(key=key, value=str(state_dir)))
        StateStore._changed(c, "import")
    for p in present:
        counts[p.name] = len(rows[p.name]) if p.suffix == ".jsonl" else 1
        p.unlink()
    return counts
