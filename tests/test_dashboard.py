"""The customer dashboard: its numbers against the profiles, the known-answer tables it is made of, and the page
loaded in a real headless Chromium (no console errors; charts, tables and sorting present)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from nextbest.features.dataset import Dataset
from nextbest.features.generate import WorldConfig, generate_world
from nextbest.features.interactions import Interactions
from nextbest.features.pipeline import PROFILES_FILE, build_features
from nextbest.features.schema import Vocabulary
from nextbest.serving.contact import ContactLedger
from nextbest.serving.dashboard import (
    NO_PREFERENCE,
    DashboardError,
    bar_chart,
    churn_risk_list,
    html_table,
    load_champion_recommender,
    popular_by_segment,
    preference_attributes,
    preference_distribution,
    recommended_by_segment,
    render_dashboard,
    segment_counts,
    write_dashboard,
)
from nextbest.serving.dashboard_data import (
    acceptance_by_action,
    acceptance_by_arm,
    acceptance_scale,
    acceptance_table,
    identity_counts,
    overview_numbers,
    with_item_details,
)
from nextbest.serving.dashboard_view import Recommendations, bar_chart_view, render_macro
from nextbest.serving.decision_log import CandidateRecord, DecisionLog, DecisionRecord
from nextbest.serving.policy import load_policy
from nextbest.serving.state_store import StateStore, default_state_url

T0 = datetime(2026, 6, 1, 10, 0)
BASH = shutil.which("bash")


# --- a small world and a hand-made decision log ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    ds = Dataset.at(tmp_path_factory.mktemp("dash") / "world")
    generate_world(WorldConfig(customers=150, days=60, seed=7), ds)
    build_features(ds)
    return ds


@pytest.fixture(scope="module")
def profiles(world) -> pl.DataFrame:
    return pl.read_parquet(world.features_dir / PROFILES_FILE)


def _decision(did: str, customer: str, arm: str, chosen: str, kind: str, at: datetime) -> DecisionRecord:
    return DecisionRecord(
        decision_id=did,
        timestamp=at,
        customer_id=customer,
        arm=arm,
        policy_version="test",
        personalised=True,
        candidates=[
            CandidateRecord(action_id=chosen, propensity=0.2, value=10, lever=1, score=2, offered=True)
        ],
        chosen=chosen,
        chosen_kind=kind,
        latency_ms=1.0,
    )


@pytest.fixture
def decision_log(tmp_path) -> StateStore:
    """Champion: two discount_apex offers (one accepted in time, one accepted too late) and one no-action.
    Challenger: two newsletter offers, both accepted. A rejected response never counts."""
    store = StateStore(default_state_url(tmp_path / "service"))
    log = DecisionLog(store)
    log.append(_decision("d1", "C0000001", "champion", "discount_apex", "discount", T0))
    log.append(_decision("d2", "C0000002", "champion", "discount_apex", "discount", T0))
    log.append(_decision("d3", "C0000003", "champion", "no_action", "none", T0))
    log.append(_decision("d4", "C0000004", "challenger", "newsletter", "newsletter", T0))
    log.append(_decision("d5", "C0000005", "challenger", "newsletter", "newsletter", T0))
    ledger = ContactLedger(store, load_policy())
    ledger.record_response("C0000001", "discount_apex", True, T0 + timedelta(days=1))
    ledger.record_response("C0000002", "discount_apex", True, T0 + timedelta(days=30))
    ledger.record_response("C0000004", "newsletter", True, T0 + timedelta(hours=2))
    ledger.record_response("C0000005", "newsletter", True, T0 + timedelta(days=6))
    ledger.record_response("C0000003", "no_action", False, T0 + timedelta(days=1))
    return store


# --- reading the page back ---------------------------------------------------------------------------------------


class PageReader(HTMLParser):
    """Tables (by ``data-table``: rows of cell texts) and charts (by ``data-chart``: (label, value) bars)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.charts: dict[str, list[tuple[str, float]]] = {}
        self.ids: set[str] = set()
        self.attrs_seen: list[tuple[str, dict[str, str]]] = []
        self._table: str | None = None
        self._chart: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.attrs_seen.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table" and "data-table" in a:
            self._table = a["data-table"]
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "svg" and "data-chart" in a:
            self._chart = a["data-chart"]
            self.charts[self._chart] = []
        elif tag == "rect" and self._chart and "data-value" in a:
            self.charts[self._chart].append((a["data-label"], float(a["data-value"])))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None
        elif tag == "svg":
            self._chart = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_page(page: str) -> PageReader:
    reader = PageReader()
    reader.feed(page)
    return reader


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


# --- the pieces, with known answers -----------------------------------------------------------------------------


def test_segment_counts_and_preferences_known_answer():
    p = pl.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d", "e"],
            "journey_phase": ["use", "need", "use", "purchase", None],
            "preferred_colour": ["red", "blue", "red", None, "red"],
            "preferred_colour_share": [0.5, 1.0, 0.7, None, 0.9],
            "preferred_sport": ["golf", None, None, None, None],
            "preferred_colour_x": ["q"] * 5,
        }
    )
    counts = segment_counts(p, "journey_phase")
    # Natural order of journey phases; null → unknown, last.
    assert counts["value"].to_list() == ["need", "purchase", "use", "unknown"]
    assert counts["customers"].to_list() == [1, 1, 2, 1]
    assert counts["share"].to_list() == pytest.approx([0.2, 0.2, 0.4, 0.2])

    assert preference_attributes(p) == ["colour", "sport", "colour_x"]
    dist = preference_distribution(p, "colour")
    assert dist["value"].to_list() == ["red", "blue", NO_PREFERENCE]
    assert dist["customers"].to_list() == [3, 1, 1]
    assert dist["mean_strength"].to_list()[:2] == pytest.approx([0.7, 1.0])


def test_churn_list_is_the_flagged_customers_most_valuable_first():
    p = pl.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d"],
            "churn_risk_flag": [True, False, True, True],
            "monetary": [10.0, 500.0, 90.0, 90.0],
            "churn_risk": [3.0, 1.0, 2.5, 4.0],
        }
    )
    listed = churn_risk_list(p, limit=2)
    # d and c spend the same; d's risk is higher.
    assert listed["customer_id"].to_list() == ["d", "c"]
    assert churn_risk_list(p, limit=None).height == 3


def test_popular_by_segment_known_answer():
    # Customers u0, u1 (segment x) and u2 (segment y); items i0..i2. Weights > 0 count once per customer.
    matrix = sp.csr_matrix(
        np.array([[1, 0, 5], [2, 0, 1], [0, 3, 0]], dtype=np.float32),
    )
    inter = Interactions(matrix, Vocabulary(("u0", "u1", "u2")), Vocabulary(("i0", "i1", "i2")))
    prof = pl.DataFrame({"customer_id": ["u0", "u1", "u2"], "seg": ["x", "x", "y"]})
    top = popular_by_segment(inter, prof, "seg", n=2, min_customers=1)
    x = top.filter(pl.col("segment_value") == "x")
    # i0 and i2 both have two customers in x: the tie goes to the smaller id.
    assert x["item_id"].to_list() == ["i0", "i2"]
    assert x["customers"].to_list() == [2, 2]
    y = top.filter(pl.col("segment_value") == "y")
    # Only i1 has an interaction in y: items nobody touched are not listed.
    assert y["item_id"].to_list() == ["i1"]
    assert y["segment_customers"].to_list() == [1]
    assert not top["fallback"].any()

    # The service's minimum (features.popularity): y (one customer) is too small and shows everyone's
    # popularity (i0: 2, i2: 2, i1: 1), as the service answers its customers; x (two) keeps its own.
    top = popular_by_segment(inter, prof, "seg", n=2, min_customers=2)
    assert top.rows() == [
        ("x", 1, "i0", 2, 2, False),
        ("x", 2, "i2", 2, 2, False),
        ("y", 1, "i0", 2, 1, True),
        ("y", 2, "i2", 2, 1, True),
    ]
    # A customer without a segment is in none (no "unknown" segment), as in the service.
    top = popular_by_segment(
        inter, prof.with_columns(seg=pl.Series(["x", "x", None])), "seg", min_customers=1
    )
    assert top["segment_value"].unique().to_list() == ["x"]


class FixedLists:
    """A recommender stand-in whose lists are known: x-customers get [A, B], y-customers [B, C]."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def recommend(self, customer_ids: list[str], n: int = 10) -> pl.DataFrame:
        self.asked.append(list(customer_ids))
        rows = []
        for c in customer_ids:
            for rank, item in enumerate(["A", "B"] if c.startswith("x") else ["B", "C"], start=1):
                rows.append({"customer_id": c, "rank": rank, "item_id": item, "score": 1.0 / rank})
        return pl.DataFrame(
            rows,
            schema={"customer_id": pl.String, "rank": pl.Int64, "item_id": pl.String, "score": pl.Float64},
        )


def test_recommended_by_segment_counts_lists_and_samples():
    prof = pl.DataFrame(
        {"customer_id": ["x1", "x2", "x3", "y1", "y2"], "seg": ["s1", "s1", "s1", "s2", "s2"]}
    )
    model = FixedLists()
    top = recommended_by_segment(model, prof, "seg", n=2, sample=2)
    s1 = top.filter(pl.col("segment_value") == "s1")
    assert s1["item_id"].to_list() == ["A", "B"]  # same count; A has the better mean rank
    assert s1["customers"].to_list() == [2, 2]  # two lists sampled out of three customers
    assert s1["lists"].to_list() == [2, 2]
    s2 = top.filter(pl.col("segment_value") == "s2")
    assert s2["item_id"].to_list() == ["B", "C"]
    assert [len(a) for a in model.asked] == [2, 2]


def test_overview_numbers_and_identity_counts_known_answer():
    p = pl.DataFrame({"customer_id": ["a", "b", "c", "d"], "churn_risk_flag": [True, None, False, True]})
    n = overview_numbers(p, {"raw_events": 120, "interaction_items": 9}, pl.DataFrame({"item_id": ["x"]}))
    assert (n.customers, n.events, n.items, n.at_risk) == (4, 120, 1, 2)
    assert n.at_risk_share == 0.5
    # No items table: the matrix's item count.
    assert overview_numbers(p, {"interaction_items": 9}, pl.DataFrame()).items == 9
    ids = pl.DataFrame(
        {
            "source_system": ["web", "crm", "web", "web", "crm"],
            "source_id": ["w1", "c1", "w2", "w3", "c2"],
            "customer_id": ["a", "a", "a", "b", None],  # an unresolved id does not count
        }
    )
    assert identity_counts(ids, unlinked=7).rows() == [
        ("crm", 1, 1),
        ("web", 3, 2),
        ("unlinked ids in events", 7, None),
    ]
    assert identity_counts(pl.DataFrame()).is_empty()


def test_acceptance_table_and_series_known_answer():
    summary = pl.DataFrame(
        {
            "arm": ["challenger", "challenger", "champion", "champion", "champion"],
            "action_id": ["newsletter", "(all actions)", "apex", None, "(all actions)"],
            "decisions": [2, 2, 2, 1, 3],
            "offers": [2, 2, 2, 0, 2],
            "accepted": [1, 1, 2, 0, 2],
            "acceptance_rate": [0.5, 0.5, 1.0, None, 1.0],
        }
    )
    catalog = pl.DataFrame({"action_id": ["apex", "newsletter"], "description": ["Apex discount", None]})
    table = acceptance_table(summary, catalog)
    assert table["action_id"].to_list() == [
        "newsletter",
        "(all actions)",
        "apex",
        "(nothing chosen)",
        "(all actions)",
    ]
    assert table["description"].to_list() == ["", "", "Apex discount", "", ""]
    assert acceptance_by_arm(table) == [("challenger", 0.5), ("champion", 1.0)]
    # Only actions that were offered: "nothing chosen" made no offer.
    assert acceptance_by_action(table, "champion") == [("apex", 1.0)]
    assert acceptance_scale(table) == 1.0
    assert acceptance_scale(table.with_columns(acceptance_rate=pl.lit(None, pl.Float64))) == 1.0
    assert acceptance_scale(table.with_columns(acceptance_rate=pl.lit(0.25))) == 0.25
    assert acceptance_table(summary, pl.DataFrame())["description"].to_list() == [""] * 5


def test_item_details_join_beside_the_table():
    top = pl.DataFrame({"rank": [1, 2], "item_id": ["i2", "i9"]})
    items = pl.DataFrame({"item_id": ["i2"], "name": ["Red shoe"], "price": [9.5], "stock": [3]})
    assert with_item_details(top, items).rows() == [(1, "i2", "Red shoe", 9.5), (2, "i9", None, None)]
    assert with_item_details(top, pl.DataFrame({"item_id": ["i2"]})).equals(top)


def test_bar_geometry_known_answer():
    chart = bar_chart_view("c", [("a", 2.0), ("b" * 30, 1.0), ("tiny", 0.001), ("none", 0.0)], title="t")
    # Bars scale to the largest value over the drawable width (320 - 4); a value above 0 stays visible.
    assert [b.length for b in chart.bars] == [316.0, 158.0, 1.0, 0.0]
    assert [b.y for b in chart.bars] == [6, 28, 50, 72]
    assert chart.bars[1].short_label == "b" * 21 + "…" and chart.bars[1].label == "b" * 30
    assert (chart.width, chart.height) == (550, 6 * 2 + 22 * 4)
    # A fixed full-width value (one scale across charts), and colours per bar.
    shared = bar_chart_view("c", [("a", 0.5)], title="t", max_value=1.0, colours=["red"])
    assert shared.bars[0].length == 158.0 and shared.bars[0].fill == "red"


def test_sections_escape_text_too():
    section = render_macro(
        "sections.html.j2",
        "recommendations",
        Recommendations(segment="<seg>", problem="The profiles have no column <seg>."),
    )
    assert "<seg>" not in section and "no column &lt;seg&gt;." in section


def test_table_and_chart_escape_text():
    table = html_table("t", [], [])
    assert 'data-table="t"' in table
    from nextbest.serving.dashboard import Column

    page = html_table("t", [Column("v", "v")], [{"v": "<script>alert(1)</script>"}])
    assert "<script>" not in page and "&lt;script&gt;" in page
    chart = bar_chart("c", [("<b>", 2.0), ("ok", 0.0)], title="x & y")
    assert "<b>" not in chart and "x &amp; y" in chart
    bars = read_page(chart).charts["c"]
    assert bars == [("<b>", 2.0), ("ok", 0.0)]


# --- the whole page ----------------------------------------------------------------------------------------------


def test_page_numbers_match_the_profiles(world, profiles, decision_log):
    page = render_dashboard(world, decision_log=decision_log)
    doc = read_page(page)
    assert {"overview", "segments", "preferences", "churn", "recommendations", "decisions"} <= doc.ids

    # Customers by segment: table and chart both hold the profile counts.
    for column in ("journey_phase", "age_band", "region", "value_tier", "lifecycle"):
        expected = dict(profiles.group_by(column).len().iter_rows())
        rows = doc.tables[f"segment-{column}"]
        assert {r[0]: as_int(r[1]) for r in rows} == expected
        assert dict(doc.charts[f"segment-{column}"]) == pytest.approx(
            {k: float(v) for k, v in expected.items()}
        )
        assert sum(as_int(r[1]) for r in rows) == profiles.height
    phases = [r[0] for r in doc.tables["segment-journey_phase"]]
    assert phases == [p for p in ("need", "orientation", "purchase", "use", "evaluation") if p in phases]

    # Preferences: every preferred attribute, colour, sport and brand first, counts as in the profiles.
    charts = [name for name in doc.charts if name.startswith("preferred-")]
    assert charts[:3] == ["preferred-colour", "preferred-sport", "preferred-brand"]
    for attribute in ("colour", "sport", "brand"):
        expected = dict(
            profiles.group_by(pl.col(f"preferred_{attribute}").fill_null(NO_PREFERENCE)).len().iter_rows()
        )
        assert {r[0]: as_int(r[1]) for r in doc.tables[f"preferred-{attribute}"]} == expected

    # Churn: the count of flagged customers and the 25 most valuable of them, in order.
    flagged = profiles.filter(pl.col("churn_risk_flag"))
    assert f'<b data-count="churn">{flagged.height:,}</b>' in page
    listed = [r[0] for r in doc.tables["churn"]]
    expected_ids = flagged.sort(
        ["monetary", "churn_risk", "customer_id"], descending=[True, True, False], nulls_last=True
    )
    assert listed == expected_ids["customer_id"].head(25).to_list()

    # Recommendations: the popularity fallback (no recommender given), one table per age band.
    assert 'data-source="popularity"' in page
    bands = profiles["age_band"].unique().to_list()
    rec_tables = [t for t in doc.tables if t.startswith("recommendations-")]
    assert sorted(rec_tables) == sorted(f"recommendations-{b}" for b in bands)
    assert all(1 <= len(doc.tables[t]) <= 5 for t in rec_tables)

    # Acceptance, by the hand-made log: champion 1 of 2 discount offers; challenger 2 of 2 newsletters.
    acceptance = {(r[0], r[1]): r for r in doc.tables["acceptance"]}
    apex = acceptance[("champion", "discount_apex")]
    assert [as_int(x) for x in apex[3:6]] == [2, 2, 1] and apex[6] == "50.0%"
    total = acceptance[("champion", "(all actions)")]
    assert [as_int(x) for x in total[3:6]] == [3, 2, 1]
    assert acceptance[("challenger", "newsletter")][6] == "100.0%"
    assert dict(doc.charts["acceptance-by-arm"]) == pytest.approx({"challenger": 1.0, "champion": 0.5})
    assert dict(doc.charts["acceptance-champion"]) == pytest.approx({"discount_apex": 0.5})

    # Self-contained: nothing loaded from anywhere.
    for tag, attrs in doc.attrs_seen:
        assert not (tag == "script" and "src" in attrs)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
        assert not (tag == "img" and not attrs.get("src", "").startswith("data:"))
    assert "https://" not in page
    assert page.count("http://") == page.count('xmlns="http://www.w3.org/2000/svg"')


def test_page_without_a_decision_log_says_so(world):
    page = render_dashboard(world, decision_log=None)
    assert 'data-empty="decisions"' in page
    assert "acceptance" not in read_page(page).tables


def test_write_dashboard_falls_back_without_a_registry(world, tmp_path):
    missing = tmp_path / "nothing" / "mlflow.db"
    assert load_champion_recommender(f"sqlite:///{missing}") is None
    assert not missing.parent.exists()  # looking did not create a registry
    result = write_dashboard(world, tmp_path / "out" / "d.html", tracking_uri=f"sqlite:///{missing}")
    assert result.path.exists() and result.recommendations == "popularity"
    assert result.decision_log is None
    assert any("no champion recommender" in n for n in result.notes)
    assert json.loads(json.dumps(result.to_dict()))["customers"] == result.customers


def test_unbuilt_dataset_is_a_clear_error(tmp_path):
    ds = Dataset.at(tmp_path / "raw-only").ensure()
    with pytest.raises(DashboardError, match="nextbest features build"):
        render_dashboard(ds)


@pytest.mark.slow
def test_dashboard_uses_the_registered_champion(world, tmp_path):
    from nextbest.training.cf import train_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.tracking import TrackingConfig

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    tracking = TrackingConfig(tracking_uri=uri)
    train_cf(world, "popularity", tracking=tracking, evaluate_test=False)
    assert promote_recommender(tracking, data=world.root).promoted
    result = write_dashboard(world, tmp_path / "d.html", tracking_uri=uri)
    assert result.recommendations == "model"
    assert result.recommender is not None and "champion" in result.recommender
    page = result.path.read_text()
    assert 'data-source="model"' in page and "lists sampled" in page


# --- in a real browser -------------------------------------------------------------------------------------------


def chromium_path() -> str | None:
    """The Chromium binary (``NEXTBEST_CHROMIUM`` overrides), or None."""
    env = os.environ.get("NEXTBEST_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
    ending in a NUL byte on fds 3 and 4), with nothing but the standard library."""

    def __init__(self, binary: str, profile_dir: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # The browser reads fd 3 and writes fd 4. bash moves the pipe ends there: they are first moved to
        # numbers above 50, so that placing one cannot clobber the other (dash takes only one-digit fds).
        r = self._high(to_browser_r)
        w = self._high(from_browser_w)
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            [BASH, "-c", f'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', "bash", *args],
            pass_fds=(r, w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for fd in (r, w):
            os.close(fd)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = from_browser_r
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl

        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 50)
        os.close(fd)
        return moved

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._in, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                else:
                    self._events.put(message)

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        self._next_id += 1
        mid = self._next_id
        message: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no answer to {method} from Chromium")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def events(self, until: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        """Events received so far; with ``until``, waits for that event first."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait = 0 if until is None else max(0.0, deadline - time.monotonic())
                event = self._events.get(timeout=wait) if wait else self._events.get_nowait()
            except queue.Empty:
                if until is not None:
                    raise TimeoutError(f"Chromium sent no {until}") from None
                return out
            out.append(event)
            if until is not None and event.get("method") == until:
                until = None

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self._out.close()
        self._reader.join(timeout=5)  # the browser is gone: its end of the pipe is closed, the reader stops
        os.close(self._in)


def console_problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and error log entries (failed loads included) among CDP events."""
    problems = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            problems.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            problems.append("log: " + params["entry"].get("text", ""))
    return problems


PAGE_FACTS = """
(() => {
  const charts = Array.from(document.querySelectorAll("svg.chart"));
  const bars = Array.from(document.querySelectorAll("svg.chart rect.bar"));
  const tables = Array.from(document.querySelectorAll("table.data"));
  const th = document.querySelector('table[data-table="segment-journey_phase"] thead th:nth-child(2)');
  th.click();
  const sorted = Array.from(document.querySelectorAll('table[data-table="segment-journey_phase"] tbody tr'))
    .map(r => parseFloat(r.cells[1].getAttribute("data-sort")));
  return JSON.stringify({
    ready: document.documentElement.getAttribute("data-ready"),
    charts: charts.length,
    visibleCharts: charts.filter(c => c.getBoundingClientRect().width > 100 && c.getBoundingClientRect().height > 10).length,
    bars: bars.length,
    drawnBars: bars.filter(b => b.getBoundingClientRect().width > 0).length,
    positiveBars: bars.filter(b => parseFloat(b.getAttribute("data-value")) > 0).length,
    tables: tables.length,
    tableRows: tables.map(t => t.tBodies[0].rows.length),
    sections: Array.from(document.querySelectorAll("section")).map(s => s.id),
    sortedAscending: sorted,
    ariaSort: th.getAttribute("aria-sort"),
  });
})()
"""


@pytest.mark.slow  # a browser process
def test_dashboard_in_headless_chromium(world, decision_log, tmp_path):
    binary = chromium_path()
    if binary is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install -y chromium, or run .ci/install-browser)"
        )
    page = render_dashboard(world, decision_log=decision_log)
    html_path = tmp_path / "dashboard.html"
    html_path.write_text(page, encoding="utf-8")
    expected = read_page(page)

    browser = Chromium(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": html_path.as_uri()}, session=session)
        events = browser.events(until="Page.loadEventFired")
        facts = json.loads(
            browser.send(
                "Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session=session
            )["result"]["value"]
        )
        events += browser.events()
    finally:
        browser.close()

    assert console_problems(events) == []
    assert facts["ready"] == "true"  # the inline script ran to its end
    assert facts["sections"] == [
        "overview",
        "segments",
        "preferences",
        "churn",
        "recommendations",
        "decisions",
    ]
    assert facts["charts"] == len(expected.charts) >= 12
    assert facts["visibleCharts"] == facts["charts"]
    assert facts["drawnBars"] == facts["positiveBars"] > 0
    assert facts["bars"] == sum(len(b) for b in expected.charts.values())
    assert facts["tables"] == len(expected.tables)
    assert facts["tableRows"] == [len(rows) for rows in expected.tables.values()]
    # Clicking a numeric header sorted the table ascending.
    assert facts["ariaSort"] == "ascending"
    assert facts["sortedAscending"] == sorted(facts["sortedAscending"])
