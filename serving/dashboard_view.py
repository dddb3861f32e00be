"""What the dashboard's templates render: typed views of its tables, charts and sections, number formats, and
the Jinja2 environment over ``serving/templates`` (autoescaped: every text is escaped where it is written)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2

from nextbest.features.schema import ACTION_ID, CUSTOMER_ID

TEMPLATES = Path(__file__).with_name("templates")
"""The dashboard's templates, stylesheet and script (installed with the package: see pyproject's package-data)."""
PAGE_TEMPLATE = "dashboard.html.j2"
ACCENT = "#2f6db5"
SECOND = "#d9822b"
# CSS colour keywords a ``colour`` preference may name: its bar is drawn in that colour.
CSS_COLOURS = frozenset(
    {"black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "grey", "gray", "brown"}
    | {"navy", "beige", "teal", "maroon", "olive", "silver", "gold", "cyan", "magenta", "violet", "coral"}
)

# --- number formats (also the templates' filters) ----------------------------------------------------------------


def format_int(value: Any) -> str:
    return "" if value is None else f"{int(value):,}"


def format_pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * float(value):.1f}%"


def format_time(value: Any) -> str:
    """An ISO timestamp to the minute (``2026-04-30 22:37``); the text itself when it is not one."""
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return str(value) if value is not None else "?"


def format_num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_money(value: Any) -> str:
    """Two decimals (spend, prices, values per decision)."""
    return format_num(float(value), 2)


# --- tables -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of an HTML table: header, key in the row dicts, formatter and alignment."""

    header: str
    key: str
    fmt: Callable[[Any], str] = str
    numeric: bool = False


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, and for numeric columns the raw value the page sorts by ("" when missing)."""

    text: str
    sort: str | None = None


@dataclass(frozen=True)
class Table:
    """A sortable table (``data-table`` = ``name``) as the ``table`` macro draws it."""

    name: str
    columns: Sequence[Column]
    rows: Sequence[Sequence[Cell]]
    caption: str = ""


def table(
    name: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], *, caption: str = ""
) -> Table:
    """The cells of ``rows`` under ``columns``: each value through its column's formatter ("–" when missing)."""

    def cell(column: Column, value: Any) -> Cell:
        text = column.fmt(value) if value is not None else "–"
        if not column.numeric:
            return Cell(text)
        return Cell(text, "" if value is None else repr(float(value)))

    return Table(name, columns, [[cell(c, row.get(c.key)) for c in columns] for row in rows], caption)


# The columns of the page's tables (numbers formatted, numeric columns sortable by value).
SHARE_COLUMNS = (
    Column("customers", "customers", format_int, numeric=True),
    Column("share", "share", format_pct, numeric=True),
)
CHURN_TABLE = {
    CUSTOMER_ID: Column("customer", CUSTOMER_ID),
    "value_tier": Column("value tier", "value_tier"),
    "lifecycle": Column("lifecycle", "lifecycle"),
    "journey_phase": Column("journey phase", "journey_phase"),
    "frequency": Column("orders", "frequency", format_int, numeric=True),
    "monetary": Column("spend", "monetary", format_money, numeric=True),
    "recency_days": Column("days since purchase", "recency_days", format_num, numeric=True),
    "usual_interval_days": Column("usual interval (days)", "usual_interval_days", format_num, numeric=True),
    "churn_risk": Column("risk ratio", "churn_risk", format_money, numeric=True),
}
ACCEPTANCE_TABLE = (
    Column("arm", "arm"),
    Column("action", ACTION_ID),
    Column("description", "description"),
    Column("decisions", "decisions", format_int, numeric=True),
    Column("offers", "offers", format_int, numeric=True),
    Column("accepted", "accepted", format_int, numeric=True),
    Column("acceptance", "acceptance_rate", format_pct, numeric=True),
)
EVALUATION_TABLE = (
    Column("candidate", "candidate"),
    Column("estimator", "estimator"),
    Column("acceptance", "acceptance", format_pct, numeric=True),
    Column("95 % interval", "acceptance_interval"),
    Column("value / decision", "value", format_money, numeric=True),
    Column("95 % interval", "value_interval"),
    Column("decisions", "decisions", format_int, numeric=True),
    Column("support", "support", format_int, numeric=True),
)


# --- charts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One bar: its label (in full and shortened to fit), value, printed value, geometry and fill."""

    label: str
    short_label: str
    value: float
    value_text: str
    y: int
    length: float
    fill: str


@dataclass(frozen=True)
class BarChart:
    """A horizontal bar chart as the ``bar_chart`` macro draws it in inline SVG (sizes in pixels)."""

    name: str
    title: str
    bars: Sequence[Bar]
    label_width: int = 150
    bar_width: int = 320
    value_width: int = 80
    row_height: int = 22
    bar_height: int = 15
    pad: int = 6

    @property
    def width(self) -> int:
        return self.label_width + self.bar_width + self.value_width

    @property
    def height(self) -> int:
        return self.pad * 2 + self.row_height * max(len(self.bars), 1)


def bar_chart_view(
    name: str,
    rows: Sequence[tuple[str, float]],
    *,
    title: str,
    value_format: Callable[[Any], str] = format_int,
    colours: Sequence[str] | None = None,
    max_value: float | None = None,
) -> BarChart:
    """The bars of a horizontal bar chart, one per row, top to bottom.

    Args:
        name: the chart's ``data-chart`` name (tests and styles find it by this).
        rows: (label, value) pairs.
        title: the accessible title.
        value_format: formats the value printed after each bar.
        colours: per row fill colours (default one accent colour).
        max_value: the value of a full-width bar (default the largest value).
    """
    chart = BarChart(name, title, [])
    top = max_value if max_value is not None else max((v for _, v in rows), default=0.0)
    bars = []
    for k, (label, value) in enumerate(rows):
        length = 0.0 if not top else max(0.0, float(value)) / top * (chart.bar_width - 4)
        if value and length < 1:
            length = 1.0  # a value above zero stays visible
        bars.append(
            Bar(
                label=label,
                short_label=label if len(label) <= 22 else label[:21] + "…",
                value=float(value),
                value_text=value_format(value),
                y=chart.pad + k * chart.row_height,
                length=length,
                fill=colours[k] if colours is not None else ACCENT,
            )
        )
    return BarChart(name, title, bars)


def preference_colours(values: Sequence[str]) -> list[str]:
    """Bar colours of preferred colours: the colour itself where CSS names it, else the accent."""
    return [v.lower() if v.lower() in CSS_COLOURS else ACCENT for v in values]


@dataclass(frozen=True)
class Panel:
    """A captioned figure: a chart and, below it, its table."""

    caption: str
    chart: BarChart | None
    table: Table | None = None


# --- sections ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """One of the overview's headline numbers (``data-card`` = ``key``)."""

    key: str
    label: str
    value: str


@dataclass(frozen=True)
class Overview:
    """The headline numbers, the dataset and its date, and the single customer view."""

    cards: Sequence[Card]
    dataset: str
    as_of: str
    identities: Table


@dataclass(frozen=True)
class Churn:
    """At-risk customers: how many, how many listed, by value tier (None without tiers) and the list."""

    flagged: int
    listed: int
    by_tier: BarChart | None
    table: Table


@dataclass(frozen=True)
class SegmentBlock:
    """One segment's top items: ``customers`` in the segment, ``lists`` sampled (model lists only), and whether
    they are the overall popularity (a segment under the minimum)."""

    value: str
    customers: int
    table: Table
    lists: int | None = None
    fallback: bool = False


@dataclass(frozen=True)
class Recommendations:
    """The top items per ``segment``: from the ``model`` (``label``), by ``popularity`` (why: ``reason``), or
    neither (``problem`` says why)."""

    segment: str
    source: str | None = None
    problem: str | None = None
    label: str | None = None
    reason: str | None = None
    list_length: int = 0
    min_customers: int = 0
    blocks: Sequence[SegmentBlock] = ()


@dataclass(frozen=True)
class PolicyEvaluation:
    """The offline policy evaluation table, or the problem that stopped it (a note, never a broken page)."""

    table: Table | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Decisions:
    """Acceptance by arm and action; ``state`` ``missing`` (no log), ``empty`` or ``shown``."""

    state: Literal["missing", "empty", "shown"]
    source: str = ""
    window_days: float = 0.0
    panels: Sequence[Panel] = ()
    table: Table | None = None
    evaluation: PolicyEvaluation | None = None


@dataclass(frozen=True)
class Page:
    """The whole page: the dataset's name, its customers and date, when it was made, and every section."""

    name: str
    customers: int
    as_of: str
    generated_at: str
    overview: Overview
    segments: Sequence[Panel]
    preferences: Sequence[Panel]
    churn: Churn | None
    recommendations: Recommendations
    decisions: Decisions


# --- rendering ----------------------------------------------------------------------------------------------------


def environment() -> jinja2.Environment:
    """The templates' environment: autoescaped, strict about undefined names, the number formats as filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(count=format_int, pct=format_pct, num=format_num, money=format_money)
    return env


def render_page(page: Page, env: jinja2.Environment | None = None) -> str:
    """The whole page."""
    return (env or environment()).get_template(PAGE_TEMPLATE).render(page=page)


def render_macro(template: str, macro: str, *args: Any) -> str:
    """One macro of a template, alone (a table, a chart, a section)."""
    return str(getattr(environment().get_template(template).module, macro)(*args))


def html_table(
    name: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], *, caption: str = ""
) -> str:
    """A sortable table (``data-table`` = ``name``); numeric cells carry their raw value in ``data-sort``."""
    return render_macro("components.html.j2", "table", table(name, columns, rows, caption=caption))


def bar_chart(
    name: str,
    rows: Sequence[tuple[str, float]],
    *,
    title: str,
    value_format: Callable[[Any], str] = format_int,
    colours: Sequence[str] | None = None,
    max_value: float | None = None,
) -> str:
    """A horizontal bar chart as inline SVG (:func:`bar_chart_view`): one ``rect.bar`` per row, its value in
    ``data-value``."""
    view = bar_chart_view(
        name, rows, title=title, value_format=value_format, colours=colours, max_value=max_value
    )
    return render_macro("components.html.j2", "bar_chart", view)
