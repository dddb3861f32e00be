"""The dashboard's "The loop, simulated" section: the line chart's geometry, the per-day table and the cards on a
hand-made simulation summary whose every number is worked out by hand, bad summaries as clear errors, and the
section on a real page (found beside a simulation's dataset, or named)."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.pipeline import build_features
from nextbest.serving.cli import main
from nextbest.serving.dashboard import DashboardError, render_dashboard, write_dashboard
from nextbest.serving.dashboard_simulation import (
    SimulationSummaryError,
    dr_within,
    read_simulation,
    simulation_beside,
    simulation_days,
    simulation_view,
)
from nextbest.serving.dashboard_view import line_chart_view, nice_ticks, render_macro
from nextbest.serving.simulate_report import MARKER, SUMMARY_FILE


def day(n: int, learned: float, greedy: float, random: float, oracle: float, **extra: Any) -> dict[str, Any]:
    """One day of a summary: 100 decisions, the four policies' values per decision."""
    values = {"learned": learned, "greedy": greedy, "random": random, "oracle": oracle}
    row: dict[str, Any] = {"day": n, "date": f"2026-07-0{n}", "decisions": 100}
    for policy, value in values.items():
        row[policy] = {"acceptance": value / 50, "value_per_decision": value}
    row["learned"]["realised_acceptance"] = 0.05 * n
    row |= {"models": {"recommender": f"nextbest-recommender/{n}"}, "retrained": True, "promoted": []}
    return row | extra


def summary() -> dict[str, Any]:
    """Three days: the learned policy reaches 1.5 of the oracle's 2.0, then 1.8; random stays at 1.0."""
    return {
        "command": "simulate",
        "config": {"customers": 5000, "seed": 42, "epsilon": 0.1},
        "learned_vs_oracle_last_week": 0.8,
        "learned_vs_random_last_week": 1.6,
        "days": [
            day(1, 1.0, 1.1, 1.0, 2.0, promoted=["propensity"]),
            day(2, 1.5, 1.6, 1.0, 2.0),
            day(3, 1.8, 1.9, 1.0, 2.0, retrained=False),
        ],
        "ope": [
            {
                "candidate": "current",
                "estimator": "dr",
                "estimate": 1.05,
                "low": 0.9,
                "high": 1.2,
                "truth": 1.0,
            }
            | {"error": 0.05, "covered": True, "decisions": 300, "support": 280},
            {
                "candidate": "epsilon:1.0",
                "estimator": "dr",
                "estimate": 1.2,
                "low": 1.1,
                "high": 1.3,
                "truth": 1.0,
            }
            | {"error": 0.2, "covered": False, "decisions": 300, "support": 300},
            {
                "candidate": "current",
                "estimator": "ips",
                "estimate": 1.0,
                "low": 0.8,
                "high": 1.2,
                "truth": 1.0,
            }
            | {"error": 0.0, "covered": True, "decisions": 300, "support": 280},
        ],
    }


class Svg(HTMLParser):
    """The points (``circle``: series → [(x label, value)]), paths and marks of the page's line charts."""

    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, dict[str, list[tuple[str, float]]]] = {}
        self.paths: dict[str, dict[str, str]] = {}
        self.marks: dict[str, list[str]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.cards: dict[str, str] = {}
        self._chart: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._card: str | None = None
        self._big = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and "data-chart" in a:
            self._chart = a["data-chart"]
            self.points[self._chart], self.paths[self._chart], self.marks[self._chart] = {}, {}, []
        elif tag == "circle" and self._chart:
            self.points[self._chart].setdefault(a["data-series"], []).append(
                (a["data-x"], float(a["data-value"]))
            )
        elif tag == "path" and self._chart:
            self.paths[self._chart][a["data-series"]] = a["d"]
        elif tag == "line" and self._chart and "data-mark" in a:
            self.marks[self._chart].append(a["data-mark"])
        elif tag == "table" and "data-table" in a:
            self._table = a["data-table"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell = []
        elif tag == "div" and "data-card" in a:
            self._card = a["data-card"]
        elif tag == "div" and self._card and a.get("class") == "big":
            self._big = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "div" and self._big:
            self._big = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._big and self._card:
            self.cards[self._card] = data.strip()
            self._card = None


def parse(page: str) -> Svg:
    reader = Svg()
    reader.feed(page)
    return reader


# --- the pieces, with known answers -------------------------------------------------------------------------------


def test_nice_ticks_known_answers():
    assert nice_ticks(0.0, 2.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert nice_ticks(0.0, 3.4) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert nice_ticks(0.0, 0.87) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(5.0, 5.0) == [5.0, 5.25, 5.5, 5.75, 6.0]  # a flat series still gets an axis


def test_line_geometry_known_answer():
    chart = line_chart_view(
        "c",
        [1, 2, 3],
        [("a", [0.0, 1.0, 2.0], "red", ""), ("b", [1.0, None, 2.0], "blue", "4 3")],
        title="t",
        marks=[(1.5, "promoted")],
    )
    # Plot area: x 52 … 468 (560 - 92), y 222 (260 - 38) … 10; the y axis runs 0 … 2 in steps of 0.5.
    assert [t.text for t in chart.y_ticks] == ["0.00", "0.50", "1.00", "1.50", "2.00"]
    assert [(p.x, p.y) for p in chart.lines[0].points] == [(52.0, 222.0), (260.0, 116.0), (468.0, 10.0)]
    assert chart.lines[0].path == "M52.0,222.0 L260.0,116.0 L468.0,10.0"
    # A missing value breaks the line: two pieces, no point drawn for it.
    assert chart.lines[1].path == "M52.0,116.0 M468.0,10.0"
    assert [p.label for p in chart.lines[1].points] == ["1", "3"]
    assert [(m.at, m.text) for m in chart.marks] == [(156.0, "promoted")]
    svg = render_macro("components.html.j2", "line_chart", chart)
    assert svg.count("<circle") == 5 and 'stroke-dasharray="4 3"' in svg and 'data-mark="promoted"' in svg


def test_an_empty_line_chart_says_so():
    svg = render_macro("components.html.j2", "line_chart", line_chart_view("c", [], [], title="t"))
    assert "no data" in svg


def test_per_day_table_and_dr_count_known_answer():
    days = simulation_days(summary())
    assert days["learned_share"].to_list() == pytest.approx([0.5, 0.75, 0.9])
    assert days["random_share"].to_list() == pytest.approx([0.5, 0.5, 0.5])
    assert days["learned_acceptance"].to_list() == pytest.approx([0.05, 0.10, 0.15])
    assert days["promoted"].to_list() == ["propensity", None, None]
    # Only the first DR row is within ±10 % of its truth with the interval covering it; IPS rows do not count.
    assert dr_within(summary()) == (1, 2)


def test_the_section_draws_the_summary():
    page = render_macro("sections.html.j2", "simulation", simulation_view(summary(), "sim/simulation.json"))
    doc = parse(page)
    value = doc.points["simulation-value"]
    assert value["learned"] == [("1", 1.0), ("2", 1.5), ("3", 1.8)]
    assert value["oracle"] == [("1", 2.0), ("2", 2.0), ("3", 2.0)]
    assert set(value) == {"oracle", "learned", "greedy", "random"}
    assert doc.points["simulation-share"]["learned"] == [("1", 0.5), ("2", 0.75), ("3", 0.9)]
    # The night after day 1 promoted a model: a mark between days 1 and 2 on both charts.
    assert (
        doc.marks["simulation-value"] == doc.marks["simulation-share"] == ["after day 1: promoted propensity"]
    )
    assert doc.cards == {
        "learned-vs-oracle": "0.800",
        "learned-vs-random": "1.600",
        "first-day": "0.500",
        "promotions": "1",
        "dr-within": "1 of 2",
    }
    rows = doc.tables["simulation-days"][1:]
    assert [r[0] for r in rows] == ["1", "2", "3"] and [r[7] for r in rows] == ["0.500", "0.750", "0.900"]
    ope = doc.tables["simulation-ope"][1:]
    assert ope[0][:5] == ["current", "dr", "1.05", "0.90 – 1.20", "1.00"] and ope[1][6] == "no"


def test_bad_summaries_are_clear_errors(tmp_path):
    with pytest.raises(SimulationSummaryError, match="no simulation summary at"):
        read_simulation(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SimulationSummaryError, match="not JSON"):
        read_simulation(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"command": "run"}))
    with pytest.raises(SimulationSummaryError, match='no "command": "simulate"'):
        read_simulation(tmp_path / "other.json")
    broken = summary()
    del broken["days"][1]["oracle"]["value_per_decision"]
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(broken))
    with pytest.raises(SimulationSummaryError, match=r'day 2 has no number "oracle.value_per_decision"'):
        read_simulation(tmp_path)  # the folder holding it reads too


# --- on the page --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulation(tmp_path_factory) -> Path:
    """A simulation's folder as ``nextbest simulate`` leaves it: the marker, the summary and ``world``."""
    out = tmp_path_factory.mktemp("sim")
    ds = Dataset.at(out / "world")
    generate_world(WorldConfig(customers=120, days=45, seed=3), ds)
    build_features(ds)
    (out / MARKER).write_text("made by nextbest simulate\n")
    (out / SUMMARY_FILE).write_text(json.dumps(summary()))
    return out


def test_the_dashboard_of_a_simulations_dataset_shows_its_curve(simulation, tmp_path):
    assert simulation_beside(simulation / "world") == (simulation / SUMMARY_FILE).resolve()
    result = write_dashboard(
        simulation / "world", tmp_path / "d.html", tracking_uri=f"sqlite:///{tmp_path}/r.db"
    )
    assert result.simulation == str((simulation / SUMMARY_FILE).resolve())
    page = result.path.read_text()
    assert 'href="#simulation"' in page and '<section id="simulation">' in page
    assert parse(page).points["simulation-value"]["learned"] == [("1", 1.0), ("2", 1.5), ("3", 1.8)]


def test_a_dataset_that_is_not_a_simulations_has_no_such_section(simulation, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(simulation / "world", plain / "world")
    (plain / SUMMARY_FILE).write_text(
        json.dumps(summary())
    )  # a summary, but no marker: not a simulation's folder
    assert simulation_beside(plain / "world") is None
    page = render_dashboard(plain / "world")
    assert 'id="simulation"' not in page and 'href="#simulation"' not in page


def test_a_named_summary_is_drawn_and_a_bad_one_refused(simulation, tmp_path, capsys):
    named = tmp_path / "elsewhere.json"
    named.write_text(json.dumps(summary()))
    page = render_dashboard(simulation / "world", simulation=named)
    assert parse(page).cards["dr-within"] == "1 of 2"
    with pytest.raises(DashboardError, match="no simulation summary at"):
        render_dashboard(simulation / "world", simulation=tmp_path / "missing.json")
    # The command line: --simulation, and a clear error (exit 2, no traceback) for a missing file.
    out = tmp_path / "cli.html"
    code = main(
        ["dashboard", "--data", str(simulation / "world"), "--out", str(out), "--simulation", str(named)]
    )
    assert code == 0 and '<section id="simulation">' in out.read_text()
    capsys.readouterr()
    code = main(["dashboard", "--data", str(simulation / "world"), "--simulation", str(tmp_path / "no.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no simulation summary at" in err and "Traceback" not in err
