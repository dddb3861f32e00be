"""The serving runtime's façade: :class:`Engine` owns the models, the dataset's side, the live state and the state
store, and answers every endpoint by calling the modules that do the work.

Why it is longer than the project's ~600 lines: :class:`Engine` is the one owner of the shared state (the served
set and its swap lock, the engine's lock, the state store, the ledger, the background threads) and keeps the order
in which an endpoint touches it (erased ids checked under the lock, a model swap waiting for requests, a rolled
back transaction undone in memory too). Each endpoint is a short sequence of calls into the parts; splitting the
class further would spread that order over several files without removing a line of logic.

The parts (plain Python; the BentoML class in :mod:`serving.service` only parses, calls and serialises):

* **Models** — champions (and challengers) of ``nextbest-recommender`` and ``nextbest-propensity`` from the
  MLflow registry or the BentoML model store (:func:`load_serving_models`, in :mod:`serving.models`; the
  configuration and the named errors in :mod:`serving.engine_config`; all re-exported here), mapped onto the
  service's items in :mod:`serving.model_slots`.
* **Data** — the dataset's features, tables and retained events, indexed by customer (:mod:`serving.serving_data`).
* **Live state** — ``/events`` are stored durably first (:mod:`serving.event_intake`) in the state store shared by
  every worker and replica (:mod:`serving.state_store`), then applied from its change feed, in commit order, to
  the customer's live row, their profile rebuilt with the pipeline's own code (:mod:`serving.live_state`); erased
  ids are purged everywhere (:mod:`serving.erasure_purge`). On start-up the store's events are replayed.
* **Answers** — a customer as a request sees them (:mod:`serving.customer_view`); recommendations and similar
  items, never an error (:mod:`serving.ranking`); propensities and the next best action
  (:mod:`serving.next_best_action`).

Errors a client can fix raise :class:`ServiceError` subclasses carrying an HTTP status (400, 401, 403, 404, 409);
start-up problems raise :class:`EngineLoadError` with one line saying what to run first.
"""

from __future__ import annotations

import functools
import gc
import hmac
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from nextbest.features.dataset_lock import erase_customers_atomically, write_lock
from nextbest.features.privacy import ERASURE_LOG, erasure_ids
from nextbest.features.schema import CUSTOMER_ID
from nextbest.serving import api
from nextbest.serving.arms import CHAMPION, Arm, assign_arm
from nextbest.serving.contact import ContactLedger, naive_utc
from nextbest.serving.customer_view import (
    CustomerView,
    access_answer,
    affinities,
    customer_view,
    model_features,
    rule_profile,
)
from nextbest.serving.decision_log import DecisionLog, new_decision_id
from nextbest.serving.decisions import PERSONALISATION

# The configuration, the named errors and the model loading live in their own modules; the rest of the service,
# the CLI and the tests import them from here too.
from nextbest.serving.engine_config import (  # noqa: F401
    DEFAULT_STATE_DIR,
    PROPENSITY_MODEL,
    RECOMMENDER_MODEL,
    BadRequest,
    Conflict,
    EngineConfig,
    EngineLoadError,
    Forbidden,
    Gone,
    NotFound,
    NotReady,
    ServiceError,
    Unauthorized,
    one_line,
)
from nextbest.serving.erasure_purge import Purge, known_erasures
from nextbest.serving.erasure_queue import ErasureQueue
from nextbest.serving.event_intake import FUTURE_TOLERANCE, EventIntake  # noqa: F401
from nextbest.serving.event_log import EventLog
from nextbest.serving.hot_swap import SwapLock, features_stamp
from nextbest.serving.levers import PolicyState
from nextbest.serving.live_state import LiveCustomer, LiveState, not_folded
from nextbest.serving.model_slots import PropensitySlot, RecommenderSlot, Served, serve
from nextbest.serving.models import (  # noqa: F401
    RegisteredModel,
    ServingModels,
    check_models,
    check_registry,
    load_serving_models,
    resolve_model_source,
    served_labels,
)
from nextbest.serving.next_best_action import (
    Decider,
    DecisionPlan,
    one_torch_thread,
    plan_decision,
    score_plans,
)
from nextbest.serving.policy import (
    DEFAULT_POLICY_PATH,
    ActionPolicy,
    PolicyError,
    attach_catalog,
    load_policy,
    unpoliced_actions,
)
from nextbest.serving.ranking import (  # noqa: F401
    SESSION_ITEMS,
    SIMILAR_ATTRIBUTES,
    RankPlan,
    filter_mask,
    popular_answer,
    rank,
    ranked_answer,
    similar_items,
)
from nextbest.serving.serving_data import EVENT_RANK, PROFILING, PURCHASE, RANK_EVENT, ServingData  # noqa: F401
from nextbest.serving.state_store import StateStore, StateStoreError, import_state_dir, redact

logger = logging.getLogger("nextbest.serving")

CHECKPOINT_SECONDS = 30.0
"""How often the embedded store's write-ahead log is folded into the database (:meth:`StateStore.checkpoint`)."""
TRIM_INTERVAL_SECONDS = 3600.0
"""How often the service drops log entries that fell out of the retention window (also done at start)."""


_Answer = TypeVar("_Answer")


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _parse_time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return naive_utc(value)
    if isinstance(value, str):
        try:
            return naive_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    raise BadRequest(f"{where}: {value!r} is not an ISO date-time (e.g. 2026-05-01T12:00:00)")


def _labels_text(labels: Mapping[str, Mapping[str, str]]) -> str:
    return ", ".join(f"{arm} {label}" for arms in labels.values() for arm, label in arms.items())


def _only(answers: Sequence[_Answer | ServiceError]) -> _Answer:
    """The answer of a batch of one request, or its error raised."""
    answer = answers[0]
    if isinstance(answer, ServiceError):
        raise answer
    return answer


def _serving(method: Any) -> Any:
    """Run an endpoint's method against one set of models: a model swap waits for it, and it for the swap."""

    @functools.wraps(method)
    def wrapper(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self._swap.reading():
            return method(self, *args, **kwargs)

    return wrapper


class Engine:
    """Every endpoint's logic over the loaded models, the dataset and the live state. Thread-safe.

    Args:
        config: the engine config.
        models: the registry models (:func:`load_serving_models`, or built in code for tests).
        data: the dataset's side; loaded from ``config.data`` when None.
    """

    def __init__(self, config: EngineConfig, models: ServingModels, data: ServingData | None = None) -> None:
        self.config = config
        self._started_wall = _utcnow()
        self._started = time.monotonic()
        self._lock = threading.RLock()
        self._swap = SwapLock()
        self._reload_lock = threading.Lock()
        self._served = serve(config, models, data)
        self.policy = self._load_policy()
        self._bought_attributes = sorted(
            {f.removeprefix("bought_") for f in self.policy.referenced_fields() if f.startswith("bought_")}
        )
        state = config.state_path
        state.mkdir(parents=True, exist_ok=True)
        try:
            self.store = StateStore(config.store_url)
            imported = import_state_dir(self.store, state)
        except StateStoreError as e:
            raise EngineLoadError(" ".join(str(e).split())) from None
        if imported:
            logger.info("imported the state directory %s into the state store: %s", state, imported)
        self.levers = PolicyState(self.policy, self.store)
        self.ledger = ContactLedger(self.store, self.policy)
        self.decision_log = DecisionLog(self.store)
        self.event_log = EventLog(self.store, event_types=self.data.feature_config.event_types)
        self.live = LiveState(self._lock, known_erasures(self.data.dataset, self.store))
        """The live customers and the erased ids."""
        self.channels = sorted(set(self.policy.named_channels()) | set(self.data.channels))
        """The channels a request may name: the policy's and those the propensity model knows."""
        self.erasures = ErasureQueue(
            self.store,
            lambda ids: erase_customers_atomically(self.data.dataset, ids, locked=True),
            exclusive=lambda: write_lock(self.data.dataset, "erasure"),
        )
        self._decider = Decider(
            self.policy, self.levers, self.ledger, self.decision_log, self.store, self._lock, self._is_erased
        )
        # Ids are drawn through this module's name, so a seeded run that replaces it seeds responses' ids too.
        self._intake = EventIntake(
            self.policy,
            self.store,
            self.event_log,
            self.ledger,
            self._lock,
            self._is_erased,
            lambda: new_decision_id(),
        )
        self._purge = Purge(self.live, self.ledger, self.decision_log, self.store)
        self._sync_lock = threading.Lock()
        self._seen, rows = self.store.snapshot()
        replay = self.event_log.frame(not_folded(rows, self.data, self.store))
        self._purge.logged(self.data, set(replay[CUSTOMER_ID].to_list()))
        replayed = self.live.apply(replay, self.data)  # less the events of the ids just found erased
        self.trim_logs()
        self.erasures.start()
        self._stop = threading.Event()
        self._background = [
            threading.Thread(target=self._trim_periodically, name="nextbest-retention", daemon=True),
            threading.Thread(target=self._follow, name="nextbest-sync", daemon=True),
            threading.Thread(
                target=self.live.refresh_stale,
                args=(self._stop, self._refresh),
                name="nextbest-profiles",
                daemon=True,
            ),
        ]
        for thread in self._background:
            thread.start()
        logger.info(
            "nextbest engine ready: %s, %s; %d live customers replayed from the state store %s",
            self.recommenders[CHAMPION].registered.label,
            self.propensities[CHAMPION].registered.label,
            len(replayed),
            redact(config.store_url),
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load models from the registry and the dataset, then replay the live state.

        Raises:
            EngineLoadError: something is missing; the message says what to run first.
        """
        models = load_serving_models(config)
        try:
            engine = cls(config, models)
        except PolicyError as e:
            raise EngineLoadError(" ".join(str(e).split())) from None
        poll = config.model_poll_seconds
        if poll > 0:  # models handed over in code are not the registry's: only a loaded engine polls it
            watcher = threading.Thread(
                target=engine._watch_models, args=(poll,), name="nextbest-models", daemon=True
            )
            engine._background.append(watcher)
            watcher.start()
        # Everything loaded so far lives as long as the process. Left to the collector, its half a million
        # objects make every full collection a pause of a few hundred milliseconds in the middle of a request.
        gc.collect()
        gc.freeze()
        return engine

    # --- the served models, and swapping them -------------------------------------------------------------

    @property
    def models(self) -> ServingModels:
        return self._served.models

    @property
    def data(self) -> ServingData:
        return self._served.data

    @property
    def recommenders(self) -> dict[str, RecommenderSlot]:
        return self._served.recommenders

    @property
    def propensities(self) -> dict[str, PropensitySlot]:
        return self._served.propensities

    @property
    def _live(self) -> dict[str, LiveCustomer]:
        """The live customers by id (:attr:`LiveState.customers`)."""
        return self.live.customers

    def model_versions(self) -> dict[str, dict[str, str]]:
        """Kind → arm → ``name/version`` of the models serving now."""
        return self._served.models.labels()

    def reload_models(self, *, force: bool = False) -> api.ReloadResponse:
        """Swap in the registry's current champions (and challengers) and rebuilt features, if they changed.

        The new set is loaded while requests go on and replaces the old one atomically (see
        :mod:`serving.hot_swap`); with ``force`` the models are reloaded even when their versions did not
        change. Thread-safe; concurrent reloads run one after the other.

        Raises:
            EngineLoadError: the registry or a champion is missing (the models serving now stay).
        """
        with self._reload_lock:
            before = self.model_versions()
            wanted = served_labels(self.config)
            stamp = features_stamp(self.config.data)
            new_data = stamp != self._served.features
            if not (force or new_data or wanted != before):
                return api.ReloadResponse(
                    swapped=False, models=before, previous=before, features_reloaded=False
                )
            models = load_serving_models(self.config)
            served: Served = serve(self.config, models, None if new_data else self._served.data)
            with self._swap.writing():
                self._served = served
                if new_data:
                    # Live state is indexed by the dataset's items: rebuild it over the new dataset.
                    self.channels = sorted(set(self.policy.named_channels()) | set(served.data.channels))
                    with self._lock:
                        self.live.customers.clear()
                    rows = not_folded(self.store.snapshot()[1], served.data, self.store)
                    self.live.apply(self.event_log.frame(rows), self.data)
            after = self.model_versions()
            logger.info(
                "nextbest: now serving %s (was %s)%s",
                _labels_text(after),
                _labels_text(before),
                "; features reloaded" if new_data else "",
            )
            return api.ReloadResponse(swapped=True, models=after, previous=before, features_reloaded=new_data)

    def _watch_models(self, every: float) -> None:
        """Poll for new champions until the engine closes; a failed look is logged and tried again later."""
        while not self._stop.wait(every):
            try:
                self.reload_models()
            except Exception as e:  # the models serving now stay; the next poll tries again
                logger.warning("nextbest: cannot look for new models: %s", one_line(e))

    def reload_request(self, request: api.ReloadRequest, authorization: str | None) -> api.ReloadResponse:
        """``POST /reload`` (admin)."""
        self.check_admin(authorization)
        try:
            return self.reload_models(force=request.force)
        except EngineLoadError as e:
            raise NotReady(f"the models serving now stay: {one_line(e)}") from None

    def _load_policy(self) -> ActionPolicy:
        policy = load_policy(self.config.policy or DEFAULT_POLICY_PATH)
        ds = self.data.dataset
        if ds.has_table("action_catalog"):
            catalog = ds.read("action_catalog")
        else:
            catalog = self.propensities[CHAMPION].registered.model.encoder.catalog
        try:
            attached = attach_catalog(policy, catalog)
        except PolicyError as e:
            raise PolicyError(
                f"{e} — give a policy for this dataset's actions with NEXTBEST_POLICY"
            ) from None
        lost = unpoliced_actions(attached, catalog)
        if lost:
            logger.warning("actions without a policy entry are never offered: %s", ", ".join(lost))
        return attached

    def close(self) -> None:
        """Stop the background work and close the state store."""
        self._stop.set()
        self.live.wake()
        self.erasures.stop()
        for thread in self._background:
            thread.join(5)
        self.store.close()

    # --- replicas: what other processes wrote --------------------------------------------------------------

    @_serving
    def sync(self) -> set[str]:
        """Apply what was written to the state store since the last call, by this process or another replica, in
        the order it was committed: events to the live state, contacts to the ledger, lever changes, erasures.

        Returns:
            the customers whose live state changed.
        """
        with self._sync_lock:
            feed = self.store.changes_since(self._seen)
            if not feed:
                return set()
            self._seen = feed[-1].seq
            kinds = {c.kind for c in feed}
            if "erasure" in kinds:
                self._purge.reported(self.data)
            changed: set[str] = set()
            refs = [c.ref for c in feed if c.kind == "event" and c.ref is not None]
            if refs:
                changed = self.live.apply(self.event_log.frame(self.store.events_by_seq(refs)), self.data)
                self.live.mark_stale(changed)  # rebuilt in the background, before the next answer asks
            for customer_id in {c.customer_id for c in feed if c.kind == "contact" and c.customer_id}:
                self.ledger.refresh(customer_id)
            if "lever" in kinds or "import" in kinds:
                self.levers.reload()
            return changed

    @_serving
    def _refresh(self, customer_id: str) -> None:
        """Recompute the customer's profile and activity features from their dataset and live events."""
        self.live.rebuild_profile(customer_id, self.data)

    def _follow(self) -> None:
        interval = self.config.sync_interval_ms / 1000.0
        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
        while not self._stop.wait(interval):
            try:
                self.sync()
                if time.monotonic() >= checkpoint_at:
                    checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                    self.store.checkpoint()
            except Exception:  # the store may be out of reach for a moment: try again at the next tick
                logger.exception("cannot follow the state store")

    # --- erasures ---------------------------------------------------------------------------------------------

    def _is_erased(self, customer_id: str) -> bool:
        return self.live.is_erased(customer_id)

    # --- retention ------------------------------------------------------------------------------------------

    def retention_start(self) -> datetime:
        """The oldest time the service keeps: ``retention_days`` (the dataset's setting) before its clock, or
        before the dataset's latest event where that is earlier (the service never drops what the dataset it
        serves still retains)."""
        return min(self.now(), self.data.as_of) - timedelta(days=self.data.feature_config.retention_days)

    def trim_logs(self) -> dict[str, int]:
        """Drop what fell out of the retention window from the state store's events, contacts, decisions,
        responses and erasure states; returns how many entries each lost."""
        before = self.retention_start()
        with self._lock:
            removed = self.store.trim(before)
            self.ledger.trim(before)
        if any(removed.values()):
            logger.info("retention: dropped entries older than %s: %s", before.date(), removed)
        return removed

    def _trim_periodically(self) -> None:
        while not self._stop.wait(TRIM_INTERVAL_SECONDS):
            try:
                self.trim_logs()
            except Exception:
                logger.exception("retention: cannot trim the logs")

    def _check_channel(self, channel: str | None, where: str = "channel") -> None:
        if channel is not None and self.channels and channel not in self.channels:
            raise BadRequest(f"{where}: unknown channel {channel!r}; known: {', '.join(self.channels)}")

    # --- time, arms, the customer as a request sees them -------------------------------------------------------

    def now(self) -> datetime:
        """The decision time: wall-clock UTC, or (``clock="data"``) the dataset's time running on since start."""
        if self.config.clock == "data":
            return self.data.as_of + timedelta(seconds=time.monotonic() - self._started)
        return _utcnow()

    def _request_time(self, context: Mapping[str, Any]) -> datetime:
        if context.get("now") is not None:
            return _parse_time(context["now"], "context.now")
        return self.now()

    def arm(self, customer_id: str) -> Arm:
        """The customer's arm: challenger for a stable share of ids when a challenger is loaded."""
        if len(self.recommenders) == 1 and len(self.propensities) == 1:
            return CHAMPION
        return assign_arm(customer_id, self.config.challenger_share, self.config.arm_salt)

    def _recommender(self, arm: str) -> RecommenderSlot:
        return self.recommenders.get(arm) or self.recommenders[CHAMPION]

    def _propensity(self, arm: str) -> PropensitySlot:
        return self.propensities.get(arm) or self.propensities[CHAMPION]

    def _consent(self, customer_id: str) -> tuple[dict[str, bool], dict[str, bool | None]]:
        return self.data.effective_consent(customer_id, erased=self._is_erased(customer_id))

    def _view(self, customer_id: str, *, with_events: bool = False) -> CustomerView:
        consent, recorded = self._consent(customer_id)
        live = self.live.customers.get(customer_id)
        if live is not None and live.dirty:
            self._refresh(customer_id)
        return customer_view(
            self.data,
            customer_id,
            consent=consent,
            recorded=recorded,
            erased=self._is_erased(customer_id),
            live=live,
            lock=self._lock,
            with_events=with_events,
        )

    def _model_features(self, view: CustomerView) -> dict[str, Any]:
        return model_features(view)

    def _rule_profile(self, view: CustomerView, now: datetime) -> dict[str, Any]:
        return rule_profile(
            view,
            now,
            self.data,
            bought_days=self.config.bought_days,
            bought_attributes=self._bought_attributes,
        )

    # --- /recommend and /similar_items --------------------------------------------------------------------------

    @_serving
    def recommend(self, request: api.RecommendRequest) -> api.RecommendResponse:
        """Follow-up purchases for a customer now (see :mod:`serving.ranking` for how).

        Raises:
            BadRequest: a filter names an unknown attribute, value or item.
        """
        return _only(self.recommend_many([request]))

    @_serving
    def recommend_many(
        self, requests: Sequence[api.RecommendRequest]
    ) -> list[api.RecommendResponse | ServiceError]:
        """Answer several ``/recommend`` requests at once (adaptive batching in the service).

        Customers the model was fitted on are ranked together, one matrix product per model and fold-in
        setting, which is where a batch saves time; the rest are answered one by one. A request that fails
        gets its :class:`ServiceError` in its place, so one bad request never fails the others.
        """
        out: list[api.RecommendResponse | ServiceError | None] = [None] * len(requests)
        pending: list[RankPlan] = []
        for k, request in enumerate(requests):
            try:
                plan = self._plan(request)
            except ServiceError as e:
                out[k] = e
                continue
            if isinstance(plan, api.RecommendResponse):
                out[k] = plan
            else:
                plan.position = k
                pending.append(plan)
        rank(pending)
        for plan in pending:
            out[plan.position] = ranked_answer(plan)
        return [o for o in out if o is not None]

    def _plan(self, request: api.RecommendRequest) -> RankPlan | api.RecommendResponse:
        """Decide how to answer a request; the non-personalised answers are made here at once."""
        cid = request.customer_id
        arm = self.arm(cid)
        slot = self._recommender(arm)
        mask = filter_mask(self.data, request.filters)
        view = self._view(cid)
        exclude = set(view.purchased_at) if request.exclude_purchased else set()
        if not view.consent[PERSONALISATION] or not view.items:
            return popular_answer(
                self.data, view, request, mask, exclude, arm=arm, model_version=slot.registered.label
            )
        row = slot.customer_row(cid) if not self._is_erased(cid) else -1
        return RankPlan(
            slot=slot,
            arm=arm,
            view=view,
            n=request.n,
            mask=mask,
            exclude=exclude,
            row=row,
            basis="model" if row >= 0 else "session",
            recalc=view.has_live_events and slot.folds_in,
        )

    @_serving
    def similar_items(self, request: api.SimilarItemsRequest) -> api.SimilarItemsResponse:
        """Items like one item: learned similarity, or shared attributes for an item the model has not seen.

        Raises:
            NotFound: the item is in neither the items table nor the events.
        """
        arm = self.arm(request.customer_id) if request.customer_id else CHAMPION
        slot = self._recommender(arm)
        if self.data.item_vocab.get(request.item_id) < 0:
            raise NotFound(f"item_id: unknown item {request.item_id!r}")
        mask = filter_mask(self.data, request.filters)
        items, basis = similar_items(self.data, slot, request.item_id, request.n, mask)
        return api.SimilarItemsResponse(
            item_id=request.item_id, items=items, basis=basis, model_version=slot.registered.label, arm=arm
        )

    # --- /propensity and /next_best_action ----------------------------------------------------------------------

    @_serving
    def propensity(self, request: api.PropensityRequest) -> api.PropensityResponse:
        """Calibrated response probabilities of actions for a customer.

        Raises:
            BadRequest: an action id the model does not know.
        """
        cid = request.customer_id
        self._check_channel(request.channel)
        arm = self.arm(cid)
        slot = self._propensity(arm)
        if request.action_ids is not None:
            unknown = [a for a in request.action_ids if a not in slot.action_ids]
            if unknown:
                raise BadRequest(
                    f"action_ids: unknown action(s) {', '.join(map(repr, unknown[:10]))}; known: "
                    + ", ".join(sorted(slot.action_ids))
                )
        now = self._request_time(request.context)
        view = self._view(cid)
        with one_torch_thread():
            scores = slot.scorer.score(
                self._model_features(view),
                request.action_ids,
                request.channel,
                now=now,
                affinities=affinities(slot, view),
            )
        return api.PropensityResponse(
            customer_id=cid,
            propensities=[api.ActionPropensity(action_id=a, propensity=float(p)) for a, p in scores.items()],
            personalised=view.consent[PERSONALISATION],
            model_version=slot.registered.label,
            arm=arm,
        )

    @_serving
    def next_best_action(self, request: api.NextBestActionRequest) -> api.NextBestActionResponse:
        """The best actions now by P × V × L; records the chosen action as a contact and logs the decision.

        Raises:
            BadRequest: ``context.now`` is not a date-time.
        """
        return _only(self.next_best_action_many([request]))

    @_serving
    def next_best_action_many(
        self, requests: Sequence[api.NextBestActionRequest]
    ) -> list[api.NextBestActionResponse | ServiceError]:
        """Decide for several requests at once: one forward pass of each propensity model for all of them,
        then arbitration, contact and decision log per request, in order."""
        started = time.perf_counter()
        out: list[api.NextBestActionResponse | ServiceError | None] = [None] * len(requests)
        plans: list[DecisionPlan] = []
        for k, request in enumerate(requests):
            try:
                self._check_channel(request.channel)
                now = self._request_time(request.context)
            except ServiceError as e:
                out[k] = e
                continue
            arm = self.arm(request.customer_id)
            pslot = self._propensity(arm)
            view = self._view(request.customer_id)
            plans.append(plan_decision(k, request, arm, pslot, now, view, self.policy.actions))
        score_plans(plans)
        for plan in plans:
            out[plan.position] = self._decide(plan, started)
        return [o for o in out if o is not None]

    def _decide(self, plan: DecisionPlan, started: float) -> api.NextBestActionResponse:
        versions = {
            "recommender": self._recommender(plan.arm).registered.label,
            "propensity": plan.pslot.registered.label,
        }
        # The id comes first: it seeds the decision's exploration draw, so the decision can be replayed.
        decision_id = new_decision_id()
        return self._decider.decide(
            plan,
            decision_id=decision_id,
            profile=self._rule_profile(plan.view, plan.now),
            versions=versions,
            started=started,
        )

    # --- /events ----------------------------------------------------------------------------------------------

    @_serving
    def events(self, request: api.EventsRequest) -> api.EventsResponse:
        """Store events and offer responses durably, then apply them to the live state at once.

        A retry is safe: entries whose ``event_id`` was stored before are acknowledged and not stored again.
        Responses are stored in the responses table (one transaction for all of them); accepted, converted and
        dismissed ones also go to the contact ledger. A response naming a ``decision_id`` is checked against the
        decision log (:func:`~serving.decision_log.check_responses`) before anything of the request is stored.

        Raises:
            BadRequest: an invalid event or response (named by position and field): a time more than
                :data:`FUTURE_TOLERANCE` ahead or before the retention window, a channel or an action not in
                the policy, a response about another customer than its decision's or an action the decision
                did not offer. Nothing of the request is stored.
            NotFound: a response names a decision the log does not hold (nothing of the request is stored).
            Conflict: a second response of one kind for one decision and action (nothing of the request is
                stored, unless another request stored the same response at the same moment: then the events
                are stored, and a retry acknowledges them).
            Gone: an entry is about an erased customer (nothing of the request is stored).
        """
        now = self.now()
        accepted, stored, duplicates = self._intake.store_request(
            request, now=now, earliest=self.retention_start(), check_channel=self._check_channel
        )
        # Applied through the change feed, in commit order with every other replica's events: the next answer
        # reflects them.
        self.sync()
        changed = set(accepted[CUSTOMER_ID].to_list()) if accepted.height else set()
        # A profile takes tens of milliseconds to rebuild: a background thread does it, and an answer about the
        # customer that comes first rebuilds it itself (the profile is marked stale), so it always reflects them.
        self.live.mark_stale(changed)
        customers = sorted(changed | {r.customer_id for r in request.responses})
        return api.EventsResponse(
            accepted=accepted.height, responses=stored, duplicates=duplicates, customers=customers
        )

    def consent(self, customer_id: str) -> dict[str, bool]:
        """The consent the service applies to the customer now, per purpose (records, the default, the
        unlinked-id rule: :func:`features.privacy.effective_consent`; an erased customer has no record)."""
        return self._consent(customer_id)[0]

    def model_inputs(self, customer_id: str) -> dict[str, Any]:
        """What the propensity model sees of the customer now (their profile with the consent rule of
        :func:`training.propensity_data.model_sees` applied, live events included)."""
        return self._model_features(self._view(customer_id))

    # --- /profile ---------------------------------------------------------------------------------------------

    @_serving
    def profile(self, request: api.CustomerRequest) -> api.ProfileResponse:
        """Everything stored and derived about a customer (GDPR access)."""
        cid = request.customer_id
        view = self._view(cid, with_events=True)
        held = self.data.customer_events(cid) if not self._is_erased(cid) else self.data.events.clear()
        decisions = [r.model_dump(mode="json") for r in self.decision_log.records_of(cid)]
        responses = self.store.responses_of(cid)
        return access_answer(
            view,
            self.data,
            held=held,
            contacts=self.ledger.entries(cid),
            decisions=decisions,
            responses=responses,
            arm=self.arm(cid),
        )

    # --- admin: /forget and /levers -----------------------------------------------------------------------------

    def check_admin(self, authorization: str | None) -> None:
        """Check an ``Authorization: Bearer <token>`` header against the admin token.

        Raises:
            Forbidden: no admin token is configured (admin endpoints are disabled).
            Unauthorized: the header is missing or the token is wrong.
        """
        token = self.config.admin_token
        if not token:
            raise Forbidden("admin endpoints are disabled: set NEXTBEST_ADMIN_TOKEN to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized(
                "missing or wrong admin token: send 'Authorization: Bearer <NEXTBEST_ADMIN_TOKEN>'"
            )

    @_serving
    def forget(self, request: api.CustomerRequest, authorization: str | None) -> api.ForgetResponse:
        """Erase a customer everywhere: at once from the live state, the event log, the contact ledger, the
        decision log and the responses, under their id, every id linked to it and those ids' unlinked forms; the erasure is logged
        by keyed digest, so that nothing more is stored about any of the ids (before or after a restart); and
        the dataset's erasure is queued (:class:`~serving.erasure_queue.ErasureQueue`)."""
        self.check_admin(authorization)
        cid = request.customer_id
        ds = self.data.dataset
        ids = erasure_ids(ds.scan("identities", required=False), cid)
        with self._lock:
            live, removed = self._purge.erase(self.data, ids)
            queued = self.erasures.submit(cid)
        logger.info(
            "erased a customer (%d id(s)) on request; dataset erasure %s queued", len(ids), queued.erasure_id
        )
        return api.ForgetResponse(
            customer_id=cid,
            ids_erased=len(ids),
            live_state=live,
            events_removed=removed["events"],
            contacts_removed=removed["contacts"],
            decisions_removed=removed["decisions"],
            responses_removed=removed["responses"],
            erasure_log=str(ds.root / ERASURE_LOG),
            erasure_id=queued.erasure_id,
            dataset=queued.state,
        )

    def erasure_status(self, request: api.ErasureRequest, authorization: str | None) -> api.ErasureStatus:
        """The state of a dataset erasure that :meth:`forget` queued.

        Raises:
            NotFound: no erasure has that id (or its state fell out of the retention window).
        """
        self.check_admin(authorization)
        status = self.erasures.status(request.erasure_id)
        if status is None:
            raise NotFound(f"erasure_id: no erasure {request.erasure_id!r}")
        return status

    def levers_request(self, request: api.LeversRequest, authorization: str | None) -> api.LeversResponse:
        """Read the levers, or change one (logged with who and when, persisted across restarts)."""
        self.check_admin(authorization)
        changed = None
        if request.action_id is not None and request.lever is not None:
            try:
                changed = self.levers.set_lever(request.action_id, request.lever, request.actor)
            except PolicyError as e:
                raise BadRequest(f"action_id: {' '.join(str(e).split())}") from None
            logger.info(
                "lever of %s changed from %g to %g by %s",
                changed.action_id,
                changed.old,
                changed.new,
                changed.actor,
            )
        return api.LeversResponse(
            policy_version=self.policy.version,
            levers=self.levers.levers,
            changed=changed,
            history=self.levers.history,
        )

    # --- introspection --------------------------------------------------------------------------------------

    def live_customers(self) -> list[str]:
        """Customers with live state (events received by the service)."""
        with self._lock:
            return sorted(self.live.customers)
