"""The dashboard's "The loop, simulated" section, from the summary ``nextbest simulate`` writes.

``nextbest simulate`` writes ``OUT/simulation.json`` (:class:`serving.simulate_report.SimulationReport`'s
``to_dict``) beside the service's dataset ``OUT/world``. The dashboard of that dataset finds it there
(:func:`simulation_beside`), or takes one named with ``nextbest dashboard --simulation FILE``, and draws the
per-day curve: the true value per decision of the learned, greedy, random and oracle policies, the learned
policy's share of the oracle's with the nights a model was promoted marked, the per-day table and the offline
estimates beside their truth.

Pure functions of the summary (:func:`simulation_days`, :func:`simulation_view`) and one reader that checks its
shape (:func:`read_simulation`), so a hand-edited or truncated file is a clear error, never a broken page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from nextbest.features.errors import NextbestError
from nextbest.serving import dashboard_view as view
from nextbest.serving.simulate_eval import POLICIES, value_ratio
from nextbest.serving.simulate_report import LAST_WEEK, MARKER, SUMMARY_FILE

# How each policy is drawn: colour and dash pattern ("" solid), in legend order.
STYLES: dict[str, tuple[str, str]] = {
    "oracle": ("#1d2330", ""),
    "learned": (view.ACCENT, ""),
    "greedy": (view.ACCENT, "4 3"),
    "random": ("#8a94a6", "6 4"),
}
DR_TOLERANCE = 0.10
"""How close a doubly robust estimate must come to the truth to count as "within" on the card (±10 %)."""


class SimulationSummaryError(NextbestError, ValueError):
    """A simulation summary that cannot be read: missing, not JSON, or without the per-day figures."""


def _ratio_text(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


def read_simulation(path: str | Path) -> dict[str, Any]:
    """The summary at ``path`` (the ``simulation.json`` file, or the simulation's folder holding it).

    Raises:
        SimulationSummaryError: no such file, not JSON, not a simulation's summary, or a day without its figures
            (the message names the file, the day and the field).
    """
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    if not p.is_file():
        raise SimulationSummaryError(
            f"no simulation summary at {p} (nextbest simulate writes OUT/{SUMMARY_FILE})"
        )
    try:
        summary = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SimulationSummaryError(f"{p} is not a simulation summary: not JSON ({e})") from None
    if not isinstance(summary, dict) or summary.get("command") != "simulate":
        raise SimulationSummaryError(f'{p} is not a simulation summary: no "command": "simulate"')
    days = summary.get("days")
    if not isinstance(days, list) or not days:
        raise SimulationSummaryError(f'{p}: "days" must be a non-empty list of the simulated days')
    for row, day in enumerate(days, start=1):
        if not isinstance(day, dict):
            raise SimulationSummaryError(f"{p}: days[{row}] is not an object")
        for key in ("day", "decisions"):
            if not isinstance(day.get(key), int | float):
                raise SimulationSummaryError(f'{p}: days[{row}] has no number "{key}" (got {day.get(key)!r})')
        for policy in POLICIES:
            value = (day.get(policy) or {}).get("value_per_decision")
            if not isinstance(value, int | float):
                raise SimulationSummaryError(
                    f'{p}: day {day["day"]} has no number "{policy}.value_per_decision" (got {value!r})'
                )
    if not isinstance(summary.get("ope", []), list):
        raise SimulationSummaryError(f'{p}: "ope" must be a list of estimates')
    return summary


def simulation_beside(root: str | Path) -> Path | None:
    """The summary of the simulation whose service dataset is ``root`` (``OUT/world`` beside
    ``OUT/simulation.json`` in a folder ``nextbest simulate`` made), or None."""
    folder = Path(root).resolve().parent
    found = folder / SUMMARY_FILE
    if not (found.is_file() and (folder / MARKER).exists()):
        return None
    try:
        read_simulation(found)
    except SimulationSummaryError:
        return None
    return found


def simulation_days(summary: Mapping[str, Any]) -> pl.DataFrame:
    """One row per simulated day: the decisions, each policy's true value per decision (``learned``,
    ``greedy``, ``random``, ``oracle``), the learned and greedy policies' shares of the oracle's, the learned
    policy's realised acceptance and the oracle's expected one, the models that served and what was promoted
    that night."""
    rows = []
    for d in summary["days"]:
        models = d.get("models") or {}
        rows.append(
            {
                "day": int(d["day"]),
                "date": d.get("date"),
                "decisions": int(d["decisions"]),
                **{p: float(d[p]["value_per_decision"]) for p in POLICIES},
                "learned_share": value_ratio([d], "learned", "oracle"),
                "greedy_share": value_ratio([d], "greedy", "oracle"),
                "random_share": value_ratio([d], "random", "oracle"),
                "learned_acceptance": d["learned"].get("realised_acceptance", d["learned"].get("acceptance")),
                "oracle_acceptance": d["oracle"].get("acceptance"),
                "models": ", ".join(str(v) for v in models.values()) or None,
                "promoted": ", ".join(d.get("promoted") or []) or None,
            }
        )
    schema = {
        "day": pl.Int64,
        "date": pl.String,
        "decisions": pl.Int64,
        **dict.fromkeys(POLICIES, pl.Float64),
        **dict.fromkeys(("learned_share", "greedy_share", "random_share"), pl.Float64),
        **dict.fromkeys(("learned_acceptance", "oracle_acceptance"), pl.Float64),
        "models": pl.String,
        "promoted": pl.String,
    }
    return pl.DataFrame(rows, schema=schema, orient="row").sort("day")


def dr_within(summary: Mapping[str, Any], tolerance: float = DR_TOLERANCE) -> tuple[int, int]:
    """How many candidates' doubly robust estimates lie within ``tolerance`` of their truth with the interval
    covering it, of how many candidates have one."""
    rows = [r for r in summary.get("ope") or [] if r.get("estimator") == "dr"]
    good = 0
    for r in rows:
        truth, estimate = r.get("truth"), r.get("estimate")
        if truth and estimate is not None and abs(estimate - truth) <= tolerance * abs(truth):
            good += bool(r.get("low") is not None and r["low"] <= truth <= r["high"])
    return good, len(rows)


DAYS_TABLE = (
    view.Column("day", "day", view.format_int, numeric=True),
    view.Column("date", "date"),
    view.Column("decisions", "decisions", view.format_int, numeric=True),
    view.Column("learned", "learned", view.format_money, numeric=True),
    view.Column("greedy", "greedy", view.format_money, numeric=True),
    view.Column("random", "random", view.format_money, numeric=True),
    view.Column("oracle", "oracle", view.format_money, numeric=True),
    view.Column("learned / oracle", "learned_share", _ratio_text, numeric=True),
    view.Column("learned acceptance", "learned_acceptance", view.format_pct, numeric=True),
    view.Column("oracle acceptance", "oracle_acceptance", view.format_pct, numeric=True),
    view.Column("models serving", "models"),
    view.Column("promoted that night", "promoted"),
)
OPE_TABLE = (
    view.Column("candidate", "candidate"),
    view.Column("estimator", "estimator"),
    view.Column("estimate", "estimate", view.format_money, numeric=True),
    view.Column("95 % interval", "interval"),
    view.Column("truth", "truth", view.format_money, numeric=True),
    view.Column("error", "error", view.format_pct, numeric=True),
    view.Column("covered", "covered", view.format_num),
    view.Column("decisions", "decisions", view.format_int, numeric=True),
    view.Column("support", "support", view.format_int, numeric=True),
)


def simulation_view(summary: Mapping[str, Any], source: str) -> view.Simulation:
    """The section of a summary read by :func:`read_simulation` (``source``: where it was read)."""
    days = simulation_days(summary)
    config = summary.get("config") or {}
    x = days["day"].to_list()
    last = summary["days"][-LAST_WEEK:]
    learned_oracle = summary.get("learned_vs_oracle_last_week", value_ratio(last, "learned", "oracle"))
    learned_random = summary.get("learned_vs_random_last_week", value_ratio(last, "learned", "random"))
    good, candidates = dr_within(summary)
    cards = [
        view.Card(
            "learned-vs-oracle",
            f"learned / oracle, last {min(LAST_WEEK, len(x))} days",
            _ratio_text(learned_oracle),
        ),
        view.Card(
            "learned-vs-random",
            f"learned / random, last {min(LAST_WEEK, len(x))} days",
            _ratio_text(learned_random),
        ),
        view.Card("first-day", "learned / oracle, day 1", _ratio_text(days["learned_share"][0])),
        view.Card(
            "promotions", "nights a model was promoted", view.format_int(days["promoted"].is_not_null().sum())
        ),
    ]
    if candidates:
        cards.append(
            view.Card("dr-within", f"DR within ±{DR_TOLERANCE:.0%} and covered", f"{good} of {candidates}")
        )
    marks = [
        (day + 0.5, f"after day {day}: promoted {what}")
        for day, what in days.select("day", "promoted").iter_rows()
        if what
    ]
    value_chart = view.line_chart_view(
        "simulation-value",
        x,
        [(p, days[p].to_list(), *STYLES[p]) for p in STYLES],
        title="True expected value per decision, per day",
        x_label="day",
        marks=marks,
    )
    shares = [("learned", "learned_share"), ("greedy", "greedy_share"), ("random", "random_share")]
    share_chart = view.line_chart_view(
        "simulation-share",
        x,
        [(p, days[col].to_list(), *STYLES[p]) for p, col in shares],
        title="Share of the oracle's value per decision, per day",
        value_format=_ratio_text,
        x_label="day",
        marks=marks,
    )
    ope = []
    for r in summary.get("ope") or []:
        low, high = r.get("low"), r.get("high")
        interval = (
            "–" if low is None or high is None else f"{view.format_money(low)} – {view.format_money(high)}"
        )
        ope.append({**r, "interval": interval})
    text = (
        f"{len(x)} simulated days of {view.format_int(config.get('customers'))} customers (seed "
        f"{config.get('seed', '?')}, ε = {config.get('epsilon', '?')})."
        if config
        else f"{len(x)} simulated days."
    )
    return view.Simulation(
        source=source,
        text=text,
        cards=cards,
        panels=[
            view.Panel("Value per decision (true, from the planted propensities)", value_chart),
            view.Panel("Share of the oracle's value (green lines: a model promoted that night)", share_chart),
        ],
        days=view.table("simulation-days", DAYS_TABLE, days.to_dicts()),
        ope=view.table("simulation-ope", OPE_TABLE, ope) if ope else None,
    )
