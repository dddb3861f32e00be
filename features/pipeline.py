"""The feature pipeline: raw tables → clean events → interaction matrix, profiles, splits and a manifest."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset, write_json_atomic, write_parquet_atomic
from nextbest.features.identity import resolve_identities
from nextbest.features.interactions import WEIGHT, InteractionConfig
from nextbest.features.privacy import (
    apply_retention,
    consent_granted,
    consent_state,
    erased_digests,
    exclude_erased,
    filter_consented,
    forget,
    retained,
)
from nextbest.features.profiles import (
    ProfileConfig,
    customer_summary,
    profile_preferences,
    profiles_from_summary,
    purchase_summary,
    recent_summary,
    summarise_events,
    value_tier_thresholds,
)
from nextbest.features.schema import (
    CONSENT_PURPOSES,
    CUSTOMER_ID,
    DEFAULT_EVENT_TYPES,
    EVENT_TYPE,
    TIMESTAMP_COL,
)
from nextbest.features.splits import SplitError, default_cutoffs

PROFILES_FILE = "profiles.parquet"
UNLINKED_FILE = "unlinked_identities.parquet"
CONSENT_FILE = "consent_state.parquet"
MANIFEST_VERSION = 1


class FeatureConfig(BaseModel):
    """Everything that decides what the feature build produces. Round-trips through JSON.

    Attributes:
        interactions: event weights and time decay of the interaction matrix.
        profiles: profile definitions.
        retention_days: events older than this before ``as_of`` are left out.
        as_of: the reference time ("now" of the data); default the latest event in the dataset.
        validation_start: first day of the validation period; default ``test_start - validation_days``.
        test_start: first day of the test period; default ``last day + 1 - test_days``.
        validation_days: length of the default validation period.
        test_days: length of the default test period.
        consent_default: consent assumed for a purpose a customer has no record for. ``True`` suits data
            exported from a system that only holds consenting customers (Complete Journey has no consent table);
            set ``False`` where absence of a record must mean no.
        event_types: accepted event types (imports validate against them).
    """

    model_config = ConfigDict(extra="forbid")

    interactions: InteractionConfig = Field(default_factory=InteractionConfig)
    profiles: ProfileConfig = Field(default_factory=ProfileConfig)
    retention_days: int = Field(365, gt=0)
    as_of: datetime | None = None
    validation_start: datetime | None = None
    test_start: datetime | None = None
    validation_days: int = Field(14, gt=0)
    test_days: int = Field(14, gt=0)
    consent_default: bool = True
    event_types: list[str] = Field(default_factory=lambda: list(DEFAULT_EVENT_TYPES))

    @classmethod
    def load(cls, path: str | Path) -> FeatureConfig:
        """Read a config from JSON; a clear error names the file and the field."""
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


def built_config(ds: Dataset) -> FeatureConfig:
    """The config ``ds``'s features were built with (its manifest), or the default before any build."""
    if not ds.manifest_path.exists():
        return FeatureConfig()
    return FeatureConfig.model_validate(ds.read_manifest().get("config", {}))


def erase_customers(
    ds: Dataset,
    customer_ids: Sequence[str],
    *,
    config: FeatureConfig | None = None,
    rebuild: bool = True,
    progress: bool = False,
    build: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Erase customers and every id linked to them from ``ds`` (:func:`features.privacy.forget`), then rebuild
    the features once (with ``config``, default the config they were last built with) so that none of them
    remains; no rebuild when nothing was found.

    ``build`` builds the features (``build(ds, config, progress=…)``; default :func:`build_features`).
    ``nextbest forget`` and the service's erasure queue run this through
    :func:`features.dataset_lock.erase_customers_atomically`, which builds beside the live features.

    Returns:
        ``ids_erased``, ``rows_removed`` (per file), ``total_rows_removed`` and ``features_rebuilt``.
    """
    ids_erased, removed = 0, Counter[str]()
    for customer_id in customer_ids:
        report = forget(ds, customer_id)
        ids_erased += report["ids_erased"]
        removed.update(report["rows_removed"])
    rebuilt = rebuild and ds.manifest_path.exists() and sum(removed.values()) > 0
    if rebuilt:
        (build or build_features)(ds, config or built_config(ds), progress=progress)
    return {
        "ids_erased": ids_erased,
        "rows_removed": dict(removed),
        "total_rows_removed": sum(removed.values()),
        "features_rebuilt": rebuilt,
    }


def resolved_events(ds: Dataset) -> pl.LazyFrame:
    """All events with canonical customer ids, erased customers left out."""
    events = resolve_identities(ds.scan("events"), ds.scan("identities", required=False))
    return exclude_erased(events, erased_digests(ds))


def data_as_of(ds: Dataset) -> datetime:
    """The time of the latest event in ``ds``: the data's "now" (identity resolution never changes it).

    Read from the event files' row-group statistics where every row group has them (a few milliseconds), else
    from the events themselves.
    """
    span = event_time_span(ds)
    latest = span[1] if span else ds.scan("events").select(pl.col(TIMESTAMP_COL).max()).collect().item()
    if latest is None:
        raise ValueError("the dataset has no events")
    return latest


def event_time_span(ds: Dataset) -> tuple[datetime, datetime] | None:
    """The first and last event times in the event files' row-group statistics; None where a file or row group
    has none to give (or there are no events)."""
    first: datetime | None = None
    last: datetime | None = None
    for path in ds.table_files("events"):
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if TIMESTAMP_COL not in names:
            return None
        column = names.index(TIMESTAMP_COL)
        for group in range(meta.num_row_groups):
            if meta.row_group(group).num_rows == 0:
                continue
            stats = meta.row_group(group).column(column).statistics
            low, high = (stats.min, stats.max) if stats is not None and stats.has_min_max else (None, None)
            # Only naive datetimes compare with the table's timestamps as Polars reads them.
            if not (isinstance(low, datetime) and isinstance(high, datetime)) or low.tzinfo or high.tzinfo:
                return None
            first = low if first is None else min(first, low)
            last = high if last is None else max(last, high)
    return (first, last) if first is not None and last is not None else None


def clean_events(
    ds: Dataset, config: FeatureConfig, *, purpose: str = "personalisation", as_of: datetime | None = None
) -> pl.LazyFrame:
    """Events fit for ``purpose``: identity-resolved, erased ids excluded, within retention, consented.

    Args:
        ds: the dataset.
        config: the feature config (retention, consent default).
        purpose: the consent purpose the events are used for (personalisation for training recommenders,
            profiling for profiles).
        as_of: reference time; default ``config.as_of`` or the latest event.
    """
    events = resolved_events(ds)
    as_of = as_of or config.as_of or data_as_of(ds)
    events = apply_retention(events, as_of=as_of, days=config.retention_days)
    events = events.filter(pl.col(TIMESTAMP_COL) <= as_of)
    state = consent_state(ds.scan("consent", required=False), as_of=as_of)
    return filter_consented(events, state, purpose, default=config.consent_default)


def code_version() -> str:
    """The installed nextbest version and, in a git checkout, the commit."""
    try:
        version = metadata.version("nextbest")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def _inputs(ds: Dataset) -> list[dict[str, Any]]:
    out = []
    for f in sorted(ds.raw_dir.glob("*.parquet")):
        st = f.stat()
        out.append({"path": str(f.relative_to(ds.root)), "bytes": st.st_size, "modified": st.st_mtime})
    return out


def _cutoffs(config: FeatureConfig, summary: pl.DataFrame) -> tuple[datetime, datetime]:
    if config.validation_start and config.test_start:
        return config.validation_start, config.test_start
    # Each customer's first and last event: their extremes are the events' time range.
    span = pl.concat(
        [
            summary.select(pl.col("first_seen").alias(TIMESTAMP_COL)),
            summary.select(pl.col("last_seen").alias(TIMESTAMP_COL)),
        ]
    )
    auto_val, auto_test = default_cutoffs(
        span.lazy(), validation_days=config.validation_days, test_days=config.test_days
    )
    return config.validation_start or auto_val, config.test_start or auto_test


class _Steps:
    """A progress bar over named steps that also records how long each took (kept in the manifest)."""

    def __init__(self, total: int, progress: bool):
        self.bar = tqdm(total=total, desc="features", disable=not progress, unit="step")
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._t = time.perf_counter()

    def start(self, name: str) -> None:
        self._name, self._t = name, time.perf_counter()
        self.bar.set_postfix_str(name)

    def done(self) -> None:
        self.seconds[self._name] = round(time.perf_counter() - self._t, 3)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def build_features(
    ds: Dataset, config: FeatureConfig | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Build every feature output of ``ds`` into ``ds.features_dir`` and return the manifest.

    Steps: resolve identities and leave out erased ids; apply retention; build the interaction matrix from
    personalisation-consented events; build profiles from profiling-consented events; choose split cut-offs;
    report unlinked ids; write ``manifest.json``.
    """
    config = config or FeatureConfig()
    ds.require()
    started = time.perf_counter()
    steps = _Steps(6, progress)
    out_dir = ds.features_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    steps.start("resolving identities")
    identities = ds.scan("identities", required=False)
    raw_events = ds.scan("events")
    # Identity resolution never changes timestamps: the raw files' statistics give the latest event cheaply.
    as_of = config.as_of or data_as_of(ds)
    kept = retained(as_of=as_of, days=config.retention_days) & (pl.col(TIMESTAMP_COL) <= as_of)
    span = event_time_span(ds)
    # Where the statistics show every event inside the window, the main pass need not test each one (0.1 s).
    in_window = (
        span is not None and span[0] >= as_of - timedelta(days=config.retention_days) and span[1] <= as_of
    )
    items = ds.scan("items", required=False)
    # One pass over the events (ids resolved on the ids as logged, not event by event), two filtered ones for
    # the purchases and the recent window; everything after works on far smaller tables.
    events_summary = summarise_events(
        raw_events if in_window else raw_events.filter(kept),
        as_of=as_of,
        config=config.profiles,
        interactions=config.interactions,
        identities=identities,
        erased=erased_digests(ds),
    )
    recent_start = as_of - timedelta(days=config.profiles.recent_days)

    def side_passes() -> tuple[pl.DataFrame, pl.DataFrame]:
        # Each filtered pass maps its ids as logged to the summary's rows: no identity resolution again.
        purchases = purchase_summary(
            events_summary.with_rows(
                raw_events.filter(kept & (pl.col(EVENT_TYPE) == config.profiles.purchase_event))
            ),
            items,
            config=config.profiles,
            by="__row",
        )
        recent = recent_summary(
            events_summary.with_rows(raw_events.filter(kept & (pl.col(TIMESTAMP_COL) >= recent_start))),
            as_of=as_of,
            config=config.profiles,
            by="__row",
        )
        return purchases.collect(), recent.collect()

    # The filtered passes (Polars) run in a worker beside the main thread's SciPy sums (one core), the consent
    # state and the interaction matrix, which need neither.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="features") as pool:
        side = pool.submit(side_passes)
        _ = events_summary.weights, events_summary.profile_weights
        steps.done()

        steps.start("consent")
        state = consent_state(ds.scan("consent", required=False), as_of=as_of).sort(CUSTOMER_ID).collect()
        write_parquet_atomic(state, out_dir / CONSENT_FILE)
        # Consent is per customer, so it selects customers (matrix rows), never the events themselves: a mask
        # over the summary's customers (one row each, sorted, as the matrices' rows) per purpose.
        purposes = ("personalisation", "profiling")
        granted = (
            events_summary.activity.lazy()
            .select(CUSTOMER_ID)
            .join(
                state.lazy().select(CUSTOMER_ID, *purposes), on=CUSTOMER_ID, how="left", maintain_order="left"
            )
            .select(consent_granted(p, default=config.consent_default).alias(p) for p in purposes)
            .collect()
        )
        consented = {p: granted[p].to_numpy() for p in purposes}
        steps.done()

        steps.start("interaction matrix")
        interactions = events_summary.matrix(WEIGHT, keep=consented["personalisation"])
        interactions.save(out_dir)
        steps.done()

        steps.start("profiles")
        profile_weights = events_summary.matrix("profile_weight", keep=consented["profiling"])
        items_table = items.collect()
        preferences = profile_preferences(profile_weights, items_table, config.profiles)
        purchases, recent = side.result()
    summary = customer_summary(
        events_summary.activity.lazy(), purchases.lazy(), recent.lazy(), as_of=as_of
    ).collect()
    profiles = profiles_from_summary(
        profile_weights,
        summary.filter(pl.Series(consented["profiling"])),
        items_table,
        ds.scan("customers", required=False),
        as_of=as_of,
        config=config.profiles,
        preferences=preferences,
    )
    write_parquet_atomic(profiles, out_dir / PROFILES_FILE)
    steps.done()

    steps.start("splits")
    warnings: list[str] = []
    splits: dict[str, str] | None = None
    try:
        validation_start, test_start = _cutoffs(config, summary)
        splits = {"validation_start": validation_start.isoformat(), "test_start": test_start.isoformat()}
    except SplitError as exc:
        # Features are still useful (profiles, a full matrix); training says what is missing.
        warnings.append(f"no train/validation/test split: {exc}")
    steps.done()

    steps.start("identity report")
    unlinked = events_summary.unlinked
    write_parquet_atomic(unlinked, out_dir / UNLINKED_FILE)
    steps.done()
    steps.close()

    n_customers_retained = summary.height
    personal_summary = summary.filter(pl.Series(consented["personalisation"]))
    consent_counts = {
        p: int(state.filter(pl.col(p) == False).height)  # noqa: E712
        for p in CONSENT_PURPOSES
    }
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "dataset": str(ds.root),
        "built_at": datetime.now().isoformat(timespec="microseconds"),
        "code_version": code_version(),
        "as_of": as_of.isoformat(),
        "inputs": _inputs(ds),
        "row_counts": {
            "raw_events": raw_events.select(pl.len()).collect().item(),
            "retained_events": int(summary["n_events"].sum()),
            "personalisation_events": int(personal_summary["n_events"].sum()),
            "profiling_events": int(summary.filter(pl.Series(consented["profiling"]))["n_events"].sum()),
            "customers_retained": n_customers_retained,
            "customers_declined": consent_counts,
            "interaction_customers": len(interactions.customers),
            "interaction_items": len(interactions.items),
            "interaction_nonzeros": int(interactions.matrix.nnz),
            "profiles": profiles.height,
            "unlinked_ids": unlinked.height,
        },
        "config": json.loads(config.model_dump_json()),
        "splits": splits,
        "warnings": warnings,
        "value_tier_thresholds": list(value_tier_thresholds(profiles)),
        "outputs": sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json"),
        "seconds": round(time.perf_counter() - started, 3),
        "step_seconds": steps.seconds,
    }
    write_json_atomic(manifest, ds.manifest_path)
    return manifest
