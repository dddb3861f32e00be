"""The variant service of ``benchmarks/batching.py``: ``/recommend`` under BentoML's own adaptive batching.

Not part of the product. It serves the same engine as :mod:`serving.service` (``EngineConfig.from_env()``,
started by ``bentoml serve benchmarks.batchable_service:BatchableNextBest``), but with
``@bentoml.api(batchable=True)`` in place of our :class:`serving.service.AdaptiveBatcher`, so that the two can be
measured side by side and the reasons we keep ours can be shown by running it.

BentoML 1.4's batching (``_bentoml_impl/server/app.py`` ``ServiceAppFactory.batch_infer`` and
``bentoml/_internal/marshal/dispatcher.py`` ``CorkDispatcher``) allows exactly one argument besides the context,
which must itself be a batch: so the body is ``{"requests": [{...}, ...]}``, not our flat ``{"customer_id": ...}``
(``/recommend_flat`` declares the flat contract and shows what happens). The batches of the callers that arrive
together are concatenated along ``batch_dim`` and the function's result split back. The function runs once per
batch with one set of keyword arguments — those of the caller that last entered the dispatcher — and its
``ctx.request`` / ``ctx.response`` are context variables of the dispatcher's controller task, which the first
request of the worker's life started: a status set there reaches no caller (``/whose_context`` shows whose
request the batch sees). An exception fails every caller of the batch (``/recommend_raising``); an error kept in
place can only travel inside a 200 answer (``/recommend``).
"""

from __future__ import annotations

import os
from http import HTTPStatus
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel

from nextbest.serving.api import RecommendRequest, RecommendResponse

with bentoml.importing():
    from nextbest.serving.engine import Engine, EngineConfig, ServiceError

THREADS = int(os.environ.get("NEXTBEST_THREADS", "8"))
MAX_BATCH = 64
MAX_LATENCY_MS = int(os.environ.get("NEXTBEST_BATCH_LATENCY_MS", "20"))
"""BentoML's latency bound: a request its dispatcher expects to miss it is refused with 503."""
ROUTES = ("/recommend", "/recommend_raising", "/recommend_flat", "/whose_context")
BATCHING = {"batchable": True, "batch_dim": 0, "max_batch_size": MAX_BATCH, "max_latency_ms": MAX_LATENCY_MS}


class RefusedRequest(BaseModel):
    """A request of the batch that the engine refused, in its place in the answer (HTTP status 200)."""

    error: str
    status: int


# The same server settings as serving.service.NextBest (one worker, its threads, no access log, no tracing on
# the API routes, metrics on), so that the batching is the difference; no request gate (loopback benchmark).
@bentoml.service(
    name="nextbest-batchable",
    workers=1,
    threads=THREADS,
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": list(ROUTES)},
)
class BatchableNextBest:
    """``/recommend`` with BentoML's adaptive batching, and the probes of what it cannot do."""

    def __init__(self) -> None:
        self.engine = Engine.load(EngineConfig.from_env())

    @bentoml.api(route="/recommend", **BATCHING)
    def recommend(
        self, requests: list[RecommendRequest], ctx: bentoml.Context
    ) -> list[RecommendResponse | RefusedRequest]:
        """The answers of a batch of requests; a refused one in its place, as ``{"error", "status"}``."""
        answers: list[Any] = []
        for answer in self.engine.recommend_many(requests):
            if isinstance(answer, ServiceError):
                # What serving.service does for one request; here it sets the status of no current response.
                ctx.response.status_code = answer.status
                answer = RefusedRequest(error=answer.message, status=answer.status)
            answers.append(answer)
        return answers

    @bentoml.api(route="/recommend_raising", **BATCHING)
    def recommend_raising(self, requests: list[RecommendRequest]) -> list[RecommendResponse]:
        """As ``/recommend``, but a refused request raises its 4xx (the only way to a per-request status)."""
        answers = self.engine.recommend_many(requests)
        for answer in answers:
            if isinstance(answer, ServiceError):
                raise BentoMLException(answer.message, error_code=HTTPStatus(answer.status))
        return answers  # type: ignore[return-value]

    @bentoml.api(route="/recommend_flat", input_spec=RecommendRequest, **BATCHING)
    def recommend_flat(self, **params: Any) -> list[RecommendResponse]:
        """Our flat contract declared batchable: BentoML refuses it per request (one argument only)."""
        return self.engine.recommend_many([RecommendRequest.model_construct(**params)])  # type: ignore[return-value]

    @bentoml.api(route="/whose_context", **BATCHING)
    def whose_context(self, tags: list[str], ctx: bentoml.Context) -> list[str]:
        """Each tag with the ``X-Probe`` header of the request that the batch's context holds."""
        seen = ctx.request.headers.get("x-probe", "")
        return [f"{tag} saw {seen}" for tag in tags]
