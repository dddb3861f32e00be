"""Campaign inputs: a customer's history with an action's target items and with earlier actions, as of a time.

What a marketer looks at before mailing a campaign: how much the household already spends on the products its
coupons cover and on their departments, and how it answered earlier campaigns (of this type, and overall).
Every value is point-in-time: purchases strictly before the row's time, and earlier exposures whose outcome was
known strictly before it (``responded_at`` of the action log; else the action's ``end_date``; else a fixed
window after the exposure). :func:`campaign_inputs_asof` computes them for many (customer, action, time) rows at
once; the online path calls the same function on one customer's rows (:func:`campaign_inputs_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from nextbest.features.schema import (
    ACTION_ID,
    CUSTOMER_ID,
    EVENT_TYPE,
    ITEM_ID,
    KIND,
    PRICE,
    QUANTITY,
    RESPONDED,
    RESPONDED_AT,
    TIMESTAMP,
    TIMESTAMP_COL,
)
from nextbest.training.affinity import action_target_items
from nextbest.training.propensity_config import PropensityDataError

TARGET_SPEND = "target_spend_before"
"""Money the customer spent on the action's target items before the row's time."""
TARGET_PURCHASES = "target_purchases_before"
"""Purchase lines of the action's target items before the row's time."""
TARGET_GROUP_SPEND = "target_group_spend_before"
"""Money spent on any item of the groups (departments) the action's target items fall in."""
EARLIER_EXPOSURES = "earlier_exposures"
EARLIER_RESPONSES = "earlier_responses"
"""Earlier exposures whose response was known before the row's time and was positive."""
EARLIER_KIND_EXPOSURES = "earlier_exposures_same_kind"
EARLIER_KIND_RESPONSES = "earlier_responses_same_kind"
CAMPAIGN_COLUMNS: tuple[str, ...] = (
    TARGET_SPEND,
    TARGET_PURCHASES,
    TARGET_GROUP_SPEND,
    EARLIER_EXPOSURES,
    EARLIER_RESPONSES,
    EARLIER_KIND_EXPOSURES,
    EARLIER_KIND_RESPONSES,
)
"""The campaign inputs, in order; all vary by customer and action (pair inputs of the encoder)."""
GROUP_ATTRIBUTES: tuple[str, ...] = ("department", "category")
"""Item attributes tried, in order, as the group of the target items (see :func:`action_targets`)."""
_GROUP = "__group"


@dataclass(frozen=True)
class ActionTargets:
    """Each action's target items, their groups and the action's kind and end, prepared once per catalogue.

    Attributes:
        items: ``action_id, item_id``, one row per target item.
        groups: ``action_id, __group``, one row per group (department) the action's target items fall in.
        item_groups: ``item_id, __group`` of every item in a group some action targets.
        group_attribute: the item attribute of the groups (None: no groups).
        kinds: ``action_id, kind``.
        ends: ``action_id, __ends_at``: the first moment after the action's ``end_date`` (null without one).
        item_prices: ``item_id, __item_price``: list prices for purchases logged without a price.
    """

    items: pl.DataFrame
    groups: pl.DataFrame
    item_groups: pl.DataFrame
    group_attribute: str | None
    kinds: pl.DataFrame
    ends: pl.DataFrame
    item_prices: pl.DataFrame


def default_group_attribute(items: pl.DataFrame) -> str | None:
    """The first of :data:`GROUP_ATTRIBUTES` that the items table has as text, else None."""
    for c in GROUP_ATTRIBUTES:
        if c in items.columns and items.schema[c] == pl.String:
            return c
    return None


def action_targets(
    catalog: pl.DataFrame,
    items: pl.DataFrame,
    targets: pl.DataFrame | None = None,
    *,
    group_attribute: str | None = None,
) -> ActionTargets:
    """Prepare an action catalogue's targets (:func:`training.affinity.action_target_items`: the explicit
    ``action_targets`` rows, else the items matching the action's attributes) for :func:`campaign_inputs_asof`.

    Args:
        catalog: the action catalogue (``action_id``, ``kind``, optional ``end_date``, attributes).
        items: the items table.
        targets: the ``action_targets`` table, if the dataset has one.
        group_attribute: item attribute whose values group target items (default :func:`default_group_attribute`).

    Raises:
        PropensityDataError: ``group_attribute`` is not a column of the items table.
    """
    if group_attribute is None:
        group_attribute = default_group_attribute(items)
    elif group_attribute not in items.columns:
        raise PropensityDataError(
            f"campaign group attribute {group_attribute!r} is not a column of the items table "
            f"(columns: {', '.join(items.columns)})"
        )
    by_action = action_target_items(catalog, items, targets)
    pairs = pl.DataFrame(
        {
            ACTION_ID: [a for a, ids in by_action.items() for _ in ids],
            ITEM_ID: [i for ids in by_action.values() for i in ids],
        },
        schema={ACTION_ID: pl.String, ITEM_ID: pl.String},
    )
    if group_attribute is None:
        groups = pl.DataFrame(schema={ACTION_ID: pl.String, _GROUP: pl.String})
        item_groups = pl.DataFrame(schema={ITEM_ID: pl.String, _GROUP: pl.String})
    else:
        all_groups = items.select(ITEM_ID, pl.col(group_attribute).cast(pl.String).alias(_GROUP)).drop_nulls()
        groups = (
            pairs.join(all_groups, on=ITEM_ID, how="inner")
            .select(ACTION_ID, _GROUP)
            .unique()
            .sort(ACTION_ID, _GROUP)
        )
        item_groups = all_groups.join(groups.select(_GROUP).unique(), on=_GROUP, how="semi")
    kind = pl.col(KIND).cast(pl.String) if KIND in catalog.columns else pl.lit(None, dtype=pl.String)
    ends_at = (
        (pl.col("end_date").cast(pl.Date).cast(TIMESTAMP) + pl.duration(days=1))
        if "end_date" in catalog.columns
        else pl.lit(None, dtype=TIMESTAMP)
    )
    prices = (
        items.select(ITEM_ID, pl.col(PRICE).cast(pl.Float64).alias("__item_price"))
        if PRICE in items.columns
        else pl.DataFrame(schema={ITEM_ID: pl.String, "__item_price": pl.Float64})
    )
    return ActionTargets(
        items=pairs,
        groups=groups,
        item_groups=item_groups,
        group_attribute=group_attribute,
        kinds=catalog.select(ACTION_ID, kind.alias(KIND)),
        ends=catalog.select(ACTION_ID, ends_at.cast(TIMESTAMP).alias("__ends_at")),
        item_prices=prices,
    )


def _purchases(
    events: pl.DataFrame | pl.LazyFrame, customers: pl.DataFrame, targets: ActionTargets, purchase_event: str
) -> pl.LazyFrame:
    """``customer_id, item_id, timestamp, __amount`` of the purchases of ``customers`` (price × quantity; the
    item's list price where the event has none)."""
    lf = events.lazy()
    names = lf.collect_schema().names()
    price = pl.col(PRICE) if PRICE in names else pl.lit(None, dtype=pl.Float64)
    qty = pl.col(QUANTITY).fill_null(1) if QUANTITY in names else pl.lit(1)
    return (
        lf.filter(pl.col(EVENT_TYPE) == purchase_event)
        .join(customers.lazy(), on=CUSTOMER_ID, how="semi")
        .join(targets.item_prices.lazy(), on=ITEM_ID, how="left")
        .select(
            CUSTOMER_ID,
            ITEM_ID,
            pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
            (pl.coalesce(price, pl.col("__item_price")) * qty)
            .fill_null(0.0)
            .cast(pl.Float64)
            .alias("__amount"),
        )
    )


def _running_asof(
    keys: pl.DataFrame, rows: pl.DataFrame, by: Sequence[str], at: str, values: Sequence[str]
) -> pl.DataFrame:
    """For each key row (``__row``, ``by`` columns, ``timestamp``), the running totals of ``values`` over the
    ``rows`` of the same ``by`` whose ``at`` time is strictly before the key's time (nulls when none)."""
    running = (
        rows.group_by(*by, at)
        .agg(pl.col(v).sum() for v in values)
        .sort(*by, at)
        .with_columns(pl.col(v).cum_sum().over(list(by)) for v in values)
        .sort(at)
    )
    return (
        keys.select("__row", *by, pl.col(TIMESTAMP_COL).alias("__t"))
        .sort("__t")
        .join_asof(
            running.rename({at: "__t"}),
            on="__t",
            by=list(by),
            strategy="backward",
            allow_exact_matches=False,
            check_sortedness=False,
        )
        .select("__row", *values)
    )


def campaign_inputs_asof(
    rows: pl.DataFrame,
    events: pl.DataFrame | pl.LazyFrame,
    history: pl.DataFrame,
    targets: ActionTargets,
    *,
    response_days: int = 30,
    purchase_event: str = "purchase",
) -> pl.DataFrame:
    """The campaign inputs (:data:`CAMPAIGN_COLUMNS`) of each (customer, action, time) row.

    Args:
        rows: ``customer_id, action_id, timestamp``.
        events: clean events (purchases give the spend inputs).
        history: the action log (``customer_id, action_id, timestamp, responded``, optional ``responded_at``):
            every exposure, the rows' own included (an exposure never counts for its own time or later).
        targets: the catalogue's prepared targets (:func:`action_targets`).
        response_days: when an exposure has no ``responded_at`` and its action no ``end_date``, its outcome
            counts as known this many days after it.
        purchase_event: the event type of a purchase.

    Returns:
        one row per row of ``rows``, in order, with the :data:`CAMPAIGN_COLUMNS` (Float64; 0 without history).
    """
    keys = rows.select(CUSTOMER_ID, ACTION_ID, pl.col(TIMESTAMP_COL).cast(TIMESTAMP)).with_row_index("__row")
    customers = keys.select(CUSTOMER_ID).unique()
    pairs = keys.select(CUSTOMER_ID, ACTION_ID).unique()
    bought = _purchases(events, customers, targets, purchase_event)

    on_targets = (
        bought.join(targets.items.lazy(), on=ITEM_ID, how="inner")
        .join(pairs.lazy(), on=[CUSTOMER_ID, ACTION_ID], how="semi")
        .select(CUSTOMER_ID, ACTION_ID, TIMESTAMP_COL, "__amount", pl.lit(1.0).alias("__lines"))
        .collect()
    )
    parts = [
        _running_asof(keys, on_targets, [CUSTOMER_ID, ACTION_ID], TIMESTAMP_COL, ["__amount", "__lines"])
    ]

    if targets.groups.height:
        spend = (
            bought.join(targets.item_groups.lazy(), on=ITEM_ID, how="inner")
            .select(CUSTOMER_ID, _GROUP, TIMESTAMP_COL, pl.col("__amount").alias("__group_amount"))
            .collect()
        )
        expanded = keys.join(targets.groups, on=ACTION_ID, how="inner")
        per_group = _running_asof(expanded, spend, [CUSTOMER_ID, _GROUP], TIMESTAMP_COL, ["__group_amount"])
        parts.append(per_group.group_by("__row").agg(pl.col("__group_amount").sum()))
    else:
        parts.append(keys.select("__row", pl.lit(None, dtype=pl.Float64).alias("__group_amount")))

    log = _outcomes(history, targets, response_days)
    with_kind = keys.join(targets.kinds, on=ACTION_ID, how="left", maintain_order="left")
    parts += [
        _running_asof(keys, log.rename({"__exposed_at": "__at"}), [CUSTOMER_ID], "__at", ["__exposures"]),
        _running_asof(
            keys, log.filter(pl.col("__response") > 0), [CUSTOMER_ID], "__known_at", ["__response"]
        ),
        _running_asof(
            with_kind.filter(pl.col(KIND).is_not_null()),
            log.rename({"__exposures": "__kind_exposures"}),
            [CUSTOMER_ID, KIND],
            "__exposed_at",
            ["__kind_exposures"],
        ),
        _running_asof(
            with_kind.filter(pl.col(KIND).is_not_null()),
            log.filter(pl.col("__response") > 0).rename({"__response": "__kind_response"}),
            [CUSTOMER_ID, KIND],
            "__known_at",
            ["__kind_response"],
        ),
    ]
    out = keys.select("__row")
    for part in parts:
        out = out.join(part, on="__row", how="left")
    zero = pl.lit(0.0)
    return (
        out.sort("__row")
        .select(
            pl.col("__amount").fill_null(zero).alias(TARGET_SPEND),
            pl.col("__lines").fill_null(zero).alias(TARGET_PURCHASES),
            pl.col("__group_amount").fill_null(zero).alias(TARGET_GROUP_SPEND),
            pl.col("__exposures").fill_null(zero).alias(EARLIER_EXPOSURES),
            pl.col("__response").fill_null(zero).alias(EARLIER_RESPONSES),
            pl.col("__kind_exposures").fill_null(zero).alias(EARLIER_KIND_EXPOSURES),
            pl.col("__kind_response").fill_null(zero).alias(EARLIER_KIND_RESPONSES),
        )
        .cast(dict.fromkeys(CAMPAIGN_COLUMNS, pl.Float64))
    )


def _outcomes(history: pl.DataFrame, targets: ActionTargets, response_days: int) -> pl.DataFrame:
    """``customer_id, kind, __exposed_at, __known_at, __exposures, __response`` of each logged exposure: when it
    happened, and when its outcome became known (``responded_at``, else the action's end, else
    ``response_days`` after the exposure)."""
    names = history.columns
    missing = [c for c in (CUSTOMER_ID, ACTION_ID, TIMESTAMP_COL, RESPONDED) if c not in names]
    if missing:
        raise PropensityDataError(f"the action log lacks column(s) {', '.join(missing)}")
    exposed = pl.col(TIMESTAMP_COL).cast(TIMESTAMP)
    responded_at = (
        pl.col(RESPONDED_AT).cast(TIMESTAMP) if RESPONDED_AT in names else pl.lit(None, dtype=TIMESTAMP)
    )
    return (
        history.select(
            CUSTOMER_ID, ACTION_ID, exposed.alias(TIMESTAMP_COL), RESPONDED, responded_at.alias("__at")
        )
        .join(targets.kinds, on=ACTION_ID, how="left")
        .join(targets.ends, on=ACTION_ID, how="left")
        .select(
            CUSTOMER_ID,
            KIND,
            pl.col(TIMESTAMP_COL).alias("__exposed_at"),
            pl.coalesce("__at", "__ends_at", pl.col(TIMESTAMP_COL) + pl.duration(days=response_days)).alias(
                "__known_at"
            ),
            pl.lit(1.0).alias("__exposures"),
            pl.col(RESPONDED).cast(pl.Float64).fill_null(0.0).alias("__response"),
        )
    )


def campaign_inputs_for(
    customer_id: str,
    action_ids: Sequence[str],
    at: datetime,
    events: pl.DataFrame | pl.LazyFrame,
    history: pl.DataFrame,
    targets: ActionTargets,
    *,
    response_days: int = 30,
) -> dict[str, dict[str, float]]:
    """One customer's campaign inputs against many actions at ``at`` (the online path): the frame path on one
    customer's rows. Returns column → action id → value (the encoder's ``pair_values``)."""
    rows = pl.DataFrame(
        {
            CUSTOMER_ID: [customer_id] * len(action_ids),
            ACTION_ID: list(action_ids),
            TIMESTAMP_COL: [at] * len(action_ids),
        },
        schema={CUSTOMER_ID: pl.String, ACTION_ID: pl.String, TIMESTAMP_COL: TIMESTAMP},
    )
    values = campaign_inputs_asof(
        rows,
        events.lazy().filter(pl.col(CUSTOMER_ID) == customer_id),
        history.filter(pl.col(CUSTOMER_ID) == customer_id),
        targets,
        response_days=response_days,
    )
    return {c: dict(zip(action_ids, values[c].to_list(), strict=True)) for c in CAMPAIGN_COLUMNS}
