"""What the dashboard's templates render: typed views of its tables, charts and sections, number formats, and
the Jinja2 environment over ``serving/templates`` (autoescaped: every text is escaped where it is written)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

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

    kind: ClassVar[str] = "bar"
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


@dataclass(frozen=True)
class Tick:
    """An axis tick (or a marked x position): where it lies in pixels and its text."""

    at: float
    text: str


@dataclass(frozen=True)
class Point:
    """One point of a line: its position in pixels, its x label and its value (raw and printed)."""

    x: float
    y: float
    label: str
    value: float
    value_text: str


@dataclass(frozen=True)
class Line:
    """One series of a line chart: its name, stroke colour and dash pattern ("" for solid), its SVG path (broken
    where a value is missing) and its points."""

    name: str
    colour: str
    dash: str
    path: str
    points: Sequence[Point]


@dataclass(frozen=True)
class LineChart:
    """A line chart as the ``line_chart`` macro draws it in inline SVG (sizes in pixels): the lines, the axes'
    ticks, vertical marks (e.g. the days a model was promoted) and the legend at the right."""

    kind: ClassVar[str] = "line"
    name: str
    title: str
    lines: Sequence[Line]
    x_ticks: Sequence[Tick]
    y_ticks: Sequence[Tick]
    marks: Sequence[Tick] = ()
    x_label: str = ""
    width: int = 560
    height: int = 260
    left: int = 52
    right: int = 92
    top: int = 10
    bottom: int = 38

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (steps of 1, 2 or 5 × 10^k) from the first at or below ``low`` to the first
    at or above ``high``."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(first + len(ticks) * step)
    return [round(t, 12) for t in ticks]


def line_chart_view(
    name: str,
    x: Sequence[float],
    series: Sequence[tuple[str, Sequence[float | None], str, str]],
    *,
    title: str,
    value_format: Callable[[Any], str] = format_money,
    x_label: str = "",
    y_min: float | None = 0.0,
    marks: Sequence[tuple[float, str]] = (),
) -> LineChart:
    """The lines of a line chart over shared ``x`` values.

    Args:
        name: the chart's ``data-chart`` name (tests and styles find it by this).
        x: the x values (ascending), one per point of every series.
        series: (name, values, colour, dash) per line; a value None leaves a gap.
        title: the accessible title.
        value_format: formats the y ticks and each point's value.
        x_label: the x axis' caption.
        y_min: the lowest value of the y axis (None: the lowest value drawn).
        marks: (x, text) vertical marks.
    """
    chart = LineChart(name, title, [], [], [], x_label=x_label)
    values = [float(v) for _, vs, _, _ in series for v in vs if v is not None and math.isfinite(v)]
    lo = y_min if y_min is not None else min(values, default=0.0)
    hi = max(values, default=lo + 1.0)
    y_ticks = nice_ticks(min(lo, hi), max(hi, lo))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    x_lo, x_hi = (min(x), max(x)) if x else (0.0, 1.0)
    x_span = (x_hi - x_lo) or 1.0
    plot_w, plot_h = chart.plot_right - chart.left, chart.plot_bottom - chart.top

    def px(value: float) -> float:
        return round(chart.left + (value - x_lo) / x_span * plot_w, 2)

    def py(value: float) -> float:
        return round(chart.plot_bottom - (value - y_lo) / ((y_hi - y_lo) or 1.0) * plot_h, 2)

    lines = []
    for label, vs, colour, dash in series:
        points, parts, pen_down = [], [], False
        for xv, v in zip(x, vs, strict=True):
            if v is None or not math.isfinite(v):
                pen_down = False
                continue
            point = Point(px(xv), py(float(v)), format_num(xv, 0), float(v), value_format(v))
            parts.append(f"{'L' if pen_down else 'M'}{point.x},{point.y}")
            points.append(point)
            pen_down = True
        lines.append(Line(label, colour, dash, " ".join(parts), points))
    step = max(1, math.ceil(len(x) / 14))
    x_ticks = [Tick(px(v), format_num(v, 0)) for v in x[::step]]
    return LineChart(
        name,
        title,
        lines,
        x_ticks,
        [Tick(py(t), value_format(t)) for t in y_ticks],
        [Tick(px(at), text) for at, text in marks],
        x_label=x_label,
    )


def preference_colours(values: Sequence[str]) -> list[str]:
    """Bar colours of preferred colours: the colour itself where CSS names it, else the accent."""
    return [v.lower() if v.lower() in CSS_COLOURS else ACCENT for v in values]


@dataclass(frozen=True)
class Panel:
    """A captioned figure: a chart and, below it, its table."""

    caption: str
    chart: BarChart | LineChart | None
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
class Simulation:
    """The loop, simulated (``nextbest simulate``): where the summary is, what was simulated, the last week's
    ratios, the per-day curves, the per-day table and the offline estimates beside their truth."""

    source: str
    text: str
    cards: Sequence[Card]
    panels: Sequence[Panel]
    days: Table
    ope: Table | None = None


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
    simulation: Simulation | None = None


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
