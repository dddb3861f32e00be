"""A customer as one request sees them (:class:`CustomerView`: consent, the dataset's rows and the live events
together), what a model or a rule reads from that view, and the answer to their access request (``/profile``)."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from nextbest.features.profiles import DEMOGRAPHICS, SEGMENT_FEATURES
from nextbest.features.profiles import age_band_of as age_band
from nextbest.features.schema import CUSTOMER_ID, ITEM_ID
from nextbest.serving import api
from nextbest.serving.contact import ContactEntry
from nextbest.serving.decisions import PERSONALISATION, bought_values
from nextbest.serving.live_state import LiveCustomer
from nextbest.serving.model_slots import PropensitySlot
from nextbest.serving.serving_data import PROFILING, ServingData, epoch_seconds, sparse_row
from nextbest.training.affinity import AFFINITY
from nextbest.training.propensity_data import model_sees


@dataclass
class CustomerView:
    """A customer as one request sees them: consent, profile, history (base data and live events together)."""

    customer_id: str
    consent: dict[str, bool]
    recorded_consent: dict[str, bool | None]
    known: bool
    demographics: dict[str, Any] | None
    profile: dict[str, Any] | None
    live_profile: bool
    items: dict[int, float]
    """Service item index → interaction weight (only with personalisation consent)."""
    strongest: dict[int, int]
    purchased_at: dict[int, float]
    live_event_count: int
    live_events: list[dict[str, Any]]
    """The live events themselves (only when asked for: the right of access)."""

    @property
    def has_live_events(self) -> bool:
        return self.live_event_count > 0


def customer_view(
    data: ServingData,
    customer_id: str,
    *,
    consent: dict[str, bool],
    recorded: dict[str, bool | None],
    erased: bool,
    live: LiveCustomer | None,
    lock: threading.RLock,
    with_events: bool = False,
) -> CustomerView:
    """The dataset's rows of the customer with their live state added (``live``, its profile already rebuilt
    where it was stale; read under ``lock``), as their consent allows.

    Args:
        data: the dataset's side.
        customer_id: the customer.
        consent: the effective consent (:meth:`ServingData.effective_consent`).
        recorded: the recorded consent.
        erased: the customer was erased (nothing of the dataset is read).
        live: the customer's live state, if any.
        lock: the lock that guards ``live``.
        with_events: include the live events themselves (the right of access).
    """
    items: dict[int, float] = {}
    strongest: dict[int, int] = {}
    purchased: dict[int, float] = {}
    demographics = None if erased else data.customers.get(customer_id)
    profile = None
    if not erased:
        r = data.interaction_customers.get(customer_id)
        if r >= 0 and consent[PERSONALISATION]:
            idx, val = sparse_row(data.interactions, r)
            items = dict(zip(idx.tolist(), val.tolist(), strict=True))
        e = data.event_customers.get(customer_id)
        if e >= 0:
            idx, val = sparse_row(data.strongest, e)
            strongest = dict(zip(idx.tolist(), val.tolist(), strict=True))
            idx, val = sparse_row(data.purchased_at, e)
            purchased = dict(zip(idx.tolist(), val.tolist(), strict=True))
        if consent[PROFILING]:
            profile = data.features.get(customer_id)
    live_events: list[dict[str, Any]] = []
    live_count = 0
    live_profile = False
    if live is not None:
        with lock:
            live_count = len(live.events)
            if with_events:
                live_events = list(live.events)
            if consent[PERSONALISATION]:
                for i, w in live.weights.items():
                    items[i] = items.get(i, 0.0) + w
            for i, k in live.strongest.items():
                strongest[i] = max(strongest.get(i, 0), k)
            for i, t in live.purchased_at.items():
                purchased[i] = max(purchased.get(i, 0.0), t)
            if live.profile is not None:
                profile, live_profile = live.profile, True
    if not consent[PROFILING]:
        profile = None
    return CustomerView(
        customer_id=customer_id,
        consent=consent,
        recorded_consent=recorded,
        known=not erased and data.knows(customer_id),
        demographics=demographics,
        profile=profile,
        live_profile=live_profile,
        items=items,
        strongest=strongest,
        purchased_at=purchased,
        live_event_count=live_count,
        live_events=live_events,
    )


def _demographics_and_profile(view: CustomerView) -> dict[str, Any]:
    """The customers table's :data:`~features.profiles.DEMOGRAPHICS` with the profile over them."""
    return {
        **{k: v for k, v in (view.demographics or {}).items() if k in DEMOGRAPHICS},
        **(view.profile or {}),
    }


def model_features(view: CustomerView) -> dict[str, Any]:
    """What the propensity model sees (:func:`training.propensity_data.model_sees`): the whole profile, or only
    the segment without personalisation consent (its age band from the customers table's age when the profile
    has none)."""
    merged = _demographics_and_profile(view)
    personalisation, profiling = view.consent[PERSONALISATION], view.consent[PROFILING]
    seen = {
        k: v for k, v in merged.items() if model_sees(k, personalisation=personalisation, profiling=profiling)
    }
    if not personalisation:
        seen = {k: seen.get(k) for k in SEGMENT_FEATURES}
        if seen.get("age_band") is None:
            seen["age_band"] = age_band(merged.get("age"))
    return seen


def affinities(slot: PropensitySlot, view: CustomerView) -> dict[str, float] | None:
    """The customer's customer–action affinities from their interaction row (dataset and live events), as
    the propensity model was trained to read them; None (missing) when the model reads none, or without the
    consent to personalise and profile (training rows only see profiling-consented events)."""
    if slot.affinity_items is None or not view.items:
        return None
    if not model_sees(
        AFFINITY, personalisation=view.consent[PERSONALISATION], profiling=view.consent[PROFILING]
    ):
        return None
    base = np.fromiter(view.items.keys(), dtype=np.int64, count=len(view.items))
    weights = np.fromiter(view.items.values(), dtype=np.float64, count=len(view.items))
    return slot.scorer.affinity.score_indexed(slot.affinity_items[base], weights)


def rule_profile(
    view: CustomerView, now: datetime, data: ServingData, *, bought_days: int, bought_attributes: list[str]
) -> dict[str, Any]:
    """What the policy's rules read: demographics, profile and the ``bought_<attribute>`` values of the items
    bought in the last ``bought_days``."""
    profile: dict[str, Any] = {CUSTOMER_ID: view.customer_id, **_demographics_and_profile(view)}
    since = epoch_seconds(now - timedelta(days=bought_days))
    recent = [data.item_vocab.ids[i] for i, t in view.purchased_at.items() if t >= since]
    return profile | bought_values((data.item_attributes.item(i) for i in recent), bought_attributes)


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _json_value(v.item())
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    return v


def _json_row(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: _json_value(v) for k, v in row.items()}


def access_answer(
    view: CustomerView,
    data: ServingData,
    *,
    held: pl.DataFrame,
    contacts: list[ContactEntry],
    decisions: list[dict[str, Any]],
    responses: Sequence[Mapping[str, Any]],
    arm: str,
) -> api.ProfileResponse:
    """Everything stored and derived about a customer, as JSON values (the right of access).

    Args:
        view: the customer's view, with its live events.
        data: the dataset's side.
        held: the customer's retained events in the dataset.
        contacts: their contact ledger entries.
        decisions: their logged decisions (JSON).
        responses: their stored responses.
        arm: their arm.
    """
    vocab = data.item_vocab
    return api.ProfileResponse(
        customer_id=view.customer_id,
        known=view.known,
        consent=view.recorded_consent,
        consent_effective=view.consent,
        demographics=_json_row(view.demographics),
        profile=_json_row(view.profile),
        live_profile=view.live_profile,
        interactions=[
            {ITEM_ID: vocab.ids[i], "weight": float(w)}
            for i, w in sorted(view.items.items(), key=lambda kv: -kv[1])
        ],
        purchases=sorted(vocab.ids[i] for i in view.purchased_at),
        events=[_json_row(r) or {} for r in held.iter_rows(named=True)],
        live_events=[_json_row(r) or {} for r in view.live_events],
        contacts=contacts,
        decisions=decisions,
        responses=[_json_row(r) or {} for r in responses],
        arm=arm,
    )
