"""Hot swap under load: p99 while new champions are swapped in, against steady state, in one run.

Usage::

    .venv/bin/python benchmarks/hot_swap.py [--data benchmarks/out/serving-world] [--clients 8]
        [--seconds 20] [--swap-every 4] [--repeats 2] [--json]

Prepares (once, then reuses) the serving benchmark's world (``benchmarks/serving.py``'s ``prepare()``), copies
its registry database (the promotions below stay in the copy), starts ``bentoml serve`` with an admin key and
drives ``/recommend`` and ``/next_best_action`` with ``--clients`` keep-alive clients each (the serving
benchmark's load generator, in its own process), in alternating windows of ``--seconds``:

* **steady**: nothing else happens;
* **swapping**: every ``--swap-every`` seconds a new version of the recommender's champion is registered (the
  champion's model again, as a promotion registers a new version) and ``POST /reload`` swaps it in — loading the
  model beside the old one, then swapping atomically (:mod:`serving.hot_swap`).

Reported per endpoint and window kind (median over ``--repeats``): requests, errors (any non-200 answer),
p50/p99 and the ratio p99 swapping / p99 steady. Goal (issue: close the loop): 0 failed requests during swaps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import serving as bench  # noqa: E402

ENDPOINTS = ("recommend", "next_best_action")


def promote_again(tracking_uri: str) -> str:
    """A new registry version of the recommender's champion, made the champion; returns its version."""
    from mlflow import MlflowClient

    from nextbest.serving.engine import RECOMMENDER_MODEL

    client = MlflowClient(tracking_uri, tracking_uri)
    champion = client.get_model_version_by_alias(RECOMMENDER_MODEL, "champion")
    new = client.create_model_version(RECOMMENDER_MODEL, champion.source, run_id=champion.run_id)
    client.set_registered_model_alias(RECOMMENDER_MODEL, "champion", new.version)
    return str(new.version)


def swapper(url: str, admin: str, tracking_uri: str, every: float, stop: threading.Event, log: list) -> None:
    import httpx

    while not stop.wait(every):
        version = promote_again(tracking_uri)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/reload", json={}, headers={"Authorization": f"Bearer {admin}"}, timeout=120)
        log.append(
            {
                "version": version,
                "status": r.status_code,
                "swapped": r.status_code == 200 and r.json().get("swapped"),
                "seconds": time.perf_counter() - t0,
            }
        )


def window(url: str, bodies: dict[str, list[str]], clients: int, seconds: float) -> dict[str, dict]:
    """Both endpoints driven at once for ``seconds``."""
    out: dict[str, dict] = {}

    def run(endpoint: str) -> None:
        out[endpoint] = bench.drive(url, endpoint, bodies[endpoint], clients, seconds, warmup=1.0)

    threads = [threading.Thread(target=run, args=(e,)) for e in ENDPOINTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(bench.DEFAULT_DATA))
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--swap-every", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from nextbest.serving.engine import Engine, EngineConfig
    from nextbest.serving.server import start

    data = Path(args.data)
    bench.prepare(data, args.customers, args.items, args.seed)
    with tempfile.TemporaryDirectory(prefix="nextbest-swap-") as tmp:
        root = Path(tmp)
        (root / "mlruns").mkdir()
        shutil.copy(Path(bench.tracking_uri(data).removeprefix("sqlite:///")), root / "mlruns" / "mlflow.db")
        uri = f"sqlite:///{root}/mlruns/mlflow.db"
        engine = Engine.load(
            EngineConfig(data=data, state_dir=root / "probe", tracking_uri=uri, model_poll_seconds=0)
        )
        customers = bench.sample_customers(engine, 2000, args.seed)
        items = bench.sample_items(engine, 100, args.seed)
        engine.close()
        bodies = bench.endpoint_bodies(list(ENDPOINTS), customers, items, args.seed)
        admin = "swap-bench-admin"
        server = start(
            data,
            state_dir=root / "state",
            tracking_uri=uri,
            admin_token=admin,
            log_path=root / "service.log",
            extra_env={"NEXTBEST_MODEL_POLL_SECONDS": "0"},
        )
        runs: dict[str, list[dict[str, dict]]] = {"steady": [], "swapping": []}
        swaps: list[dict[str, Any]] = []
        try:
            server.wait_ready(240)
            window(server.url, bodies, args.clients, 3.0)  # warm up
            for _ in range(args.repeats):
                runs["steady"].append(window(server.url, bodies, args.clients, args.seconds))
                stop = threading.Event()
                t = threading.Thread(
                    target=swapper, args=(server.url, admin, uri, args.swap_every, stop, swaps)
                )
                t.start()
                runs["swapping"].append(window(server.url, bodies, args.clients, args.seconds))
                stop.set()
                t.join()
        finally:
            server.stop()

    summary: dict[str, Any] = {
        "clients": args.clients,
        "seconds": args.seconds,
        "swaps": swaps,
        "endpoints": {},
    }
    print(f"hot swap: {args.clients} clients per endpoint, windows of {args.seconds:g} s, x{args.repeats}")
    print(f"{'endpoint':<18} {'window':<9} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for e in ENDPOINTS:
        figures = {}
        for kind, rs in runs.items():
            f = {
                "requests": sum(r[e]["requests"] for r in rs),
                "errors": sum(r[e]["errors"] for r in rs),
                "p50_ms": statistics.median(r[e]["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r[e]["p99_ms"] for r in rs),
            }
            figures[kind] = f
            print(
                f"{e:<18} {kind:<9} {f['requests']:>9} {f['errors']:>7} {f['p50_ms']:>8.1f} {f['p99_ms']:>8.1f}"
            )
        figures["p99_ratio"] = figures["swapping"]["p99_ms"] / figures["steady"]["p99_ms"]
        print(f"{e:<18} p99 swapping / steady: {figures['p99_ratio']:.2f}x")
        summary["endpoints"][e] = figures
    ok_swaps = sum(1 for s in swaps if s["swapped"])
    errors = sum(f["swapping"]["errors"] + f["steady"]["errors"] for f in summary["endpoints"].values())
    print(
        f"swaps: {ok_swaps} of {len(swaps)} swapped, "
        f"{statistics.median([s['seconds'] for s in swaps]) if swaps else float('nan'):.2f} s median per reload"
    )
    print(f"goal: 0 failed requests during swaps: {'met' if errors == 0 else f'missed ({errors} failed)'}")
    summary["errors"] = errors
    if args.json:
        print(json.dumps(summary))
    return 0 if errors == 0 and ok_swaps == len(swaps) and swaps else 1


if __name__ == "__main__":
    sys.exit(main())
