"""The simulated world of ``nextbest simulate``: the generated world split at a cut-off, and its planted truth.

One world is generated for the history *and* the simulated days (:func:`~features.generate.generate_world`
with ``days = history_days + sim_days``), so every customer's browsing after the cut-off follows the same
preferences, catalogue and follow-up rules as before it. :func:`split_world` writes the dataset the service
starts from: every raw table cut at the cut-off (customers who sign up later are left out, and so are their
events). :class:`DaySchedule` is what happens on one simulated day: the events of known customers (a linked
cookie's under its customer's id, as a logged-in app would send them) and one *visit* per customer with an
online session that day: as that session opens, the service decides what to offer.

:class:`PlantedTruth` answers the planted response probability of any customer to any action at any time with
the generator's own :func:`~features.generate.planted_propensity` and the inputs it uses: the customer's
preferred brand and sport, age, app habit and price sensitivity (``truth/``) and their purchases before that
time in the *whole* world (cookie purchases included) — recency, purchases in 90 days and money spent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.generate import (
    ACTION_KINDS,
    BRANDS,
    EXPOSURE_CHANNELS,
    SPORTS,
    planted_propensity,
)
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EVENT_TYPE,
    KIND,
    PRICE,
    QUANTITY,
    SESSION_ID,
    SOURCE_ID,
    TIMESTAMP_COL,
)
from nextbest.serving.state_store import EVENT_COLUMNS

DAY_SECONDS = 86_400.0
ONLINE_CHANNELS: tuple[str, ...] = ("web", "app")
"""Session channels on which the service is asked for a next best action."""
_TIMED_TABLES: tuple[str, ...] = ("events", "consent", "actions")


class SimulationWorldError(NextbestError, ValueError):
    """The world cannot be simulated (no truth files, a catalogue action the planted truth does not know)."""


def epoch_seconds(column: str = TIMESTAMP_COL) -> pl.Expr:
    """A naive-UTC timestamp column as seconds since 1970 (float)."""
    return pl.col(column).dt.epoch("us").cast(pl.Float64) / 1e6


# --- the dataset the service starts from ---------------------------------------------------------------------


def split_world(full: Dataset, served: Dataset, cutoff: datetime) -> dict[str, int]:
    """Write into ``served`` the raw tables of ``full`` as they stood at ``cutoff``.

    Customers who signed up on or after the cut-off's date are left out with their consent and identities;
    events, consent records and exposures are those before the cut-off (cookies' and anonymous visitors' events
    included: they are part of the history). ``items`` and ``action_catalog`` are copied. The truth stays in
    ``full``.

    Returns:
        rows written per table.
    """
    served.ensure()
    customers = full.read("customers").filter(pl.col("signup_date") < cutoff.date())
    known = customers.select(CUSTOMER_ID)
    counts: dict[str, int] = {}
    tables: dict[str, pl.DataFrame] = {
        "customers": customers,
        "items": full.read("items"),
        "action_catalog": full.read("action_catalog"),
        "identities": full.read("identities").join(known, on=CUSTOMER_ID, how="semi"),
    }
    for table in _TIMED_TABLES:
        frame = full.scan(table).filter(pl.col(TIMESTAMP_COL) < cutoff)
        if table != "events":
            frame = frame.join(known.lazy(), on=CUSTOMER_ID, how="semi")
        tables[table] = frame.sort(TIMESTAMP_COL, maintain_order=True).collect()
    for table, frame in tables.items():
        served.clear_table(table)
        # The generator writes its big tables as numbered parts; folds add parts after them.
        served.write_table(table, frame, part=0 if table in ("events", "actions") else None)
        counts[table] = frame.height
    return counts


# --- one simulated day -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaySchedule:
    """What happens on one simulated day.

    Attributes:
        events: the events to send, in time order: ``event_id, customer_id, item_id, event_type, timestamp,
            session_id, channel, quantity, price``.
        visits: one row per customer with an online (web or app) session that day: ``customer_id, channel,
            decided_at`` — the channel and the first event of their first online session.
    """

    events: pl.DataFrame
    visits: pl.DataFrame


def canonical_ids(full: Dataset, customers: Sequence[str]) -> pl.DataFrame:
    """``source_id → customer_id`` for the ids under which known ``customers`` act: their own CRM ids and their
    *linked* cookies (the public ``identities``; an unlinked cookie's events cannot be tied to anyone)."""
    known = pl.DataFrame({CUSTOMER_ID: list(customers)}, schema={CUSTOMER_ID: pl.String})
    linked = (
        full.read("identities")
        .filter(pl.col("source_system") == "web")
        .select(pl.col(SOURCE_ID), pl.col(CUSTOMER_ID))
        .join(known, on=CUSTOMER_ID, how="semi")
    )
    own = known.select(pl.col(CUSTOMER_ID).alias(SOURCE_ID), pl.col(CUSTOMER_ID))
    return pl.concat([own, linked]).unique(SOURCE_ID, keep="first", maintain_order=True)


def day_schedule(full: Dataset, ids: pl.DataFrame, start: datetime) -> DaySchedule:
    """The events and visits of the day that begins at ``start`` (see :class:`DaySchedule`).

    Args:
        full: the whole generated world.
        ids: :func:`canonical_ids` of the simulated customers.
        start: midnight of the day.
    """
    end = start + timedelta(days=1)
    raw = (
        full.scan("events")
        .filter((pl.col(TIMESTAMP_COL) >= start) & (pl.col(TIMESTAMP_COL) < end))
        .collect()
        .with_row_index("__row")
        .rename({CUSTOMER_ID: SOURCE_ID})
        .join(ids, on=SOURCE_ID, how="inner")
        .sort([TIMESTAMP_COL, "__row"])
    )
    events = raw.select(
        pl.format("sim-{}-{}", pl.col(SESSION_ID), pl.col("__row")).alias("event_id"),
        *EVENT_COLUMNS,  # what the service keeps of an event
    )
    visits = (
        raw.filter(pl.col(CHANNEL).is_in(ONLINE_CHANNELS))
        .group_by(CUSTOMER_ID, SESSION_ID)
        .agg(pl.col(CHANNEL).first(), pl.col(TIMESTAMP_COL).min().alias("decided_at"))
        .sort(["decided_at", SESSION_ID])
        .unique(CUSTOMER_ID, keep="first", maintain_order=True)
        .select(CUSTOMER_ID, CHANNEL, "decided_at")
        .sort(["decided_at", CUSTOMER_ID])
    )
    return DaySchedule(events, visits)


# --- the planted truth -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionTraits:
    """What the planted propensity reads of each catalogue action (arrays aligned with ``ids``)."""

    ids: tuple[str, ...]
    kind: np.ndarray
    brand: np.ndarray
    sport: np.ndarray
    discount_pct: np.ndarray

    @classmethod
    def of(cls, catalog: pl.DataFrame) -> ActionTraits:
        """From an ``action_catalog`` of the generated world.

        Raises:
            SimulationWorldError: a kind, brand or sport the planted truth does not know.
        """
        unknown = sorted(set(catalog[KIND].to_list()) - set(ACTION_KINDS))
        if unknown:
            raise SimulationWorldError(
                f"action_catalog kind(s) {', '.join(unknown)} have no planted propensity; known: "
                + ", ".join(ACTION_KINDS)
            )

        def column(name: str) -> list[object]:
            return catalog[name].to_list() if name in catalog.columns else [None] * catalog.height

        def index(name: str, names: Sequence[str]) -> np.ndarray:
            return np.array([names.index(v) if v in names else -1 for v in column(name)], dtype=np.int64)

        pct = np.array([float(v) if v is not None else 0.0 for v in column("discount_pct")], dtype=np.float64)
        return cls(
            ids=tuple(catalog[ACTION_ID].to_list()),
            kind=index(KIND, ACTION_KINDS),
            brand=index("brand", BRANDS),
            sport=index("sport", SPORTS),
            discount_pct=pct,
        )

    def positions(self, action_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``action_ids``.

        Raises:
            SimulationWorldError: an action that is not in the catalogue.
        """
        where = {a: k for k, a in enumerate(self.ids)}
        missing = [a for a in action_ids if a not in where]
        if missing:
            raise SimulationWorldError(
                f"action(s) {', '.join(missing)} are not in the world's action catalogue"
            )
        return np.array([where[a] for a in action_ids], dtype=np.int64)


@dataclass(frozen=True)
class PlantedTruth:
    """The generator's planted response probability, for any customer, action, channel and time."""

    customers: Mapping[str, int]
    age: np.ndarray
    preferred_brand: np.ndarray
    preferred_sport: np.ndarray
    price_sensitive: np.ndarray
    app_user: np.ndarray
    purchase_key: np.ndarray
    """Purchases sorted by (customer, time): customer row × span + seconds since 1970 (see :meth:`history`)."""
    purchase_time: np.ndarray
    spent_before: np.ndarray
    """Money spent over the sorted purchases before each one (length purchases + 1)."""
    span: float
    actions: ActionTraits

    @classmethod
    def of_world(cls, full: Dataset) -> PlantedTruth:
        """Read the truth of a generated world (``truth/preferences``, ``truth/latent``, ``truth/identities``)
        and its purchases.

        Raises:
            SimulationWorldError: the dataset has no planted truth (it was not generated by nextbest).
        """
        truth = full.truth_dir
        needed = ("preferences.parquet", "latent.parquet", "identities.parquet")
        missing = [n for n in needed if not (truth / n).exists()]
        if missing:
            raise SimulationWorldError(
                f"{truth} lacks {', '.join(missing)}: simulate needs a world made by nextbest's generator"
            )
        customers = (
            full.read("customers")
            .select(CUSTOMER_ID, "age")
            .join(pl.read_parquet(truth / "preferences.parquet"), on=CUSTOMER_ID, how="left")
            .join(pl.read_parquet(truth / "latent.parquet"), on=CUSTOMER_ID, how="left")
        )
        ids = customers[CUSTOMER_ID].to_list()
        row = {c: k for k, c in enumerate(ids)}
        # Cookies (linked or not) act for their customer; anonymous visitors never buy.
        owners = pl.concat(
            [
                customers.select(pl.col(CUSTOMER_ID).alias(SOURCE_ID), pl.col(CUSTOMER_ID)),
                pl.read_parquet(truth / "identities.parquet")
                .filter(pl.col(CUSTOMER_ID).is_not_null())
                .select(SOURCE_ID, CUSTOMER_ID),
            ]
        )
        purchases = (
            full.scan("events")
            .filter(pl.col(EVENT_TYPE) == "purchase")
            .select(
                pl.col(CUSTOMER_ID).alias(SOURCE_ID),
                epoch_seconds().alias("t"),
                (pl.col(PRICE) * pl.col(QUANTITY)).fill_null(0.0).alias("amount"),
            )
            .join(owners.lazy(), on=SOURCE_ID, how="inner")
            .collect()
        )
        owner = np.array([row[c] for c in purchases[CUSTOMER_ID].to_list()], dtype=np.int64)
        t = purchases["t"].to_numpy()
        amount = purchases["amount"].to_numpy()
        span = float(max(t.max(initial=0.0), 0.0)) * 2.0 + 10 * DAY_SECONDS
        order = np.lexsort((t, owner))
        return cls(
            customers=row,
            age=customers["age"].cast(pl.Float64).fill_null(40.0).to_numpy(),
            preferred_brand=_indices(customers["brand"], BRANDS),
            preferred_sport=_indices(customers["sport"], SPORTS),
            price_sensitive=customers["price_sensitive"].fill_null(False).to_numpy(),
            app_user=(customers["channel_type"] == "app").fill_null(False).to_numpy(),
            purchase_key=owner[order] * span + t[order],
            purchase_time=t[order],
            spent_before=np.concatenate([[0.0], np.cumsum(amount[order])]),
            span=span,
            actions=ActionTraits.of(full.read("action_catalog")),
        )

    def rows(self, customer_ids: Sequence[str]) -> np.ndarray:
        """The truth's rows of ``customer_ids``.

        Raises:
            SimulationWorldError: a customer the world does not have.
        """
        try:
            return np.array([self.customers[c] for c in customer_ids], dtype=np.int64)
        except KeyError as e:
            raise SimulationWorldError(f"customer {e.args[0]!r} is not in the generated world") from None

    def history(self, rows: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Recency (days since the last purchase before ``at``; inf without one), purchases in the 90 days
        before ``at`` and money spent before ``at``, as the generator computes them for an exposure at ``at``
        (seconds since 1970)."""
        base = rows * self.span
        first = np.searchsorted(self.purchase_key, base, side="left")
        upto = np.searchsorted(self.purchase_key, base + at, side="left")
        from90 = np.searchsorted(
            self.purchase_key, base + np.maximum(at - 90 * DAY_SECONDS, 0.0), side="left"
        )
        count = upto - first
        last = np.where(count > 0, self.purchase_time[np.maximum(upto - 1, 0)], -np.inf)
        recency = (at - last) / DAY_SECONDS
        return recency, (upto - from90).astype(np.float64), self.spent_before[upto] - self.spent_before[first]

    def propensity(
        self,
        customer_ids: Sequence[str],
        at: np.ndarray,
        action_ids: Sequence[str],
        channels: np.ndarray,
    ) -> np.ndarray:
        """p_true of each customer (row) for each action (column), delivered on ``channels``.

        Args:
            customer_ids: n customers.
            at: n decision times, seconds since 1970.
            action_ids: k catalogue actions.
            channels: (n, k) delivery channel names (``email``, ``app``, ``web``, ``call``; any other counts as
                a channel without a factor).

        Returns:
            (n, k) probabilities in [0, 1].
        """
        rows = self.rows(customer_ids)
        at = np.asarray(at, dtype=np.float64)
        cols = self.actions.positions(action_ids)
        n, k = rows.size, cols.size
        recency, f90, monetary = self.history(rows, at)
        channel_index = {c: i for i, c in enumerate(EXPOSURE_CHANNELS)}
        chan = np.vectorize(lambda c: channel_index.get(c, -1), otypes=[np.int64])(
            np.asarray(channels, dtype=object).reshape(n, k)
        )

        def per_row(x: np.ndarray) -> np.ndarray:
            return np.repeat(x[:, None], k, axis=1).ravel()

        def per_col(x: np.ndarray) -> np.ndarray:
            return np.tile(x[cols], n)

        p = planted_propensity(
            kind=per_col(self.actions.kind),
            brand_match=per_col(self.actions.brand) == per_row(self.preferred_brand[rows]),
            sport_match=per_col(self.actions.sport) == per_row(self.preferred_sport[rows]),
            discount_pct=per_col(self.actions.discount_pct),
            channel=chan.ravel(),
            age=per_row(self.age[rows]),
            app_user=per_row(self.app_user[rows]),
            price_sensitive=per_row(self.price_sensitive[rows]),
            recency_days=per_row(recency),
            frequency_90d=per_row(f90),
            monetary=per_row(monetary),
        )
        return p.reshape(n, k)


def _indices(values: pl.Series, names: Sequence[str]) -> np.ndarray:
    where = {v: k for k, v in enumerate(names)}
    return np.array([where.get(v, -2) for v in values.to_list()], dtype=np.int64)


def day_start(start: date, day: int) -> datetime:
    """Midnight of day ``day`` counted from the world's ``start``."""
    return datetime.combine(start, datetime.min.time()) + timedelta(days=day)
