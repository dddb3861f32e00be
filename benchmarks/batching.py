"""Adaptive batching: our batcher, no batching and BentoML's own ``batchable=True``, side by side on ``/recommend``.

Usage::

    .venv/bin/python benchmarks/batching.py [--data benchmarks/out/serving-world] [--clients 1,32]
        [--seconds 5] [--repeats 2] [--bentoml-latency-ms 20,200] [--json]

Prepares (or reuses) the serving benchmark's world as ``benchmarks/serving.py`` does, then starts these servers
on loopback at once, all on the same engine and data:

- ``ours/batch64``: ``serving.service:NextBest`` with ``NEXTBEST_MAX_BATCH=64`` (our ``AdaptiveBatcher``);
- ``ours/batch1``: the same service with ``NEXTBEST_MAX_BATCH=1`` (no batching);
- ``bentoml/batchable-20ms`` (one per ``--bentoml-latency-ms``): ``benchmarks.batchable_service:BatchableNextBest``,
  ``/recommend`` as ``@bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=20)`` over
  ``requests: list[RecommendRequest]`` (body ``{"requests": [one request]}``). BentoML refuses with 503 a request
  it expects to miss its latency bound, so a looser bound (200 ms) shows its batching without that shedding.

The serving benchmark's load generator drives ``/recommend`` (n=10, the same customers; each request of the
variant holds one of them) at 1 and 32 concurrent keep-alive clients, the servers interleaved and their order
alternated, ``--repeats`` times (medians reported): p50/p99 ms, req/s and the server's CPU ms per request (its
process tree), and the ratios of BentoML's batching to ours measured in the same run.

Then it records what each server does with the contract and with per-request errors: our flat body sent to the
variant; our contract declared batchable; one batch-mate with an unknown filter attribute sent at the same time
as good requests (errors in place, and raised); whose request the batch's context holds.

The summary goes to ``DATA/../batching-results.json``; ``--json`` prints it as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path; the project root must come first instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from benchmarks.serving import (  # noqa: E402 -- after the path fix above
    DEFAULT_DATA,
    cpu_counter,
    drive,
    endpoint_bodies,
    idle_cores,
    prepare,
    sample_customers,
    sample_items,
    settle,
    start_service,
    tracking_uri,
)

VARIANT = "benchmarks.batchable_service:BatchableNextBest"
OURS, UNBATCHED, BENTO = "ours/batch64", "ours/batch1", "bentoml/batchable"
"""Server names; a variant's name ends with its latency bound (``bentoml/batchable-20ms``)."""
BAD_FILTER = {"include": {"no_such_attribute": "x"}}
"""A filter the engine refuses with 400 (unknown attribute) after validation: a per-request error."""


class Server:
    """One server under test: its URL, the bodies it takes, and its process tree's CPU seconds."""

    def __init__(self, url: str, bodies: list[str], cpu: Callable[[], float]) -> None:
        self.url = url
        self.bodies = bodies
        self.cpu = cpu


def start_variant(stack: contextlib.ExitStack, args: argparse.Namespace, root: Path, latency_ms: int) -> Any:
    """``bentoml serve`` the batchable variant on the benchmark's world, configured as the service would be,
    with BentoML's latency bound ``latency_ms``."""
    from nextbest.serving.engine import EngineConfig
    from nextbest.serving.server import ServiceProcess, free_port, service_env

    data = Path(args.data).resolve()
    name = f"batchable-{latency_ms}ms"
    config = EngineConfig(data=data, state_dir=root / name, tracking_uri=tracking_uri(data))
    env = service_env(config, threads=args.threads)
    env["NEXTBEST_BATCH_LATENCY_MS"] = str(latency_ms)
    port = free_port()
    log = root / f"{name}.log"
    with log.open("ab") as out:
        command = [sys.executable, "-m", "bentoml", "serve", VARIANT, "--working-dir", str(ROOT)]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return stack.enter_context(ServiceProcess(process, f"http://127.0.0.1:{port}", log))


def measure(servers: dict[str, Server], clients: list[int], seconds: float, repeats: int) -> list[dict]:
    """``/recommend`` at each client count on every server, interleaved, order alternated; medians of
    ``repeats`` runs. (``benchmarks.serving.measure`` gives every server the same bodies; the variant's
    differ.)"""
    names = list(servers)
    idle = {name: idle_cores(s.cpu) for name, s in servers.items()}
    rows = []
    for c in clients:
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                s = servers[name]
                before = s.cpu()
                run = drive(s.url, "recommend", s.bodies, c, seconds, warmup=1.5)
                run["settle_s"] = settle(s.cpu, idle[name])
                run["server_cpu_ms"] = 1000 * (s.cpu() - before) / max(run["answered"], 1)
                runs[name].append(run)
        for name in names:
            r: dict[str, Any] = {
                key: statistics.median(run[key] for run in runs[name])
                for key in ("p50_ms", "p99_ms", "throughput_rps", "server_cpu_ms")
            }
            r.update(
                server=name,
                clients=c,
                errors=sum(run["errors"] for run in runs[name]),
                requests=sum(run["requests"] for run in runs[name]),
                runs=runs[name],
            )
            print(
                f"  {name:<18} {c:>3} clients: p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                f"{r['throughput_rps']:7.1f} req/s  server CPU {r['server_cpu_ms']:5.2f} ms/req  "
                f"({r['errors']} errors)",
                file=sys.stderr,
            )
            rows.append(r)
    return rows


def ratios(rows: list[dict], clients: list[int]) -> dict[str, dict[str, float]]:
    """Each BentoML variant over ours (batch 64), and ours over no batching, per client count."""
    by = {(r["server"], r["clients"]): r for r in rows}
    variants = sorted({r["server"] for r in rows if r["server"].startswith(BENTO)})
    out: dict[str, dict[str, float]] = {}
    for c in clients:
        pairs = [(f"{v} / {OURS}", by[(v, c)], by[(OURS, c)]) for v in variants]
        for label, x, y in [*pairs, (f"{OURS} / {UNBATCHED}", by[(OURS, c)], by[(UNBATCHED, c)])]:
            out[f"{label} @{c}"] = {
                key: x[key] / y[key] if y[key] else float("nan")
                for key in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms")
            }
    return out


# --- the contract and per-request errors ----------------------------------------------------------------------


def _answer(response: Any) -> str:
    """A response in brief: its status and what its body holds (``answer`` for a list of recommendations)."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:200]}"

    def brief(x: Any) -> str:
        if isinstance(x, str):
            return x
        if isinstance(x, dict) and "items" in x:
            return "answer"
        if isinstance(x, dict) and "error" in x:
            return "error: " + str(x["error"])[:72] + ("…" if len(str(x["error"])) > 72 else "")
        return json.dumps(x)[:200]

    return f"{response.status_code} " + (
        json.dumps([brief(x) for x in body]) if isinstance(body, list) else brief(body)
    )


async def _together(url: str, calls: list[tuple[str, Any, dict[str, str]]]) -> list[str]:
    """Send these (path, body, headers) at once, each on a connection of its own; their answers in order."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as client:
        # Connections opened first, so that the requests themselves leave together.
        await asyncio.gather(*[client.get("/livez") for _ in calls])
        responses = await asyncio.gather(*[client.post(p, json=b, headers=h) for p, b, h in calls])
    return [_answer(r) for r in responses]


def warm_up(url: str, path: str, bodies: list[Any], calls: int = 24) -> None:
    """Requests one at a time: BentoML's dispatcher answers its first dozen or so one by one while it learns
    how long a batch takes (``CorkDispatcher.train_optimizer``), so a probe sent before would not be batched."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        for k in range(calls):
            client.post(path, json=bodies[k % len(bodies)])


def crowd_with_a_bad_mate(
    url: str, path: str, wrap: Callable[[dict], Any], good: list[dict], bad: dict, rounds: int
) -> dict[str, dict[str, int]]:
    """``rounds`` times, the good requests and the bad one sent at once (the bad one's place moving): how often
    each answer came back, to the good requests and to the bad one."""
    warm_up(url, path, [wrap(r) for r in good])
    out: dict[str, dict[str, int]] = {"good": {}, "bad": {}}
    for k in range(rounds):
        at = k % (len(good) + 1)
        calls = [(path, wrap(r), {}) for r in good]
        calls.insert(at, (path, wrap(bad), {}))
        answers = asyncio.run(_together(url, calls))
        for who, answer in [("bad", answers.pop(at))] + [("good", a) for a in answers]:
            out[who][answer] = out[who].get(answer, 0) + 1
    return out


def probe_variant(url: str, good: list[dict], bad: dict, rounds: int) -> dict[str, Any]:
    """The variant against our contract, with a refused batch-mate, and whose request its context holds."""
    import httpx

    out: dict[str, Any] = {
        "our flat body to /recommend": _answer(httpx.post(f"{url}/recommend", json=good[0], timeout=30)),
        "our flat contract declared batchable (/recommend_flat)": _answer(
            httpx.post(f"{url}/recommend_flat", json=good[0], timeout=30)
        ),
    }
    for path in ("/recommend", "/recommend_raising"):
        body = {"requests": [good[0], bad, good[1]]}
        out[f"one caller, [good, bad, good], {path}"] = _answer(
            httpx.post(f"{url}{path}", json=body, timeout=30)
        )
    for path, how in (("/recommend", "error in place"), ("/recommend_raising", "error raised")):
        out[f"crowd with a bad mate, {path} ({how})"] = crowd_with_a_bad_mate(
            url, path, lambda r: {"requests": [r]}, good, bad, rounds
        )
    # The dispatcher's controller task starts with the route's first request and keeps its context variables.
    first = httpx.post(
        f"{url}/whose_context", json={"tags": ["first"]}, headers={"X-Probe": "first"}, timeout=30
    )
    warm_up(url, "/whose_context", [{"tags": [f"warm-up{k}"]} for k in range(len(good))])
    crowd = [
        ("/whose_context", {"tags": [f"caller{k}"]}, {"X-Probe": f"caller{k}"}) for k in range(len(good))
    ]
    out["whose context (X-Probe seen by the batch)"] = [_answer(first), *asyncio.run(_together(url, crowd))]
    return out


def probe_errors(servers: dict[str, Server], customers: list[str], rounds: int = 5, mates: int = 8) -> dict:
    """What each server answers when one request of a crowd is refused, and what the variants do with our
    contract and with their context."""
    good = [{"customer_id": c, "n": 10} for c in customers[:mates]]
    bad = {"customer_id": customers[mates], "n": 10, "filters": BAD_FILTER}
    out: dict[str, Any] = {
        OURS: {
            "crowd with a bad mate, /recommend": crowd_with_a_bad_mate(
                servers[OURS].url, "/recommend", lambda r: r, good, bad, rounds
            )
        }
    }
    for name, server in servers.items():
        if name.startswith(BENTO):
            out[name] = probe_variant(server.url, good, bad, rounds)
    return out


def logged_errors(log: str, most: int = 8) -> list[str]:
    """The distinct exception lines of a server's log (``TypeError: ...``), first seen first."""
    seen: dict[str, None] = {}
    for line in log.splitlines():
        line = line.strip()
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Unavailable")) and " " not in head:
            seen.setdefault(line[:300])
    return list(seen)[:most]


# --- the run ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "cpus": os.cpu_count(),
        "load_before": round(load[0], 2),
    }


def markdown(results: dict[str, Any]) -> str:
    by = {(r["server"], r["clients"]): r for r in results["rows"]}
    lines = [
        "| clients | server | p50 / p99 ms | req/s | server CPU ms/req | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["clients"]:
        for name in results["servers"]:
            r = by[(name, c)]
            lines.append(
                f"| {c} | {name} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['throughput_rps']:.0f} | "
                f"{r['server_cpu_ms']:.2f} | {r['errors']} |"
            )
    lines += ["", "| ratio | req/s | p50 | p99 | CPU/req |", "|---|---|---|---|---|"]
    for label, r in results["ratios"].items():
        lines.append(
            f"| {label} | {r['throughput_rps']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['server_cpu_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--customers", type=int, default=20_000, help="of the world, if it must be made")
    parser.add_argument("--items", type=int, default=20_000, help="of the world, if it must be made")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per point (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="worker threads of every server")
    parser.add_argument(
        "--bentoml-latency-ms",
        default="20,200",
        help="a BentoML variant per max_latency_ms (BentoML refuses with 503 a request it expects to miss it)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as the last line")
    args = parser.parse_args(argv)

    from nextbest.serving.engine import Engine, EngineConfig

    data = Path(args.data)
    prepare(data, args.customers, args.items, args.seed)
    clients = [int(c) for c in args.clients.split(",")]
    results: dict[str, Any] = {
        **machine(),
        "clients": clients,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "max_batch": 64,
        "bentoml_max_latency_ms": [int(x) for x in args.bentoml_latency_ms.split(",")],
    }
    with tempfile.TemporaryDirectory(prefix="nextbest-batching-") as tmp:
        root = Path(tmp)
        engine = Engine.load(
            EngineConfig(data=data, state_dir=root / "inproc", tracking_uri=tracking_uri(data))
        )
        customers = sample_customers(engine, 2000, args.seed)
        items = sample_items(engine, 10, args.seed)
        engine.close()
        del engine
        flat = endpoint_bodies(["recommend"], customers, items, args.seed)["recommend"]
        wrapped = [json.dumps({"requests": [json.loads(b)]}) for b in flat]
        with contextlib.ExitStack() as stack:
            started = {
                OURS: start_service(stack, args, root, "batch64", extra_env={"NEXTBEST_MAX_BATCH": "64"}),
                UNBATCHED: start_service(stack, args, root, "batch1", extra_env={"NEXTBEST_MAX_BATCH": "1"}),
            }
            for ms in results["bentoml_max_latency_ms"]:
                started[f"{BENTO}-{ms}ms"] = start_variant(stack, args, root, ms)
            results["servers"] = list(started)
            for service in started.values():
                service.wait_ready(600)
            servers = {
                name: Server(s.url, wrapped if name.startswith(BENTO) else flat, cpu_counter(s.process.pid))
                for name, s in started.items()
            }
            print(f"/recommend on {', '.join(servers)}", file=sys.stderr)
            results["rows"] = measure(servers, clients, args.seconds, args.repeats)
            results["ratios"] = ratios(results["rows"], clients)
            print("per-request errors and the contract", file=sys.stderr)
            results["probes"] = probe_errors(servers, customers)
            results["logged_errors"] = {
                name: logged_errors(s.log()) for name, s in started.items() if name.startswith(BENTO)
            }
    results["load_after"] = round(os.getloadavg()[0], 2)

    out = data.parent / "batching-results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(json.dumps({"probes": results["probes"], "logged_errors": results["logged_errors"]}, indent=2))
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "rows"} | {"rows": strip_runs(results)}))
    return 0


def strip_runs(results: dict[str, Any]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "runs"} for r in results["rows"]]


if __name__ == "__main__":
    raise SystemExit(main())
