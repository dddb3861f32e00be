"""The customer dashboard: one self-contained HTML page of a dataset's customers, recommendations and decisions.

The page needs no network and no server: charts are inline SVG, tables are plain HTML, and a few lines of inline
JavaScript make the tables sortable. It is made in three layers: the numbers, computed by the pure functions of
:mod:`serving.dashboard_data`; their typed views (:mod:`serving.dashboard_view`); and the Jinja2 templates in
``serving/templates/`` that draw them, autoescaped. This module loads what the page shows (the dataset's
features, the registered champion, the service's decision log and contact ledger), builds the views and writes
the file. Sections:

* **Overview** — profiled customers, events, items, customers at churn risk; the single customer view (ids linked
  per source system, unlinked ids).
* **Segments and journey phases** — customers per journey phase, age band, region, value tier and lifecycle.
* **Preferences** — the distribution of every ``preferred_<attribute>`` (colour, sport, brand first).
* **Churn risk** — the customers whose ``churn_risk_flag`` is set, most valuable first.
* **Top recommendations per segment** — from the registered champion recommender when one is given: the items
  that appear most often in the top-10 lists of a sample of each segment's customers. Without one (or when the
  champion was trained on another dataset), the fallback is popularity within the segment, by the service's own
  rule (:func:`features.popularity.segment_popularity`: small segments show the popularity among everyone).
* **Next best actions** — when a decision log exists: acceptance by chosen action and by champion/challenger arm
  (:func:`serving.decision_log.summarise_decisions`, responses read from the service's contact ledger by
  :func:`serving.contact.offer_responses`), and beside it the offline policy evaluation of the current policy
  and candidates (:mod:`serving.policy_eval`).
* **The loop, simulated** — when the dataset is a simulation's (``nextbest simulate``) or a summary is named:
  the per-day curve of the learned, greedy, random and oracle policies, the nights a model was promoted and the
  offline estimates beside their truth (:mod:`serving.dashboard_simulation`).

:func:`render_dashboard` is pure (dataset and models in, HTML text out); :func:`write_dashboard` finds the
champion and the service's decision log, renders and writes the file (``nextbest dashboard --data DIR``).

Why it is a little longer than the project's ~600 lines: it is the one place that knows which source feeds which
section and what the page says when a source is missing; the arithmetic, the views and the markup are already in
the three modules above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.interactions import Interactions
from nextbest.features.pipeline import PROFILES_FILE, UNLINKED_FILE
from nextbest.features.popularity import MIN_SEGMENT_CUSTOMERS
from nextbest.features.schema import ITEM_ID, PRICE, SOURCE_SYSTEM
from nextbest.serving import dashboard_view as view
from nextbest.serving.arms import CHAMPION
from nextbest.serving.contact import ledger_beside, offer_responses
from nextbest.serving.dashboard_data import (
    ITEM_COLUMNS,
    NO_PREFERENCE,
    RECOMMENDATION_LIST_LENGTH,
    acceptance_by_action,
    acceptance_by_arm,
    acceptance_scale,
    acceptance_table,
    churn_risk_list,
    identity_counts,
    ordered_values,
    overview_numbers,
    popular_by_segment,
    preference_attributes,
    preference_distribution,
    recommended_by_segment,
    segment_counts,
    with_item_details,
)
from nextbest.serving.dashboard_simulation import (
    SimulationSummaryError,
    read_simulation,
    simulation_beside,
    simulation_view,
)
from nextbest.serving.dashboard_view import Column, bar_chart, html_table
from nextbest.serving.state_store import StateStore, redact
from nextbest.training.registry import ChampionRecommender, load_champion_recommender

if TYPE_CHECKING:
    from nextbest.training.recommender_bundle import RecommenderBundle

__all__ = [  # what callers import from here: this module's own names and those its split moved out
    "DEFAULT_OUT_NAME",
    "DEFAULT_POLICY_CANDIDATES",
    "NO_PREFERENCE",
    "ChampionRecommender",
    "Column",
    "DashboardError",
    "DashboardResult",
    "bar_chart",
    "churn_risk_list",
    "default_decision_log",
    "html_table",
    "load_champion_recommender",
    "offer_responses",
    "ordered_values",
    "popular_by_segment",
    "preference_attributes",
    "preference_distribution",
    "recommended_by_segment",
    "render_dashboard",
    "segment_counts",
    "write_dashboard",
]

DEFAULT_OUT_NAME = "dashboard.html"
"""Where :func:`write_dashboard` writes by default, inside the dataset directory."""
DEFAULT_POLICY_CANDIDATES: tuple[str, ...] = ("epsilon:0.1",)
"""Candidates the offline policy evaluation shows beside the current policy unless others are given."""
SEGMENT_CHARTS: tuple[tuple[str, str], ...] = (
    ("journey_phase", "Journey phase"),
    ("age_band", "Age band"),
    ("region", "Region"),
    ("value_tier", "Value tier"),
    ("lifecycle", "Lifecycle"),
)


class DashboardError(NextbestError, ValueError):
    """The dataset cannot be shown (its features are not built); the message says what to run."""


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


# --- the sections' views ------------------------------------------------------------------------------------------


def _bars(frame: pl.DataFrame, label: str, value: str) -> list[tuple[str, float]]:
    return list(zip(frame[label].to_list(), frame[value].to_list(), strict=True))


def _overview(inputs: _Inputs, ds: Dataset) -> view.Overview:
    n = overview_numbers(inputs.profiles, inputs.manifest.get("row_counts", {}), inputs.items)
    cards = [
        view.Card("customers", "profiled customers", view.format_int(n.customers)),
        view.Card("events", "events", view.format_int(n.events)),
        view.Card("items", "items", view.format_int(n.items)),
        view.Card(
            "at_risk", "at churn risk", f"{view.format_int(n.at_risk)} ({view.format_pct(n.at_risk_share)})"
        ),
    ]
    identities = view.table(
        "identities",
        [
            Column("source system", SOURCE_SYSTEM),
            Column("linked ids", "ids", view.format_int, numeric=True),
            Column("customers", "customers", view.format_int, numeric=True),
        ],
        identity_counts(inputs.identities, inputs.unlinked).to_dicts(),
        caption="Single customer view: ids of each source system linked to one customer_id",
    )
    return view.Overview(cards, str(ds.root), view.format_time(inputs.manifest.get("as_of")), identities)


def _segments(profiles: pl.DataFrame) -> list[view.Panel]:
    panels = []
    for column, label in SEGMENT_CHARTS:
        if column not in profiles.columns:
            continue
        counts = segment_counts(profiles, column)
        what = f"Customers by {label.lower()}"
        chart = view.bar_chart_view(f"segment-{column}", _bars(counts, "value", "customers"), title=what)
        rows = view.table(
            f"segment-{column}", [Column(label.lower(), "value"), *view.SHARE_COLUMNS], counts.to_dicts()
        )
        panels.append(view.Panel(what, chart, rows))
    return panels


def _preferences(profiles: pl.DataFrame) -> list[view.Panel]:
    panels = []
    for attribute in preference_attributes(profiles):
        dist = preference_distribution(profiles, attribute)
        colours = view.preference_colours(dist["value"].to_list()) if attribute == "colour" else None
        name = f"preferred-{attribute}"
        chart = view.bar_chart_view(
            name,
            _bars(dist, "value", "customers"),
            title=f"Customers by preferred {attribute}",
            colours=colours,
        )
        columns = [
            Column(f"preferred {attribute}", "value"),
            *view.SHARE_COLUMNS,
            Column("mean strength", "mean_strength", view.format_pct, numeric=True),
        ]
        panels.append(view.Panel(f"Preferred {attribute}", chart, view.table(name, columns, dist.to_dicts())))
    return panels


def _churn(profiles: pl.DataFrame, limit: int) -> view.Churn | None:
    if "churn_risk_flag" not in profiles.columns:
        return None
    flagged = profiles.filter(pl.col("churn_risk_flag").fill_null(False))
    by_tier: view.BarChart | None = None
    if "value_tier" in profiles.columns:
        tiers = segment_counts(flagged, "value_tier")
        by_tier = view.bar_chart_view(
            "churn-by-tier",
            _bars(tiers, "value", "customers"),
            title="Customers at churn risk by value tier",
            colours=[view.SECOND] * tiers.height,
        )
    listed = churn_risk_list(profiles, limit)
    columns = [view.CHURN_TABLE[c] for c in listed.columns if c in view.CHURN_TABLE]
    return view.Churn(flagged.height, listed.height, by_tier, view.table("churn", columns, listed.to_dicts()))


def _recommendations(
    inputs: _Inputs,
    segment: str,
    top_n: int,
    recommender: RecommenderBundle | None,
    label: str | None,
    fallback_reason: str | None,
    min_customers: int,
) -> view.Recommendations:
    profiles = inputs.profiles
    if segment not in profiles.columns:
        return view.Recommendations(segment, problem=f"The profiles have no column {segment}.")
    if recommender is not None:
        found = recommended_by_segment(recommender, profiles, segment, top_n)
        source, count_header = "model", "in lists"
    elif inputs.interactions is not None:
        found = popular_by_segment(inputs.interactions, profiles, segment, top_n, min_customers=min_customers)
        source, count_header = "popularity", "customers"
    else:
        return view.Recommendations(
            segment, problem="No interaction matrix in the features and no recommender."
        )
    found = with_item_details(found, inputs.items)
    columns = [
        Column("rank", "rank", view.format_int, numeric=True),
        Column("item", ITEM_ID),
        *[Column(c, c) for c in ITEM_COLUMNS if c in found.columns],
        *([Column("price", PRICE, view.format_money, numeric=True)] if PRICE in found.columns else []),
        Column(count_header, "customers", view.format_int, numeric=True),
    ]
    sizes = dict(segment_counts(profiles, segment).select("value", "customers").iter_rows())
    blocks = []
    for value in ordered_values(found["segment_value"].unique().to_list(), segment):
        part = found.filter(pl.col("segment_value") == value).sort("rank")
        blocks.append(
            view.SegmentBlock(
                value,
                sizes.get(value, 0),
                view.table(f"recommendations-{value}", columns, part.to_dicts()),
                lists=part["lists"][0] if "lists" in part.columns else None,
                fallback="fallback" in part.columns and bool(part["fallback"][0]),
            )
        )
    return view.Recommendations(
        segment,
        source=source,
        label=label,
        reason=fallback_reason,
        list_length=RECOMMENDATION_LIST_LENGTH,
        min_customers=min_customers,
        blocks=blocks,
    )


def _policy_evaluation_view(
    decision_log: Any,
    ds: Dataset,
    catalog: pl.DataFrame,
    policy: str | Path | None,
    candidates: Sequence[str],
) -> view.PolicyEvaluation:
    from nextbest.serving.policy import DEFAULT_POLICY_PATH, attach_catalog, load_policy
    from nextbest.serving.policy_eval import evaluation_table, policy_report

    if not isinstance(decision_log, StateStore):
        return view.PolicyEvaluation(problem="Needs the service's state store.")
    try:
        current = load_policy(policy or DEFAULT_POLICY_PATH)
        known = None if catalog.is_empty() else catalog
        if known is not None:
            current = attach_catalog(current, known)
        rows = policy_report(
            decision_log, current, candidates, catalog=known, profiles_path=ds.features_dir / PROFILES_FILE
        )
    except ValueError as e:  # PolicyError, CandidateSpecError, PolicyEvalError: a note, never a broken page
        return view.PolicyEvaluation(problem=" ".join(str(e).split()))
    shown = evaluation_table(rows).to_dicts()
    for r in shown:
        for metric, fmt in (("acceptance", view.format_pct), ("value", view.format_money)):
            low, high = r[f"{metric}_low"], r[f"{metric}_high"]
            r[f"{metric}_interval"] = "–" if low is None or high is None else f"{fmt(low)} – {fmt(high)}"
    return view.PolicyEvaluation(view.table("policy-evaluation", view.EVALUATION_TABLE, shown))


def _policy_evaluation(
    decision_log: Any,
    ds: Dataset,
    catalog: pl.DataFrame,
    policy: str | Path | None,
    candidates: Sequence[str],
) -> str:
    """The "Offline policy evaluation" part of the next-best-action section (:mod:`serving.policy_eval`), alone."""
    section = _policy_evaluation_view(decision_log, ds, catalog, policy, candidates)
    return view.render_macro("sections.html.j2", "policy_evaluation", section)


def _acceptance_chart(
    name: str, bars: list[tuple[str, float]], title: str, top: float, arms: list[str]
) -> view.BarChart:
    colours = [view.ACCENT if arm == CHAMPION else view.SECOND for arm in arms]
    return view.bar_chart_view(
        name, bars, title=title, value_format=view.format_pct, max_value=top, colours=colours
    )


def _decisions(
    decision_log: Any,
    responses: pl.DataFrame | None,
    catalog: pl.DataFrame,
    window_days: float,
    evaluation: Callable[[], view.PolicyEvaluation] | None = None,
) -> view.Decisions:
    if not _readable(decision_log):
        return view.Decisions("missing")
    from nextbest.serving.decision_log import summarise_decisions

    if responses is None:
        responses = offer_responses(ledger_beside(decision_log))
    summary = summarise_decisions(decision_log, responses, window_days=window_days)
    if summary.is_empty():
        return view.Decisions("empty")
    rows = acceptance_table(summary, catalog)
    # One scale for every acceptance chart, so that bars compare across arms.
    top = acceptance_scale(rows)
    totals = acceptance_by_arm(rows)
    panels = [
        view.Panel(
            f"Acceptance by arm (offers accepted within {window_days:g} days)",
            _acceptance_chart("acceptance-by-arm", totals, "Acceptance by arm", top, [a for a, _ in totals]),
        )
    ]
    for arm in sorted(set(rows["arm"].to_list())):
        per = acceptance_by_action(rows, arm)
        chart = _acceptance_chart(
            f"acceptance-{arm}", per, f"Acceptance by action, {arm}", top, [arm] * len(per)
        )
        panels.append(view.Panel(f"Acceptance by action: {arm}", chart))
    return view.Decisions(
        "shown",
        source=_source_name(decision_log),
        window_days=window_days,
        panels=panels,
        table=view.table("acceptance", view.ACCEPTANCE_TABLE, rows.to_dicts()),
        evaluation=evaluation() if evaluation is not None else None,
    )


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
    min_segment_customers: int = MIN_SEGMENT_CUSTOMERS,
    simulation: str | Path | None = None,
) -> str:
    """The dashboard of a dataset as one self-contained HTML page (see the module docstring).

    Args:
        data: the dataset directory (features built).
        decision_log: the service's state store, or a JSON-lines export of its decision log; None leaves the
            acceptance section empty.
        responses: offer responses (``customer_id, action_id, timestamp[, responded]``); default the responses
            in the contact ledger beside the decision log (:func:`serving.contact.ledger_beside`).
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
        min_segment_customers: the popularity fallback's smallest segment, as the service's
            ``min_segment_customers``; smaller ones show the popularity among everyone.
        simulation: a ``nextbest simulate`` summary (``simulation.json`` or its folder) for the section "The loop,
            simulated"; None leaves the section out.

    Raises:
        DatasetError: ``data`` is not a dataset.
        DashboardError: its features are not built, or ``simulation`` is not a readable summary.
    """
    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    inputs = _load(ds)
    catalog = ds.read("action_catalog", required=False)
    simulated = None
    if simulation is not None:
        try:
            simulated = simulation_view(read_simulation(simulation), str(simulation))
        except SimulationSummaryError as e:
            raise DashboardError(str(e)) from None
    page = view.Page(
        name=ds.root.resolve().name,
        customers=inputs.profiles.height,
        as_of=view.format_time(inputs.manifest.get("as_of")),
        generated_at=(generated_at or datetime.now()).isoformat(timespec="seconds"),
        overview=_overview(inputs, ds),
        segments=_segments(inputs.profiles),
        preferences=_preferences(inputs.profiles),
        churn=_churn(inputs.profiles, churn_limit),
        recommendations=_recommendations(
            inputs, segment, top_n, recommender, recommender_label, fallback_reason, min_segment_customers
        ),
        decisions=_decisions(
            decision_log,
            responses,
            catalog,
            window_days,
            lambda: _policy_evaluation_view(decision_log, ds, catalog, policy, policy_candidates),
        ),
        simulation=simulated,
    )
    return view.render_page(page)


# --- the champion and the file ----------------------------------------------------------------------------------


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
    simulation: str | None = None
    """The ``nextbest simulate`` summary the page shows, if any."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "dashboard",
            "path": str(self.path),
            "recommendations": self.recommendations,
            "recommender": self.recommender,
            "decision_log": self.decision_log,
            "customers": self.customers,
            "simulation": self.simulation,
            "notes": list(self.notes),
        }


def _readable(decision_log: Any) -> bool:
    """Whether there is a decision log to read: a state store, or an export file that exists."""
    return decision_log is not None and (isinstance(decision_log, StateStore) or Path(decision_log).exists())


def _source_name(decision_log: Any) -> str:
    """Where a decision log is, for the page: the state store's URL (password hidden) or the file."""
    return redact(decision_log.url) if isinstance(decision_log, StateStore) else str(decision_log)


def default_decision_log(ds: Dataset) -> Any:
    """The service's state store at its default place (``DATA/service/state.db``), or None before the service
    has run."""
    from nextbest.serving.engine import DEFAULT_STATE_DIR
    from nextbest.serving.state_store import STATE_DB, default_state_url

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
    simulation: str | Path | None = None,
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
        simulation: a ``nextbest simulate`` summary to draw (``--simulation``); default the one beside ``DIR``
            when ``DIR`` is a simulation's service dataset (``OUT/world``).

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
    log = default_decision_log(ds) if decision_log is None else decision_log
    if not _readable(log):
        where = log if log is not None else ds.root / "service" / "state.db"
        notes.append(f"no decision log at {where}: the next-best-action section is empty")
        log_used = None
    else:
        log_used = log
    if simulation is None:
        simulation = simulation_beside(ds.root)
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
        simulation=simulation,
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
        simulation=str(simulation) if simulation is not None else None,
    )
