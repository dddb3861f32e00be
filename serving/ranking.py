"""How ``/recommend`` and ``/similar_items`` rank items — never with an error: a customer without personalisation
consent or with nothing known gets items popular in their segment (the answer says so); one the model was fitted
on gets its ranking, fresh events folded in (ALS ``recalculate_user``), one call per batch; one it never saw gets
item similarity to the items of their history and session. Every item comes with its reasons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from nextbest.features.schema import ITEM_ID
from nextbest.serving import api
from nextbest.serving.customer_view import CustomerView, age_band
from nextbest.serving.decisions import PERSONALISATION
from nextbest.serving.engine_config import BadRequest
from nextbest.serving.explain import FilterError, ItemFilters, recommendation_reasons
from nextbest.serving.model_slots import RecommenderSlot
from nextbest.serving.serving_data import RANK_EVENT, ServingData

SIMILAR_ATTRIBUTES: tuple[str, ...] = ("category", "sport", "brand", "colour")
SESSION_ITEMS = 20
"""At most this many of a customer's items (strongest first) seed session-based item similarity."""


@dataclass
class RankPlan:
    """A personalised ranking still to be made (model or session based)."""

    slot: RecommenderSlot
    arm: str
    view: CustomerView
    n: int
    mask: np.ndarray | None
    exclude: set[int]
    row: int
    basis: str
    recalc: bool
    position: int = 0
    ranking: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.float32))


def filter_mask(data: ServingData, filters: ItemFilters | None) -> np.ndarray | None:
    """Mask over the service's items; unknown attributes, values of include filters and items are 400s.

    Raises:
        BadRequest: a filter names an unknown attribute, an unknown value of an include filter, or an unknown
            item.
    """
    if filters is None or filters.is_empty:
        return None
    attrs = data.item_attributes
    for which, table in (("include", filters.include), ("exclude", filters.exclude)):
        for attribute, value in table.items():
            if attribute not in attrs.levels:
                continue  # the mask names it below
            values = value if isinstance(value, list) else [value]
            unknown = [v for v in values if v not in attrs.levels[attribute]]
            if unknown and (which == "include" or attribute == ITEM_ID):
                known = sorted(map(str, attrs.levels[attribute]))
                shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "")
                what = "item" if attribute == ITEM_ID else f"value of {attribute!r}"
                raise BadRequest(
                    f"filters.{which}.{attribute}: unknown {what} {', '.join(map(repr, unknown[:5]))}"
                    + ("" if attribute == ITEM_ID else f"; known: {shown}")
                )
    try:
        return attrs.mask(filters)
    except FilterError as e:
        raise BadRequest(f"filters: {e}") from None


# --- not personalised: popularity -----------------------------------------------------------------------------


def segment(data: ServingData, view: CustomerView) -> tuple[str | None, np.ndarray]:
    """The customer's segment value and its item popularity (overall popularity when unknown or small)."""
    column = data.segment_column
    value = (view.profile or {}).get(column)
    if value is None and column == "age_band":
        value = age_band((view.demographics or {}).get("age"))
    if value is not None and str(value) in data.segment_popularity:
        return str(value), data.segment_popularity[str(value)]
    return None, data.popularity


def segment_text(data: ServingData, value: str | None) -> str:
    if value is None:
        return "popular right now"
    if data.segment_column == "age_band":
        return f"popular with customers aged {value}"
    return f"popular with customers in {data.segment_column.replace('_', ' ')} {value}"


def popular(
    data: ServingData, view: CustomerView, n: int, mask: np.ndarray | None, *, exclude: set[int] | None
) -> tuple[list[api.RecommendedItem], str | None]:
    from nextbest.training.recommenders import top_n

    value, popularity = segment(data, view)
    s = popularity.astype(np.float32).copy()[None, :]
    if mask is not None:
        s[0, ~mask] = -np.inf
    if exclude:
        s[0, np.fromiter(exclude, dtype=np.int64, count=len(exclude))] = -np.inf
    ids, vals = top_n(s, n)
    reason = segment_text(data, value)
    top = float(popularity.max()) if popularity.size else 0.0
    return [
        api.RecommendedItem(
            item_id=data.item_vocab.ids[i],
            score=float(v) / top if top > 0 else 0.0,
            reasons=[reason],
        )
        for i, v in zip(ids[0].tolist(), vals[0].tolist(), strict=True)
        if i >= 0
    ], value


def popular_answer(
    data: ServingData,
    view: CustomerView,
    request: api.RecommendRequest,
    mask: np.ndarray | None,
    exclude: set[int],
    *,
    arm: str,
    model_version: str,
) -> api.RecommendResponse:
    """The answer for a customer without personalisation consent or without anything known: popularity."""
    consented = view.consent[PERSONALISATION]
    # Without consent their history is not used at all, not even to leave out what they bought.
    items, value = popular(data, view, request.n, mask, exclude=exclude if consented else None)
    why = "nothing known about this customer yet" if consented else "no consent to personalisation"
    return api.RecommendResponse(
        customer_id=view.customer_id,
        items=items,
        personalised=False,
        basis="segment_popularity" if value else "popularity",
        note=f"not personalised: {why}; {segment_text(data, value)}",
        model_version=model_version,
        arm=arm,
    )


# --- personalised: the model, or the session ----------------------------------------------------------------


def rank(plans: Sequence[RankPlan]) -> None:
    """Make each plan's ranking: customers the model was fitted on without a filter in one call per model and
    fold-in setting (where a batch saves time), the rest one by one."""
    groups: dict[tuple[int, bool], list[RankPlan]] = {}
    for plan in plans:
        if plan.basis == "model" and plan.mask is None:
            groups.setdefault((id(plan.slot), plan.recalc), []).append(plan)
        elif plan.basis == "model":
            plan.ranking = model_ranking(plan.slot, [plan])[0]
        else:
            plan.ranking = session_ranking(plan.slot, plan.view, plan.n, plan.mask, plan.exclude)
    for group in groups.values():
        for plan, ranking in zip(group, model_ranking(group[0].slot, group), strict=True):
            plan.ranking = ranking


def ranked_answer(plan: RankPlan) -> api.RecommendResponse:
    """The answer of a ranked plan, with each item's reasons."""
    ids, scores = plan.ranking
    why = reasons(plan.slot, plan.view, ids)
    vocab = plan.slot.registered.model.history.items
    return api.RecommendResponse(
        customer_id=plan.view.customer_id,
        items=[
            api.RecommendedItem(item_id=vocab.ids[i], score=float(s), reasons=r)
            for i, s, r in zip(ids.tolist(), scores.tolist(), why, strict=True)
        ],
        personalised=True,
        basis=plan.basis,
        model_version=plan.slot.registered.label,
        arm=plan.arm,
    )


def reasons(slot: RecommenderSlot, view: CustomerView, ids: np.ndarray) -> list[list[str]]:
    """Reasons per recommended item (:func:`serving.explain.recommendation_reasons`, the one rule): the
    customer's preferences it matches, and the history item most like it."""
    history = {
        int(m): RANK_EVENT.get(view.strongest.get(int(b), 1), "view")
        for b in view.items
        if (m := slot.from_base[b]) >= 0
    }
    return recommendation_reasons(view.profile, ids, history, slot.items, unit_factors=slot.unit_factors)


def exclusion(slot: RecommenderSlot, exclude: set[int]) -> np.ndarray:
    """Service item indices to leave out as the model's indices (sorted; items the model lacks dropped)."""
    if not exclude:
        return np.empty(0, np.int64)
    idx = slot.from_base[np.fromiter(exclude, dtype=np.int64, count=len(exclude))]
    return np.sort(idx[idx >= 0])


def stack_rows(rows: list[tuple[np.ndarray, np.ndarray]], n_items: int) -> sp.csr_matrix:
    """One CSR matrix from (sorted indices, values) rows, without scipy's per-row overhead."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(i) for i, _ in rows])
    indices = np.concatenate([i for i, _ in rows]) if rows else np.empty(0, np.int64)
    data = np.concatenate([v for _, v in rows]).astype(np.float32) if rows else np.empty(0, np.float32)
    return sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(len(rows), n_items))


def model_ranking(slot: RecommenderSlot, plans: Sequence[RankPlan]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The model's ranking for customers it was fitted on: one call for the whole group."""
    from nextbest.training.recommenders import MISSING_ID, RecommenderError

    histories = []
    for plan in plans:
        idx, val = slot.to_model(plan.view.items)
        order = np.argsort(idx)
        histories.append((idx[order], val[order]))
    user_items = stack_rows(histories, slot.n_items)
    excluded = [exclusion(slot, p.exclude) for p in plans]
    exclude = (
        stack_rows([(e, np.ones(len(e), np.float32)) for e in excluded], slot.n_items)
        if any(len(e) for e in excluded)
        else None
    )
    candidates = None
    mask = plans[0].mask
    if mask is not None:  # only single plans carry a filter
        candidates = np.flatnonzero(slot.model_mask(mask))
    rows = np.array([p.row for p in plans], dtype=np.int64)
    n = max(p.n for p in plans)
    recalc = plans[0].recalc
    kwargs = {"filter_already_liked": False, "exclude": exclude, "candidates": candidates}
    try:
        ids, scores = slot.model.recommend(rows, user_items, n, recalculate_user=recalc, **kwargs)
    except RecommenderError:
        if not recalc:
            raise
        ids, scores = slot.model.recommend(rows, user_items, n, **kwargs)
    out = []
    for r, plan in enumerate(plans):
        keep = ids[r] != MISSING_ID
        out.append((ids[r][keep][: plan.n], scores[r][keep][: plan.n]))
    return out


def session_ranking(
    slot: RecommenderSlot,
    view: CustomerView,
    n: int,
    mask: np.ndarray | None,
    exclude: set[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Item similarity to the customer's items (strongest first), popularity after them."""
    from nextbest.training.recommenders import top_n

    model = slot.model
    idx, val = slot.to_model(view.items)
    if len(idx) > SESSION_ITEMS:
        keep = np.argsort(-val, kind="stable")[:SESSION_ITEMS]
        idx, val = idx[keep], val[keep]
    scores = np.zeros(slot.n_items, dtype=np.float64)
    if len(idx):
        k = min(slot.n_items - 1, max(50, 5 * n))
        sim_ids, sims = model.similar_items(idx, n=k)
        ok = (sim_ids >= 0) & np.isfinite(sims)
        weights = np.broadcast_to(val[:, None], sim_ids.shape)
        np.add.at(scores, sim_ids[ok], (weights[ok] * sims[ok]).astype(np.float64))
    # Popularity orders the items no history item points to (and breaks ties).
    scores += 1e-6 * model.popularity_scores()
    s = scores.astype(np.float32)[None, :]
    if mask is not None:
        s[0, ~slot.model_mask(mask)] = -np.inf
    excluded = exclusion(slot, exclude)
    if len(excluded):
        s[0, excluded] = -np.inf
    ids, vals = top_n(s, n, model.tie_order)
    keep = ids[0] >= 0
    return ids[0][keep], vals[0][keep]


# --- /similar_items -----------------------------------------------------------------------------------------


def similar_items(
    data: ServingData, slot: RecommenderSlot, item_id: str, n: int, mask: np.ndarray | None
) -> tuple[list[api.RecommendedItem], str]:
    """Items like one item of the service's items, and the basis: ``model`` (learned similarity) or
    ``attributes`` (shared attributes, for an item the model has not seen)."""
    base = data.item_vocab.get(item_id)
    target = data.item_attributes.item(item_id)
    model_index = int(slot.from_base[base])
    vocab = slot.registered.model.history.items
    if model_index >= 0:
        k = slot.n_items - 1 if mask is not None else min(n, slot.n_items - 1)
        ids, sims = slot.model.similar_items(model_index, n=max(k, 0))
        allowed = None if mask is None else slot.model_mask(mask)
        pairs = [
            (vocab.ids[i], float(s))
            for i, s in zip(ids.tolist(), sims.tolist(), strict=True)
            if allowed is None or allowed[i]
        ][:n]
        basis = "model"
    else:
        pairs = attribute_neighbours(data, base, target, n, mask)
        basis = "attributes"
    items = [
        api.RecommendedItem(
            item_id=i, score=s, reasons=shared_attributes(target, data.item_attributes.item(i))
        )
        for i, s in pairs
    ]
    return items, basis


def attribute_neighbours(
    data: ServingData, base: int, target: Mapping[str, Any], n: int, mask: np.ndarray | None
) -> list[tuple[str, float]]:
    from nextbest.training.recommenders import top_n

    attrs = data.item_attributes
    shared = np.zeros(len(attrs), dtype=np.float32)
    for a in SIMILAR_ATTRIBUTES:
        if a in attrs.codes and target.get(a) is not None:
            code = attrs.levels[a].get(target[a])
            if code is not None:
                shared += attrs.codes[a] == code
    pop = data.popularity
    s = (shared + 1e-3 * pop / max(float(pop.max()), 1.0))[None, :]
    s[0, base] = -np.inf
    s[0, shared == 0] = -np.inf
    if mask is not None:
        s[0, ~mask] = -np.inf
    ids, vals = top_n(s, n)
    return [
        (data.item_vocab.ids[i], float(v) / len(SIMILAR_ATTRIBUTES))
        for i, v in zip(ids[0].tolist(), vals[0].tolist(), strict=True)
        if i >= 0
    ]


def shared_attributes(target: Mapping[str, Any], item: Mapping[str, Any]) -> list[str]:
    return [
        f"same {a}: {item[a]}"
        for a in SIMILAR_ATTRIBUTES
        if item.get(a) is not None and item.get(a) == target.get(a)
    ][:3]
