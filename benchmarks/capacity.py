"""Capacity figures for the README's "Scaling" section: memory, throughput, state-store writes, ALS fit time.

Usage::

    .venv/bin/python benchmarks/capacity.py [--data benchmarks/out/serving-world] [--seconds 4]
        [--probe 20] [--write-events 2000] [--write-decisions 500] [--stores sqlite,postgresql]
        [--postgres-url URL] [--als 50000x10000:1000000,100000x20000:2000000,200000x50000:4000000,…]
        [--als-threads 1,2] [--skip-serving] [--json]

Measures, on the serving benchmark's world (20,000 customers, ~20,000 items, ALS with 64 factors: prepared once by
``benchmarks/serving.py``'s ``prepare`` when missing):

1. **Memory of a serving process.** RSS (psutil) before and after ``Engine.load``, and the loaded structures
   attributed by size: the dataset side (``engine.data``: Polars frames by ``estimated_size()``, SciPy sparse
   matrices by their three arrays, the per-customer Python indexes by their objects' ``sys.getsizeof``), the
   recommender (item and user factors, the matrix it ranks from, its vocabularies) and the propensity model
   (network parameters, the affinity's item factors). Buffers shared between structures are counted once.
   Derived: bytes per customer (customer-proportional structures / customers), bytes per item factor (item
   factor arrays / (items × factors)) and per user factor, and the live state per customer with live events.
2. **Requests/s per worker, in process**: ``engine.recommend`` (``n`` 10) and ``engine.next_best_action`` (web,
   ``n`` 3, ``record_contact`` false) on one thread for ``--seconds`` each (no HTTP; the HTTP figures are those
   recorded in ``benchmarks/README.md``, "State store and workers").
3. **State-store writes per event and per decision**: the rows each table gains, and the SQL statements and
   commits issued, per ``engine.events`` call with one ``view`` event and per recorded ``next_best_action`` (web,
   3 actions, ``record_contact`` true), over ``--probe`` calls of each; then the store's growth over
   ``--write-events`` and ``--write-decisions`` more (SQLite: file size after a checkpoint; PostgreSQL:
   ``pg_total_relation_size`` of every table and the WAL bytes written, on an embedded PostgreSQL 18 or
   ``--postgres-url``).
4. **ALS fit time on CPU** against the matrix size: implicit's ``AlternatingLeastSquares`` (64 factors, 10
   iterations, ``--als-threads`` threads) on synthetic matrices (uniform customers, Zipf-distributed items) of
   growing size (:data:`DEFAULT_ALS`); seconds per iteration per million non-zeros, to extrapolate. Not on a GPU: implicit's GPU
   build needs CUDA (``benchmarks/propensity_device.py`` measures the propensity network on CUDA where one is).

Prints the figures; ``--json`` adds them as one JSON object on the last line. ``--skip-serving`` runs the ALS
fits alone. The four measurements stay in one file (past 600 lines) because the README's capacity plan reads
them together from one run; each is a function of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; the project root must come first instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

DEFAULT_DATA = Path("benchmarks/out/serving-world")
DEFAULT_ALS = "50000x10000:1000000,100000x20000:2000000,200000x50000:4000000,80000x20000:4000000"
"""Customers × items : drawn interactions (fewer non-zeros after duplicates merge): ~18 per customer, then ~41."""
MIB = 1024**2
ALS_ITERATIONS = 10


# --- sizing objects -----------------------------------------------------------------------------------------


class Sizer:
    """Bytes held by objects, each buffer counted once across every call (shared arrays are not counted twice).

    NumPy arrays count their base buffer; SciPy sparse matrices their ``data``, ``indices`` and ``indptr``;
    Polars frames ``estimated_size()``; torch modules their parameters and buffers; Python containers and
    objects ``sys.getsizeof`` of themselves and of what they hold.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._keep: list[Any] = []  # keeps what was seen alive, so that no id is reused

    def _first(self, obj: Any) -> bool:
        if id(obj) in self.seen:
            return False
        self.seen.add(id(obj))
        self._keep.append(obj)
        return True

    def bytes(self, obj: Any) -> int:
        import polars as pl
        import scipy.sparse as sp
        import torch

        if obj is None or isinstance(obj, type | types.ModuleType | types.FunctionType | types.MethodType):
            return 0
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            return int(base.nbytes) if self._first(base) else 0
        if not self._first(obj):
            return 0
        if sp.issparse(obj):
            return sum(self.bytes(getattr(obj, a, None)) for a in ("data", "indices", "indptr"))
        if isinstance(obj, pl.DataFrame | pl.Series):
            return int(obj.estimated_size())
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
            return sum(t.element_size() * t.nelement() for t in tensors)
        if isinstance(obj, torch.Tensor):
            return obj.element_size() * obj.nelement()
        size = sys.getsizeof(obj)
        if isinstance(obj, dict):
            return size + sum(self.bytes(k) + self.bytes(v) for k, v in obj.items())
        if isinstance(obj, list | tuple | set | frozenset):
            return size + sum(self.bytes(v) for v in obj)
        if isinstance(obj, str | bytes | int | float | bool | Path):
            return size
        held = getattr(obj, "__dict__", None)
        if held is not None:
            size += self.bytes(held)
        for name in getattr(type(obj), "__slots__", ()):
            size += self.bytes(getattr(obj, name, None))
        return size


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


# --- 1. memory ------------------------------------------------------------------------------------------------


CUSTOMER_DATA = (
    "interactions",
    "interaction_customers",
    "events",
    "event_customers",
    "event_starts",
    "event_counts",
    "purchased_at",
    "strongest",
    "features",
    "customers",
    "consent",
)
"""``ServingData`` fields whose size grows with the customers (and their events)."""
ITEM_DATA = ("items", "item_vocab", "item_attributes", "popularity", "segment_popularity")
"""``ServingData`` fields whose size grows with the items."""


def load_engine(data: Path, state_dir: Path) -> tuple[Any, dict[str, float]]:
    """The serving engine on ``data`` (its own registry), with the RSS and time its loading took."""
    from benchmarks.serving import prepare, tracking_uri
    from nextbest.serving.engine import Engine, EngineConfig

    prepare(data, 20_000, 20_000, 42)
    config = EngineConfig(
        data=data, tracking_uri=tracking_uri(data), state_dir=state_dir, model_poll_seconds=0
    )
    gc.collect()
    before = rss()
    started = time.perf_counter()
    first = Engine.load(config)
    seconds = time.perf_counter() - started
    gc.collect()
    after = rss()
    # The first load also imports what loading needs (MLflow's model flavours, torch's kernels …); a second
    # engine, loaded while the first is held, shows what the data and the models alone add.
    second = Engine.load(config.model_copy(update={"state_dir": state_dir.with_name(state_dir.name + "-2")}))
    gc.collect()
    again = rss()
    first.close()
    return second, {
        "rss_before_load": before,
        "rss_after_load": after,
        "rss_second_load_delta": again - after,
        "load_seconds": seconds,
    }


def _factor_arrays(model: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The (item, user) factor arrays of a recommender (a blend's CF part), or None."""
    implicit_model = getattr(model, "implicit_model", None)
    if implicit_model is None and getattr(model, "cf", None) is not None:
        return _factor_arrays(model.cf)
    if implicit_model is None:
        return None, None
    items = getattr(implicit_model, "item_factors", None)
    users = getattr(implicit_model, "user_factors", None)
    return (
        None if items is None else np.asarray(items),
        None if users is None else np.asarray(users),
    )


def memory(engine: Any, rss_figures: dict[str, float]) -> dict[str, Any]:
    """Attribute the loaded engine's memory to the customers, the items and the fixed part."""
    data = engine.data
    sizer = Sizer()
    parts: dict[str, int] = {}
    customer_parts: list[str] = []
    item_factor_parts: list[str] = []
    user_factor_parts: list[str] = []
    item_parts: list[str] = []

    # The models first, so that a factor array also referenced elsewhere is counted as a factor array.
    for arm, slot in engine.recommenders.items():
        bundle = slot.registered.model
        item_factors, user_factors = _factor_arrays(bundle.model)
        for name, array, group in (
            ("item_factors", item_factors, item_factor_parts),
            ("unit_item_factors", slot.unit_factors, item_factor_parts),
            ("user_factors", user_factors, user_factor_parts),
        ):
            key = f"recommender[{arm}].{name}"
            parts[key] = sizer.bytes(array)
            group.append(key)
        key = f"recommender[{arm}].history_matrix+customer_vocab"
        parts[key] = sizer.bytes(bundle.history.matrix) + sizer.bytes(bundle.history.customers)
        customer_parts.append(key)
        key = f"recommender[{arm}].item_maps"
        parts[key] = (
            sizer.bytes(bundle.history.items)
            + sizer.bytes(slot.from_base)
            + sizer.bytes(slot.to_base)
            + sizer.bytes(slot.items)
        )
        item_parts.append(key)
        # What remains of the model: per-customer flags and per-item popularity, config; counted as customers'.
        key = f"recommender[{arm}].model_rest"
        parts[key] = sizer.bytes(bundle.model)
        customer_parts.append(key)
    for arm, slot in engine.propensities.items():
        model = slot.registered.model
        parts[f"propensity[{arm}].network"] = sizer.bytes(model.net)
        affinity = model.affinity
        if affinity is not None:
            factors = next(
                (v for v in vars(affinity).values() if isinstance(v, np.ndarray) and v.ndim == 2), None
            )
            key = f"propensity[{arm}].affinity_item_factors"
            parts[key] = sizer.bytes(factors)
            item_factor_parts.append(key)
            key = f"propensity[{arm}].affinity_rest"
            parts[key] = sizer.bytes(affinity)
            item_parts.append(key)
        parts[f"propensity[{arm}].encoder_calibration"] = sizer.bytes(model.encoder) + sizer.bytes(
            model.calibration
        )
    for name in CUSTOMER_DATA:
        key = f"data.{name}"
        parts[key] = sizer.bytes(getattr(data, name))
        customer_parts.append(key)
    for name in ITEM_DATA:
        key = f"data.{name}"
        parts[key] = sizer.bytes(getattr(data, name))
        item_parts.append(key)
    rest = [f.name for f in dataclasses.fields(data) if f.name not in CUSTOMER_DATA + ITEM_DATA]
    parts["data.rest"] = sum(sizer.bytes(getattr(data, name)) for name in rest)

    customers = len(data.all_customer_ids())
    slot = engine.recommenders["champion"]
    item_factors, user_factors = _factor_arrays(slot.registered.model.model)
    n_items, factors = item_factors.shape if item_factors is not None else (len(data.item_vocab), 0)
    fitted_customers = user_factors.shape[0] if user_factors is not None else 0
    factor_arrays = sum(parts[k] for k in item_factor_parts)
    customer_bytes = sum(parts[k] for k in customer_parts) + sum(parts[k] for k in user_factor_parts)
    attributed = sum(parts.values())
    return {
        "customers": customers,
        "items": len(data.item_vocab),
        "factors": int(factors),
        "events_in_memory": int(data.events.height),
        "interactions_nnz": int(data.interactions.nnz),
        "events_per_customer": data.events.height / customers,
        "nnz_per_customer": data.interactions.nnz / customers,
        "parts_bytes": parts,
        "customer_parts": customer_parts + user_factor_parts,
        "item_factor_parts": item_factor_parts,
        "attributed_bytes": attributed,
        "customer_bytes": customer_bytes,
        "bytes_per_customer": customer_bytes / customers,
        "bytes_per_item_factor": factor_arrays / (n_items * factors) if factors else None,
        "item_factor_copies": len(item_factor_parts),
        "bytes_per_user_factor": (
            sum(parts[k] for k in user_factor_parts) / (fitted_customers * factors) if factors else None
        ),
        "item_bytes_other": sum(parts[k] for k in item_parts),
        "bytes_per_item_other": sum(parts[k] for k in item_parts) / len(data.item_vocab),
        **rss_figures,
        "rss_load_delta": rss_figures["rss_after_load"] - rss_figures["rss_before_load"],
    }


def live_state_bytes(engine: Any) -> dict[str, float]:
    """Bytes of the live state per customer with live events (what ``/events`` adds in memory)."""
    live = dict(engine._live)
    total = Sizer().bytes(live)
    events = sum(len(c.events) for c in live.values())
    return {
        "live_customers": len(live),
        "live_events": events,
        "live_bytes": total,
        "live_bytes_per_customer": total / max(len(live), 1),
    }


# --- 2. throughput --------------------------------------------------------------------------------------------


def throughput(engine: Any, customers: list[str], seconds: float) -> dict[str, dict[str, float]]:
    """Calls per second of ``recommend`` and ``next_best_action`` on one thread, in process."""
    from nextbest.serving import api

    calls: dict[str, Callable[[str], Any]] = {
        "recommend": lambda c: engine.recommend(api.RecommendRequest(customer_id=c, n=10)),
        "next_best_action": lambda c: engine.next_best_action(
            api.NextBestActionRequest(customer_id=c, channel="web", n=3, record_contact=False)
        ),
    }
    out: dict[str, dict[str, float]] = {}
    for name, call in calls.items():
        for c in customers[:50]:
            call(c)
        done = 0
        cpu = time.thread_time()
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            call(customers[done % len(customers)])
            done += 1
        cpu = time.thread_time() - cpu
        out[name] = {"calls": done, "per_second": done / elapsed, "cpu_ms_per_call": 1000 * cpu / done}
    return out


# --- 3. state-store writes --------------------------------------------------------------------------------------


def table_rows(store: Any) -> dict[str, int]:
    import sqlalchemy as sa

    from nextbest.serving.state_store import metadata

    with store.readers.connect() as c:
        return {
            name: int(c.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)
            for name, table in metadata.tables.items()
        }


@contextlib.contextmanager
def counting_statements(store: Any) -> Iterator[dict[str, int]]:
    """Counts the writing statements (by verb) and the commits on the store's writing connection pool."""
    import sqlalchemy as sa

    counts: dict[str, int] = {}

    def statement(conn: Any, cursor: Any, text: str, params: Any, context: Any, many: bool) -> None:
        verb = text.lstrip().split(None, 1)[0].upper() if text.strip() else "?"
        if verb in ("INSERT", "UPDATE", "DELETE"):
            counts[verb] = counts.get(verb, 0) + 1

    def commit(conn: Any) -> None:
        counts["COMMIT"] = counts.get("COMMIT", 0) + 1

    sa.event.listen(store.engine, "before_cursor_execute", statement)
    sa.event.listen(store.engine, "commit", commit)
    try:
        yield counts
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", statement)
        sa.event.remove(store.engine, "commit", commit)


def event_call(engine: Any, customer_id: str, item_id: str) -> Callable[[], Any]:
    """One ``engine.events`` call: a ``view`` of ``item_id`` by ``customer_id``, with a fresh event id."""
    from nextbest.serving import api

    def call() -> Any:
        event = api.EventIn(
            customer_id=customer_id, item_id=item_id, event_type="view", event_id=uuid.uuid4().hex
        )
        return engine.events(api.EventsRequest(events=[event]))

    return call


def decision_call(engine: Any, customer_id: str) -> Callable[[], Any]:
    """One recorded ``engine.next_best_action`` (web, 3 actions): a logged decision and its contacts."""
    from nextbest.serving import api

    request = api.NextBestActionRequest(customer_id=customer_id, channel="web", n=3, record_contact=True)
    return lambda: engine.next_best_action(request)


def store_bytes(store: Any) -> dict[str, int]:
    """The store's size: SQLite's files after a checkpoint; PostgreSQL's tables (with indexes and TOAST)."""
    import sqlalchemy as sa

    from nextbest.serving.state_store import metadata

    if store.dialect == "sqlite":
        store.checkpoint()
        path = Path(sa.make_url(store.url).database or "")
        files = [path, path.with_name(path.name + "-wal")]
        return {"total": sum(f.stat().st_size for f in files if f.exists())}
    with store.readers.connect() as c:
        sizes = {
            name: int(c.execute(sa.text(f"SELECT pg_total_relation_size('{name}')")).scalar() or 0)
            for name in metadata.tables
        }
        sizes["wal_lsn"] = int(
            c.execute(sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")).scalar() or 0
        )
    sizes["total"] = sum(v for k, v in sizes.items() if k != "wal_lsn")
    return sizes


def write_cost(engine: Any, calls: list[Callable[[], Any]], probe: int) -> dict[str, Any]:
    """Rows per table and statements per call over the first ``probe`` calls, then the store's growth in bytes
    per call over the rest (``calls`` each write one thing: an event, a decision)."""
    store = engine.store
    before = table_rows(store)
    with counting_statements(store) as counts:
        for call in calls[:probe]:
            call()
    after = table_rows(store)
    size_before = store_bytes(store)
    times = []
    for call in calls[probe:]:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    time.sleep(0.5)
    size_after = store_bytes(store)
    grown = len(times)
    growth = {k: (size_after[k] - size_before.get(k, 0)) / grown for k in size_after if k != "wal_lsn"}
    out: dict[str, Any] = {
        "rows_per_call": {t: (after[t] - before[t]) / probe for t in after if after[t] != before[t]},
        "statements_per_call": {k: v / probe for k, v in counts.items()},
        "calls_grown": grown,
        "bytes_per_call": growth.pop("total"),
        "bytes_per_call_by_table": {k: v for k, v in growth.items() if v},
        "calls_per_second_one_thread": grown / sum(times),
        "call_p50_ms": 1000 * sorted(times)[grown // 2],
    }
    if "wal_lsn" in size_after:
        out["wal_bytes_per_call"] = (size_after["wal_lsn"] - size_before["wal_lsn"]) / grown
    return out


def store_writes(
    engine: Any, customers: list[str], items: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """What one-event ``/events`` calls and recorded decisions write to the engine's store."""
    rng = random.Random(args.seed)
    n_events = args.probe + args.write_events
    events = [event_call(engine, customers[k % len(customers)], rng.choice(items)) for k in range(n_events)]
    # Decisions for other customers than the first events', so that no contact limit is reached.
    n_decisions = args.probe + args.write_decisions
    decisions = [decision_call(engine, customers[-1 - k % len(customers)]) for k in range(n_decisions)]
    return {
        "dialect": engine.store.dialect,
        "event": write_cost(engine, events, args.probe),
        "decision": write_cost(engine, decisions, args.probe),
    }


# --- 4. ALS fit time ------------------------------------------------------------------------------------------


def synthetic_matrix(users: int, items: int, nnz: int, seed: int) -> Any:
    """``users × items`` CSR of about ``nnz`` entries: customers uniform, items Zipf(1) by popularity rank."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1)
    item_of = rng.choice(items, size=nnz, p=weights / weights.sum()).astype(np.int32)
    user_of = rng.integers(0, users, size=nnz, dtype=np.int32)
    values = rng.integers(1, 6, size=nnz).astype(np.float32)
    matrix = sp.csr_matrix((values, (user_of, item_of)), shape=(users, items), dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def als_fit_times(
    shapes: list[tuple[int, int, int]], threads: list[int], seed: int
) -> list[dict[str, float]]:
    """implicit's CPU ALS (64 factors, 10 iterations) fitted once per matrix shape and thread count.

    Reports wall seconds and the process's CPU seconds (user + system over every thread): on a shared machine
    the CPU seconds of a one-thread fit are the figure neighbours move least.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    out = []
    for users, items, nnz in shapes:
        matrix = synthetic_matrix(users, items, nnz, seed)
        for n in threads:
            model = AlternatingLeastSquares(
                factors=64, iterations=ALS_ITERATIONS, num_threads=n, random_state=seed
            )
            with threadpool_limits(1, "blas"):
                cpu = cpu_seconds()
                started = time.perf_counter()
                model.fit(matrix, show_progress=False)
                seconds = time.perf_counter() - started
                cpu = cpu_seconds() - cpu
            m_nnz = matrix.nnz / 1e6
            out.append(
                {
                    "users": users,
                    "items": items,
                    "nnz": int(matrix.nnz),
                    "threads": n,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "seconds_per_iteration_per_m_nnz": seconds / ALS_ITERATIONS / m_nnz,
                    "cpu_seconds_per_iteration_per_m_nnz": cpu / ALS_ITERATIONS / m_nnz,
                    "load_average": os.getloadavg()[0],
                }
            )
            print(als_line(out[-1]), file=sys.stderr)
            del model
        del matrix
    return out


def als_line(fig: dict[str, float]) -> str:
    return (
        f"ALS {fig['users']:,} × {fig['items']:,}, {fig['nnz']:,} nnz, {fig['threads']} thread(s): "
        f"{fig['seconds']:.1f} s wall, {fig['cpu_seconds']:.1f} s CPU for {ALS_ITERATIONS} iterations; "
        f"{fig['seconds_per_iteration_per_m_nnz']:.3f} s wall and "
        f"{fig['cpu_seconds_per_iteration_per_m_nnz']:.3f} s CPU per iteration per M nnz "
        f"(load {fig['load_average']:.1f})"
    )


# --- main -------------------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``50000x10000:1000000,…`` → [(users, items, nnz), …]."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, nnz = part.split(":")
        users, items = size.lower().split("x")
        shapes.append((int(users), int(items), int(nnz)))
    return shapes


def report(results: dict[str, Any]) -> str:
    """The figures as text."""
    lines: list[str] = []
    mem = results.get("memory")
    if mem:
        lines.append(
            f"world: {mem['customers']:,} customers, {mem['items']:,} items, {mem['factors']} factors, "
            f"{mem['events_in_memory']:,} events in memory ({mem['events_per_customer']:.1f}/customer), "
            f"{mem['interactions_nnz']:,} interactions ({mem['nnz_per_customer']:.1f}/customer)"
        )
        lines.append(
            f"RSS {mem['rss_before_load'] / MIB:.0f} MiB before load, {mem['rss_after_load'] / MIB:.0f} MiB "
            f"after ({mem['rss_load_delta'] / MIB:.0f} MiB for the first load, imports included, "
            f"{mem['load_seconds']:.1f} s); a second engine added {mem['rss_second_load_delta'] / MIB:.0f} MiB; "
            f"attributed {mem['attributed_bytes'] / MIB:.0f} MiB"
        )
        for name, size in sorted(mem["parts_bytes"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<52} {size / MIB:9.2f} MiB")
        lines.append(
            f"bytes per customer {mem['bytes_per_customer']:,.0f}; bytes per item factor "
            f"{mem['bytes_per_item_factor']:.1f} ({mem['item_factor_copies']} copies); bytes per user factor "
            f"{mem['bytes_per_user_factor']:.1f}; other bytes per item {mem['bytes_per_item_other']:,.0f}"
        )
    for name, fig in (results.get("throughput") or {}).items():
        lines.append(
            f"in process, one thread: {name} {fig['per_second']:.0f} calls/s "
            f"({fig['cpu_ms_per_call']:.2f} ms CPU per call)"
        )
    for fig in results.get("store", []):
        for kind in ("event", "decision"):
            cost = fig[kind]
            wal = f", WAL {cost['wal_bytes_per_call']:.0f} B" if "wal_bytes_per_call" in cost else ""
            lines.append(
                f"{fig['dialect']}, one {kind} per call: rows {cost['rows_per_call']}, statements "
                f"{cost['statements_per_call']}; {cost['bytes_per_call']:.0f} B per call over "
                f"{cost['calls_grown']:,} calls {cost['bytes_per_call_by_table']}{wal}; "
                f"{cost['calls_per_second_one_thread']:.0f} calls/s on one thread, p50 {cost['call_p50_ms']:.1f} ms"
            )
    live = results.get("live")
    if live:
        lines.append(
            f"live state: {live['live_customers']:,} customers with {live['live_events']:,} live events, "
            f"{live['live_bytes_per_customer']:,.0f} B per customer"
        )
    lines.extend(als_line(fig) for fig in results.get("als", []))
    return "\n".join(lines)


def serving_figures(args: argparse.Namespace, stores: list[str]) -> dict[str, Any]:
    """Memory, in-process throughput and state-store writes of the engine on ``args.data``."""
    from benchmarks.serving import Postgres, sample_customers, sample_items
    from nextbest.serving.engine import Engine

    out: dict[str, Any] = {"store": []}
    with tempfile.TemporaryDirectory(prefix="nextbest-capacity-") as tmp:
        engine, rss_figures = load_engine(args.data, Path(tmp) / "sqlite")
        try:
            out["memory"] = memory(engine, rss_figures)
            customers = sample_customers(engine, 2000, args.seed)
            items = sample_items(engine, 2000, args.seed)
            out["throughput"] = throughput(engine, customers, args.seconds)
            if "sqlite" in stores:
                out["store"].append(store_writes(engine, customers, items, args))
                out["live"] = live_state_bytes(engine)
            if "postgresql" in stores:
                with contextlib.closing(Postgres(args.postgres_url, Path(tmp) / "postgres")) as server:
                    url = server.database("capacity")
                    config = engine.config.model_copy(
                        update={"state_dir": Path(tmp) / "pg", "state_url": url}
                    )
                    # The same models and data, another store: nothing is loaded twice.
                    other = Engine(config, engine.models, engine.data)
                    try:
                        out["store"].append(store_writes(other, customers, items, args))
                    finally:
                        other.close()
        finally:
            engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seconds", type=float, default=4.0, help="per endpoint, in-process throughput")
    parser.add_argument("--probe", type=int, default=20, help="calls of each kind whose rows are counted")
    parser.add_argument("--write-events", type=int, default=2000, help="one-event calls for bytes per event")
    parser.add_argument("--write-decisions", type=int, default=500, help="recorded decisions for their bytes")
    parser.add_argument("--stores", default="sqlite,postgresql", help="sqlite, postgresql, or none")
    parser.add_argument("--postgres-url", default=None, help="else an embedded PostgreSQL is started")
    parser.add_argument("--als", default=DEFAULT_ALS, help="USERSxITEMS:NNZ,…; empty skips the ALS fits")
    parser.add_argument("--als-threads", default="1,2", help="thread counts, each fitted on every matrix")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-serving", action="store_true", help="only the ALS fits")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["load_average"] = os.getloadavg()
    if not args.skip_serving:
        stores = [s for s in args.stores.split(",") if s and s != "none"]
        results.update(serving_figures(args, stores))
    if args.als:
        threads = [int(t) for t in args.als_threads.split(",") if t]
        results["als"] = als_fit_times(parse_shapes(args.als), threads, args.seed)
    results["load_average_end"] = os.getloadavg()
    print(report(results))
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
