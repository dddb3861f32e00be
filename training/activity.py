"""Customer activity features (events, sessions, purchases, spend, price sensitivity) from events before a time.

:func:`customer_activity` computes them for every customer at one time (the online path, and the service's
load); :func:`activity_asof` computes the same values for every (customer, time) row at once (training rows).
Prices are compared with each item's reference price (:func:`reference_prices`), whose grouping columns depend
on the catalogue only: compute them once per catalogue with :func:`item_reference_prices` and pass them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl

from nextbest.features.schema import (
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    ITEM_ID,
    PRICE,
    QUANTITY,
    SESSION_ID,
    TIMESTAMP,
    TIMESTAMP_COL,
)

ACTIVITY_WINDOWS: tuple[int, ...] = (30, 90)
"""Purchase-count windows (days before the exposure) of the activity features."""
RECENT_EVENT_DAYS = 7
CHANNEL_SHARE_PREFIX = "channel_share_"
SESSIONS_PREFIX = "sessions_"


def activity_channels(events: pl.DataFrame, *, limit: int = 6) -> list[str]:
    """The most frequent event channels (most frequent first), whose shares become activity features."""
    if CHANNEL not in events.columns:
        return []
    counts = (
        events.select(pl.col(CHANNEL).drop_nulls())
        .group_by(CHANNEL)
        .len()
        .sort(["len", CHANNEL], descending=[True, False])
    )
    return counts[CHANNEL].head(limit).to_list()


def price_reference_columns(
    items: pl.LazyFrame | pl.DataFrame,
    *,
    max_columns: int = 2,
    min_gain: float = 0.25,
    min_group_items: int = 5,
) -> list[str]:
    """The item attributes whose groups define an item's reference price (see :func:`reference_prices`).

    Chosen greedily from the text attributes of the items table (``name``/``title``/``description`` aside): first
    the attribute whose groups leave the least variance of log price, then, while fewer than ``max_columns``, the
    attribute that cuts the variance left by at least ``min_gain`` of it, as long as the median group keeps at least
    ``min_group_items`` items. In a sporting-goods catalogue that is category, then sport (equipment is a bike in
    cycling and a mat in yoga); colour or brand explain too little to be picked. Deterministic for a given items
    table, so training and serving agree. It reads the whole catalogue: compute it once per catalogue
    (:func:`item_reference_prices`), not per customer.
    """
    frame = items.collect() if isinstance(items, pl.LazyFrame) else items
    if PRICE not in frame.columns:
        return []
    text = [
        c
        for c, t in frame.schema.items()
        if t == pl.String and c not in {ITEM_ID, "name", "title", "description"}
    ]
    return _choose_reference_columns(frame, text, max_columns, min_gain, min_group_items)


def _choose_reference_columns(
    frame: pl.DataFrame, text: list[str], max_columns: int, min_gain: float, min_group_items: int
) -> list[str]:
    priced = frame.filter(pl.col(PRICE).is_not_null() & (pl.col(PRICE) > 0)).with_columns(
        pl.col(PRICE).log().alias("__log_price")
    )
    if priced.height < 2 or not text:
        return []

    def spread(columns: list[str]) -> tuple[float, float]:
        grouped = priced.select(
            ((pl.col("__log_price") - pl.col("__log_price").mean().over(columns)) ** 2).mean().alias("v"),
            pl.len().over(columns).median().alias("m"),
        )
        return float(grouped["v"][0]), float(grouped["m"][0])

    chosen: list[str] = []
    left = float(priced["__log_price"].var(ddof=0))
    while len(chosen) < max_columns:
        best: tuple[float, str] | None = None
        for c in text:
            if c in chosen:
                continue
            v, median_size = spread([*chosen, c])
            if median_size >= min_group_items and (best is None or v < best[0]):
                best = (v, c)
        if best is None or best[0] > (1.0 - min_gain) * left:
            break
        left = best[0]
        chosen.append(best[1])
    return chosen


def reference_prices(items: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Each item's list price and reference price: the median price of the items of its group (the attributes of
    :func:`price_reference_columns`; the whole catalogue when none qualifies). Columns ``item_id``,
    ``__item_price``, ``__reference``."""
    lazy = items.lazy() if isinstance(items, pl.DataFrame) else items
    group = price_reference_columns(lazy)
    median = pl.col(PRICE).median()
    return lazy.select(
        ITEM_ID,
        pl.col(PRICE).cast(pl.Float64).alias("__item_price"),
        (median.over(group) if group else median).cast(pl.Float64).alias("__reference"),
    )


REFERENCE_SCHEMA: dict[str, pl.DataType] = {
    ITEM_ID: pl.String(),
    "__item_price": pl.Float64(),
    "__reference": pl.Float64(),
}
"""Columns of :func:`item_reference_prices`."""


def item_reference_prices(items: pl.LazyFrame | pl.DataFrame | None) -> pl.DataFrame:
    """:func:`reference_prices` of a catalogue, collected: compute it once when the catalogue is loaded and pass it
    to :func:`customer_activity` / :func:`activity_asof` as ``reference``, so a live profile refresh does not
    re-derive the catalogue's reference columns. Empty (no reference) when there are no items or no prices."""
    if items is None:
        return pl.DataFrame(schema=REFERENCE_SCHEMA)
    lazy = items.lazy() if isinstance(items, pl.DataFrame) else items
    if PRICE not in lazy.collect_schema().names():
        return pl.DataFrame(schema=REFERENCE_SCHEMA)
    return reference_prices(lazy).collect().cast(REFERENCE_SCHEMA)


def _session_key(names: Sequence[str]) -> pl.Expr:
    # Events without a session id (live events posted without one) count as one session per channel and day.
    day = pl.col(TIMESTAMP_COL).dt.strftime("%Y-%m-%d")
    channel = pl.col(CHANNEL).fill_null("") if CHANNEL in names else pl.lit("")
    fallback = pl.format("{}|{}", channel, day)
    return pl.coalesce(pl.col(SESSION_ID), fallback) if SESSION_ID in names else fallback


def _session_starts(events: pl.DataFrame) -> pl.DataFrame:
    """``customer_id, timestamp, channel`` of each event, sorted by customer and time, with ``__start``: 1.0 on
    the first event of each of the customer's sessions (the session counts for that event's channel)."""
    names = events.columns
    return (
        events.select(
            CUSTOMER_ID,
            pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
            (pl.col(CHANNEL) if CHANNEL in names else pl.lit(None, dtype=pl.String)).alias(CHANNEL),
            _session_key(names).alias("__session"),
        )
        .sort(CUSTOMER_ID, TIMESTAMP_COL, maintain_order=True)
        .with_columns(
            pl.struct(CUSTOMER_ID, "__session").is_first_distinct().cast(pl.Float64).alias("__start")
        )
        .drop("__session")
    )


def _funnel_rows(
    events: pl.DataFrame,
    items: pl.LazyFrame,
    purchase_event: str,
    cart_event: str,
    reference: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Purchases and add-to-carts, priced against their item's reference price (:func:`reference_prices`).

    Returns:
        (purchases, carts). Purchases: ``customer_id, timestamp, __amount`` (price × quantity), ``__relative``
        (price over reference), ``__above`` (1.0 above the reference, 0.0 at or below it, null unpriced) and
        ``__carted`` (1.0 when an add-to-cart of the same item in the same session came at or before it).
        Carts: ``customer_id, timestamp, __above``.
    """
    names = events.columns
    item_cols = items.collect_schema().names()
    funnel = events.lazy().filter(pl.col(EVENT_TYPE).is_in([purchase_event, cart_event]))
    price = pl.col(PRICE) if PRICE in names else pl.lit(None, dtype=pl.Float64)
    reference_price = pl.lit(None, dtype=pl.Float64)
    if reference is not None:
        funnel = funnel.join(reference.lazy(), on=ITEM_ID, how="left")
        price = pl.coalesce(price, pl.col("__item_price"))
        reference_price = pl.col("__reference")
    elif PRICE in item_cols:
        funnel = funnel.join(reference_prices(items), on=ITEM_ID, how="left")
        price = pl.coalesce(price, pl.col("__item_price"))
        reference_price = pl.col("__reference")
    qty = pl.col(QUANTITY).fill_null(1) if QUANTITY in names else pl.lit(1)
    rows = (
        funnel.select(
            CUSTOMER_ID,
            pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
            ITEM_ID,
            pl.col(EVENT_TYPE),
            _session_key(names).alias("__session"),
            (price * qty).fill_null(0.0).cast(pl.Float64).alias("__amount"),
            (price / reference_price).cast(pl.Float64).alias("__relative"),
        )
        .with_columns((pl.col("__relative") > 1.0).cast(pl.Float64).alias("__above"))
        .collect()
    )
    carts = rows.filter(pl.col(EVENT_TYPE) == cart_event).select(CUSTOMER_ID, TIMESTAMP_COL, "__above")
    key = [CUSTOMER_ID, ITEM_ID, "__session"]
    cart_times = (
        rows.filter(pl.col(EVENT_TYPE) == cart_event)
        .select(*key, pl.col(TIMESTAMP_COL).alias("__cart_at"))
        .sort("__cart_at")
    )
    purchases = (
        rows.filter(pl.col(EVENT_TYPE) == purchase_event)
        .sort(TIMESTAMP_COL)
        .join_asof(
            cart_times,
            left_on=TIMESTAMP_COL,
            right_on="__cart_at",
            by=key,
            strategy="backward",
            check_sortedness=False,
        )
        .select(
            CUSTOMER_ID,
            TIMESTAMP_COL,
            "__amount",
            "__relative",
            "__above",
            pl.col("__cart_at").is_not_null().cast(pl.Float64).alias("__carted"),
        )
    )
    return purchases, carts


def _conversion(carted: pl.Expr, carts: pl.Expr) -> pl.Expr:
    # A cart can be bought twice (multi-unit items bought again in the session): a rate never exceeds 1.
    return pl.when(carts > 0).then(pl.min_horizontal(carted / carts, pl.lit(1.0))).otherwise(None)


def customer_activity(
    events: pl.DataFrame | pl.LazyFrame,
    items: pl.LazyFrame,
    *,
    as_of: datetime,
    channels: Sequence[str],
    purchase_event: str = "purchase",
    cart_event: str = "add_to_cart",
    reference: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Activity features per customer from events strictly before ``as_of`` (the online path).

    Columns: ``events_before``, ``events_7d``, ``channel_share_<c>`` (share of events) and ``sessions_<c>``
    (sessions started on the channel; the channel habit shows more reliably in sessions, since a browsing
    session has many events and a store visit few) per channel, ``purchases_before``, ``purchases_30d``,
    ``purchases_90d``, ``spend_before``, ``relative_price`` (mean price of purchases over their reference price,
    :func:`reference_prices`), price sensitivity as ``carts_above_reference`` (add-to-carts of items priced above
    their reference) and ``cart_conversion_above_reference`` / ``cart_conversion_below_reference`` (the share of
    those add-to-carts, and of the ones at or below the reference, bought in the same session), and
    ``last_purchase_at``. Customers without events get no row. :func:`activity_asof` computes the same values
    for every exposure at once.

    ``reference`` is the catalogue's :func:`item_reference_prices`, computed once per catalogue; None derives it
    from ``items`` on every call.
    """
    ts = pl.col(TIMESTAMP_COL)
    ev = events.lazy().filter(ts < as_of).collect()
    if ev.is_empty():
        return pl.DataFrame(schema={CUSTOMER_ID: pl.String, **_activity_schema(channels)})
    starts = _session_starts(ev)
    base = starts.group_by(CUSTOMER_ID).agg(
        pl.len().cast(pl.Float64).alias("events_before"),
        (ts >= as_of - timedelta(days=RECENT_EVENT_DAYS)).sum().cast(pl.Float64).alias("events_7d"),
        *[
            ((pl.col(CHANNEL) == c).fill_null(False).sum() / pl.len())
            .cast(pl.Float64)
            .alias(CHANNEL_SHARE_PREFIX + c)
            for c in channels
        ],
        *[
            (pl.col("__start") * (pl.col(CHANNEL) == c).fill_null(False).cast(pl.Float64))
            .sum()
            .alias(SESSIONS_PREFIX + c)
            for c in channels
        ],
    )
    p, carts = _funnel_rows(ev, items, purchase_event, cart_event, reference)
    bought = p.group_by(CUSTOMER_ID).agg(
        pl.len().cast(pl.Float64).alias("purchases_before"),
        *[
            (ts >= as_of - timedelta(days=w)).sum().cast(pl.Float64).alias(f"purchases_{w}d")
            for w in ACTIVITY_WINDOWS
        ],
        pl.col("__amount").sum().alias("spend_before"),
        pl.col("__relative").mean().alias("relative_price"),
        ts.max().alias("last_purchase_at"),
        (pl.col("__carted") * pl.col("__above")).sum().alias("__bought_above"),
        (pl.col("__carted") * (1.0 - pl.col("__above"))).sum().alias("__bought_below"),
    )
    carted = carts.group_by(CUSTOMER_ID).agg(
        pl.col("__above").sum().alias("carts_above_reference"),
        (1.0 - pl.col("__above")).sum().alias("__carts_below"),
    )
    counts = [
        "purchases_before",
        *(f"purchases_{w}d" for w in ACTIVITY_WINDOWS),
        "spend_before",
        "carts_above_reference",
        "__carts_below",
        "__bought_above",
        "__bought_below",
    ]
    return (
        base.join(bought, on=CUSTOMER_ID, how="left")
        .join(carted, on=CUSTOMER_ID, how="left")
        .with_columns(pl.col(c).fill_null(0.0) for c in counts)
        .with_columns(
            _conversion(pl.col("__bought_above"), pl.col("carts_above_reference")).alias(
                "cart_conversion_above_reference"
            ),
            _conversion(pl.col("__bought_below"), pl.col("__carts_below")).alias(
                "cart_conversion_below_reference"
            ),
        )
        .select(CUSTOMER_ID, *_activity_schema(channels))
        .cast(_activity_schema(channels))
        .sort(CUSTOMER_ID)
    )


def _activity_schema(channels: Sequence[str]) -> dict[str, pl.DataType]:
    return {
        "events_before": pl.Float64(),
        "events_7d": pl.Float64(),
        **{CHANNEL_SHARE_PREFIX + c: pl.Float64() for c in channels},
        **{SESSIONS_PREFIX + c: pl.Float64() for c in channels},
        "purchases_before": pl.Float64(),
        **{f"purchases_{w}d": pl.Float64() for w in ACTIVITY_WINDOWS},
        "spend_before": pl.Float64(),
        "relative_price": pl.Float64(),
        "carts_above_reference": pl.Float64(),
        "cart_conversion_above_reference": pl.Float64(),
        "cart_conversion_below_reference": pl.Float64(),
        "last_purchase_at": TIMESTAMP,
    }


def _cumulative_asof(
    keys: pl.DataFrame,
    rows: pl.DataFrame,
    columns: Sequence[str],
    *,
    shift_days: float = 0.0,
    suffix: str = "",
) -> pl.DataFrame:
    """For each key (customer, time t), the running totals of ``rows`` over the customer's rows strictly before
    ``t − shift_days`` (nulls when there are none)."""
    left = keys.select(
        "__row", CUSTOMER_ID, (pl.col(TIMESTAMP_COL) - timedelta(days=shift_days)).alias("__t")
    )
    right = rows.select(CUSTOMER_ID, pl.col(TIMESTAMP_COL).alias("__t"), *columns)
    joined = left.sort("__t").join_asof(
        right.sort("__t"),
        on="__t",
        by=CUSTOMER_ID,
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    )
    return joined.select("__row", *(pl.col(c).alias(c + suffix) for c in columns))


def activity_asof(
    keys: pl.DataFrame,
    events: pl.DataFrame,
    items: pl.LazyFrame,
    *,
    channels: Sequence[str],
    purchase_event: str = "purchase",
    cart_event: str = "add_to_cart",
    reference: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The :func:`customer_activity` features of each (customer, timestamp) row, each from events strictly
    before its own time (exact, no snapshot staleness), by as-of joins on running totals.

    ``reference``: as in :func:`customer_activity`.

    Returns:
        the activity columns, one row per row of ``keys``, in the same order.
    """
    keys = keys.select(CUSTOMER_ID, pl.col(TIMESTAMP_COL).cast(TIMESTAMP)).with_row_index("__row")
    channel_of = [(pl.col(CHANNEL) == c).fill_null(False).cast(pl.Float64) for c in channels]
    ev = _session_starts(events).with_columns(
        pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Float64).alias("__events"),
        *[is_c.cum_sum().over(CUSTOMER_ID).alias(f"__ch{i}") for i, is_c in enumerate(channel_of)],
        *[
            (pl.col("__start") * is_c).cum_sum().over(CUSTOMER_ID).alias(f"__se{i}")
            for i, is_c in enumerate(channel_of)
        ],
    )
    ch_cols = [f"__ch{i}" for i in range(len(channels))]
    se_cols = [f"__se{i}" for i in range(len(channels))]
    purchases, carts = _funnel_rows(events, items, purchase_event, cart_event, reference)
    p = purchases.sort(CUSTOMER_ID, TIMESTAMP_COL).with_columns(
        pl.int_range(1, pl.len() + 1).over(CUSTOMER_ID).cast(pl.Float64).alias("__purchases"),
        pl.col("__amount").cum_sum().over(CUSTOMER_ID).alias("__spend"),
        pl.col("__relative").fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__rel_sum"),
        pl.col("__relative").is_not_null().cast(pl.Float64).cum_sum().over(CUSTOMER_ID).alias("__rel_n"),
        (pl.col("__carted") * pl.col("__above"))
        .fill_null(0.0)
        .cum_sum()
        .over(CUSTOMER_ID)
        .alias("__b_above"),
        (pl.col("__carted") * (1.0 - pl.col("__above")))
        .fill_null(0.0)
        .cum_sum()
        .over(CUSTOMER_ID)
        .alias("__b_below"),
        pl.col(TIMESTAMP_COL).alias("__last"),
    )
    c = carts.sort(CUSTOMER_ID, TIMESTAMP_COL).with_columns(
        pl.col("__above").fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__c_above"),
        (1.0 - pl.col("__above")).fill_null(0.0).cum_sum().over(CUSTOMER_ID).alias("__c_below"),
    )
    out = keys.select("__row")
    parts = [
        _cumulative_asof(keys, ev, ["__events", *ch_cols, *se_cols]),
        _cumulative_asof(keys, ev, ["__events"], shift_days=RECENT_EVENT_DAYS, suffix="_recent"),
        _cumulative_asof(
            keys, p, ["__purchases", "__spend", "__rel_sum", "__rel_n", "__b_above", "__b_below", "__last"]
        ),
        _cumulative_asof(keys, c, ["__c_above", "__c_below"]),
        *[_cumulative_asof(keys, p, ["__purchases"], shift_days=w, suffix=f"_{w}") for w in ACTIVITY_WINDOWS],
    ]
    for part in parts:
        out = out.join(part, on="__row", how="left")
    seen = pl.col("__events").is_not_null()
    bought = pl.col("__purchases").fill_null(0.0)

    def when_seen(expr: pl.Expr) -> pl.Expr:
        return pl.when(seen).then(expr).otherwise(None)

    return (
        out.sort("__row")
        .select(
            pl.col("__events").alias("events_before"),
            when_seen(pl.col("__events") - pl.col("__events_recent").fill_null(0.0)).alias("events_7d"),
            *[
                (pl.col(f"__ch{i}") / pl.col("__events")).alias(CHANNEL_SHARE_PREFIX + ch)
                for i, ch in enumerate(channels)
            ],
            *[pl.col(f"__se{i}").alias(SESSIONS_PREFIX + ch) for i, ch in enumerate(channels)],
            when_seen(bought).alias("purchases_before"),
            *[
                when_seen(bought - pl.col(f"__purchases_{w}").fill_null(0.0)).alias(f"purchases_{w}d")
                for w in ACTIVITY_WINDOWS
            ],
            when_seen(pl.col("__spend").fill_null(0.0)).alias("spend_before"),
            pl.when(pl.col("__rel_n") > 0)
            .then(pl.col("__rel_sum") / pl.col("__rel_n"))
            .otherwise(None)
            .alias("relative_price"),
            when_seen(pl.col("__c_above").fill_null(0.0)).alias("carts_above_reference"),
            when_seen(
                _conversion(pl.col("__b_above").fill_null(0.0), pl.col("__c_above").fill_null(0.0))
            ).alias("cart_conversion_above_reference"),
            when_seen(
                _conversion(pl.col("__b_below").fill_null(0.0), pl.col("__c_below").fill_null(0.0))
            ).alias("cart_conversion_below_reference"),
            pl.col("__last").alias("last_purchase_at"),
        )
        .cast(_activity_schema(channels))
    )
