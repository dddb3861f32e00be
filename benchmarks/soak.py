"""Soak test of the HTTP service: a mixed load at the target rate for ten minutes, on loopback.

Usage::

    .venv/bin/python benchmarks/soak.py [--data benchmarks/out/serving-world] [--customers 20000]
        [--items 20000] [--seconds 600] [--rate 50] [--clients 8] [--seed 7] [--json]

Prepares (once, then reuses) the serving benchmark's world with ``benchmarks/serving.py``'s ``prepare()``, starts
``bentoml serve`` with random app and admin bearer tokens (``NEXTBEST_APP_TOKEN``, ``NEXTBEST_ADMIN_TOKEN``) and
a fresh temporary state directory, and drives it **open-loop**: request *k* is due at ``k / rate`` seconds and
is sent then, whether or not earlier ones were answered (up to ``--clients`` keep-alive connections; a request
due while every connection is busy waits for one). Latency runs from the time a request was *due*, not sent, so
a slow server is not hidden by a load generator that slows down with it (coordinated omission).

The rate: 50 requests/s in all, the "light mixed load" of the outside test behind the soak requirement (the
serving benchmark sets latency and saturation targets, not a rate). The mix, drawn at random per request:

* 45 % ``/recommend`` (``n`` 10);
* 25 % ``/next_best_action`` (channel web, app or email, ``n`` 3; half with ``"record_contact": false``);
* 15 % ``/events``: 1–3 events (view, click, add to cart, purchase) of real customers and items of the world,
  each with a unique ``event_id`` — unless a probe at start finds the service rejects that field (400), in
  which case it is left out;
* 10 % ``/similar_items`` (``n`` 10);
* 5 % ``/profile`` (with the admin token; every other endpoint gets the app token).

Customers and items are those of the world's features (``DATA/features/profiles.parquet``,
``DATA/features/items.parquet``). Every request sends ``Content-Type: application/json``; traffic goes to
127.0.0.1 only.

Measured: the status of every request (an error is any non-2xx answer, a transport error, a request not
answered within 30 s, or one not answered at all when the run ends; the first few error bodies are printed), its
latency, and, every 5 s, the resident memory (RSS) and CPU time of the server's process tree — the ``bentoml
serve`` process and every process under it, summed — with the machine's load average. Reported per minute of due
time (a window): requests, errors, p50 and p99 of the answered 2xx requests, median RSS, the server's CPU time per
request (barely moved by other work on a shared machine, unlike latency: it tells a service that slows down from
a machine that got busy) and the median load; then the totals, the achieved rate, per-endpoint figures, and the
goals.

Goals (all must hold; exit status 0, else 1):

* **0 errors** over the whole run;
* **RSS flat within 10 %**: the median RSS sample of the last full minute divided by that of the first full
  minute lies in [0.90, 1.10];
* **p99 steady**: the last full minute's p99 is at most 1.5× the first minute's, and no minute's p99 exceeds 3×
  the median of the per-minute p99s.

Runs shorter than two minutes compare the first minute with itself (the ratios are then 1); the figures of a
ten-minute run are recorded in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; the project root must come first instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import serving as bench  # noqa: E402

MIX: tuple[tuple[str, float], ...] = (
    ("recommend", 0.45),
    ("next_best_action", 0.25),
    ("events", 0.15),
    ("similar_items", 0.10),
    ("profile", 0.05),
)
ADMIN_ENDPOINTS = frozenset({"profile"})
CHANNELS = ("web", "app", "email")
EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
EVENT_TYPE_WEIGHTS = (0.6, 0.2, 0.15, 0.05)
DEFAULT_RATE = 50.0
WINDOW_S = 60.0
SAMPLE_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 60.0
MAX_ERROR_SAMPLES = 5
MAX_CHUNKS = 100_000
MAX_SAMPLE_IDS = 5000
RSS_BAND = 0.10
P99_LAST_OVER_FIRST = 1.5
P99_OVER_MEDIAN = 3.0


@dataclass(frozen=True)
class Planned:
    """One request of the plan: due ``due`` seconds after the start, its bytes on the wire ready."""

    index: int
    due: float
    endpoint: str
    wire: bytes


@dataclass(frozen=True)
class Outcome:
    """What became of one request: ``status`` 0 for a transport error or no answer."""

    index: int
    due: float
    endpoint: str
    status: int
    latency: float


@dataclass
class Tokens:
    app: str
    admin: str

    def for_endpoint(self, endpoint: str) -> str:
        return self.admin if endpoint in ADMIN_ENDPOINTS else self.app


# --- requests ------------------------------------------------------------------------------------------------


def world_ids(data: Path, seed: int) -> tuple[list[str], list[str]]:
    """Customers and items of the world's features, a seeded sample of each."""
    import polars as pl

    feats = data / "features"
    customers = pl.read_parquet(feats / "profiles.parquet", columns=["customer_id"])["customer_id"].to_list()
    items = pl.read_parquet(feats / "items.parquet", columns=["item_id"])["item_id"].to_list()
    rng = random.Random(seed)
    return (
        rng.sample(customers, min(MAX_SAMPLE_IDS, len(customers))),
        rng.sample(items, min(MAX_SAMPLE_IDS, len(items))),
    )


def wire_request(host: str, port: int, endpoint: str, body: dict[str, Any], token: str | None) -> bytes:
    """An HTTP/1.1 keep-alive POST of ``body`` as JSON, with a bearer token when given."""
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    head = (
        f"POST /{endpoint} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def events_body(
    rng: random.Random, customers: list[str], items: list[str], with_event_id: bool
) -> dict[str, Any]:
    events = []
    for _ in range(rng.randint(1, 3)):
        event: dict[str, Any] = {
            "customer_id": rng.choice(customers),
            "item_id": rng.choice(items),
            "event_type": rng.choices(EVENT_TYPES, EVENT_TYPE_WEIGHTS)[0],
        }
        if with_event_id:
            event["event_id"] = uuid.uuid4().hex
        events.append(event)
    return {"events": events}


def request_body(
    endpoint: str, rng: random.Random, customers: list[str], items: list[str], with_event_id: bool
) -> dict[str, Any]:
    """The body of one request of the mix for ``endpoint``."""
    if endpoint == "recommend":
        return {"customer_id": rng.choice(customers), "n": 10}
    if endpoint == "next_best_action":
        body: dict[str, Any] = {"customer_id": rng.choice(customers), "channel": rng.choice(CHANNELS), "n": 3}
        if rng.random() < 0.5:
            body["record_contact"] = False
        return body
    if endpoint == "events":
        return events_body(rng, customers, items, with_event_id)
    if endpoint == "similar_items":
        return {"item_id": rng.choice(items), "n": 10}
    return {"customer_id": rng.choice(customers)}


def plan_requests(
    host: str,
    port: int,
    tokens: Tokens,
    ids: tuple[list[str], list[str]],
    rate: float,
    seconds: float,
    seed: int,
    with_event_id: bool,
) -> list[Planned]:
    """Every request of the run, due at fixed intervals of ``1 / rate`` seconds."""
    customers, items = ids
    rng = random.Random(seed)
    names = [name for name, _ in MIX]
    weights = [share for _, share in MIX]
    plan = []
    for k in range(int(rate * seconds)):
        endpoint = rng.choices(names, weights)[0]
        body = request_body(endpoint, rng, customers, items, with_event_id)
        wire = wire_request(host, port, endpoint, body, tokens.for_endpoint(endpoint))
        plan.append(Planned(k, k / rate, endpoint, wire))
    return plan


# --- a lean HTTP/1.1 client ----------------------------------------------------------------------------------


async def read_body(reader: asyncio.StreamReader, fields: dict[str, str]) -> bytes:
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding", "").lower() != "chunked":
        return b""
    parts = []
    for _ in range(MAX_CHUNKS):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        parts.append(await reader.readexactly(size + 2))
        if size == 0:
            return b"".join(parts)
    raise ValueError(f"more than {MAX_CHUNKS} chunks")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server keeps the connection open."""
    status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    body = await read_body(reader, fields)
    return int(status_line.split(" ", 2)[1]), body, fields.get("connection", "").lower() != "close"


class Connection:
    """One keep-alive connection, reopened after a transport error or a ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, wire: bytes) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(wire)
        status, body, keep = await read_response(self.reader)
        if not keep:
            self.close()
        return status, body

    async def timed_exchange(self, wire: bytes) -> tuple[int, bytes]:
        """``exchange`` within the request timeout; a transport error or timeout is status 0."""
        try:
            return await asyncio.wait_for(self.exchange(wire), REQUEST_TIMEOUT_S)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            self.close()
            return 0, f"{type(e).__name__}: {e}".encode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- the run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The server's process tree at ``at`` seconds into the run (on the 5 s grid): resident memory (bytes),
    CPU seconds used so far, and the machine's one-minute load average."""

    at: float
    rss: int
    cpu_s: float
    load: float


def take_sample(at: float, pid: int) -> Sample:
    return Sample(at, tree_rss(pid), bench.tree_cpu_seconds(pid), os.getloadavg()[0])


@dataclass
class Run:
    """What a run collected: outcomes, samples of the server, first error bodies, how late the scheduler put a
    request on the queue at worst, and the load generator's CPU seconds."""

    outcomes: list[Outcome]
    samples: list[Sample]
    error_samples: list[str]
    max_schedule_lag_s: float = 0.0
    loadgen_cpu_s: float = 0.0


async def schedule(
    plan: list[Planned], queue: asyncio.Queue[Planned | None], start: float, clients: int, run: Run
) -> None:
    """Put each request on the queue when it is due (open loop), then one stop mark per connection."""
    for p in plan:
        delay = start + p.due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.max_schedule_lag_s = max(run.max_schedule_lag_s, time.perf_counter() - (start + p.due))
        queue.put_nowait(p)
    for _ in range(clients):
        queue.put_nowait(None)


async def connection_worker(
    host: str, port: int, queue: asyncio.Queue[Planned | None], start: float, limit: int, run: Run
) -> None:
    """Send queued requests on one connection until a stop mark; latency from when each was due."""
    conn = Connection(host, port)
    try:
        for _ in range(limit):
            p = await queue.get()
            if p is None:
                return
            status, body = await conn.timed_exchange(p.wire)
            run.outcomes.append(
                Outcome(p.index, p.due, p.endpoint, status, time.perf_counter() - (start + p.due))
            )
            if not 200 <= status < 300 and len(run.error_samples) < MAX_ERROR_SAMPLES:
                run.error_samples.append(f"/{p.endpoint} {status}: {body[:500].decode(errors='replace')}")
    finally:
        conn.close()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and every process under it, summed (bytes)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


async def sample_server(pid: int, start: float, seconds: float, run: Run) -> None:
    """A sample every ``SAMPLE_EVERY_S`` seconds of the run, on the grid 0, 5, 10, …, ``seconds``."""
    for k in range(int(seconds / SAMPLE_EVERY_S) + 1):
        at = k * SAMPLE_EVERY_S
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.samples.append(await asyncio.to_thread(take_sample, at, pid))


async def report_progress(start: float, seconds: float, run: Run) -> None:
    """One line on stderr per minute: the load generator is alive and what it has seen."""
    for minute in range(1, math.ceil(seconds / WINDOW_S) + 1):
        await asyncio.sleep(max(0.0, start + minute * WINDOW_S - time.perf_counter()))
        errors = sum(1 for o in run.outcomes if not 200 <= o.status < 300)
        rss = run.samples[-1].rss / 2**20 if run.samples else float("nan")
        print(
            f"  minute {minute}: {len(run.outcomes)} answered, {errors} errors, RSS {rss:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )


async def drive(url: str, pid: int, plan: list[Planned], clients: int, seconds: float) -> Run:
    """Run the plan against ``url``; requests left unanswered at the end count as errors."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    run = Run([], [], [])
    cpu_before = time.process_time()
    queue: asyncio.Queue[Planned | None] = asyncio.Queue()
    start = time.perf_counter() + 0.2
    # Each of these ends by itself (the sampler at ``seconds``), within the timeout unless the server hangs.
    bounded = [
        asyncio.create_task(connection_worker(host, int(port), queue, start, len(plan) + 1, run))
        for _ in range(clients)
    ]
    bounded.append(asyncio.create_task(schedule(plan, queue, start, clients, run)))
    bounded.append(asyncio.create_task(sample_server(pid, start, seconds, run)))
    progress = asyncio.create_task(report_progress(start, seconds, run))
    _, late = await asyncio.wait(bounded, timeout=seconds + DRAIN_S + REQUEST_TIMEOUT_S)
    for task in [*late, progress]:
        task.cancel()
    await asyncio.gather(*bounded, progress, return_exceptions=True)
    run.loadgen_cpu_s = time.process_time() - cpu_before
    answered = {o.index for o in run.outcomes}
    missing = [p for p in plan if p.index not in answered]
    run.outcomes.extend(Outcome(p.index, p.due, p.endpoint, 0, float("nan")) for p in missing)
    if missing:
        run.error_samples.append(f"{len(missing)} requests not answered when the run ended")
    return run


async def probe(url: str, endpoint: str, body: dict[str, Any], token: str | None) -> tuple[int, str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = Connection(host, int(port))
    try:
        status, answer = await conn.timed_exchange(wire_request(host, int(port), endpoint, body, token))
    finally:
        conn.close()
    return status, answer[:300].decode(errors="replace")


def accepts_event_id(url: str, token: str, ids: tuple[list[str], list[str]]) -> bool:
    """Whether ``/events`` takes an ``event_id`` (2xx) or rejects the unknown field (400, 422)."""
    body = events_body(random.Random(0), *ids, with_event_id=True)
    status, answer = asyncio.run(probe(url, "events", body, token))
    if 200 <= status < 300:
        return True
    if status in (400, 422):
        print(f"/events rejects event_id ({status}: {answer}); sending events without it", file=sys.stderr)
        return False
    raise RuntimeError(f"the /events probe failed: {status} {answer}")


def probe_service(url: str, tokens: Tokens, ids: tuple[list[str], list[str]]) -> dict[str, Any]:
    """Before the run: whether a request without a token is refused, and whether ``event_id`` is taken."""
    status, _ = asyncio.run(probe(url, "recommend", {"customer_id": ids[0][0]}, None))
    return {"unauthenticated_recommend_status": status, "event_id": accepts_event_id(url, tokens.app, ids)}


# --- figures -------------------------------------------------------------------------------------------------


def window_figures(run: Run, seconds: float) -> list[dict[str, Any]]:
    """Per minute of due time: requests, errors, p50/p99 of the 2xx answers, median RSS."""
    rows = []
    for w in range(math.ceil(seconds / WINDOW_S)):
        lo, hi = w * WINDOW_S, min((w + 1) * WINDOW_S, seconds)
        picked = [o for o in run.outcomes if lo <= o.due < hi]
        ok = [o.latency for o in picked if 200 <= o.status < 300]
        inside = [x for x in run.samples if lo <= x.at < hi]
        ends = [x for x in run.samples if x.at in (lo, hi)]
        cpu_s = ends[-1].cpu_s - ends[0].cpu_s if len(ends) == 2 else float("nan")
        rows.append(
            {
                "minute": w + 1,
                "full": hi - lo >= WINDOW_S,
                "requests": len(picked),
                "errors": len(picked) - len(ok),
                **bench.percentiles(ok),
                "rss_mib": statistics.median(x.rss for x in inside) / 2**20 if inside else float("nan"),
                "server_cpu_ms": 1000 * cpu_s / max(len(picked), 1),
                "load": statistics.median(x.load for x in inside) if inside else float("nan"),
            }
        )
    return rows


def endpoint_figures(run: Run) -> dict[str, dict[str, Any]]:
    """Per endpoint over the whole run: requests, errors, p50/p99 of the 2xx answers."""
    out = {}
    for name, _ in MIX:
        picked = [o for o in run.outcomes if o.endpoint == name]
        ok = [o.latency for o in picked if 200 <= o.status < 300]
        out[name] = {"requests": len(picked), "errors": len(picked) - len(ok), **bench.percentiles(ok)}
    return out


def ratio(last: float, first: float) -> float:
    return last / first if first > 0 else float("nan")


def summarise(run: Run, windows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Totals, first vs last full minute, and the goals (see the module docstring)."""
    full = [w for w in windows if w["full"]] or windows
    first, last = full[0], full[-1]
    ok = [o.latency for o in run.outcomes if 200 <= o.status < 300]
    errors = len(run.outcomes) - len(ok)
    window_p99 = [w["p99_ms"] for w in windows if not math.isnan(w["p99_ms"])]
    median_p99 = statistics.median(window_p99) if window_p99 else float("nan")
    rss_ratio = ratio(last["rss_mib"], first["rss_mib"])
    p99_ratio = ratio(last["p99_ms"], first["p99_ms"])
    worst_over_median = ratio(max(window_p99, default=float("nan")), median_p99)
    goals = {
        "zero_errors": errors == 0,
        "rss_flat": abs(rss_ratio - 1) <= RSS_BAND,
        "p99_steady": p99_ratio <= P99_LAST_OVER_FIRST and worst_over_median <= P99_OVER_MEDIAN,
    }
    return {
        "requests": len(run.outcomes),
        "answered_2xx": len(ok),
        "achieved_rps": len(ok) / seconds,
        "errors": errors,
        **bench.percentiles(ok),
        "rss_first_mib": first["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "rss_ratio": rss_ratio,
        "p99_first_ms": first["p99_ms"],
        "p99_last_ms": last["p99_ms"],
        "p99_ratio": p99_ratio,
        "p99_median_window_ms": median_p99,
        "p99_worst_over_median": worst_over_median,
        "endpoints": endpoint_figures(run),
        "goals": goals,
        "passed": all(goals.values()),
    }


def print_report(windows: list[dict[str, Any]], summary: dict[str, Any], errors: list[str]) -> None:
    print("| minute | requests | errors | p50 ms | p99 ms | RSS MiB | server CPU ms/req | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for w in windows:
        mark = "" if w["full"] else " (partial)"
        print(
            f"| {w['minute']}{mark} | {w['requests']} | {w['errors']} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} "
            f"| {w['rss_mib']:.0f} | {w['server_cpu_ms']:.2f} | {w['load']:.1f} |"
        )
    s = summary
    print(
        f"\n{s['requests']} requests, {s['achieved_rps']:.1f} req/s answered 2xx, {s['errors']} errors; "
        f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms; server CPU {s['server_cpu_ms']:.2f} ms/request"
    )
    print(
        f"RSS first/last full minute {s['rss_first_mib']:.0f} / {s['rss_last_mib']:.0f} MiB "
        f"(ratio {s['rss_ratio']:.3f}); p99 first/last {s['p99_first_ms']:.2f} / {s['p99_last_ms']:.2f} ms "
        f"(ratio {s['p99_ratio']:.2f}); worst minute p99 {s['p99_worst_over_median']:.2f}× the median minute's "
        f"({s['p99_median_window_ms']:.2f} ms)"
    )
    for name, e in s["endpoints"].items():
        print(
            f"  /{name:<17} {e['requests']:>6} requests {e['errors']:>4} errors  p50 {e['p50_ms']:7.2f} ms  "
            f"p99 {e['p99_ms']:7.2f} ms"
        )
    print(
        f"load generator: {s['loadgen_cpu_s']:.1f} CPU s, a request queued at worst "
        f"{s['max_schedule_lag_ms']:.1f} ms after it was due"
    )
    service = s["service"]
    print(
        f"service: a request without a token got {service['unauthenticated_recommend_status']}; event_id "
        f"{'sent' if service['event_id'] else 'left out (rejected)'}; alive at the end: {service['server_alive']}"
    )
    for error in errors:
        print(f"error: {error}")
    verdict = ", ".join(f"{name} {'PASS' if met else 'FAIL'}" for name, met in s["goals"].items())
    print(f"goals: {verdict} -> {'PASS' if s['passed'] else 'FAIL'}")


def log_problems(log: str, limit: int = 5) -> list[str]:
    """Lines of the service log that report errors (tracebacks, ERROR records)."""
    lines = [ln for ln in log.splitlines() if "Traceback" in ln or " ERROR " in ln or "Exception" in ln]
    return lines[:limit]


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(bench.DEFAULT_DATA))
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests per second, in all")
    parser.add_argument("--clients", type=int, default=8, help="concurrent keep-alive connections")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or args.clients < 1:
        parser.error("--seconds and --rate must be positive, --clients at least 1")
    return args


def soak(args: argparse.Namespace, data: Path, state: Path) -> tuple[Run, dict[str, Any], list[str]]:
    """Start the service, probe it, run the plan; return the run, service facts and the service's log problems."""
    from nextbest.serving.server import start

    tokens = Tokens(app=secrets.token_urlsafe(24), admin=secrets.token_urlsafe(24))
    server = start(
        data,
        state_dir=state / "state",
        tracking_uri=bench.tracking_uri(data),
        admin_token=tokens.admin,
        log_path=state / "service.log",
        extra_env={"NEXTBEST_APP_TOKEN": tokens.app, "NEXTBEST_ADMIN_TOKEN": tokens.admin},
    )
    try:
        server.wait_ready(240)
        ids = world_ids(data, args.seed)
        try:
            facts = probe_service(server.url, tokens, ids)
        except RuntimeError:
            print(f"the end of the service log:\n{server.log()[-4000:]}", file=sys.stderr)
            raise
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        plan = plan_requests(
            host, int(port), tokens, ids, args.rate, args.seconds, args.seed, facts["event_id"]
        )
        print(
            f"soak: {len(plan)} requests at {args.rate:g} req/s over {args.seconds:g} s, {args.clients} "
            f"connections, event_id {'sent' if facts['event_id'] else 'left out'}",
            file=sys.stderr,
            flush=True,
        )
        cpu_before = bench.tree_cpu_seconds(server.process.pid)
        run = asyncio.run(drive(server.url, server.process.pid, plan, args.clients, args.seconds))
        facts["server_cpu_s"] = bench.tree_cpu_seconds(server.process.pid) - cpu_before
        facts["server_alive"] = server.process.poll() is None
    finally:
        server.stop()
    return run, facts, log_problems(server.log())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    bench.prepare(data, args.customers, args.items, args.seed)
    with tempfile.TemporaryDirectory(prefix="nextbest-soak-") as tmp:
        run, facts, problems = soak(args, data, Path(tmp))
    windows = window_figures(run, args.seconds)
    summary = summarise(run, windows, args.seconds)
    summary["server_cpu_ms"] = 1000 * facts["server_cpu_s"] / max(summary["answered_2xx"], 1)
    summary["loadgen_cpu_s"] = run.loadgen_cpu_s
    summary["max_schedule_lag_ms"] = 1000 * run.max_schedule_lag_s
    summary.update(
        rate=args.rate,
        seconds=args.seconds,
        clients=args.clients,
        service=facts,
        service_log_problems=problems,
    )
    print_report(windows, summary, run.error_samples)
    for line in problems:
        print(f"service log: {line}")
    if args.json:
        print(json.dumps({**summary, "windows": windows, "error_samples": run.error_samples}))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
