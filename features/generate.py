"""The embedded default dataset: a deterministic, streaming generator of a sporting-goods retail world.

:func:`generate_world` writes a complete nextbest dataset (``raw/`` tables in the exact contract dtypes, plus the
planted ground truth under ``truth/``). Customers are generated in chunks of ``chunk_customers``; each chunk
draws from its own random stream seeded by ``(seed, chunk index)`` and is written as one numbered part of
``events`` and ``actions``, so memory stays bounded whatever the size. The same config always gives the same
files; a different ``chunk_customers`` gives a different (equally valid) world.

The world
---------
* **Items** (``items``): ``item_id`` (``I00001``…), ``category``, ``sport``, ``colour``, ``brand``, ``price``,
  ``name``. Eight sports (:data:`SPORTS`), each with its own categories (:data:`CATEGORIES`; "equipment" is a
  bike in cycling, a racket in tennis, a mat in yoga, a backpack in hiking, goggles and fins in swimming, shin
  guards in football), eight colours, ten brands, each sport with about the same number of items and colours
  and brands dealt out evenly over sports and categories. Price: a base per category (:data:`BASE_PRICE`,
  overridden per sport in :data:`PRICE_OVERRIDES`) × a brand premium × log-normal noise, ending in .99. Each item
  also has a latent popularity (log-normal) that scales how often it is viewed.
* **Customers** (``customers``): ``customer_id`` (``C0000001``…), ``age`` 18–80, ``gender``, ``region``,
  ``signup_date`` (a quarter sign up during the period, the rest up to three years before). Latent and *not* in
  the table: preferred sport, colour and brand (``truth/preferences.parquet``), activity (log-normal, a tenth of
  customers very light), price sensitivity (a third), and a channel type (app, web or store; young customers
  are more often app users) (``truth/latent.parquet``).
* **Sessions and events** (``events``): a Poisson number of sessions per customer (``sessions_per_week`` ×
  activity × weeks since signup) on channel web, app or store. Online sessions view 1 + Poisson items, each
  drawn with probability ∝ popularity · exp(a·[sport = preferred] + b·[colour = preferred] + c·[brand =
  preferred]) (one CDF per (sport, colour, brand) combination, sampled with one ``searchsorted``). Each view
  may lead to ``click`` → ``add_to_cart`` → ``purchase`` (timestamps strictly increasing within a session);
  price-sensitive customers buy items priced above their group's median less often, and nobody buys the same
  durable item twice (socks, balls and nutrition aside: a repeat stays an abandoned cart). Store sessions are
  purchase-only. ``quantity`` and ``price`` (the item's list price) are set on ``add_to_cart`` and
  ``purchase`` rows only. Each part is sorted by time.
* **Follow-ups** (:data:`FOLLOW_UPS`, ``truth/followups.parquet``): after buying an item of a trigger
  (sport, category), with probability ``p_follow`` the customer comes back 1–``follow_up_days`` days later
  and buys an item of the follow-up category of the same sport (preferring their colour and brand). One level:
  follow-up purchases trigger nothing.
* **Identity**: canonical ids are CRM ids (``C…``). A share ``cookie_share`` of web sessions is logged under one
  of the customer's cookies (``W`` + 16 hex digits) with ``source_system = "web"``; canonical events have a
  null ``source_system``. ``identities`` holds ``(crm, C…, C…)`` for every customer, ``(email, E…, C…)`` for
  customers with an e-mail id and ``(web, W…, C…)`` for linked cookies; a share ``unlinked_cookie_share`` of
  cookies has no row. Purely anonymous visitors browse under cookies of their own (never linked, never buy).
  ``truth/identities.parquet`` maps every cookie seen in events to its true customer (null for anonymous).
* **Consent** (``consent``): one record per customer and purpose at signup; a share ``consent_change_share``
  has a second, later record per purpose (the later one wins; half of them flip). Final declines follow
  ``decline_personalisation`` / ``decline_profiling`` / ``decline_marketing``; ``truth/consent.parquet`` holds
  the final state.
* **Actions** (``action_catalog``, ``actions``): brand discounts (:data:`DISCOUNT_BRANDS`, kind ``discount``),
  sport bundles (:data:`BUNDLE_SPORTS`, kind ``bundle``), ``free_shipping``, ``retention_call`` (channel
  ``call``), ``newsletter`` (channel ``email``) and ``no_action`` (kind ``none``, value 0). Each customer gets
  Poisson(``exposures_per_customer``) exposures, uniform in time from a sixth into the period (or signup). The
  historical policy was mostly random: a kind by fixed shares, the brand (bundle sport) the customer's own half
  of the time when it has an action, else any; the channel where the customer browses (app or web) when the
  action allows it, else any allowed one. Actions needing marketing consent go only to customers who grant it
  at that moment (the others get free shipping or nothing). ``responded`` ~ Bernoulli(p_true), with p_true in
  ``truth/propensity.parquet``. No response feeds back into the events.

The planted propensity p_true
-----------------------------
Computed per exposure from what the data lets a model observe: the preferred brand and sport (revealed by
behaviour), age, the exposure channel, the app habit (the latent channel type; a model sees it as the share of
app sessions), and, at exposure time t, from the customer's purchases before t: ``R`` (days since the last purchase; infinite without one), ``F90`` (purchases
in the 90 days before t) and ``M`` (money spent before t, price × quantity). ``eager`` = price-sensitive (latent,
visible as cheaper purchases) or ``F90 ≥ 4``.

==================  =========================================================================================
action              p before the channel factor
==================  =========================================================================================
discount (brand)    0.025; brand = preferred brand: 0.07, and if also eager: 0.55 + 0.015·(discount_pct − 10)
bundle (sport)      0.025; sport = preferred sport: 0.07, and if also F90 ≥ 2: 0.55
free_shipping       0.04; app user under 35: 0.55 on the app channel, 0.15 on the others
retention_call      lapsed (R ≥ 40) with M ≥ 150: 0.60; lapsed with M < 150: 0.07; active (R < 14): 0.005
                    (the call annoys); otherwise 0.03
newsletter          0.025; age 35–54 with R < 30: 0.30
no_action           organic: 0.015, or 0.05 if R < 14
==================  =========================================================================================

Channel factor: e-mail × 0.8, everything else × 1. A logistic regression on raw or one-hot features cannot
express these AND-of-thresholds (an action attribute must match a customer attribute), which is the point.

Why it is longer than the project's ~600 lines: this docstring is the world's specification, and every planted
truth it promises (preferences, follow-ups, identities, consent, p_true) is made in one pass over a chunk, from
the same random stream and per-customer arrays as the draws that must agree with it (:func:`planted_propensity`
is the table above, in code). Split up, the specification, the draws and the truths that
``tests/test_generate.py`` holds them to would be read and changed in different files.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from nextbest.features.dataset import Dataset, write_json_atomic
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CONSENT_PURPOSES,
    CUSTOMER_ID,
    DEFAULT_EVENT_TYPES,
    EVENT_TYPE,
    EXPOSURE_ID,
    GRANTED,
    ITEM_ID,
    KIND,
    PRICE,
    PURPOSE,
    QUANTITY,
    RESPONDED,
    SESSION_ID,
    SOURCE_ID,
    SOURCE_SYSTEM,
    TIMESTAMP,
    TIMESTAMP_COL,
    VALUE,
    table_spec,
)

SPORTS: tuple[str, ...] = (
    "running",
    "cycling",
    "football",
    "tennis",
    "swimming",
    "hiking",
    "yoga",
    "basketball",
)
SPORT_POPULARITY: tuple[float, ...] = (0.22, 0.15, 0.15, 0.10, 0.08, 0.13, 0.09, 0.08)
"""Share of customers preferring each sport."""
COLOURS: tuple[str, ...] = ("black", "white", "red", "blue", "green", "yellow", "grey", "pink")
BRANDS: tuple[str, ...] = (
    "Apex",
    "Stride",
    "Velo",
    "Kinetic",
    "Summit",
    "Aqua",
    "Pulse",
    "Nordic",
    "Terra",
    "Zenith",
)
BRAND_PREMIUM: tuple[float, ...] = (1.25, 1.0, 1.15, 0.9, 1.1, 0.95, 0.85, 1.2, 1.0, 0.8)
REGIONS: tuple[str, ...] = ("north", "south", "east", "west", "central")
REGION_SHARES: tuple[float, ...] = (0.22, 0.24, 0.18, 0.2, 0.16)
GENDERS: tuple[str, ...] = ("female", "male", "unspecified")
GENDER_SHARES: tuple[float, ...] = (0.48, 0.48, 0.04)
SESSION_CHANNELS: tuple[str, ...] = ("web", "app", "store")
CUSTOMER_TYPES: tuple[str, ...] = ("web", "app", "store")
"""Latent channel habit; row i of :data:`CHANNEL_MIX` is the (web, app, store) session mix of type i."""
CHANNEL_MIX: tuple[tuple[float, float, float], ...] = (
    (0.72, 0.1, 0.18),
    (0.2, 0.72, 0.08),
    (0.25, 0.05, 0.7),
)

CATEGORIES: dict[str, tuple[str, ...]] = {
    "running": ("shoes", "apparel", "socks", "accessories", "nutrition"),
    "cycling": ("equipment", "helmets", "apparel", "accessories", "nutrition"),
    "football": ("shoes", "balls", "apparel", "socks", "equipment"),
    "tennis": ("equipment", "balls", "apparel", "shoes", "accessories"),
    "swimming": ("apparel", "equipment", "accessories"),
    "hiking": ("shoes", "apparel", "equipment", "socks", "accessories"),
    "yoga": ("equipment", "apparel", "accessories"),
    "basketball": ("shoes", "balls", "apparel", "socks", "accessories"),
}
BASE_PRICE: dict[str, float] = {
    "shoes": 110.0,
    "apparel": 45.0,
    "socks": 12.0,
    "accessories": 25.0,
    "nutrition": 9.0,
    "balls": 25.0,
    "helmets": 75.0,
    "equipment": 120.0,
}
PRICE_OVERRIDES: dict[tuple[str, str], float] = {
    ("cycling", "equipment"): 850.0,
    ("tennis", "equipment"): 150.0,
    ("yoga", "equipment"): 40.0,
    ("swimming", "equipment"): 22.0,
    ("football", "equipment"): 30.0,
    ("hiking", "equipment"): 95.0,
}
MULTI_UNIT_CATEGORIES: frozenset[str] = frozenset({"socks", "balls", "nutrition"})
"""Categories bought several at a time (quantity 1 + Poisson(0.8) instead of 1 + Poisson(0.1))."""


@dataclass(frozen=True)
class FollowUp:
    """After buying ``category`` of ``sport``, customers tend to buy ``follow_up_category`` of the same sport."""

    sport: str
    category: str
    follow_up_category: str


FOLLOW_UPS: tuple[FollowUp, ...] = (
    FollowUp("running", "shoes", "socks"),
    FollowUp("cycling", "equipment", "helmets"),
    FollowUp("cycling", "helmets", "accessories"),
    FollowUp("football", "shoes", "socks"),
    FollowUp("football", "equipment", "balls"),
    FollowUp("tennis", "equipment", "balls"),
    FollowUp("tennis", "shoes", "accessories"),
    FollowUp("swimming", "apparel", "accessories"),
    FollowUp("hiking", "shoes", "socks"),
    FollowUp("hiking", "equipment", "accessories"),
    FollowUp("yoga", "equipment", "accessories"),
    FollowUp("basketball", "shoes", "socks"),
)
"""The planted follow-up table; ``truth/followups.parquet`` holds it with its probability."""

DISCOUNT_BRANDS: tuple[tuple[str, float], ...] = (
    ("Apex", 10.0),
    ("Stride", 15.0),
    ("Velo", 20.0),
    ("Pulse", 25.0),
)
"""Brands with a discount action, and the discount in percent."""
BUNDLE_SPORTS: tuple[str, ...] = ("running", "tennis")

EXPOSURE_CHANNELS: tuple[str, ...] = ("email", "app", "web", "call")
ACTION_KINDS: tuple[str, ...] = ("discount", "bundle", "free_shipping", "retention", "newsletter", "none")
"""The ``kind`` values of the action catalogue."""
# How often the historical (random) policy picked each kind, and which kinds need marketing consent.
_KIND_SHARES: tuple[float, ...] = (0.32, 0.16, 0.15, 0.12, 0.13, 0.12)
_KIND_MARKETING: tuple[bool, ...] = (True, True, False, True, True, False)

DAY = 86_400.0
_HOUR_WEIGHTS = np.array(
    [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 5, 6, 6, 5, 5, 5, 6, 8, 9, 9, 7, 4, 0], dtype=np.float64
)
_HOUR_CDF = np.cumsum(_HOUR_WEIGHTS) / _HOUR_WEIGHTS.sum()
_VIEW, _CLICK, _CART, _PURCHASE = 0, 1, 2, 3
_WEB, _APP, _STORE = 0, 1, 2


class WorldConfig(BaseModel):
    """Everything that shapes a generated world; the same config always yields the same files."""

    model_config = ConfigDict(extra="forbid")

    customers: int = Field(2000, ge=50)
    days: int = Field(180, ge=14)
    seed: int = Field(42, ge=0)
    items: int | None = Field(
        None, ge=100, description="catalogue size; None: clip(customers // 4, 300, 3000)"
    )
    start: dt.date = dt.date(2026, 1, 1)
    chunk_customers: int = Field(20_000, ge=10, description="customers per chunk and per event/action part")
    new_customer_share: float = Field(0.25, ge=0, le=1, description="customers signing up during the period")
    sessions_per_week: float = Field(0.55, gt=0, description="mean sessions per customer per week")
    activity_sigma: float = Field(0.6, ge=0, description="spread (log-normal sigma) of customer activity")
    light_customer_share: float = Field(0.1, ge=0, le=1, description="customers at a fifth of the activity")
    views_per_session: float = Field(2.5, ge=1)
    p_click: float = Field(0.5, ge=0, le=1)
    p_cart: float = Field(0.6, ge=0, le=1, description="P(add to cart | click)")
    p_purchase: float = Field(0.8, ge=0, le=1, description="P(purchase | add to cart)")
    store_items_per_session: float = Field(1.6, ge=1)
    sport_strength: float = Field(2.8, ge=0, description="a: log-weight of the preferred sport")
    colour_strength: float = Field(2.8, ge=0, description="b: log-weight of the preferred colour")
    brand_strength: float = Field(2.8, ge=0, description="c: log-weight of the preferred brand")
    price_sensitive_share: float = Field(0.33, ge=0, le=1)
    p_follow: float = Field(0.5, ge=0, le=1, description="P(follow-up purchase | trigger purchase)")
    follow_up_days: int = Field(21, ge=1)
    cookie_share: float = Field(0.4, ge=0, le=1, description="web sessions logged under a cookie id")
    unlinked_cookie_share: float = Field(0.1, ge=0, le=1, description="cookies without an identities row")
    anonymous_session_share: float = Field(
        0.03, ge=0, le=1, description="extra sessions of anonymous visitors"
    )
    email_share: float = Field(0.8, ge=0, le=1, description="customers with an e-mail id")
    decline_personalisation: float = Field(0.08, ge=0, le=1)
    decline_profiling: float = Field(0.12, ge=0, le=1)
    decline_marketing: float = Field(0.35, ge=0, le=1)
    consent_change_share: float = Field(0.1, ge=0, le=1, description="customers with a second consent record")
    exposures_per_customer: float = Field(4.0, ge=0)

    @property
    def n_items(self) -> int:
        """The catalogue size: ``items``, or derived from the number of customers."""
        return self.items if self.items is not None else int(np.clip(self.customers // 4, 300, 3000))

    def decline_shares(self) -> dict[str, float]:
        """Final share of customers declining each consent purpose."""
        return {
            "personalisation": self.decline_personalisation,
            "profiling": self.decline_profiling,
            "marketing": self.decline_marketing,
        }


# --- the catalogue ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RaggedCdf:
    """Many discrete distributions in one non-decreasing array, sampled together with one ``searchsorted``.

    Row ``r`` stores ``r + cumulative probabilities`` in ``flat[starts[r]:starts[r + 1]]``, so a draw from row
    ``r`` with uniform ``u`` is the first position whose value exceeds ``r + u``.
    """

    flat: np.ndarray
    starts: np.ndarray
    values: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple[np.ndarray, np.ndarray]]) -> _RaggedCdf:
        """Build from ``(weights, values)`` per row (weights positive)."""
        flats, values, starts = [], [], [0]
        for r, (w, v) in enumerate(rows):
            c = np.cumsum(w, dtype=np.float64)
            c /= c[-1]
            c[-1] = 1.0
            flats.append(r + c)
            values.append(v)
            starts.append(starts[-1] + len(w))
        return cls(np.concatenate(flats), np.asarray(starts, dtype=np.int64), np.concatenate(values))

    def sample(self, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One draw per element of ``rows``, from uniforms ``u``."""
        target = rows + u
        # searchsorted resumes from the previous answer when the queries ascend: sorting first is ~5× faster
        # than random probes into a large table.
        order = np.argsort(target)
        pos = np.empty(target.size, dtype=np.int64)
        pos[order] = np.searchsorted(self.flat, target[order], side="right")
        # r + u can round up to r + 1 in floating point: stay inside the row.
        pos = np.clip(pos, self.starts[rows], self.starts[rows + 1] - 1)
        return self.values[pos]


@dataclass(frozen=True)
class _Catalogue:
    sport: np.ndarray
    category: np.ndarray  # index into _CATEGORY_NAMES
    colour: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    group: np.ndarray  # index of (sport, category) in _GROUPS
    ref_price: np.ndarray  # median price of the item's group
    multi_unit: np.ndarray
    views: _RaggedCdf  # row: sport·80 + colour·10 + brand
    by_group: _RaggedCdf  # row: group·80 + colour·10 + brand
    follow_rule: np.ndarray  # per group: index into FOLLOW_UPS, or -1
    follow_target: np.ndarray  # per rule: target group


_GROUPS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SPORTS for c in CATEGORIES[s])
_CATEGORY_NAMES: tuple[str, ...] = tuple(sorted({c for cats in CATEGORIES.values() for c in cats}))


def _combo(sport: np.ndarray, colour: np.ndarray, brand: np.ndarray) -> np.ndarray:
    return (sport * len(COLOURS) + colour) * len(BRANDS) + brand


def _build_catalogue(config: WorldConfig, rng: np.random.Generator) -> _Catalogue:
    n = config.n_items
    n_groups = len(_GROUPS)
    # Every (sport, category) gets at least one item; the rest are spread evenly at random.
    # Shuffled, so that item ids say nothing about the group.
    # Every sport gets about the same number of items, spread evenly over its categories.
    n_cats = np.array([len(CATEGORIES[sp]) for sp in SPORTS])
    first_group = np.cumsum(n_cats) - n_cats
    extra_sport = np.arange(n - n_groups) % len(SPORTS)
    extra = first_group[extra_sport] + np.floor(rng.random(n - n_groups) * n_cats[extra_sport]).astype(
        np.int64
    )
    group = rng.permutation(np.concatenate([np.arange(n_groups), extra]))
    sport = np.array([SPORTS.index(_GROUPS[g][0]) for g in range(n_groups)])[group]
    category = np.array([_CATEGORY_NAMES.index(_GROUPS[g][1]) for g in range(n_groups)])[group]
    # Colours and brands are dealt out in turn along the items ordered by group, so every sport and category
    # gets a balanced share of each and the (colour, brand) pairs spread over different sports. Drawn
    # independently, a small catalogue puts a customer's matching (colour, brand) items in one other sport by
    # chance, and their sport preference then shows up as that sport.
    n_c, n_b = len(COLOURS), len(BRANDS)
    j = np.empty(n, dtype=np.int64)
    j[np.argsort(group, kind="stable")] = rng.integers(0, n_c * n_b) + np.arange(n)
    colour = rng.permutation(n_c)[j % n_c]
    brand = rng.permutation(n_b)[(j + (j // (n_c * n_b // 2))) % n_b]
    base = np.array([PRICE_OVERRIDES.get(_GROUPS[g], BASE_PRICE[_GROUPS[g][1]]) for g in range(n_groups)])
    raw = base[group] * np.asarray(BRAND_PREMIUM)[brand] * rng.lognormal(0.0, 0.3, n)
    price = np.maximum(np.round(raw) - 0.01, 2.99)
    ref = np.zeros(n_groups)
    for g in range(n_groups):
        ref[g] = np.median(price[group == g])
    popularity = rng.lognormal(0.0, 0.5, n)

    a, b, c = config.sport_strength, config.colour_strength, config.brand_strength
    s_w = np.exp(a * (sport[None, :] == np.arange(len(SPORTS))[:, None]))
    c_w = np.exp(b * (colour[None, :] == np.arange(len(COLOURS))[:, None]))
    b_w = np.exp(c * (brand[None, :] == np.arange(len(BRANDS))[:, None]))
    items = np.arange(n)
    views = _RaggedCdf.from_rows(
        [
            (popularity * s_w[s] * c_w[k] * b_w[j], items)
            for s in range(len(SPORTS))
            for k in range(len(COLOURS))
            for j in range(len(BRANDS))
        ]
    )
    rows = []
    for g in range(n_groups):
        members = np.flatnonzero(group == g)
        for k in range(len(COLOURS)):
            for j in range(len(BRANDS)):
                rows.append((popularity[members] * c_w[k, members] * b_w[j, members], members))
    by_group = _RaggedCdf.from_rows(rows)

    follow_rule = np.full(n_groups, -1)
    follow_target = np.zeros(len(FOLLOW_UPS), dtype=np.int64)
    for r, f in enumerate(FOLLOW_UPS):
        follow_rule[_GROUPS.index((f.sport, f.category))] = r
        follow_target[r] = _GROUPS.index((f.sport, f.follow_up_category))
    multi = np.array([_CATEGORY_NAMES[k] in MULTI_UNIT_CATEGORIES for k in range(len(_CATEGORY_NAMES))])
    return _Catalogue(
        sport=sport,
        category=category,
        colour=colour,
        brand=brand,
        price=price,
        group=group,
        ref_price=ref[group],
        multi_unit=multi[category],
        views=views,
        by_group=by_group,
        follow_rule=follow_rule,
        follow_target=follow_target,
    )


def _items_frame(cat: _Catalogue) -> pl.DataFrame:
    n = len(cat.price)
    sport = _take(SPORTS, cat.sport)
    category = _take(_CATEGORY_NAMES, cat.category)
    colour = _take(COLOURS, cat.colour)
    brand = _take(BRANDS, cat.brand)
    df = pl.DataFrame(
        {
            ITEM_ID: _numbered("I", np.arange(1, n + 1), 5),
            PRICE: pl.Series(cat.price, dtype=pl.Float64),
            "category": category,
            "sport": sport,
            "colour": colour,
            "brand": brand,
        }
    )
    return df.with_columns(
        pl.concat_str([pl.col("brand"), pl.col("sport"), pl.col("category")], separator=" ")
        .add(pl.lit(" ("))
        .add(pl.col("colour"))
        .add(pl.lit(")"))
        .alias("name")
    )


def _action_catalog() -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    for brand, pct in DISCOUNT_BRANDS:
        rows.append(
            dict(
                action_id=f"discount_{brand.lower()}",
                kind="discount",
                value=round(60.0 * (0.4 - pct / 100.0), 2),
                brand=brand,
                discount_pct=pct,
                channels="web,app,email",
                marketing=True,
                description=f"{pct:g}% off {brand}",
            )
        )
    for sport in BUNDLE_SPORTS:
        rows.append(
            dict(
                action_id=f"bundle_{sport}",
                kind="bundle",
                value=15.0,
                sport=sport,
                channels="web,app,email",
                marketing=True,
                description=f"A {sport} bundle",
            )
        )
    rows += [
        dict(
            action_id="free_shipping",
            kind="free_shipping",
            value=6.0,
            channels="web,app",
            marketing=False,
            description="Free shipping on the current order",
        ),
        dict(
            action_id="retention_call",
            kind="retention",
            value=40.0,
            channels="call",
            channel="call",
            marketing=True,
            description="An agent calls a customer at risk of leaving",
        ),
        dict(
            action_id="newsletter",
            kind="newsletter",
            value=1.5,
            channels="email",
            channel="email",
            marketing=True,
            description="Subscribe to the newsletter",
        ),
        dict(
            action_id="no_action",
            kind="none",
            value=0.0,
            marketing=False,
            description="Do nothing",
        ),
    ]
    schema = {
        ACTION_ID: pl.String,
        KIND: pl.String,
        VALUE: pl.Float64,
        "brand": pl.String,
        "sport": pl.String,
        "discount_pct": pl.Float64,
        "channels": pl.String,
        CHANNEL: pl.String,
        "marketing": pl.Boolean,
        "description": pl.String,
    }
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)


@dataclass(frozen=True)
class _Actions:
    """The catalogue as arrays for exposure generation."""

    ids: tuple[str, ...]
    kind: np.ndarray  # index into ACTION_KINDS
    brand: np.ndarray  # index into BRANDS, -1
    sport: np.ndarray  # index into SPORTS, -1
    pct: np.ndarray
    channel_cdf: np.ndarray  # (actions, 4): cumulative uniform choice among allowed exposure channels
    allowed: np.ndarray  # (actions, 4) bool

    @classmethod
    def of(cls, catalog: pl.DataFrame) -> _Actions:
        allowed = np.zeros((catalog.height, len(EXPOSURE_CHANNELS)), dtype=bool)
        for i, ch in enumerate(catalog["channels"].to_list()):
            # no_action is the control group, observed where customers browse.
            for name in (ch or "web,app").split(","):
                allowed[i, EXPOSURE_CHANNELS.index(name)] = True
        cdf = np.cumsum(allowed, axis=1) / allowed.sum(axis=1, keepdims=True)
        return cls(
            ids=tuple(catalog[ACTION_ID].to_list()),
            kind=np.array([ACTION_KINDS.index(k) for k in catalog[KIND].to_list()]),
            brand=np.array([BRANDS.index(b) if b else -1 for b in catalog["brand"].to_list()]),
            sport=np.array([SPORTS.index(s) if s else -1 for s in catalog["sport"].to_list()]),
            pct=catalog["discount_pct"].fill_null(0.0).to_numpy(),
            channel_cdf=cdf,
            allowed=allowed,
        )


# --- the planted propensity ---------------------------------------------------------------------------------


def planted_propensity(
    *,
    kind: np.ndarray,
    brand_match: np.ndarray,
    sport_match: np.ndarray,
    discount_pct: np.ndarray,
    channel: np.ndarray,
    age: np.ndarray,
    app_user: np.ndarray,
    price_sensitive: np.ndarray,
    recency_days: np.ndarray,
    frequency_90d: np.ndarray,
    monetary: np.ndarray,
) -> np.ndarray:
    """The true response probability of each exposure (the table in the module docstring).

    Args:
        kind: index into :data:`ACTION_KINDS` (discount, bundle, free_shipping, retention, newsletter, none).
        brand_match: the action's brand is the customer's preferred brand.
        sport_match: the action's sport is the customer's preferred sport.
        discount_pct: the action's discount in percent (0 without one).
        channel: exposure channel index into :data:`EXPOSURE_CHANNELS`.
        age: customer age in years.
        app_user: the customer's channel habit is the app.
        price_sensitive: the customer is (latently) price-sensitive.
        recency_days: days since the last purchase before the exposure (``inf`` without one).
        frequency_90d: purchases in the 90 days before the exposure.
        monetary: money spent before the exposure.

    Returns:
        p_true in [0, 1], one per exposure.
    """
    eager = price_sensitive | (frequency_90d >= 4)
    young_app = app_user & (age < 35)
    lapsed = recency_days >= 40
    active = recency_days < 14
    p = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4, kind == 5],
        [
            np.where(brand_match, np.where(eager, 0.55 + 0.015 * (discount_pct - 10.0), 0.07), 0.025),
            np.where(sport_match, np.where(frequency_90d >= 2, 0.55, 0.07), 0.025),
            np.where(young_app, np.where(channel == 1, 0.55, 0.15), 0.04),
            np.where(lapsed, np.where(monetary >= 150.0, 0.6, 0.07), np.where(active, 0.005, 0.03)),
            np.where((age >= 35) & (age < 55) & (recency_days < 30), 0.3, 0.025),
            np.where(active, 0.05, 0.015),
        ],
    )
    p = p * np.where(channel == 0, 0.8, 1.0)
    return np.clip(p, 0.0, 1.0)


# --- one chunk of customers ---------------------------------------------------------------------------------


def _take(values: tuple[str, ...], idx: np.ndarray) -> pl.Series:
    return pl.Series(values, dtype=pl.String).gather(idx)


def _numbered(prefix: str, numbers: np.ndarray, width: int) -> pl.Series:
    digits = pl.Series(numbers, dtype=pl.Int64).cast(pl.String).str.zfill(width)
    return pl.select(pl.concat_str([pl.lit(prefix), pl.lit(digits)])).to_series()


def _hex_ids(prefix: str, values: np.ndarray) -> pl.Series:
    return pl.Series([f"{prefix}{v:016x}" for v in values.tolist()], dtype=pl.String)


def _hours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds into the day, following the hourly traffic profile."""
    return np.searchsorted(_HOUR_CDF, rng.random(n), side="right") * 3600.0 + rng.random(n) * 3600.0


def _segment_offsets(gaps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative ``gaps`` restarted at each segment (the first gap of a segment is ignored: offset 0)."""
    if gaps.size == 0:
        return gaps
    starts = np.cumsum(counts) - counts
    starts = starts[counts > 0]
    g = gaps.copy()
    g[starts] = 0.0
    cs = np.cumsum(g)
    return cs - np.repeat(cs[starts], counts[counts > 0])


@dataclass
class _Events:
    sess: np.ndarray
    item: np.ndarray
    etype: np.ndarray
    t: np.ndarray
    qty: np.ndarray

    @classmethod
    def concat(cls, parts: list[_Events]) -> _Events:
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("sess", "item", "etype", "t", "qty"))
        )

    def take(self, mask: np.ndarray) -> _Events:
        return _Events(self.sess[mask], self.item[mask], self.etype[mask], self.t[mask], self.qty[mask])


def _quantity(rng: np.random.Generator, cat: _Catalogue, item: np.ndarray) -> np.ndarray:
    return (1 + rng.poisson(np.where(cat.multi_unit[item], 0.8, 0.1))).astype(np.int32)


def _online_events(
    rng: np.random.Generator,
    config: WorldConfig,
    cat: _Catalogue,
    sess: np.ndarray,
    start: np.ndarray,
    row: np.ndarray,
    buy_scale: np.ndarray,
    sensitive: np.ndarray,
) -> _Events:
    """Browsing sessions: views drawn from each session's preference row, each with its purchase funnel."""
    n_views = 1 + rng.poisson(config.views_per_session - 1.0, sess.size)
    v_sess = np.repeat(np.arange(sess.size), n_views)
    v_item = cat.views.sample(row[v_sess], rng.random(v_sess.size))
    u = rng.random((3, v_sess.size))
    click = u[0] < config.p_click
    cart = click & (u[1] < config.p_cart)
    p_buy = config.p_purchase * buy_scale[v_sess]
    # Price-sensitive customers shy away from items above their group's median price.
    p_buy = np.where(
        sensitive[v_sess], p_buy * np.clip(cat.ref_price[v_item] / cat.price[v_item], 0.2, 1.0) ** 2, p_buy
    )
    buy = cart & (u[2] < p_buy)
    qty = _quantity(rng, cat, v_item)
    n_ev = 1 + click.astype(np.int64) + cart + buy
    e_view = np.repeat(np.arange(v_sess.size), n_ev)
    first = np.cumsum(n_ev) - n_ev
    etype = (np.arange(e_view.size) - first[e_view]).astype(np.int8)
    # A new view comes 20 s to a few minutes later; funnel steps of one item follow within seconds.
    gaps = np.where(
        etype == _VIEW, 20.0 + rng.exponential(70.0, e_view.size), 3.0 + rng.exponential(15.0, e_view.size)
    )
    e_sess = v_sess[e_view]
    per_session = np.bincount(e_sess, minlength=sess.size)
    t = start[e_sess] + _segment_offsets(gaps, per_session)
    return _Events(sess[e_sess], v_item[e_view], etype, t, np.where(etype >= _CART, qty[e_view], 0))


def _store_events(
    rng: np.random.Generator,
    config: WorldConfig,
    cat: _Catalogue,
    sess: np.ndarray,
    start: np.ndarray,
    row: np.ndarray,
) -> _Events:
    """Store visits: purchases only, a few minutes apart at the till."""
    n_buy = 1 + rng.poisson(config.store_items_per_session - 1.0, sess.size)
    b_sess = np.repeat(np.arange(sess.size), n_buy)
    item = cat.views.sample(row[b_sess], rng.random(b_sess.size))
    gaps = 1.0 + rng.exponential(20.0, b_sess.size)
    t = start[b_sess] + _segment_offsets(gaps, n_buy)
    etype = np.full(b_sess.size, _PURCHASE, dtype=np.int8)
    return _Events(sess[b_sess], item, etype, t, _quantity(rng, cat, item))


def _repeat_purchases(ev: _Events, owner: np.ndarray, cat: _Catalogue) -> np.ndarray:
    """Purchases of a durable item (not socks, balls or nutrition) the customer has bought before.

    Dropping them (the add-to-cart stays, as an abandoned cart) keeps one very attractive item from being
    bought again and again, which nobody does with a helmet and which would drown the rest of the history.
    """
    bought = np.flatnonzero((ev.etype == _PURCHASE) & ~cat.multi_unit[ev.item])
    key = owner[ev.sess[bought]] * len(cat.price) + ev.item[bought]
    order = np.lexsort((ev.t[bought], key))
    again = np.zeros(bought.size, dtype=bool)
    again[order[1:]] = key[order[1:]] == key[order[:-1]]
    out = np.zeros(ev.t.size, dtype=bool)
    out[bought[again]] = True
    return out


@dataclass
class _Chunk:
    tables: dict[str, pl.DataFrame]
    truth: dict[str, pl.DataFrame]


@dataclass
class _Counters:
    """Running id offsets across chunks (chunks run in order, so ids are deterministic for a config)."""

    sessions: int = 0
    exposures: int = 0


def _chunk_world(
    config: WorldConfig, cat: _Catalogue, actions: _Actions, k: int, c0: int, c1: int, counters: _Counters
) -> _Chunk:
    rng = np.random.default_rng([config.seed, 1, k])
    n = c1 - c0
    horizon = config.days * DAY
    start_us = (
        int((dt.datetime.combine(config.start, dt.time()) - dt.datetime(1970, 1, 1)).total_seconds()) * 10**6
    )
    start_day = (config.start - dt.date(1970, 1, 1)).days

    # Customers and their latent traits.
    age = np.clip(np.round(rng.normal(40.0, 14.0, n)), 18, 80).astype(np.int32)
    gender = rng.choice(len(GENDERS), n, p=GENDER_SHARES)
    region = rng.choice(len(REGIONS), n, p=REGION_SHARES)
    new = rng.random(n) < config.new_customer_share
    signup_day = np.where(
        new, rng.integers(0, max(1, int(config.days * 0.9)), n), -rng.integers(1, 3 * 365, n)
    ).astype(np.int64)
    active_day = np.maximum(signup_day, 0)
    pref_sport = rng.choice(len(SPORTS), n, p=np.asarray(SPORT_POPULARITY) / sum(SPORT_POPULARITY))
    pref_colour = rng.integers(0, len(COLOURS), n)
    pref_brand = rng.integers(0, len(BRANDS), n)
    row = _combo(pref_sport, pref_colour, pref_brand)
    sig = config.activity_sigma
    activity = rng.lognormal(-0.5 * sig * sig, sig, n) * np.where(
        rng.random(n) < config.light_customer_share, 0.2, 1.0
    )
    sensitive = rng.random(n) < config.price_sensitive_share
    u = rng.random(n)
    p_app = np.where(age < 35, 0.55, 0.2)
    ctype = np.where(u < p_app, 1, np.where(u < p_app + 0.22, 2, 0))
    mix_cdf = np.cumsum(np.asarray(CHANNEL_MIX), axis=1)[ctype]

    def channels(owner: np.ndarray) -> np.ndarray:
        v = rng.random(owner.size)
        m = mix_cdf[owner]
        return np.where(v < m[:, 0], _WEB, np.where(v < m[:, 1], _APP, _STORE))

    # Sessions of customers.
    window = config.days - active_day
    n_sess = rng.poisson(config.sessions_per_week * activity * window / 7.0)
    s_owner = np.repeat(np.arange(n), n_sess)
    s_day = active_day[s_owner] + np.floor(rng.random(s_owner.size) * window[s_owner])
    s_start = s_day * DAY + _hours(rng, s_owner.size)
    s_chan = channels(s_owner)

    # Anonymous visitors: a few web sessions each under a never-linked cookie, browsing but not buying.
    n_anon_sess = int(rng.poisson(config.anonymous_session_share * s_owner.size))
    n_anon = max(1, n_anon_sess // 2) if n_anon_sess else 0
    a_visitor = rng.integers(0, max(n_anon, 1), n_anon_sess)
    a_row = _combo(
        rng.integers(0, len(SPORTS), n_anon),
        rng.integers(0, len(COLOURS), n_anon),
        rng.integers(0, len(BRANDS), n_anon),
    )
    a_start = np.floor(rng.random(n_anon_sess) * config.days) * DAY + _hours(rng, n_anon_sess)

    # One session table: customers' sessions, then anonymous ones (owner -1), then follow-ups (added below).
    owner = np.concatenate([s_owner, np.full(n_anon_sess, -1)])
    chan = np.concatenate([s_chan, np.full(n_anon_sess, _WEB)])
    start = np.concatenate([s_start, a_start])
    srow = np.concatenate([row[s_owner], a_row[a_visitor]])
    s_sens = np.concatenate([sensitive[s_owner], np.zeros(n_anon_sess, dtype=bool)])
    buy_scale = np.concatenate([np.ones(s_owner.size), np.zeros(n_anon_sess)])
    online = np.flatnonzero(chan != _STORE)
    store = np.flatnonzero(chan == _STORE)
    ev = _Events.concat(
        [
            _online_events(
                rng, config, cat, online, start[online], srow[online], buy_scale[online], s_sens[online]
            ),
            _store_events(rng, config, cat, store, start[store], srow[store]),
        ]
    )
    ev = ev.take((ev.t < horizon) & ~_repeat_purchases(ev, owner, cat))

    # Follow-ups: a trigger purchase brings the customer back for the follow-up category of the same sport.
    bought = np.flatnonzero(ev.etype == _PURCHASE)
    b_owner = owner[ev.sess[bought]]
    rule = cat.follow_rule[cat.group[ev.item[bought]]]
    follow = (rule >= 0) & (rng.random(bought.size) < config.p_follow)
    f_owner, f_rule = b_owner[follow], rule[follow]
    f_day = np.floor(ev.t[bought][follow] / DAY) + rng.integers(1, config.follow_up_days + 1, f_owner.size)
    f_start = f_day * DAY + _hours(rng, f_owner.size)
    keep = f_start < horizon
    f_owner, f_rule, f_start = f_owner[keep], f_rule[keep], f_start[keep]
    f_item = cat.by_group.sample(
        (cat.follow_target[f_rule] * len(COLOURS) + pref_colour[f_owner]) * len(BRANDS) + pref_brand[f_owner],
        rng.random(f_owner.size),
    )
    f_chan = channels(f_owner)
    f_sess = owner.size + np.arange(f_owner.size)
    f_online = f_chan != _STORE
    steps = np.where(f_online, 4, 1)
    fe = np.repeat(np.arange(f_owner.size), steps)
    f_first = np.cumsum(steps) - steps
    f_type = np.where(f_online[fe], np.arange(fe.size) - f_first[fe], _PURCHASE).astype(np.int8)
    f_t = f_start[fe] + _segment_offsets(3.0 + rng.exponential(30.0, fe.size), steps)
    f_qty = _quantity(rng, cat, f_item)
    ev = _Events.concat(
        [ev, _Events(f_sess[fe], f_item[fe], f_type, f_t, np.where(f_type >= _CART, f_qty[fe], 0))]
    )
    owner = np.concatenate([owner, f_owner])
    ev = ev.take((ev.t < horizon) & ~_repeat_purchases(ev, owner, cat))
    chan = np.concatenate([chan, f_chan])
    start = np.concatenate([start, f_start])

    # Cookies: customers have 1-3 browsers; some web sessions are logged under one of them. Only cookies and
    # anonymous visitors with events left are kept, so that every cookie in the identities is seen in events.
    has_events = np.bincount(ev.sess, minlength=owner.size) > 0
    n_cookies = 1 + (rng.random(n) < 0.35) + (rng.random(n) < 0.1)
    cookie_values = rng.integers(0, 2**63, (n, 3), dtype=np.int64)
    web = (owner >= 0) & (chan == _WEB)
    on_cookie = web & (rng.random(owner.size) < config.cookie_share)
    slot = np.floor(rng.random(owner.size) * n_cookies[np.maximum(owner, 0)]).astype(np.int64)
    key = np.where(on_cookie, owner * 3 + slot, -1)
    used = np.unique(key[on_cookie & has_events])
    linked = rng.random(used.size) >= config.unlinked_cookie_share
    cookie_ids = _hex_ids("W", cookie_values.ravel()[used])
    anon_sess = np.arange(s_owner.size, s_owner.size + n_anon_sess)
    anon_seen = np.unique(a_visitor[has_events[anon_sess]])
    anon_ids = _hex_ids("W", rng.integers(0, 2**63, n_anon, dtype=np.int64)[anon_seen])
    actor = np.where(owner >= 0, owner, 0)
    actor = np.where(on_cookie, n + np.searchsorted(used, key), actor)
    actor[anon_sess] = n + used.size + np.searchsorted(anon_seen, a_visitor)

    customer_ids = _numbered("C", np.arange(c0 + 1, c1 + 1), 7)
    actor_ids = pl.concat([customer_ids, cookie_ids, anon_ids])

    # Session ids numbered in time order, so that neighbouring ids say nothing about who is behind them.
    rank = np.empty(start.size, dtype=np.int64)
    rank[np.argsort(start, kind="stable")] = np.arange(start.size)
    session_ids = _numbered("S", counters.sessions + 1 + rank, 10)
    counters.sessions += start.size

    order = np.argsort(ev.t, kind="stable")
    ev = _Events(ev.sess[order], ev.item[order], ev.etype[order], ev.t[order], ev.qty[order])
    has_qty = ev.etype >= _CART
    item_ids = _numbered("I", np.arange(1, len(cat.price) + 1), 5)
    events = (
        pl.DataFrame(
            {
                CUSTOMER_ID: actor_ids.gather(actor[ev.sess]),
                ITEM_ID: item_ids.gather(ev.item),
                EVENT_TYPE: _take(DEFAULT_EVENT_TYPES, ev.etype),
                TIMESTAMP_COL: pl.Series(start_us + np.round(ev.t * 1e6).astype(np.int64)).cast(TIMESTAMP),
                SESSION_ID: session_ids.gather(ev.sess),
                CHANNEL: _take(SESSION_CHANNELS, chan[ev.sess]),
                QUANTITY: pl.Series(np.where(has_qty, ev.qty, 0), dtype=pl.Int32),
                PRICE: pl.Series(cat.price[ev.item], dtype=pl.Float64),
                SOURCE_SYSTEM: pl.Series(actor[ev.sess] >= n),
                "__qty": pl.Series(has_qty),
            }
        )
        .with_columns(
            pl.when(pl.col("__qty")).then(pl.col(QUANTITY)).alias(QUANTITY),
            pl.when(pl.col("__qty")).then(pl.col(PRICE)).alias(PRICE),
            pl.when(pl.col(SOURCE_SYSTEM))
            .then(pl.lit("web"))
            .otherwise(None)
            .cast(pl.String)
            .alias(SOURCE_SYSTEM),
        )
        .drop("__qty")
    )

    # Customers, identities, consent.
    signup = pl.Series(start_day + signup_day, dtype=pl.Int32).cast(pl.Date)
    customers = pl.DataFrame(
        {
            CUSTOMER_ID: customer_ids,
            "age": pl.Series(age, dtype=pl.Int32),
            "gender": _take(GENDERS, gender),
            "region": _take(REGIONS, region),
            "signup_date": signup,
        }
    )
    has_email = rng.random(n) < config.email_share
    email_ids = _hex_ids("E", rng.integers(0, 2**63, int(has_email.sum()), dtype=np.int64))
    used_owner = used // 3
    identities = pl.DataFrame(
        {
            SOURCE_SYSTEM: pl.Series(
                ["crm"] * n + ["email"] * len(email_ids) + ["web"] * int(linked.sum()), dtype=pl.String
            ),
            SOURCE_ID: pl.concat([customer_ids, email_ids, cookie_ids.filter(pl.Series(linked))]),
            CUSTOMER_ID: pl.concat(
                [
                    customer_ids,
                    customer_ids.filter(pl.Series(has_email)),
                    customer_ids.gather(used_owner[linked]),
                ]
            ),
        }
    )
    truth_identities = pl.DataFrame(
        {
            SOURCE_SYSTEM: pl.Series(["web"] * (used.size + anon_seen.size), dtype=pl.String),
            SOURCE_ID: pl.concat([cookie_ids, anon_ids]),
            CUSTOMER_ID: pl.concat(
                [customer_ids.gather(used_owner), pl.Series([None] * anon_seen.size, dtype=pl.String)]
            ),
            "linked": pl.Series(
                np.concatenate([linked, np.zeros(anon_seen.size, dtype=bool)]), dtype=pl.Boolean
            ),
        }
    )
    consent, final, marketing_at = _consent(rng, config, customer_ids, signup_day, horizon, start_us)

    # Exposures to actions, with the planted propensity computed from the purchase history before each one.
    purchases = ev.etype == _PURCHASE
    p_owner = owner[ev.sess[purchases]]
    p_t = ev.t[purchases]
    p_amount = cat.price[ev.item[purchases]] * ev.qty[purchases]
    known = p_owner >= 0
    p_owner, p_t, p_amount = p_owner[known], p_t[known], p_amount[known]
    actions_df, propensity = _exposures(
        rng,
        config,
        actions,
        counters,
        customer_ids=customer_ids,
        active_day=active_day,
        age=age,
        app_user=ctype == 1,
        sensitive=sensitive,
        pref_brand=pref_brand,
        pref_sport=pref_sport,
        purchases=(p_owner, p_t, p_amount),
        marketing_at=marketing_at,
        start_us=start_us,
    )

    preferences = pl.DataFrame(
        {
            CUSTOMER_ID: customer_ids,
            "colour": _take(COLOURS, pref_colour),
            "sport": _take(SPORTS, pref_sport),
            "brand": _take(BRANDS, pref_brand),
        }
    )
    latent = pl.DataFrame(
        {
            CUSTOMER_ID: customer_ids,
            "activity": pl.Series(activity, dtype=pl.Float64),
            "price_sensitive": pl.Series(sensitive, dtype=pl.Boolean),
            "channel_type": _take(CUSTOMER_TYPES, ctype),
        }
    )
    return _Chunk(
        tables={
            "events": events,
            "customers": customers,
            "identities": identities,
            "consent": consent,
            "actions": actions_df,
        },
        truth={
            "preferences": preferences,
            "latent": latent,
            "identities": truth_identities,
            "consent": final,
            "propensity": propensity,
        },
    )


def _consent(
    rng: np.random.Generator,
    config: WorldConfig,
    customer_ids: pl.Series,
    signup_day: np.ndarray,
    horizon: float,
    start_us: int,
) -> tuple[pl.DataFrame, pl.DataFrame, Any]:
    """Consent records (one at signup; for some a later one that wins) and the final state per purpose.

    Returns the records, the final state, and a function giving marketing consent at given (owner, time).
    """
    n = customer_ids.len()
    first_t = signup_day * DAY + _hours(rng, n)
    changes = rng.random(n) < config.consent_change_share
    second_t = np.maximum(first_t, 0.0) + rng.random(n) * (horizon - np.maximum(first_t, 0.0))
    owners, purposes, granted, times = [], [], [], []
    final_rows = []
    marketing: tuple[np.ndarray, np.ndarray] | None = None
    for p, purpose in enumerate(CONSENT_PURPOSES):
        final = rng.random(n) >= config.decline_shares()[purpose]
        flip = rng.random(n) < 0.5
        initial = np.where(changes & flip, ~final, final)
        owners += [np.arange(n), np.flatnonzero(changes)]
        purposes += [np.full(n, p), np.full(int(changes.sum()), p)]
        granted += [np.where(changes, initial, final), final[changes]]
        times += [first_t, second_t[changes]]
        final_rows.append((np.full(n, p), final))
        if purpose == "marketing":
            marketing = (np.where(changes, initial, final), final)
    own = np.concatenate(owners)
    records = pl.DataFrame(
        {
            CUSTOMER_ID: customer_ids.gather(own),
            PURPOSE: _take(CONSENT_PURPOSES, np.concatenate(purposes)),
            GRANTED: pl.Series(np.concatenate(granted), dtype=pl.Boolean),
            TIMESTAMP_COL: pl.Series(start_us + np.round(np.concatenate(times) * 1e6).astype(np.int64)).cast(
                TIMESTAMP
            ),
        }
    )
    truth = pl.DataFrame(
        {
            CUSTOMER_ID: pl.concat([customer_ids] * len(CONSENT_PURPOSES)),
            PURPOSE: _take(CONSENT_PURPOSES, np.concatenate([r[0] for r in final_rows])),
            GRANTED: pl.Series(np.concatenate([r[1] for r in final_rows]), dtype=pl.Boolean),
        }
    )
    assert marketing is not None
    before, after = marketing

    def marketing_at(who: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.where(changes[who] & (t >= second_t[who]), after[who], before[who])

    return records, truth, marketing_at


def _exposures(
    rng: np.random.Generator,
    config: WorldConfig,
    actions: _Actions,
    counters: _Counters,
    *,
    customer_ids: pl.Series,
    active_day: np.ndarray,
    age: np.ndarray,
    app_user: np.ndarray,
    sensitive: np.ndarray,
    pref_brand: np.ndarray,
    pref_sport: np.ndarray,
    purchases: tuple[np.ndarray, np.ndarray, np.ndarray],
    marketing_at: Any,
    start_us: int,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    n = customer_ids.len()
    horizon = config.days * DAY
    n_exp = rng.poisson(config.exposures_per_customer, n)
    who = np.repeat(np.arange(n), n_exp)
    lo = np.maximum(active_day[who] * DAY, horizon / 6.0)
    t = lo + rng.random(who.size) * (horizon - lo)

    # The historical policy picked action kinds at random; marketing needs consent at that moment.
    kind = np.searchsorted(np.cumsum(_KIND_SHARES) / sum(_KIND_SHARES), rng.random(who.size), side="right")
    kind = np.minimum(kind, len(ACTION_KINDS) - 1)
    needs = np.asarray(_KIND_MARKETING)[kind]
    refused = needs & ~marketing_at(who, t)
    kind = np.where(refused, np.where(rng.random(who.size) < 0.7, 2, 5), kind)
    # Within a kind: discounts and bundles lean towards the customer's revealed taste a little.
    disc_brands = np.array([BRANDS.index(b) for b, _ in DISCOUNT_BRANDS])
    bundle_sports = np.array([SPORTS.index(s) for s in BUNDLE_SPORTS])
    first_of_kind = {kd: int(np.flatnonzero(actions.kind == kd)[0]) for kd in range(len(ACTION_KINDS))}
    pick = rng.random(who.size)
    own_disc = np.searchsorted(disc_brands, pref_brand[who]).clip(0, disc_brands.size - 1)
    own_disc_ok = disc_brands[own_disc] == pref_brand[who]
    disc = np.where(own_disc_ok & (pick < 0.5), own_disc, rng.integers(0, disc_brands.size, who.size))
    own_bundle = np.searchsorted(bundle_sports, pref_sport[who]).clip(0, bundle_sports.size - 1)
    own_bundle_ok = bundle_sports[own_bundle] == pref_sport[who]
    bund = np.where(own_bundle_ok & (pick < 0.5), own_bundle, rng.integers(0, bundle_sports.size, who.size))
    action = np.array([first_of_kind[kd] for kd in range(len(ACTION_KINDS))])[kind]
    action = np.where(
        kind == 0, first_of_kind[0] + disc, np.where(kind == 1, first_of_kind[1] + bund, action)
    )

    # Channel: where the customer is (app or web) when the action allows it, else any allowed channel.
    digital = np.where(app_user[who], 1, 2)
    uniform = np.argmax(rng.random(who.size)[:, None] < actions.channel_cdf[action], axis=1)
    channel = np.where(actions.allowed[action, digital] & (rng.random(who.size) < 0.6), digital, uniform)

    # Purchase history before each exposure, by searchsorted on (owner, time) keys.
    p_owner, p_t, p_amount = purchases
    span = horizon + 2 * DAY
    order = np.lexsort((p_t, p_owner))
    pk = p_owner[order] * span + p_t[order]
    pt = p_t[order]
    cum = np.concatenate([[0.0], np.cumsum(p_amount[order])])
    first = np.searchsorted(pk, who * span, side="left")
    upto = np.searchsorted(pk, who * span + t, side="left")
    from90 = np.searchsorted(pk, who * span + np.maximum(t - 90 * DAY, 0.0), side="left")
    count = upto - first
    last = np.where(count > 0, pt[np.maximum(upto - 1, 0)], -np.inf)
    recency = (t - last) / DAY
    p_true = planted_propensity(
        kind=kind,
        brand_match=actions.brand[action] == pref_brand[who],
        sport_match=actions.sport[action] == pref_sport[who],
        discount_pct=actions.pct[action],
        channel=channel,
        age=age[who],
        app_user=app_user[who],
        price_sensitive=sensitive[who],
        recency_days=recency,
        frequency_90d=upto - from90,
        monetary=cum[upto] - cum[first],
    )
    responded = rng.random(who.size) < p_true

    order = np.argsort(t, kind="stable")
    ids = _numbered("X", counters.exposures + 1 + np.arange(who.size), 10)
    counters.exposures += who.size
    df = pl.DataFrame(
        {
            EXPOSURE_ID: ids,
            CUSTOMER_ID: customer_ids.gather(who[order]),
            ACTION_ID: _take(actions.ids, action[order]),
            CHANNEL: _take(EXPOSURE_CHANNELS, channel[order]),
            TIMESTAMP_COL: pl.Series(start_us + np.round(t[order] * 1e6).astype(np.int64)).cast(TIMESTAMP),
            RESPONDED: pl.Series(responded[order], dtype=pl.Boolean),
        }
    )
    truth = pl.DataFrame({EXPOSURE_ID: ids, "p_true": pl.Series(p_true[order], dtype=pl.Float64)})
    return df, truth


# --- writing ------------------------------------------------------------------------------------------------


class _ParquetStream:
    """Appends frames to one parquet file (a row group each), published atomically when closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._tmp = path.with_suffix(path.suffix + ".tmp")
        self._writer: pq.ParquetWriter | None = None

    def write(self, df: pl.DataFrame) -> None:
        table = df.to_arrow(compat_level=pl.CompatLevel.oldest())
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.rows += df.height

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, self.path)
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)


_STREAMED_TABLES = ("customers", "identities", "consent")
_PART_TABLES = ("events", "actions")
_TRUTH_STREAMS = ("preferences", "latent", "identities", "consent", "propensity")


def _check_dtypes(table: str, df: pl.DataFrame) -> None:
    """Guard against drift from the contract: the generator builds frames with the contract dtypes directly."""
    expected = table_spec(table).dtypes
    for name, dtype in expected.items():
        if name in df.columns and df.schema[name] != dtype:
            raise TypeError(
                f"generated {table}.{name} has dtype {df.schema[name]}, the contract says {dtype}"
            )


def generate_world(config: WorldConfig, out: Dataset, *, progress: bool = False) -> dict[str, Any]:
    """Generate the sporting-goods world described in the module docstring into ``out``.

    Replaces the generated tables and truth files already in ``out``. Events and actions are written as one
    numbered part per chunk of ``config.chunk_customers`` customers; the other tables as single files.

    Args:
        config: the world's size, seed and knobs.
        out: the dataset directory to write.
        progress: show a progress bar over chunks.

    Returns:
        A JSON-able summary: ``tables`` (per raw table its ``rows`` and ``path``), ``truth`` (per truth file),
        ``config``, ``seconds`` and ``events_per_second``.
    """
    t0 = time.perf_counter()
    out.ensure()
    for table in (*_STREAMED_TABLES, *_PART_TABLES, "items", "action_catalog"):
        out.clear_table(table)
    truth_dir = out.truth_dir
    truth_dir.mkdir(parents=True, exist_ok=True)

    cat = _build_catalogue(config, np.random.default_rng([config.seed, 0]))
    catalog = _action_catalog()
    actions = _Actions.of(catalog)
    items = _items_frame(cat)
    for table, df in (("items", items), ("action_catalog", catalog)):
        _check_dtypes(table, df)
        out.write_table(table, df)
    followups = pl.DataFrame(
        {
            "sport": [f.sport for f in FOLLOW_UPS],
            "category": [f.category for f in FOLLOW_UPS],
            "follow_up_category": [f.follow_up_category for f in FOLLOW_UPS],
            "p_follow": pl.Series([config.p_follow] * len(FOLLOW_UPS), dtype=pl.Float64),
        }
    )
    followups.write_parquet(truth_dir / "followups.parquet")
    write_json_atomic(config.model_dump(mode="json"), truth_dir / "world.json")

    bounds = [*range(0, config.customers, config.chunk_customers), config.customers]
    counters = _Counters()
    part_rows = dict.fromkeys(_PART_TABLES, 0)
    streams = {t: _ParquetStream(out.raw_dir / f"{t}.parquet") for t in _STREAMED_TABLES}
    truths = {t: _ParquetStream(truth_dir / f"{t}.parquet") for t in _TRUTH_STREAMS}

    def write_chunk(k: int, chunk: _Chunk) -> None:
        for table, df in chunk.tables.items():
            _check_dtypes(table, df)
            if table in _PART_TABLES:
                out.write_table(table, df, part=k)
                part_rows[table] += df.height
            else:
                streams[table].write(df)
        for name, df in chunk.truth.items():
            truths[name].write(df)

    # One writer thread: chunk k is compressed and written while chunk k + 1 is generated (both release the
    # GIL for most of their work). At most two chunks are in memory.
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=1) as writer:
        for s in (*streams.values(), *truths.values()):
            stack.callback(s.abort)
        chunks: Iterable[int] = range(len(bounds) - 1)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="generating world", unit="chunk")
        pending: Future[None] | None = None
        for k in chunks:
            chunk = _chunk_world(config, cat, actions, k, bounds[k], bounds[k + 1], counters)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_chunk, k, chunk)
            del chunk
        if pending is not None:
            pending.result()
        for s in (*streams.values(), *truths.values()):
            s.close()

    seconds = time.perf_counter() - t0
    tables: dict[str, dict[str, Any]] = {
        "items": {"rows": items.height, "path": str(out.raw_dir / "items.parquet")},
        "action_catalog": {"rows": catalog.height, "path": str(out.raw_dir / "action_catalog.parquet")},
    }
    for t in _STREAMED_TABLES:
        tables[t] = {"rows": streams[t].rows, "path": str(streams[t].path)}
    for t in _PART_TABLES:
        tables[t] = {
            "rows": part_rows[t],
            "path": str(out.raw_dir / f"{t}-*.parquet"),
            "parts": len(bounds) - 1,
        }
    truth: dict[str, dict[str, Any]] = {
        name: {"rows": s.rows, "path": str(s.path)} for name, s in truths.items()
    }
    truth["followups"] = {"rows": followups.height, "path": str(truth_dir / "followups.parquet")}
    truth["world"] = {"path": str(truth_dir / "world.json")}
    return {
        "tables": tables,
        "truth": truth,
        "config": config.model_dump(mode="json"),
        "seconds": round(seconds, 3),
        "events_per_second": round(part_rows["events"] / seconds) if seconds > 0 else None,
    }
