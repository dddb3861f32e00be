"""The BentoML service: a thin class that parses requests, calls :class:`serving.engine.Engine`, serialises answers.

Configuration comes from the environment (see :meth:`serving.engine.EngineConfig.from_env`): ``NEXTBEST_DATA``,
``NEXTBEST_STATE_DIR``, ``MLFLOW_TRACKING_URI``, ``NEXTBEST_ADMIN_TOKEN``, ``NEXTBEST_CHALLENGER_SHARE``,
``NEXTBEST_POLICY``, ``NEXTBEST_CLOCK``; the keys and limits of the request gate (:mod:`serving.gate`:
``NEXTBEST_APP_TOKEN``, ``NEXTBEST_ADMIN_TOKEN``, ``NEXTBEST_MAX_BODY_BYTES``, 1 MiB); the erasure key
(:mod:`features.privacy`); ``NEXTBEST_MAX_BATCH`` (64; 1 turns batching off) and ``NEXTBEST_LOG_LEVEL`` (INFO).
All of it is read when a worker starts. The BentoML server's own settings (the decorator's,
:data:`serving.server.SERVICE_DEFAULTS`) are fixed; ``nextbest serve`` turns ``--workers``,
``NEXTBEST_ACCESS_LOG`` and ``NEXTBEST_TRACING`` (both off) and ``NEXTBEST_METRICS`` (on) into BentoML's
``BENTOML_CONFIG_OVERRIDES`` (:func:`serving.server.bentoml_overrides`), which BentoML applies when it starts
the service; with a bare ``bentoml serve``, set ``BENTOML_CONFIG_OVERRIDES`` yourself. ``NEXTBEST_THREADS``
(threads for the blocking endpoints, default 8) is the one setting read when BentoML imports this module in the
worker: BentoML 1.4.39 sizes its thread limiter from the decorator's arguments only. Models and data load in a
background thread, so ``/livez`` answers at once and ``/readyz`` only once everything is loaded. The live state
and its logs live in the state store (:mod:`serving.state_store`), which every worker and replica shares.

``/recommend`` and ``/next_best_action`` run on the event loop through an :class:`AdaptiveBatcher`: requests
that arrive together are answered with one call of the engine (one matrix product, one forward pass); BentoML's
own ``batchable=True`` cannot serve these endpoints unchanged (see :class:`AdaptiveBatcher` for why, and the
measured comparison). The endpoints that write or rebuild (``/events``, ``/profile``, ``/forget``,
``/erasure``, ``/levers``) run in worker threads.

Every endpoint takes a flat JSON body validated by its model in :mod:`serving.api`. The request gate
(:class:`serving.gate.RequestGate`) checks the key, the content type, the size and the body before BentoML sees
the request, and answers refusals itself (401, 403, 413, 415, 400 naming every invalid field). The engine's own
refusals (an unknown item in a filter, an unknown action, an erased customer) come back as ``{"error": "..."}``
with their 4xx status. Every refusal is one log line; only a 5xx logs a traceback.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from nextbest.serving.api import (
    CustomerRequest,
    ErasureRequest,
    ErasureStatus,
    EventsRequest,
    EventsResponse,
    ForgetResponse,
    LeversRequest,
    LeversResponse,
    NextBestActionRequest,
    NextBestActionResponse,
    ProfileResponse,
    PropensityRequest,
    PropensityResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
)
from nextbest.serving.gate import (
    APP_TOKEN_ENV,
    HOST_ENV,
    RequestGate,
)
from nextbest.serving.openapi import complete_spec

with bentoml.importing():
    from nextbest.serving.engine import Engine, EngineConfig, EngineLoadError, ServiceError, one_line
    from nextbest.serving.server import SERVICE_DEFAULTS, SERVICE_NAME, check_start, max_batch, thread_count

logger = logging.getLogger("nextbest.service")


class AdaptiveBatcher:
    """Answers the requests that arrive while the event loop is busy with one call.

    A request enqueues itself and, if no flush is pending, schedules one on the event loop. The flush waits
    while the queue keeps growing from one loop iteration to the next (the requests already read are still
    being parsed), at most ``max_ticks`` iterations, then answers up to ``max_batch`` requests with one call
    of ``answer_many``. One client waits two loop iterations; many clients share one matrix product.

    Why not BentoML's own ``@bentoml.api(batchable=True)`` (issue 16; checked on BentoML 1.4.39, whose
    ``batch_infer`` and ``CorkDispatcher`` do the batching; probed by ``benchmarks/batching.py`` against the
    variant in ``benchmarks/batchable_service.py``). It cannot serve these endpoints without changing them:

    - The contract: a batchable API takes exactly one argument, itself a batch (``{"requests": [{...}]}``), and
      answers a list. Our flat body is refused with 400; declaring ``input_spec=RecommendRequest`` batchable
      fails every request with 500 (``TypeError: Batch inference function only accept one argument``).
    - One context per batch: the function runs once per batch with one set of keyword arguments, and its
      ``ctx.request`` / ``ctx.response`` are those of the route's first request ever (context variables of the
      dispatcher's task), so no caller's headers are seen and a status set there reaches no response.
    - Errors: a request the engine refuses either stays in place inside a 200 answer (its 4xx lost) or is
      raised, and then every batch-mate gets its 4xx (11 of 40 good requests in the probe). Here each request
      gets its own answer or its own ``{"error": ...}`` with its status.
    - Its ``max_latency_ms`` sheds load with 503: at 20 ms nearly every request at 32 clients was refused.

    Measured side by side on ``/recommend`` (benchmarks/README.md, "Adaptive batching: ours and BentoML's";
    2 shared cores, one run): with a 200 ms bound BentoML's batching gave 0.50× our requests/s at one client and
    0.45× at 32 clients, at about twice our latency and CPU per request; ours gave 1.34× the requests/s of no
    batching at 32 clients, at 0.74× the CPU per request.
    """

    def __init__(
        self, answer_many: Callable[[list[Any]], list[Any]], max_batch: int = 64, max_ticks: int = 4
    ):
        self.answer_many = answer_many
        self.max_batch = max_batch
        self.max_ticks = max_ticks
        self._queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._seen = 0
        self._ticks = 0

    async def submit(self, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((request, future))
        if not self._scheduled:
            self._scheduled, self._seen, self._ticks = True, 0, 0
            loop.call_soon(self._tick)
        return await future

    def _tick(self) -> None:
        n = len(self._queue)
        if n < self.max_batch and n > self._seen and self._ticks < self.max_ticks:
            self._seen, self._ticks = n, self._ticks + 1
            asyncio.get_running_loop().call_soon(self._tick)
            return
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if self._queue:
            self._seen, self._ticks = 0, 0
            asyncio.get_running_loop().call_soon(self._tick)
        else:
            self._scheduled = False
        live = [(r, f) for r, f in batch if not f.cancelled()]
        if not live:
            return
        try:
            answers = self.answer_many([r for r, _ in live])
        except Exception as e:
            for _, f in live:
                if not f.done():
                    f.set_exception(e)
            return
        for (_, f), answer in zip(live, answers, strict=True):
            if not f.done():  # a client that gave up meanwhile
                f.set_result(answer)


def _error(status: int, message: str, ctx: bentoml.Context | None = None) -> JSONResponse:
    logger.info("refused: %d %s", status, message[:300])
    if ctx is not None:
        # With a context parameter BentoML copies the context's status onto the response.
        ctx.response.status_code = status
    return JSONResponse({"error": message}, status_code=status)


def start_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this worker must not serve (None: it may): :func:`serving.server.check_start` as the worker sees
    its configuration — open app endpoints beyond loopback would expose customers' data."""
    env = os.environ if environ is None else environ
    try:
        warning = check_start(env.get(HOST_ENV, "127.0.0.1"), env.get(APP_TOKEN_ENV))
    except EngineLoadError as e:
        return str(e)
    if warning:
        logger.warning("nextbest: %s", warning)
    return None


# BentoML reads ``threads`` from this dictionary only (see serving.server.bentoml_overrides): the one setting
# read when BentoML imports the module in the worker; the others come from BENTOML_CONFIG_OVERRIDES at start.
@bentoml.service(name=SERVICE_NAME, threads=thread_count(os.environ), **copy.deepcopy(SERVICE_DEFAULTS))
class NextBest:
    """nextbest: follow-up purchases, action propensities and the next best action, in real time."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.config: EngineConfig | None = None
        # BentoML shows warnings only; the service's own lines (start, refusals, erasures) are worth reading.
        logging.getLogger("nextbest").setLevel(os.environ.get("NEXTBEST_LOG_LEVEL", "INFO").upper())
        try:
            self.max_batch = max_batch(os.environ)
            problem = start_problem()
        except EngineLoadError as e:
            self.max_batch, problem = 1, one_line(e)
        self.recommend_batcher = AdaptiveBatcher(self._recommend_many, max_batch=self.max_batch)
        self.decision_batcher = AdaptiveBatcher(self._decide_many, max_batch=self.max_batch)
        if problem is not None:
            self.load_error = problem
            logger.error("nextbest: cannot start: %s", problem)
            return
        try:
            self.config = EngineConfig.from_env()
        except EngineLoadError as e:
            self.config = None
            self.load_error = one_line(e)
            logger.error("nextbest: cannot start: %s", self.load_error)
            return
        threading.Thread(target=self._load, name="nextbest-load", daemon=True).start()

    def _load(self) -> None:
        assert self.config is not None
        try:
            self.engine = Engine.load(self.config)
        except EngineLoadError as e:
            self.load_error = one_line(e)
            logger.error("nextbest: cannot start: %s", self.load_error)
        except Exception as e:  # the service must say why it will never be ready
            self.load_error = one_line(e)
            logger.exception("nextbest: cannot start: %s", self.load_error)

    def __is_ready__(self) -> bool:
        return self.engine is not None

    def _call(self, work: Callable[[Engine], Any], ctx: bentoml.Context | None = None) -> Any:
        engine = self.engine
        if engine is None:
            why = self.load_error or "models and data are still loading"
            return _error(503, f"not ready: {why}", ctx)
        try:
            return work(engine)
        except ServiceError as e:
            return _error(e.status, e.message, ctx)

    def _recommend_many(self, requests: list[RecommendRequest]) -> list[Any]:
        assert self.engine is not None
        return self.engine.recommend_many(requests)

    def _decide_many(self, requests: list[NextBestActionRequest]) -> list[Any]:
        assert self.engine is not None
        return self.engine.next_best_action_many(requests)

    async def _batched(self, batcher: AdaptiveBatcher, request: Any, single: Callable[[Engine], Any]) -> Any:
        if self.engine is None or self.max_batch <= 1:
            return self._call(single)
        answer = await batcher.submit(request)
        if isinstance(answer, ServiceError):
            return _error(answer.status, answer.message)
        return answer

    @staticmethod
    def _authorization(ctx: bentoml.Context) -> str | None:
        return ctx.request.headers.get("authorization")

    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(self, **params: Any) -> RecommendResponse:
        """Follow-up purchases for a customer now, with reasons (concurrent requests are batched)."""
        request = RecommendRequest.model_construct(**params)
        return await self._batched(self.recommend_batcher, request, lambda e: e.recommend(request))

    @bentoml.api(route="/similar_items", input_spec=SimilarItemsRequest)
    async def similar_items(self, **params: Any) -> SimilarItemsResponse:
        """Items like one item."""
        return self._call(lambda e: e.similar_items(SimilarItemsRequest.model_construct(**params)))

    @bentoml.api(route="/propensity", input_spec=PropensityRequest)
    async def propensity(self, **params: Any) -> PropensityResponse:
        """Calibrated response probability per action."""
        return self._call(lambda e: e.propensity(PropensityRequest.model_construct(**params)))

    @bentoml.api(route="/next_best_action", input_spec=NextBestActionRequest)
    async def next_best_action(self, **params: Any) -> NextBestActionResponse:
        """The best actions now by propensity × value × lever, within rules, consent and contact limits
        (concurrent requests share one forward pass of the propensity model)."""
        request = NextBestActionRequest.model_construct(**params)
        return await self._batched(self.decision_batcher, request, lambda e: e.next_best_action(request))

    @bentoml.api(route="/events", input_spec=EventsRequest)
    def events(self, **params: Any) -> EventsResponse:
        """Interactions and offer responses: stored durably, then applied to the live state at once."""
        return self._call(lambda e: e.events(EventsRequest.model_construct(**params)))

    @bentoml.api(route="/profile", input_spec=CustomerRequest)
    def profile(self, ctx: bentoml.Context, **params: Any) -> ProfileResponse:
        """Admin: everything stored and derived about a customer (GDPR right of access)."""
        return self._call(lambda e: e.profile(CustomerRequest.model_construct(**params)), ctx)

    @bentoml.api(route="/forget", input_spec=CustomerRequest)
    def forget(self, ctx: bentoml.Context, **params: Any) -> ForgetResponse:
        """Admin: erase a customer; the next training run leaves them out."""
        return self._call(
            lambda e: e.forget(CustomerRequest.model_construct(**params), self._authorization(ctx)), ctx
        )

    @bentoml.api(route="/erasure", input_spec=ErasureRequest)
    def erasure(self, ctx: bentoml.Context, **params: Any) -> ErasureStatus:
        """Admin: the state of a dataset erasure that ``/forget`` queued."""
        return self._call(
            lambda e: e.erasure_status(ErasureRequest.model_construct(**params), self._authorization(ctx)),
            ctx,
        )

    @bentoml.api(route="/levers", input_spec=LeversRequest)
    def levers(self, ctx: bentoml.Context, **params: Any) -> LeversResponse:
        """Admin: read the action levers, or change one (logged)."""
        return self._call(
            lambda e: e.levers_request(LeversRequest.model_construct(**params), self._authorization(ctx)), ctx
        )

    @bentoml.api(route="/reload", input_spec=ReloadRequest)
    def reload(self, ctx: bentoml.Context, **params: Any) -> ReloadResponse:
        """Admin: swap in new champions (and rebuilt features) now, without a restart; requests go on."""
        return self._call(
            lambda e: e.reload_request(ReloadRequest.model_construct(**params), self._authorization(ctx)), ctx
        )


def _spec(app_token: bool, admin_token: bool) -> dict[str, Any]:
    return complete_spec(NextBest.openapi_spec.asdict(), app_token=app_token, admin_token=admin_token)


# The gate reads its keys and limit when BentoML builds the app in the worker, not at import.
NextBest.add_asgi_middleware(RequestGate, spec=_spec)
