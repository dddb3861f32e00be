"""Start the BentoML service (``python -m bentoml serve serving.service:NextBest``) with its environment set.

:func:`serve` runs it in the foreground (what ``nextbest serve`` calls); :func:`start` runs it in the background
and returns a :class:`ServiceProcess` (tests and benchmarks). Either can serve a built Bento instead of the
working tree (``bento="nextbest:latest"``: ``bentoml serve <bento tag>``, with the champions it packages). Both
check first that the features and both champions exist, so a missing piece is one line saying what to run,
not a server that never becomes ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from nextbest.serving.api import ROUTES
from nextbest.serving.engine import EngineConfig, EngineLoadError, check_models
from nextbest.serving.gate import APP_TOKEN_ENV, HOST_ENV, ExposureError, check_exposure

SERVICE = "nextbest.serving.service:NextBest"
SERVICE_NAME = "nextbest"
"""The BentoML service's name (its settings live under ``services.nextbest`` in BentoML's configuration)."""
OVERRIDES_ENV = "BENTOML_CONFIG_OVERRIDES"
"""BentoML's own variable: JSON merged over the service's decorator settings when BentoML starts it."""

DEFAULT_THREADS = 8
"""Threads for the blocking endpoints (``NEXTBEST_THREADS``)."""
DEFAULT_MAX_BATCH = 64
"""Most requests one engine call answers (``NEXTBEST_MAX_BATCH``; 1: no batching)."""
SERVICE_DEFAULTS: dict[str, Any] = {
    "workers": 1,
    "traffic": {"timeout": 30},
    # One log line per request costs about a tenth of a request's time: off unless asked for.
    "logging": {"access": {"enabled": False}},
    # BentoML opens several OpenTelemetry spans per request, even with no exporter configured, at a cost of a
    # fair share of a millisecond: off for the API routes unless asked for.
    "tracing": {"excluded_urls": list(ROUTES)},
    # Prometheus metrics on /metrics: a fifth of a millisecond per request.
    "metrics": {"enabled": True},
}
"""The service's BentoML settings when nothing asks otherwise (the ``@bentoml.service`` decorator's: fixed,
read from nothing at import)."""


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise EngineLoadError(f"{name}={env[name]!r} is not a yes/no value: use 1 or 0")


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EngineLoadError(f"{name}={env[name]!r} is not a whole number of at least 1")
    return value


def max_batch(env: Mapping[str, str]) -> int:
    """``NEXTBEST_MAX_BATCH`` (default 64), read when the service starts.

    Raises:
        EngineLoadError: not a whole number of at least 1.
    """
    return _count(env, "NEXTBEST_MAX_BATCH", DEFAULT_MAX_BATCH)


def thread_count(env: Mapping[str, str]) -> int:
    """``NEXTBEST_THREADS`` (default 8).

    Raises:
        EngineLoadError: not a whole number of at least 1.
    """
    return _count(env, "NEXTBEST_THREADS", DEFAULT_THREADS)


def bentoml_overrides(env: Mapping[str, str], workers: int = 1) -> dict[str, Any]:
    """The settings of the service's BentoML server that ``env`` asks for, as the value of
    ``BENTOML_CONFIG_OVERRIDES`` (``{"services": {"nextbest": {...}}}``; empty when it asks for nothing): the
    workers, ``NEXTBEST_ACCESS_LOG``, ``NEXTBEST_TRACING`` and ``NEXTBEST_METRICS``. BentoML merges them over
    :data:`SERVICE_DEFAULTS` when it starts the service, so they are read at start, never at import.

    ``NEXTBEST_THREADS`` is the exception: BentoML 1.4.39 sizes the blocking endpoints' thread limiter from the
    decorator's own dictionary (``_bentoml_impl/server/app.py``, ``_to_thread``), never from its merged
    configuration, so the service module reads it when BentoML imports it in the worker
    (:data:`SERVICE_DEFAULTS` stays fixed; ``serving.service`` passes :func:`thread_count` beside it).

    Raises:
        EngineLoadError: a variable holds a value that is not a yes/no.
    """
    service: dict[str, Any] = {}
    if workers != 1:
        service["workers"] = workers
    if _flag(env, "NEXTBEST_ACCESS_LOG"):
        service["logging"] = {"access": {"enabled": True}}
    if _flag(env, "NEXTBEST_TRACING"):
        service["tracing"] = {"excluded_urls": []}
    if _flag(env, "NEXTBEST_METRICS") is False:
        service["metrics"] = {"enabled": False}
    return {"services": {SERVICE_NAME: service}} if service else {}


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 3000


def service_env(
    config: EngineConfig,
    *,
    threads: int | None = None,
    base: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    app_token: str | None = None,
    workers: int = 1,
) -> dict[str, str]:
    """The environment of the service process: ``base`` (default ``os.environ``) plus the config's variables,
    the address it listens on, the BentoML settings asked for (the worker count, ``threads`` and the
    variables of :func:`bentoml_overrides`, merged into ``BENTOML_CONFIG_OVERRIDES``) and, when given, the app
    key (else ``NEXTBEST_APP_TOKEN`` as in ``base``).

    Raises:
        EngineLoadError: fewer than one worker, or a server variable with a value it cannot take.
    """
    if workers < 1:
        raise EngineLoadError(f"--workers must be at least 1, got {workers}")
    env = dict(os.environ if base is None else base)
    if threads is not None:
        env["NEXTBEST_THREADS"] = str(threads)
    thread_count(env)  # refused here, in one line, rather than in the worker
    overrides = bentoml_overrides(env, workers)
    if overrides:
        try:
            given = json.loads(env.get(OVERRIDES_ENV) or "{}")
        except ValueError:
            raise EngineLoadError(f"{OVERRIDES_ENV} is not JSON: {env[OVERRIDES_ENV][:200]!r}") from None
        env[OVERRIDES_ENV] = json.dumps(_merged(given if isinstance(given, dict) else {}, overrides))
    env[HOST_ENV] = host
    if app_token:
        env[APP_TOKEN_ENV] = app_token
    env["NEXTBEST_DATA"] = str(config.data)
    env["NEXTBEST_STATE_DIR"] = str(config.state_path)
    env["NEXTBEST_CHALLENGER_SHARE"] = str(config.challenger_share)
    env["NEXTBEST_CLOCK"] = config.clock
    env["NEXTBEST_MODEL_SOURCE"] = config.model_source
    if config.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = config.tracking_uri
    if config.policy is not None:
        env["NEXTBEST_POLICY"] = str(config.policy)
    if config.state_url:
        env["NEXTBEST_STATE_URL"] = config.state_url
    if config.admin_token:
        env["NEXTBEST_ADMIN_TOKEN"] = config.admin_token
    else:
        env.pop("NEXTBEST_ADMIN_TOKEN", None)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # BentoML would otherwise phone home with usage statistics.
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return env


def check_start(host: str, app_token: str | None) -> str | None:
    """Refuse a start that would expose customers' data; return the warning to print, if any.

    Raises:
        EngineLoadError: a non-loopback address without ``NEXTBEST_APP_TOKEN``.
    """
    try:
        return check_exposure(host, app_token)
    except ExposureError as e:
        raise EngineLoadError(str(e)) from None


def preflight(config: EngineConfig, bento: str | None = None) -> dict[str, str]:
    """Check that the dataset's features and both champion models exist; return the champions' labels.

    With ``bento``, the champions are the models that Bento packages, looked up in the BentoML model store
    (the MLflow registry is not asked); otherwise they are looked up where ``config.model_source`` says.

    Raises:
        EngineLoadError: one line naming what is missing and what to run first.
    """
    manifest = Path(config.data) / "features" / "manifest.json"
    if not manifest.exists():
        raise EngineLoadError(
            f"{config.data} has no features: run 'nextbest features build --data {config.data}' first"
        )
    if bento is None:
        return check_models(config)
    from nextbest.serving.bento_store import SERVED_MODELS, BentoStoreError, bento_model_tags, stored_model

    try:
        tags = bento_model_tags(bento)
        missing = [kind for kind in SERVED_MODELS if kind not in tags]
        if missing:
            raise EngineLoadError(
                f"Bento {bento} packages no {' and no '.join(missing)} model: build it with "
                "'nextbest bento build' after 'nextbest promote recommender' and 'nextbest promote propensity'"
            )
        return {kind: stored_model(tags[kind]).label for kind in SERVED_MODELS}
    except BentoStoreError as e:
        raise EngineLoadError(" ".join(str(e).split())) from None


def _command(host: str, port: int, extra: Sequence[str], bento: str | None = None) -> list[str]:
    target = [bento] if bento is not None else [SERVICE, "--working-dir", str(PROJECT_ROOT)]
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        *target,
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]


def _config(
    data: str | Path,
    state_dir: str | Path | None,
    tracking_uri: str | None,
    policy: str | Path | None,
    challenger_share: float,
    admin_token: str | None,
    clock: Literal["wall", "data"],
    model_source: Literal["auto", "mlflow", "bentoml"] = "auto",
    state_url: str | None = None,
) -> EngineConfig:
    return EngineConfig(
        data=Path(data).resolve(),
        state_dir=Path(state_dir).resolve() if state_dir is not None else None,
        tracking_uri=tracking_uri,
        admin_token=admin_token if admin_token is not None else os.environ.get("NEXTBEST_ADMIN_TOKEN"),
        challenger_share=challenger_share,
        policy=Path(policy).resolve() if policy is not None else None,
        clock=clock,
        model_source=model_source,
        state_url=state_url or os.environ.get("NEXTBEST_STATE_URL") or None,
    )


def serve(
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    data: str | Path = "data/world",
    *,
    state_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    policy: str | Path | None = None,
    challenger_share: float = 0.0,
    admin_token: str | None = None,
    clock: Literal["wall", "data"] = "wall",
    model_source: Literal["auto", "mlflow", "bentoml"] = "auto",
    bento: str | None = None,
    threads: int | None = None,
    check: bool = True,
    extra_args: Sequence[str] = (),
    app_token: str | None = None,
    state_url: str | None = None,
    workers: int = 1,
) -> int:
    """Run ``bentoml serve`` for the service in the foreground until it stops; return its exit status.

    SIGTERM and SIGINT (what systemd, container runtimes and Ctrl-C send) stop the whole process tree: the
    server and every worker, which BentoML runs in sessions of their own.

    Args:
        port, host: where to listen.
        data: the dataset directory (features built, models trained and promoted).
        state_dir: live state (default ``DATA/service``).
        tracking_uri: the MLflow registry (default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``).
        policy: the action policy file (default: the shipped one).
        challenger_share: share of customers served by the challenger models.
        admin_token: bearer token of the admin endpoints (default ``NEXTBEST_ADMIN_TOKEN``; none: disabled).
        clock: ``wall`` or ``data`` (time runs on from the dataset's last event).
        model_source: ``auto`` (a Bento's packaged models, else the MLflow registry), ``mlflow`` or
            ``bentoml`` (the BentoML model store's champions).
        bento: serve this built Bento (a tag such as ``nextbest:latest``) instead of the working tree.
        threads: request threads of the worker (default 16).
        check: check the features and the champions first (:func:`preflight`).
        extra_args: more ``bentoml serve`` arguments.
        app_token: the key of the app endpoints (default ``NEXTBEST_APP_TOKEN``; none: open, on loopback only).
        state_url: the state store (default ``NEXTBEST_STATE_URL``, else ``sqlite:///STATE_DIR/state.db``);
            replicas share one PostgreSQL.
        workers: BentoML workers (processes) on this machine; they share the state store like replicas.

    Raises:
        EngineLoadError: the start was refused (:func:`check_start`) or the preflight check failed (one line
            saying what to run first).
    """
    config = _config(
        data, state_dir, tracking_uri, policy, challenger_share, admin_token, clock, model_source, state_url
    )
    app_token = app_token or os.environ.get(APP_TOKEN_ENV)
    warning = check_start(host, app_token)
    if warning:
        print(f"nextbest: warning: {warning}", file=sys.stderr)
    if check:
        preflight(config, bento)
    env = service_env(config, threads=threads, host=host, app_token=app_token, workers=workers)
    server = ServiceProcess(
        subprocess.Popen(_command(host, port, extra_args, bento), env=env, start_new_session=True),
        f"http://{host}:{port}",
        None,
    )
    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Polled rather than waited on: a signal only sets the flag, and the tree is stopped here.
        while server.process.poll() is None and not stopping:
            time.sleep(0.2)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = server.process.returncode
    return 128 + stopping[0] if stopping else code


def example_requests(data: str | Path, url: str = f"http://127.0.0.1:{DEFAULT_PORT}") -> list[str]:
    """``curl`` commands to try against a running service, for a real customer and item of the dataset."""
    import polars as pl

    feats = Path(data) / "features"
    customer, item = "C0000001", "I00001"
    if (feats / "profiles.parquet").exists():
        ids = pl.read_parquet(feats / "profiles.parquet", columns=["customer_id"])["customer_id"]
        customer = ids[0] if len(ids) else customer
    if (feats / "items.parquet").exists():
        items = pl.read_parquet(feats / "items.parquet", columns=["item_id"])["item_id"]
        item = items[0] if len(items) else item

    # The key itself is never printed: the command reads it from the environment.
    key = f' -H "Authorization: Bearer ${APP_TOKEN_ENV}"' if os.environ.get(APP_TOKEN_ENV) else ""

    def curl(path: str, body: dict[str, Any]) -> str:
        return f"curl -s -X POST {url}{path}{key} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"

    return [
        curl("/recommend", {"customer_id": customer, "n": 5}),
        curl("/next_best_action", {"customer_id": customer, "channel": "web"}),
        curl("/events", {"events": [{"customer_id": customer, "item_id": item, "event_type": "view"}]}),
        curl("/similar_items", {"item_id": item, "n": 5}),
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """A ``bentoml serve`` process in its own session (so the whole process group can be signalled).

    Attributes:
        url: the base URL (``http://host:port``).
        process: the Popen handle.
        log_path: where its stdout and stderr go.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, log_path: Path | None, workers: int = 1
    ) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        self.workers = workers

    def log(self) -> str:
        """What the server printed so far (empty without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ServiceProcess:
        """Wait until ``/readyz`` answers 200 (with several workers: from every worker).

        Each probe is a new connection, which the kernel hands to any worker; a worker still loading answers
        503. With N workers, ready means 8·N probes in a row answered 200: a worker still loading would be
        missed by all of them with a chance of ((N-1)/N)^(8N), under 1 in 250.

        Raises:
            RuntimeError: the process exited or the timeout passed; the message holds the end of its log.
        """
        import httpx

        deadline = time.monotonic() + timeout
        needed = 1 if self.workers <= 1 else 8 * self.workers
        in_a_row = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                ok = httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            in_a_row = in_a_row + 1 if ok else 0
            if in_a_row >= needed:
                return self
            time.sleep(0.2 if not ok else 0.02)
        raise RuntimeError(f"the service was not ready within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def _tree(self) -> list[int]:
        """The server and every process under it. BentoML's workers run in sessions of their own, so the
        process group of the server does not reach them."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group and to every worker under it."""
        if self.process.poll() is not None:
            return
        tree = self._tree()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the server and its workers, SIGKILL what is left after ``timeout``; return the exit status."""
        tree = self._tree()
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.wait()
        self._reap(tree)
        return code

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a crash: nothing gets to flush or clean up)."""
        tree = self._tree()
        self.signal(signal.SIGKILL)
        self.process.wait()
        self._reap(tree)

    @staticmethod
    def _reap(pids: list[int], timeout: float = 10.0) -> None:
        """Wait until the processes of ``pids`` are gone, SIGKILLing any that linger."""
        import psutil

        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                alive.append(psutil.Process(pid))
        _, left = psutil.wait_procs(alive, timeout=timeout)
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(left, timeout=timeout)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(
    data: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    state_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    policy: str | Path | None = None,
    challenger_share: float = 0.0,
    admin_token: str | None = None,
    clock: Literal["wall", "data"] = "wall",
    model_source: Literal["auto", "mlflow", "bentoml"] = "auto",
    bento: str | None = None,
    threads: int | None = None,
    log_path: str | Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    check: bool = True,
    app_token: str | None = None,
    state_url: str | None = None,
    workers: int = 1,
) -> ServiceProcess:
    """Start the service in the background (its own session); call :meth:`ServiceProcess.wait_ready` next.

    Arguments as for :func:`serve`; ``port`` None picks a free one, ``log_path`` receives its output.

    Raises:
        EngineLoadError: the preflight check failed.
    """
    config = _config(
        data, state_dir, tracking_uri, policy, challenger_share, admin_token, clock, model_source, state_url
    )
    env = service_env(config, threads=threads, host=host, app_token=app_token, workers=workers)
    env.update(extra_env or {})
    check_start(host, env.get(APP_TOKEN_ENV))
    if check:
        preflight(config, bento)
    port = port or free_port(host)
    log = Path(log_path) if log_path is not None else None
    out: Any = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 -- handed to the child, closed below
    try:
        process = subprocess.Popen(
            _command(host, port, (), bento),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()
    return ServiceProcess(process, f"http://{host}:{port}", log, workers)
