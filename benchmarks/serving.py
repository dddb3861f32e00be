"""Serving benchmark: the BentoML service against a minimal Starlette app and the in-process call, on loopback.

Usage::

    .venv/bin/python benchmarks/serving.py [--data benchmarks/out/serving-world] [--customers 20000]
        [--items 20000] [--clients 1,8,32] [--seconds 8] [--endpoints recommend,next_best_action]

Prepares (once, then reuses) a generated world with trained and promoted models in its own MLflow registry
(``DATA/mlruns``), then measures, for ``/recommend`` and ``/next_best_action``:

1. the **in-process** time of the same engine call (the floor: no HTTP, no serialisation);
2. a **minimal Starlette app** on uvicorn serving that same call (what a user could write instead of a service);
3. the **BentoML service** (``serving.service:NextBest`` under ``bentoml serve``).

A separate process drives each server on loopback with 1, 8 and 32 concurrent keep-alive clients (a lean
asyncio HTTP/1.1 client, so that the load generator takes as little of the shared CPU as it can) and reports
p50/p99 latency, throughput and the server's CPU time per request (its process tree's user + system time over
the run, divided by the requests it answered: unlike wall-clock figures, barely moved by other work on a shared
machine). Both servers run at once and are measured interleaved, their order alternating, ``--repeats`` times per
point (the median is reported). Targets (issue 5): at one client p99 ≤ 10 ms for ``/recommend`` and ≤ 15 ms for
``/next_best_action``; at saturation at least 0.8× the Starlette app's throughput. Results are printed and
written to ``DATA/../serving-results.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; the project root must come first instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

DEFAULT_DATA = Path("benchmarks/out/serving-world")
ENDPOINTS = ("recommend", "next_best_action")


# --- preparing the world ----------------------------------------------------------------------------------


def tracking_uri(data: Path) -> str:
    return f"sqlite:///{(data.resolve() / 'mlruns' / 'mlflow.db').as_posix()}"


def prepare(data: Path, customers: int, items: int, seed: int) -> None:
    """Generate the world, build features, train and promote both models (skipped when already done)."""
    from features.dataset import Dataset
    from features.generate import WorldConfig, generate_world
    from features.pipeline import build_features
    from serving.engine import EngineConfig, EngineLoadError, check_registry
    from training.cf import train_cf
    from training.propensity_tuning import promote_propensity, train_propensity
    from training.tracking import TrackingConfig, promote_recommender

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


def request_body(endpoint: str, customer_id: str) -> dict[str, Any]:
    if endpoint == "recommend":
        return {"customer_id": customer_id, "n": 10}
    return {"customer_id": customer_id, "channel": "web", "n": 3}


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

    from serving import api

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

    from serving import api
    from serving.engine import Engine, EngineConfig, ServiceError

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
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            body = bodies[k % len(bodies)]
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


def drive(url: str, endpoint: str, customers: list[str], clients: int, seconds: float, warmup: float) -> dict:
    """Run the load generator in a separate process and return its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(customers, f)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "drive",
            "--url",
            url,
            "--endpoint",
            endpoint,
            "--customers-file",
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


def measure(
    servers: dict[str, str],
    pids: dict[str, int],
    endpoints: list[str],
    customers: list[str],
    clients: list[int],
    seconds: float,
    repeats: int,
) -> list[dict]:
    """Every (endpoint, clients) point on every server, the servers interleaved and their order alternated, so
    that a change in the background load of the machine hits them alike; the median of ``repeats`` runs."""
    rows = []
    names = list(servers)
    for endpoint in endpoints:
        for c in clients:
            runs: dict[str, list[dict]] = {n: [] for n in names}
            for rep in range(repeats):
                for name in names if rep % 2 == 0 else names[::-1]:
                    before = tree_cpu_seconds(pids[name])
                    run = drive(servers[name], endpoint, customers, c, seconds, warmup=1.5)
                    # Server CPU per answered request: what the throughput of a dedicated machine follows,
                    # and far less disturbed than wall-clock figures by whatever else the machine runs.
                    run["server_cpu_ms"] = (
                        1000 * (tree_cpu_seconds(pids[name]) - before) / max(run["answered"], 1)
                    )
                    runs[name].append(run)
            for name in names:
                r = {
                    key: statistics.median(run[key] for run in runs[name])
                    for key in ("p50_ms", "p99_ms", "throughput_rps", "mean_ms", "server_cpu_ms")
                }
                r.update(
                    server=name,
                    endpoint=endpoint,
                    clients=c,
                    errors=sum(run["errors"] for run in runs[name]),
                    requests=sum(run["requests"] for run in runs[name]),
                    runs=runs[name],
                )
                print(
                    f"  {name:<9} /{endpoint:<17} {c:>3} clients: p50 {r['p50_ms']:6.2f} ms  p99 "
                    f"{r['p99_ms']:6.2f} ms  {r['throughput_rps']:7.1f} req/s  server CPU {r['server_cpu_ms']:5.2f} ms/req"
                    f"  ({r['errors']} errors)",
                    file=sys.stderr,
                )
                rows.append(r)
    return rows


def markdown(results: dict[str, Any]) -> str:
    ip = results["in_process"]
    lines = [
        f"World: {results['customers']} customers, {ip['items']} items, ALS {ip['factors']} factors; "
        f"{results['cpus']} CPUs; median of {results['repeats']} runs of {results['seconds']} s per point (after 1.5 s "
        "warm-up), the two servers interleaved.",
        "",
        f"In-process (the floor): `/recommend` p50 {ip['recommend']['p50_ms']:.2f} ms, p99 "
        f"{ip['recommend']['p99_ms']:.2f} ms; `/next_best_action` p50 {ip['next_best_action']['p50_ms']:.2f} ms, "
        f"p99 {ip['next_best_action']['p99_ms']:.2f} ms; bare ALS `recommend` p50 "
        f"{ip['bare_model_recommend']['p50_ms']:.2f} ms.",
        "",
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    d = sub.add_parser("drive", help="(internal) the load generator")
    d.add_argument("--url", required=True)
    d.add_argument("--endpoint", required=True)
    d.add_argument("--customers-file", required=True)
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
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--threads", type=int, default=None, help="BentoML worker threads")
    parser.add_argument("--repeats", type=int, default=2, help="runs per point (the median is reported)")
    parser.add_argument("--skip-starlette", action="store_true")
    args = parser.parse_args(argv)

    if args.mode == "drive":
        customers = json.loads(Path(args.customers_file).read_text())
        bodies = [json.dumps(request_body(args.endpoint, c)).encode() for c in customers]
        r = asyncio.run(
            _drive(args.url, f"/{args.endpoint}", bodies, args.clients, args.seconds, args.warmup)
        )
        print(json.dumps(r))
        return 0
    if args.mode == "starlette":
        run_starlette(Path(args.data), Path(args.state_dir), args.port)
        return 0

    from serving.engine import Engine, EngineConfig
    from serving.server import free_port, start

    data = Path(args.data)
    prepare(data, args.customers, args.items, args.seed)
    clients = [int(c) for c in args.clients.split(",")]
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    results: dict[str, Any] = {
        "customers": args.customers,
        "clients": clients,
        "endpoints": endpoints,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "http": [],
    }
    with tempfile.TemporaryDirectory(prefix="nextbest-bench-") as tmp:
        root = Path(tmp)
        engine = Engine.load(
            EngineConfig(data=data, state_dir=root / "inproc", tracking_uri=tracking_uri(data))
        )
        customers = sample_customers(engine, 2000, args.seed)
        print(f"in-process ({len(customers)} customers)", file=sys.stderr)
        results["in_process"] = in_process(engine, customers, calls=2000)
        print(json.dumps(results["in_process"]), file=sys.stderr)
        engine.close()
        del engine

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
                    str(data),
                    "--state-dir",
                    str(root / "starlette"),
                    "--port",
                    str(port),
                ],
                start_new_session=True,
            )
        bento = start(
            data,
            state_dir=root / "bentoml",
            tracking_uri=tracking_uri(data),
            threads=args.threads,
            log_path=root / "bentoml.log",
        )
        servers["bentoml"] = bento.url
        try:
            if starlette is not None:
                wait_ready(servers["starlette"], starlette)
            bento.wait_ready(240)
            pids = {"bentoml": bento.process.pid}
            if starlette is not None:
                pids["starlette"] = starlette.pid
            results["http"] = measure(
                servers, pids, endpoints, customers, clients, args.seconds, args.repeats
            )
        finally:
            bento.stop()
            if starlette is not None:
                os.killpg(starlette.pid, 15)
                starlette.wait(30)

    out = data.parent / "serving-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (data.parent / "serving-results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
