"""The customer dashboard: one self-contained HTML page of a dataset's customers, recommendations and decisions.

The page needs no network and no server: charts are inline SVG drawn here, tables are plain HTML, and a few lines
of inline JavaScript make the tables sortable. Sections:

* **Overview** — profiled customers, events, items, customers at churn risk; the single customer view (ids linked
  per source system, unlinked ids).
* **Segments and journey phases** — customers per journey phase, age band, region, value tier and lifecycle.
* **Preferences** — the distribution of every ``preferred_<attribute>`` (colour, sport, brand first).
* **Churn risk** — the customers whose ``churn_risk_flag`` is set, most valuable first.
* **Top recommendations per segment** — from the registered champion recommender when one is given: the items
  that appear most often in the top-10 lists of a sample of each segment's customers. Without one (or when the
  champion was trained on another dataset), the fallback is popularity within the segment: the items the most
  of the segment's customers interacted with (the same fallback the service uses without a model answer).
* **Next best actions** — when a decision log exists: acceptance by chosen action and by champion/challenger arm
  (:func:`serving.decision_log.summarise_decisions`, responses from the service's contact ledger), and beside
  it the offline policy evaluation of the current policy and candidates (:mod:`serving.policy_eval`).

:func:`render_dashboard` is pure (dataset and models in, HTML text out); :func:`write_dashboard` finds the
champion and the service's decision log, renders and writes the file (``nextbest dashboard --data DIR``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from nextbest.features.dataset import Dataset
from nextbest.features.interactions import Interactions
from nextbest.features.pipeline import PROFILES_FILE, UNLINKED_FILE
from nextbest.features.profiles import AGE_BANDS, JOURNEY_PHASES
from nextbest.features.schema import (
    ACTION_ID,
    CUSTOMER_ID,
    ITEM_ID,
    PRICE,
    RESPONDED,
    SOURCE_SYSTEM,
    TIMESTAMP_COL,
)

if TYPE_CHECKING:
    from nextbest.training.recommender_bundle import RecommenderBundle

DEFAULT_OUT_NAME = "dashboard.html"
"""Where :func:`write_dashboard` writes by default, inside the dataset directory."""
SEGMENT_CHARTS: tuple[tuple[str, str], ...] = (
    ("journey_phase", "Journey phase"),
    ("age_band", "Age band"),
    ("region", "Region"),
    ("value_tier", "Value tier"),
    ("lifecycle", "Lifecycle"),
)
PREFERENCE_FIRST: tuple[str, ...] = ("colour", "sport", "brand")
ITEM_COLUMNS: tuple[str, ...] = ("name", "category", "sport", "brand", "colour")
NO_PREFERENCE = "(no preference)"
RECOMMENDATION_LIST_LENGTH = 10
"""Length of the lists sampled per customer when a recommender ranks a segment's top items."""
CHURN_COLUMNS: tuple[str, ...] = (
    CUSTOMER_ID,
    "value_tier",
    "lifecycle",
    "journey_phase",
    "frequency",
    "monetary",
    "recency_days",
    "usual_interval_days",
    "churn_risk",
)
# The natural order of each segment's values (anything else follows, alphabetically).
_VALUE_ORDER: dict[str, tuple[str, ...]] = {
    "journey_phase": JOURNEY_PHASES,
    "age_band": (*(name for _, _, name in AGE_BANDS), "unknown"),
    "value_tier": ("high", "mid", "low", "none"),
    "lifecycle": ("new", "prospect", "active", "lapsing", "lapsed"),
}
# CSS colour keywords a ``colour`` preference may name: its bar is drawn in that colour.
_CSS_COLOURS = frozenset(
    {"black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "grey", "gray", "brown"}
    | {"navy", "beige", "teal", "maroon", "olive", "silver", "gold", "cyan", "magenta", "violet", "coral"}
)
_ACCENT = "#2f6db5"
_SECOND = "#d9822b"


class DashboardError(ValueError):
    """The dataset cannot be shown (its features are not built); the message says what to run."""


# --- tables the page is made of (pure functions) ----------------------------------------------------------------


def ordered_values(values: Sequence[str], column: str) -> list[str]:
    """``values`` of a profile column in their natural order (journey phases as a journey, age bands by age,
    value tiers high to low, lifecycle from new to lapsed); values outside that order follow alphabetically."""
    order = _VALUE_ORDER.get(column, ())
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def segment_counts(profiles: pl.DataFrame, column: str) -> pl.DataFrame:
    """Customers per value of a profile column: ``value, customers, share``, in the column's natural order.

    Nulls count as ``unknown``.
    """
    total = profiles.height
    counts = (
        profiles.select(pl.col(column).cast(pl.String).fill_null("unknown").alias("value"))
        .group_by("value")
        .len("customers")
    )
    order = ordered_values(counts["value"].to_list(), column)
    return (
        counts.with_columns(
            pl.col("customers").cast(pl.Int64),
            (pl.col("customers") / total if total else pl.lit(0.0)).alias("share"),
            pl.col("value")
            .replace_strict(order, list(range(len(order))), return_dtype=pl.Int64)
            .alias("__o"),
        )
        .sort("__o")
        .drop("__o")
    )


def preference_attributes(profiles: pl.DataFrame) -> list[str]:
    """The attributes A with a ``preferred_<A>`` column: colour, sport and brand first, then the rest."""
    found = [
        c.removeprefix("preferred_")
        for c in profiles.columns
        if c.startswith("preferred_") and not c.endswith("_share")
    ]
    return [a for a in PREFERENCE_FIRST if a in found] + sorted(a for a in found if a not in PREFERENCE_FIRST)


def preference_distribution(profiles: pl.DataFrame, attribute: str) -> pl.DataFrame:
    """Customers per preferred value of ``attribute``: ``value, customers, share, mean_strength``.

    ``mean_strength`` is the mean ``preferred_<attribute>_share`` (how dominant the preferred value is in those
    customers' interactions). Customers without any value of the attribute count as :data:`NO_PREFERENCE`, last.
    Sorted by customers, most first.
    """
    col = f"preferred_{attribute}"
    share_col = f"{col}_share"
    strength = pl.col(share_col).mean() if share_col in profiles.columns else pl.lit(None, dtype=pl.Float64)
    total = profiles.height
    out = (
        profiles.group_by(pl.col(col).cast(pl.String).alias("value"))
        .agg(pl.len().cast(pl.Int64).alias("customers"), strength.cast(pl.Float64).alias("mean_strength"))
        .with_columns((pl.col("customers") / total if total else pl.lit(0.0)).alias("share"))
        .sort(
            [pl.col("value").is_null(), "customers", "value"],
            descending=[False, True, False],
        )
        .with_columns(pl.col("value").fill_null(NO_PREFERENCE))
    )
    return out.select("value", "customers", "share", "mean_strength")


def churn_risk_list(profiles: pl.DataFrame, limit: int | None = 25) -> pl.DataFrame:
    """The customers flagged at churn risk, most valuable (by ``monetary``) first, then by churn risk.

    Returns:
        the :data:`CHURN_COLUMNS` present in ``profiles``; at most ``limit`` rows (all when None).
    """
    if "churn_risk_flag" not in profiles.columns:
        return pl.DataFrame(schema={CUSTOMER_ID: pl.String})
    cols = [c for c in CHURN_COLUMNS if c in profiles.columns]
    keys = [c for c in ("monetary", "churn_risk") if c in cols]
    flagged = profiles.filter(pl.col("churn_risk_flag").fill_null(False)).select(cols)
    flagged = flagged.sort([*keys, CUSTOMER_ID], descending=[True] * len(keys) + [False], nulls_last=True)
    return flagged if limit is None else flagged.head(limit)


def popular_by_segment(
    interactions: Interactions, profiles: pl.DataFrame, segment: str, n: int = 5
) -> pl.DataFrame:
    """Per segment value, the ``n`` items the most of its customers interacted with (the popularity fallback).

    Returns:
        ``segment_value, rank, item_id, customers, segment_customers`` (the segment's customers in the
        matrix); ties go to the smaller item id.
    """
    seg = (
        pl.DataFrame({CUSTOMER_ID: list(interactions.customers.ids)}, schema={CUSTOMER_ID: pl.String})
        .join(
            profiles.select(CUSTOMER_ID, pl.col(segment).cast(pl.String).fill_null("unknown")),
            on=CUSTOMER_ID,
            how="left",
            maintain_order="left",
        )
        .get_column(segment)
    )
    binary = interactions.matrix.copy()
    binary.data = (binary.data > 0).astype(np.float32)
    binary.eliminate_zeros()
    values = ordered_values([v for v in seg.unique().to_list() if v is not None], segment)
    labels = seg.to_numpy()
    rows: list[dict[str, Any]] = []
    for value in values:
        members = np.flatnonzero(labels == value)
        counts = np.asarray(binary[members].sum(axis=0)).ravel()
        # Stable sort on the negated count keeps vocabulary (sorted id) order among ties.
        order = np.argsort(-counts, kind="stable")
        for rank, i in enumerate(order[:n], start=1):
            if counts[i] <= 0:
                break
            rows.append(
                {
                    "segment_value": value,
                    "rank": rank,
                    ITEM_ID: interactions.items.ids[int(i)],
                    "customers": int(counts[i]),
                    "segment_customers": len(members),
                }
            )
    return pl.DataFrame(
        rows,
        schema={
            "segment_value": pl.String,
            "rank": pl.Int64,
            ITEM_ID: pl.String,
            "customers": pl.Int64,
            "segment_customers": pl.Int64,
        },
    )


def recommended_by_segment(
    recommender: RecommenderBundle,
    profiles: pl.DataFrame,
    segment: str,
    n: int = 5,
    *,
    sample: int = 200,
    list_length: int = RECOMMENDATION_LIST_LENGTH,
    seed: int = 0,
) -> pl.DataFrame:
    """Per segment value, the ``n`` items found most often in the recommender's top-``list_length`` lists of a
    seeded sample of at most ``sample`` of its customers.

    Returns:
        ``segment_value, rank, item_id, customers`` (lists holding the item), ``lists`` (lists sampled in the
        segment) and ``mean_rank``; ties go to the better mean rank, then the smaller item id.
    """
    schema = {
        "segment_value": pl.String,
        "rank": pl.Int64,
        ITEM_ID: pl.String,
        "customers": pl.Int64,
        "lists": pl.Int64,
        "mean_rank": pl.Float64,
    }
    seg = profiles.select(CUSTOMER_ID, pl.col(segment).cast(pl.String).fill_null("unknown").alias("value"))
    frames = []
    for value in ordered_values(seg["value"].unique().to_list(), segment):
        ids = seg.filter(pl.col("value") == value)[CUSTOMER_ID].sort()
        if ids.len() > sample:
            ids = ids.sample(sample, seed=seed).sort()
        lists = recommender.recommend(ids.to_list(), list_length)
        if lists.is_empty():
            continue
        frames.append(
            lists.group_by(ITEM_ID)
            .agg(
                pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias("customers"),
                pl.col("rank").mean().cast(pl.Float64).alias("mean_rank"),
            )
            .sort(["customers", "mean_rank", ITEM_ID], descending=[True, False, False])
            .head(n)
            .with_columns(
                pl.lit(value).alias("segment_value"),
                pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"),
                pl.lit(ids.len(), dtype=pl.Int64).alias("lists"),
            )
        )
    if not frames:
        return pl.DataFrame(schema=schema)
    return pl.concat(frames).select(list(schema))


def offer_responses(source: Any) -> pl.DataFrame:
    """The offer responses recorded in the service's contact ledger, as ``customer_id, action_id, timestamp,
    responded`` rows (what :func:`serving.decision_log.summarise_decisions` joins on).

    Args:
        source: the :class:`~serving.state_store.StateStore`, or a JSON-lines export of the ledger (empty when
            the file is missing).
    """
    from nextbest.serving.jsonl import read_lines
    from nextbest.serving.state_store import StateStore

    schema = {CUSTOMER_ID: pl.String, ACTION_ID: pl.String, TIMESTAMP_COL: pl.String, RESPONDED: pl.Boolean}
    if isinstance(source, StateStore):
        entries = source.all_contacts()
    else:
        entries = list(read_lines(Path(source))) if Path(source).exists() else []
    rows = [
        {
            CUSTOMER_ID: r.get(CUSTOMER_ID),
            ACTION_ID: r.get(ACTION_ID),
            TIMESTAMP_COL: r["at"].isoformat() if isinstance(r.get("at"), datetime) else r.get("at"),
            RESPONDED: bool(r.get("accepted")),
        }
        for r in entries
        if r.get("type") == "response"
    ]
    from nextbest.features.schema import parse_timestamp

    return pl.DataFrame(rows, schema=schema).with_columns(parse_timestamp(pl.col(TIMESTAMP_COL)))


# --- HTML pieces ------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt_int(value: Any) -> str:
    return "" if value is None else f"{int(value):,}"


def _fmt_pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * float(value):.1f}%"


def _fmt_time(value: Any) -> str:
    """An ISO timestamp to the minute (``2026-04-30 22:37``); the text itself when it is not one."""
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(value) if value is not None else "?"


def _fmt_num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


@dataclass(frozen=True)
class Column:
    """One column of an HTML table: header, key in the row dicts, formatter and alignment."""

    header: str
    key: str
    fmt: Any = str
    numeric: bool = False


def html_table(
    name: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], *, caption: str = ""
) -> str:
    """A sortable table (``data-table`` = ``name``); numeric cells carry their raw value in ``data-sort``."""
    head = "".join(
        f'<th scope="col" class="{"num" if c.numeric else "text"}">{_e(c.header)}</th>' for c in columns
    )
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c.key)
            text = _e(c.fmt(value)) if value is not None else "–"
            if c.numeric:
                raw = "" if value is None else repr(float(value))
                cells.append(f'<td class="num" data-sort="{raw}">{text}</td>')
            else:
                cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (
        f'<table class="data sortable" data-table="{_e(name)}">{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def bar_chart(
    name: str,
    rows: Sequence[tuple[str, float]],
    *,
    title: str,
    value_format: Any = _fmt_int,
    colours: Sequence[str] | None = None,
    max_value: float | None = None,
) -> str:
    """A horizontal bar chart as inline SVG: one ``rect.bar`` per row, its value in ``data-value``.

    Args:
        name: the chart's ``data-chart`` name (tests and styles find it by this).
        rows: (label, value) pairs, drawn top to bottom.
        title: the accessible title.
        value_format: formats the value printed after each bar.
        colours: per row fill colours (default one accent colour).
        max_value: the value of a full-width bar (default the largest value).
    """
    label_w, bar_w, value_w, row_h, bar_h, pad = 150, 320, 80, 22, 15, 6
    width = label_w + bar_w + value_w
    height = pad * 2 + row_h * max(len(rows), 1)
    top = max_value if max_value is not None else max((v for _, v in rows), default=0.0)
    parts = [
        f'<svg class="chart" data-chart="{_e(name)}" role="img" aria-label="{_e(title)}" '
        f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
        f"<title>{_e(title)}</title>",
    ]
    if not rows:
        parts.append(f'<text x="{pad}" y="{pad + 14}" class="empty">no data</text>')
    for k, (label, value) in enumerate(rows):
        y = pad + k * row_h
        length = 0.0 if not top else max(0.0, float(value)) / top * (bar_w - 4)
        if value and length < 1:
            length = 1.0  # a value above zero stays visible
        fill = colours[k] if colours is not None else _ACCENT
        short = label if len(label) <= 22 else label[:21] + "…"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar_h - 3}" text-anchor="end" class="label">{_e(short)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y}" width="{length:.2f}" height="{bar_h}" fill="{_e(fill)}" '
            f'stroke="#555" stroke-width="0.4" data-label="{_e(label)}" data-value="{float(value)!r}">'
            f"<title>{_e(label)}: {_e(value_format(value))}</title></rect>"
            f'<text x="{label_w + length + 5:.2f}" y="{y + bar_h - 3}" class="value">{_e(value_format(value))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _figure(chart: str, table: str, caption: str) -> str:
    return f'<figure class="panel"><figcaption>{_e(caption)}</figcaption>{chart}{table}</figure>'


# --- loading ----------------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    manifest: dict[str, Any]
    profiles: pl.DataFrame
    items: pl.DataFrame
    interactions: Interactions | None
    identities: pl.DataFrame
    unlinked: int | None


def _load(ds: Dataset) -> _Inputs:
    ds.require()
    profiles_path = ds.features_dir / PROFILES_FILE
    if not ds.manifest_path.exists() or not profiles_path.exists():
        raise DashboardError(
            f"{ds.root} has no built features: run 'nextbest features build --data {ds.root}' first"
        )
    manifest = ds.read_manifest()
    interactions = None
    try:
        interactions = Interactions.load(ds.features_dir)
    except FileNotFoundError:
        interactions = None
    unlinked_path = ds.features_dir / UNLINKED_FILE
    unlinked = pl.read_parquet(unlinked_path).height if unlinked_path.exists() else None
    return _Inputs(
        manifest=manifest,
        profiles=pl.read_parquet(profiles_path),
        items=ds.read("items", required=False),
        interactions=interactions,
        identities=ds.read("identities", required=False),
        unlinked=unlinked,
    )


# --- sections ---------------------------------------------------------------------------------------------------


def _overview(inputs: _Inputs, ds: Dataset) -> str:
    p = inputs.profiles
    counts = inputs.manifest.get("row_counts", {})
    at_risk = int(p["churn_risk_flag"].fill_null(False).sum()) if "churn_risk_flag" in p.columns else 0
    cards = [
        ("profiled customers", _fmt_int(p.height), "customers"),
        ("events", _fmt_int(counts.get("raw_events", 0)), "events"),
        ("items", _fmt_int(inputs.items.height or counts.get("interaction_items", 0)), "items"),
        (
            "at churn risk",
            f"{_fmt_int(at_risk)} ({_fmt_pct(at_risk / p.height if p.height else 0)})",
            "at_risk",
        ),
    ]
    card_html = "".join(
        f'<div class="card" data-card="{key}"><div class="big">{_e(value)}</div><div>{_e(label)}</div></div>'
        for label, value, key in cards
    )
    ids = (
        inputs.identities.filter(pl.col(CUSTOMER_ID).is_not_null())
        .group_by(SOURCE_SYSTEM)
        .agg(
            pl.len().cast(pl.Int64).alias("ids"),
            pl.col(CUSTOMER_ID).n_unique().cast(pl.Int64).alias("customers"),
        )
        .sort(SOURCE_SYSTEM)
        if inputs.identities.height
        else pl.DataFrame(schema={SOURCE_SYSTEM: pl.String, "ids": pl.Int64, "customers": pl.Int64})
    )
    rows = ids.to_dicts()
    if inputs.unlinked is not None:
        rows.append({SOURCE_SYSTEM: "unlinked ids in events", "ids": inputs.unlinked, "customers": None})
    table = html_table(
        "identities",
        [
            Column("source system", SOURCE_SYSTEM),
            Column("linked ids", "ids", _fmt_int, numeric=True),
            Column("customers", "customers", _fmt_int, numeric=True),
        ],
        rows,
        caption="Single customer view: ids of each source system linked to one customer_id",
    )
    return (
        '<section id="overview"><h2>Overview</h2>'
        f'<div class="cards">{card_html}</div>'
        f'<p class="note">Dataset <code>{_e(ds.root)}</code>, as of {_e(_fmt_time(inputs.manifest.get("as_of")))}; '
        "profiles cover customers who consented to profiling.</p>"
        f"{table}</section>"
    )


def _segments(profiles: pl.DataFrame) -> str:
    panels = []
    for column, label in SEGMENT_CHARTS:
        if column not in profiles.columns:
            continue
        counts = segment_counts(profiles, column)
        chart = bar_chart(
            f"segment-{column}",
            list(zip(counts["value"].to_list(), counts["customers"].to_list(), strict=True)),
            title=f"Customers by {label.lower()}",
        )
        table = html_table(
            f"segment-{column}",
            [
                Column(label.lower(), "value"),
                Column("customers", "customers", _fmt_int, numeric=True),
                Column("share", "share", _fmt_pct, numeric=True),
            ],
            counts.to_dicts(),
        )
        panels.append(_figure(chart, table, f"Customers by {label.lower()}"))
    return (
        '<section id="segments"><h2>Segments and journey phases</h2>'
        '<p class="note">Journey phase from recent behaviour: <b>need</b> (a need forming, or never bought), '
        "<b>orientation</b> (comparing options), <b>purchase</b> (an open cart or a purchase in the last days), "
        "<b>use</b> (bought recently), <b>evaluation</b> (bought a while ago: deciding whether to come back).</p>"
        f'<div class="grid">{"".join(panels)}</div></section>'
    )


def _preferences(profiles: pl.DataFrame) -> str:
    panels = []
    for attribute in preference_attributes(profiles):
        dist = preference_distribution(profiles, attribute)
        colours = None
        if attribute == "colour":
            colours = [v.lower() if v.lower() in _CSS_COLOURS else _ACCENT for v in dist["value"].to_list()]
        chart = bar_chart(
            f"preferred-{attribute}",
            list(zip(dist["value"].to_list(), dist["customers"].to_list(), strict=True)),
            title=f"Customers by preferred {attribute}",
            colours=colours,
        )
        table = html_table(
            f"preferred-{attribute}",
            [
                Column(f"preferred {attribute}", "value"),
                Column("customers", "customers", _fmt_int, numeric=True),
                Column("share", "share", _fmt_pct, numeric=True),
                Column("mean strength", "mean_strength", _fmt_pct, numeric=True),
            ],
            dist.to_dicts(),
        )
        panels.append(_figure(chart, table, f"Preferred {attribute}"))
    body = "".join(panels) or '<p class="note">The items have no text attributes to prefer.</p>'
    return (
        '<section id="preferences"><h2>Preferences</h2>'
        '<p class="note">Each customer\'s preferred value is the one with the largest share of their weighted '
        "interactions; <i>mean strength</i> is that share averaged over the customers who prefer it.</p>"
        f'<div class="grid">{body}</div></section>'
    )


def _churn(profiles: pl.DataFrame, limit: int) -> str:
    if "churn_risk_flag" not in profiles.columns:
        return '<section id="churn"><h2>Churn risk</h2><p class="note">No churn risk in the profiles.</p></section>'
    flagged = profiles.filter(pl.col("churn_risk_flag").fill_null(False))
    tiers = segment_counts(flagged, "value_tier") if "value_tier" in profiles.columns else None
    chart = ""
    if tiers is not None:
        chart = bar_chart(
            "churn-by-tier",
            list(zip(tiers["value"].to_list(), tiers["customers"].to_list(), strict=True)),
            title="Customers at churn risk by value tier",
            colours=[_SECOND] * tiers.height,
        )
    listed = churn_risk_list(profiles, limit)
    formats = {
        CUSTOMER_ID: Column("customer", CUSTOMER_ID),
        "value_tier": Column("value tier", "value_tier"),
        "lifecycle": Column("lifecycle", "lifecycle"),
        "journey_phase": Column("journey phase", "journey_phase"),
        "frequency": Column("orders", "frequency", _fmt_int, numeric=True),
        "monetary": Column("spend", "monetary", lambda v: _fmt_num(float(v), 2), numeric=True),
        "recency_days": Column("days since purchase", "recency_days", _fmt_num, numeric=True),
        "usual_interval_days": Column("usual interval (days)", "usual_interval_days", _fmt_num, numeric=True),
        "churn_risk": Column("risk ratio", "churn_risk", lambda v: _fmt_num(float(v), 2), numeric=True),
    }
    table = html_table("churn", [formats[c] for c in listed.columns if c in formats], listed.to_dicts())
    return (
        '<section id="churn"><h2>Churn risk</h2>'
        f'<p class="note"><b data-count="churn">{_fmt_int(flagged.height)}</b> customers are at risk: the days '
        "since their last purchase exceed twice their usual interval between orders (single-order customers: "
        f"no purchase for a long while). The {_fmt_int(listed.height)} most valuable are listed, by spend.</p>"
        f'<div class="grid"><figure class="panel"><figcaption>At risk by value tier</figcaption>{chart}</figure></div>'
        f"{table}</section>"
    )


def _item_rows(table: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    cols = [c for c in (*ITEM_COLUMNS, PRICE) if c in items.columns]
    if not cols:
        return table
    return table.join(items.select(ITEM_ID, *cols), on=ITEM_ID, how="left", maintain_order="left")


def _recommendations(
    inputs: _Inputs,
    segment: str,
    top_n: int,
    recommender: RecommenderBundle | None,
    label: str | None,
    fallback_reason: str | None,
) -> str:
    profiles = inputs.profiles
    if segment not in profiles.columns:
        return (
            '<section id="recommendations"><h2>Top recommendations per segment</h2>'
            f'<p class="note">The profiles have no column {_e(segment)}.</p></section>'
        )
    if recommender is not None:
        table = recommended_by_segment(recommender, profiles, segment, top_n)
        source = "model"
        what = (
            f"From <b>{_e(label or 'the given recommender')}</b>: the items found most often in the top-"
            f"{RECOMMENDATION_LIST_LENGTH} lists of a sample of each segment's customers "
            "(<i>in lists</i>: how many of the sampled lists hold the item)."
        )
        count_header = "in lists"
    elif inputs.interactions is not None:
        table = popular_by_segment(inputs.interactions, profiles, segment, top_n)
        source = "popularity"
        why = f" ({_e(fallback_reason)})" if fallback_reason else ""
        what = (
            f"Popularity fallback{why}: the items the most of each segment's customers interacted with "
            "(<i>customers</i>), as the service answers without a model."
        )
        count_header = "customers"
    else:
        return (
            '<section id="recommendations"><h2>Top recommendations per segment</h2>'
            '<p class="note">No interaction matrix in the features and no recommender.</p></section>'
        )
    table = _item_rows(table, inputs.items)
    item_cols = [c for c in ITEM_COLUMNS if c in table.columns]
    columns = [
        Column("rank", "rank", _fmt_int, numeric=True),
        Column("item", ITEM_ID),
        *[Column(c, c) for c in item_cols],
        *(
            [Column("price", PRICE, lambda v: _fmt_num(float(v), 2), numeric=True)]
            if PRICE in table.columns
            else []
        ),
        Column(count_header, "customers", _fmt_int, numeric=True),
    ]
    sizes = dict(segment_counts(profiles, segment).select("value", "customers").iter_rows())
    blocks = []
    for value in ordered_values(table["segment_value"].unique().to_list(), segment):
        part = table.filter(pl.col("segment_value") == value).sort("rank")
        sampled = f", {_fmt_int(part['lists'][0])} lists sampled" if "lists" in part.columns else ""
        blocks.append(
            f'<div class="segment-block" data-segment="{_e(value)}"><h3>{_e(segment)} = {_e(value)} '
            f'<span class="muted">({_fmt_int(sizes.get(value, 0))} customers{sampled})</span></h3>'
            + html_table(f"recommendations-{value}", columns, part.to_dicts())
            + "</div>"
        )
    return (
        f'<section id="recommendations" data-source="{source}"><h2>Top recommendations per segment</h2>'
        f'<p class="note">{what}</p><div class="grid">{"".join(blocks)}</div></section>'
    )


DEFAULT_POLICY_CANDIDATES: tuple[str, ...] = ("epsilon:0.1",)
"""Candidates the offline policy evaluation shows beside the current policy unless others are given."""


def _policy_evaluation(
    decision_log: Any,
    ds: Dataset,
    catalog: pl.DataFrame,
    policy: str | Path | None,
    candidates: Sequence[str],
) -> str:
    """The "Offline policy evaluation" part of the next-best-action section (:mod:`serving.policy_eval`)."""
    from nextbest.serving.policy import DEFAULT_POLICY_PATH, attach_catalog, load_policy
    from nextbest.serving.policy_eval import evaluation_table, policy_report
    from nextbest.serving.state_store import StateStore

    head = '<h3 id="policy-evaluation">Offline policy evaluation</h3>'
    if not isinstance(decision_log, StateStore):
        return head + '<p class="note" data-empty="policy-evaluation">Needs the service\'s state store.</p>'
    try:
        current = load_policy(policy or DEFAULT_POLICY_PATH)
        known = None if catalog.is_empty() else catalog
        if known is not None:
            current = attach_catalog(current, known)
        rows = policy_report(
            decision_log, current, candidates, catalog=known, profiles_path=ds.features_dir / PROFILES_FILE
        )
    except ValueError as e:  # PolicyError, CandidateSpecError, PolicyEvalError: a note, never a broken page
        return head + f'<p class="note" data-empty="policy-evaluation">{_e(" ".join(str(e).split()))}</p>'
    table = evaluation_table(rows).to_dicts()
    for r in table:
        for metric, fmt in (("acceptance", _fmt_pct), ("value", lambda v: _fmt_num(v, 2))):
            low, high = r[f"{metric}_low"], r[f"{metric}_high"]
            r[f"{metric}_interval"] = "–" if low is None or high is None else f"{fmt(low)} – {fmt(high)}"
    return (
        head
        + '<p class="note">What the current policy and each candidate would have achieved on the logged decisions, '
        "estimated from the decision log and the responses (IPS, self-normalised IPS and doubly robust, 95 % "
        "bootstrap intervals; <i>support</i>: decisions where the candidate could have made the logged choice). "
        "More candidates: <code>nextbest report policy --candidate SPEC</code>.</p>"
        + html_table(
            "policy-evaluation",
            [
                Column("candidate", "candidate"),
                Column("estimator", "estimator"),
                Column("acceptance", "acceptance", _fmt_pct, numeric=True),
                Column("95 % interval", "acceptance_interval"),
                Column("value / decision", "value", lambda v: _fmt_num(v, 2), numeric=True),
                Column("95 % interval", "value_interval"),
                Column("decisions", "decisions", _fmt_int, numeric=True),
                Column("support", "support", _fmt_int, numeric=True),
            ],
            table,
        )
    )


def _decisions(
    decision_log: Any,
    responses: pl.DataFrame | None,
    catalog: pl.DataFrame,
    window_days: float,
    evaluation: Callable[[], str] | None = None,
) -> str:
    from nextbest.serving.state_store import StateStore

    head = '<section id="decisions"><h2>Next best actions</h2>'
    if decision_log is None or (not isinstance(decision_log, StateStore) and not Path(decision_log).exists()):
        return (
            head + '<p class="note" data-empty="decisions">No decision log yet: acceptance appears here once '
            "the service has made next-best-action decisions (<code>DATA/service/state.db</code>).</p>"
            "</section>"
        )
    from nextbest.serving.decision_log import ALL_ACTIONS, summarise_decisions

    if responses is None:
        source = (
            decision_log
            if isinstance(decision_log, StateStore)
            else Path(decision_log).with_name("contacts.jsonl")
        )
        responses = offer_responses(source)
    summary = summarise_decisions(decision_log, responses, window_days=window_days)
    if summary.is_empty():
        return head + '<p class="note" data-empty="decisions">The decision log is empty.</p></section>'
    described = {}
    if "description" in catalog.columns:
        described = dict(zip(catalog[ACTION_ID].to_list(), catalog["description"].to_list(), strict=True))
    rows = [
        {
            **r,
            ACTION_ID: r[ACTION_ID] if r[ACTION_ID] is not None else "(nothing chosen)",
            "description": described.get(r[ACTION_ID], ""),
        }
        for r in summary.to_dicts()
    ]
    totals = [r for r in rows if r[ACTION_ID] == ALL_ACTIONS]
    # One scale for every acceptance chart, so that bars compare across arms.
    top = max((r["acceptance_rate"] or 0.0 for r in rows), default=0.0) or 1.0
    charts = [
        bar_chart(
            "acceptance-by-arm",
            [(r["arm"], r["acceptance_rate"] or 0.0) for r in totals],
            title="Acceptance by arm",
            value_format=_fmt_pct,
            max_value=top,
            colours=[_ACCENT if r["arm"] == "champion" else _SECOND for r in totals],
        )
    ]
    captions = [f"Acceptance by arm (offers accepted within {window_days:g} days)"]
    for arm in sorted({r["arm"] for r in rows}):
        per = [r for r in rows if r["arm"] == arm and r[ACTION_ID] != ALL_ACTIONS and r["offers"]]
        charts.append(
            bar_chart(
                f"acceptance-{arm}",
                [(r[ACTION_ID], r["acceptance_rate"] or 0.0) for r in per],
                title=f"Acceptance by action, {arm}",
                value_format=_fmt_pct,
                max_value=top,
                colours=[_ACCENT if arm == "champion" else _SECOND] * len(per),
            )
        )
        captions.append(f"Acceptance by action: {arm}")
    panels = "".join(
        f'<figure class="panel"><figcaption>{_e(c)}</figcaption>{ch}</figure>'
        for c, ch in zip(captions, charts, strict=True)
    )
    table = html_table(
        "acceptance",
        [
            Column("arm", "arm"),
            Column("action", ACTION_ID),
            Column("description", "description"),
            Column("decisions", "decisions", _fmt_int, numeric=True),
            Column("offers", "offers", _fmt_int, numeric=True),
            Column("accepted", "accepted", _fmt_int, numeric=True),
            Column("acceptance", "acceptance_rate", _fmt_pct, numeric=True),
        ],
        rows,
    )
    return (
        head
        + f'<p class="note">From <code>{_e(_source_name(decision_log))}</code>: every decision by arm and chosen action; '
        "<i>offers</i> leave out decisions to do nothing; an offer is accepted when the customer's response "
        f"to that action was recorded within {window_days:g} days.</p>"
        f'<div class="grid">{panels}</div>{table}{evaluation() if evaluation is not None else ""}</section>'
    )


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9d1e0}nav{padding:8px 28px;background:#e6e9ef;position:sticky;top:0}
nav a{margin-right:16px;color:#1d2330;text-decoration:none;font-weight:600}
section{background:#fff;margin:16px 28px;padding:14px 20px;border-radius:6px;box-shadow:0 1px 2px #0002}
h2{margin:4px 0 10px;font-size:18px}h3{font-size:15px;margin:14px 0 4px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#eef3fa;border-radius:6px;padding:10px 16px;min-width:150px}
.card .big{font-size:22px;font-weight:700}.note{color:#4a5568}.muted{color:#718096;font-weight:400}
.grid{display:flex;flex-wrap:wrap;gap:18px}.panel{margin:0;flex:0 1 570px}.segment-block{flex:0 1 570px}
.segment-block table.data{font-size:12px}.segment-block table.data th,.segment-block table.data td{padding:3px 5px}
figcaption{font-weight:600;margin:6px 0}svg.chart{max-width:100%;height:auto;display:block}
svg text{font-size:12px;fill:#1d2330}svg text.value{fill:#4a5568}
table.data{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
table.data caption{text-align:left;color:#4a5568;padding:4px 0}
table.data th,table.data td{padding:3px 10px;border-bottom:1px solid #e2e8f0;text-align:left}
table.data th{background:#f0f2f6;cursor:pointer;user-select:none}
table.data td.num,table.data th.num{text-align:right;font-variant-numeric:tabular-nums}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
footer{margin:8px 28px 24px;color:#718096}
"""

# Click a header to sort its table (numeric columns by their raw data-sort value); click again to reverse.
_SCRIPT = """
(function () {
  "use strict";
  function key(cell, numeric) {
    if (!cell) { return numeric ? -Infinity : ""; }
    if (numeric) {
      var raw = cell.getAttribute("data-sort");
      var v = raw === null || raw === "" ? NaN : parseFloat(raw);
      return isNaN(v) ? -Infinity : v;
    }
    return cell.textContent.trim().toLowerCase();
  }
  function sortBy(table, index, numeric, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    rows.sort(function (a, b) {
      var x = key(a.cells[index], numeric), y = key(b.cells[index], numeric);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return ascending ? order : -order;
    });
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, index) {
      th.addEventListener("click", function () { sortBy(table, index, th.classList.contains("num"), th); });
    });
  });
  document.documentElement.setAttribute("data-ready", "true");
})();
"""


# --- the page ---------------------------------------------------------------------------------------------------


def render_dashboard(
    data: Dataset | str | Path,
    *,
    decision_log: Any = None,
    responses: pl.DataFrame | None = None,
    recommender: RecommenderBundle | None = None,
    recommender_label: str | None = None,
    fallback_reason: str | None = None,
    segment: str = "age_band",
    top_n: int = 5,
    churn_limit: int = 25,
    window_days: float = 7.0,
    generated_at: datetime | None = None,
    policy: str | Path | None = None,
    policy_candidates: Sequence[str] = DEFAULT_POLICY_CANDIDATES,
) -> str:
    """The dashboard of a dataset as one self-contained HTML page (see the module docstring).

    Args:
        data: the dataset directory (features built).
        decision_log: the service's state store, or a JSON-lines export of its decision log; None leaves the
            acceptance section empty.
        responses: offer responses (``customer_id, action_id, timestamp[, responded]``); default the responses
            in the contact ledger beside the decision log (``contacts.jsonl``).
        recommender: the model whose lists give the top recommendations per segment (e.g. the registered
            champion); None for the popularity fallback.
        recommender_label: how the page names that model (``nextbest-recommender v3 (champion, als)``).
        fallback_reason: shown beside the popularity fallback (e.g. why there is no champion).
        segment: the profile column whose values are the segments of the recommendation tables.
        top_n: items per segment.
        churn_limit: customers in the churn-risk list.
        window_days: how long after a decision a response counts as its acceptance.
        generated_at: the time printed in the footer (default now).
        policy: the current policy file, for the offline policy evaluation (default the shipped one).
        policy_candidates: SPECs evaluated beside it (:func:`serving.policy_replay.parse_candidate`).

    Raises:
        DatasetError: ``data`` is not a dataset.
        DashboardError: its features are not built.
    """
    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    inputs = _load(ds)
    when = (generated_at or datetime.now()).isoformat(timespec="seconds")
    catalog = ds.read("action_catalog", required=False)
    name = ds.root.resolve().name
    sections = [
        _overview(inputs, ds),
        _segments(inputs.profiles),
        _preferences(inputs.profiles),
        _churn(inputs.profiles, churn_limit),
        _recommendations(inputs, segment, top_n, recommender, recommender_label, fallback_reason),
        _decisions(
            decision_log,
            responses,
            catalog,
            window_days,
            lambda: _policy_evaluation(decision_log, ds, catalog, policy, policy_candidates),
        ),
    ]
    nav = "".join(
        f'<a href="#{key}">{label}</a>'
        for key, label in (
            ("overview", "Overview"),
            ("segments", "Segments"),
            ("preferences", "Preferences"),
            ("churn", "Churn risk"),
            ("recommendations", "Recommendations"),
            ("decisions", "Next best actions"),
        )
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>nextbest: customers of {_e(name)}</title>'
        f"<style>{_STYLE}</style></head><body>"
        f"<header><h1>Customers of {_e(name)}</h1><p>{_fmt_int(inputs.profiles.height)} profiled customers, "
        f"as of {_e(_fmt_time(inputs.manifest.get('as_of')))}</p></header><nav>{nav}</nav>"
        + "".join(sections)
        + f"<footer>Generated by nextbest at {_e(when)}. Self-contained: no network needed.</footer>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# --- the champion and the file ----------------------------------------------------------------------------------


@dataclass
class ChampionRecommender:
    """The registered champion recommender, loaded.

    Attributes:
        bundle: the model with its histories.
        label: ``nextbest-recommender v3 (champion, als)``.
        dataset: the dataset it was trained on (its registry tag), if recorded.
    """

    bundle: RecommenderBundle
    label: str
    dataset: str | None = None


def load_champion_recommender(
    tracking_uri: str | None = None, *, registered_model: str | None = None, alias: str = "champion"
) -> ChampionRecommender | None:
    """The registry's ``alias`` version of the recommender, or None when there is no registry or no such version.

    A SQLite tracking URI whose file does not exist counts as no registry (nothing is created). Otherwise MLflow
    is pointed at the URI (tracking and registry), as training and the service do.

    Args:
        tracking_uri: the MLflow tracking/registry URI; default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``.
        registered_model: the registered model name; default ``nextbest-recommender``.
        alias: the alias to resolve.
    """
    from nextbest.training.registry import download_version
    from nextbest.training.tracking import (
        REGISTERED_MODEL,
        resolve_tracking_uri,
        sqlite_path,
        version_by_alias,
    )

    uri = tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from mlflow import MlflowClient

    from nextbest.training.recommender_bundle import find_bundle

    name = registered_model or REGISTERED_MODEL
    version = version_by_alias(MlflowClient(uri, uri), name, alias)
    if version is None:
        return None
    bundle = find_bundle(download_version(uri, name, version.version))
    if bundle is None:
        return None
    kind = bundle.metadata.get("model") or (version.tags or {}).get("model")
    label = f"{name} v{version.version} ({alias}{', ' + kind if kind else ''})"
    return ChampionRecommender(bundle, label, (version.tags or {}).get("dataset"))


@dataclass
class DashboardResult:
    """What :func:`write_dashboard` did. ``to_dict`` is the JSON the CLI prints."""

    path: Path
    recommendations: str
    """``model`` (the champion's lists) or ``popularity`` (the fallback)."""
    recommender: str | None
    decision_log: str | None
    """Where the decision log was read: the state store's URL (password hidden), or a file."""
    customers: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "dashboard",
            "path": str(self.path),
            "recommendations": self.recommendations,
            "recommender": self.recommender,
            "decision_log": self.decision_log,
            "customers": self.customers,
            "notes": list(self.notes),
        }


def _source_name(decision_log: Any) -> str:
    """Where a decision log is, for the page: the state store's URL (password hidden) or the file."""
    from nextbest.serving.state_store import StateStore, redact

    return redact(decision_log.url) if isinstance(decision_log, StateStore) else str(decision_log)


def default_decision_log(ds: Dataset) -> Any:
    """The service's state store at its default place (``DATA/service/state.db``), or None before the service
    has run."""
    from nextbest.serving.engine import DEFAULT_STATE_DIR
    from nextbest.serving.state_store import STATE_DB, StateStore, default_state_url

    folder = ds.root / DEFAULT_STATE_DIR
    return StateStore(default_state_url(folder), create=False) if (folder / STATE_DB).exists() else None


def write_dashboard(
    data: Dataset | str | Path,
    out_path: str | Path | None = None,
    *,
    decision_log: Any = None,
    champion: bool = True,
    tracking_uri: str | None = None,
    segment: str = "age_band",
    top_n: int = 5,
    churn_limit: int = 25,
    window_days: float = 7.0,
    policy: str | Path | None = None,
    policy_candidates: Sequence[str] = DEFAULT_POLICY_CANDIDATES,
) -> DashboardResult:
    """Render the dashboard of ``data`` and write it (``nextbest dashboard --data DIR [--out FILE]``).

    Args:
        data: the dataset directory (features built).
        out_path: the HTML file; default ``DIR/dashboard.html``.
        decision_log: the service's state store (or a JSON-lines export of its decision log); default the store
            in ``DIR/service/state.db`` when it exists.
        champion: use the registered champion recommender for the per-segment recommendations (when it was
            trained on this dataset); otherwise, or without one, popularity per segment.
        tracking_uri: the MLflow registry; default ``MLFLOW_TRACKING_URI`` or ``mlruns/mlflow.db``.
        segment: the profile column of the recommendation tables.
        top_n: items per segment.
        churn_limit: customers in the churn-risk list.
        window_days: how long after a decision a response counts as its acceptance.
        policy: the current policy file, for the offline policy evaluation (default the shipped one).
        policy_candidates: SPECs evaluated beside it.

    Returns:
        where the page went and what it shows.
    """
    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    ds.require()
    out = Path(out_path) if out_path is not None else ds.root / DEFAULT_OUT_NAME
    notes: list[str] = []
    bundle = label = reason = None
    if champion:
        found = load_champion_recommender(tracking_uri)
        wanted = str(ds.root.resolve())
        if found is None:
            reason = "no champion recommender in the registry"
        elif found.dataset is not None and found.dataset != wanted:
            reason = f"the champion {found.label} was trained on {found.dataset}"
        else:
            bundle, label = found.bundle, found.label
    else:
        reason = "the champion was not asked for"
    if reason:
        notes.append(f"recommendations: popularity per segment ({reason})")
    from nextbest.serving.state_store import StateStore

    log = default_decision_log(ds) if decision_log is None else decision_log
    if log is None or (not isinstance(log, StateStore) and not Path(log).exists()):
        where = log if log is not None else ds.root / "service" / "state.db"
        notes.append(f"no decision log at {where}: the next-best-action section is empty")
        log_used = None
    else:
        log_used = log
    page = render_dashboard(
        ds,
        decision_log=log_used,
        recommender=bundle,
        recommender_label=label,
        fallback_reason=reason,
        segment=segment,
        top_n=top_n,
        churn_limit=churn_limit,
        window_days=window_days,
        policy=policy,
        policy_candidates=policy_candidates,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    customers = pl.scan_parquet(ds.features_dir / PROFILES_FILE).select(pl.len()).collect().item()
    return DashboardResult(
        path=out,
        recommendations="model" if bundle is not None else "popularity",
        recommender=label,
        decision_log=_source_name(log_used) if log_used is not None else None,
        customers=int(customers),
        notes=notes,
    )
