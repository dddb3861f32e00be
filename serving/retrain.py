"""``nextbest retrain``: fold what the service saw into the dataset, rebuild features, retrain and promote.

Safe to run from cron while the service runs. In order, under the dataset's lock (one retrain at a time,
:class:`~features.dataset_lock.DatasetLock`):

1. **Fold** (:func:`fold_service_data`): the events the service received since the last retrain (by the
   store's change sequence: the first retrain reads a consistent snapshot of every stored event) and the
   exposures its decisions and their responses make (:func:`~features.live_exposures.exposures_from_decisions`) are
   validated, deduplicated and erasure-checked and appended to ``raw/`` as new parts (:mod:`features.live_fold`).
   The store is only read: the service goes on writing to it. The fold and the build below each hold the
   dataset's write lock (:func:`~features.dataset_lock.write_lock`): an erasure the service runs meanwhile
   waits for them, or they for it.
2. **Features** are rebuilt with the config they were last built with, into a staging folder that replaces
   ``features/`` in one step (:func:`~features.dataset_lock.build_features_atomically`); a service reading the
   old features meanwhile never sees half of a build.
3. **Challengers**: the recommender and the propensity model are trained with their champions' configurations
   as logged in the registry (no tuning; the defaults where there is no champion yet). The recommender is
   evaluated on the held-out periods as always, then refit on every event up to now (``refit="all"``), and its
   registry version is tagged ``refit=all`` and ``data_until=<latest event>``; the propensity model (calibrated on
   its validation period) is not refit, and its version is tagged ``refit=train`` and ``data_until=<latest
   exposure>``.
4. **Promotion** goes through the existing gate only (:func:`~training.promotion.promote_recommender`,
   :func:`~training.propensity_tuning.promote_propensity`), which says why either way. The CLI then exports the
   champions for BentoML; a running service picks the new ``@champion`` up by itself.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.dataset_lock import DatasetLock, build_features_atomically, write_lock
from nextbest.features.errors import NextbestError
from nextbest.features.live_exposures import DECISION_COLUMNS, exposures_from_decisions
from nextbest.features.live_fold import (
    EVENT_ID,
    SEQ,
    commit_fold,
    folded_ids,
    missing_parts,
    read_fold_state,
    roll_back_pending,
    scrub_parts,
    sort_exposures,
    sort_live_events,
)
from nextbest.features.pipeline import built_config, data_as_of
from nextbest.features.privacy import (
    ERASURE_KEY_FILE_ENV,
    ERASURE_LOG,
    ErasedIds,
    ErasureKeyError,
    erased_digests,
)
from nextbest.features.schema import CHANNEL, EXPOSURE_ID, TIMESTAMP, TIMESTAMP_COL
from nextbest.serving.state_store import EVENT_COLUMNS, StateStore
from nextbest.serving.state_store import store_key as state_store_key

DEFAULT_WINDOW = timedelta(days=7)
"""How long after a decision a response may still come (as ``nextbest report decisions`` counts)."""
LIVE_EVENT_SCHEMA: dict[str, pl.DataType] = {
    EVENT_ID: pl.String(),
    SEQ: pl.Int64(),
    "customer_id": pl.String(),
    "item_id": pl.String(),
    "event_type": pl.String(),
    "timestamp": TIMESTAMP,
    "session_id": pl.String(),
    "channel": pl.String(),
    "quantity": pl.Int64(),
    "price": pl.Float64(),
}


class RetrainError(NextbestError, RuntimeError):
    """Retraining cannot go on; the message says why and what to do."""


# --- reading the store --------------------------------------------------------------------------------------


def store_key(store: StateStore) -> str:
    """How the fold manifest names a store: its URL without password, a SQLite path made absolute."""
    return state_store_key(store.url)


def live_events(store: StateStore, after_change: int | None) -> tuple[pl.DataFrame, int]:
    """The events stored after change ``after_change`` (every stored event, from one consistent snapshot, when
    None), with their ``event_id`` and ``seq``; and the last change read."""
    if after_change is None:
        last, rows = store.snapshot()
    else:
        last, refs = after_change, []
        while True:
            page = store.changes_since(last)
            if not page:
                break
            refs += [c.ref for c in page if c.kind == "event" and c.ref is not None]
            last = page[-1].seq
        rows = store.events_by_seq(refs)
    frame = pl.DataFrame(
        [{k: r.get(k) for k in (EVENT_ID, SEQ, *EVENT_COLUMNS)} for r in rows],
        schema=LIVE_EVENT_SCHEMA,
    )
    return frame, last


def decision_log(store: StateStore, since: datetime | None) -> pl.DataFrame:
    """The decisions at or after ``since`` as :data:`~features.live_exposures.DECISION_COLUMNS` (channel from the
    record)."""
    frame = store.decisions_frame(since=since)
    return frame.with_columns(
        pl.col("record").str.json_path_match("$.channel").alias(CHANNEL),
        pl.col(TIMESTAMP_COL).cast(TIMESTAMP),
    ).select(list(DECISION_COLUMNS))


def erased_everywhere(ds: Dataset, store: StateStore) -> ErasedIds:
    """The dataset's erasures and the service's (both keyed digests under the same key).

    Raises:
        ErasureKeyError: the service has erased ids and no key is available to match them.
    """
    logged = erased_digests(ds)
    served = store.erased_digests()
    if served and logged.key is None:
        raise ErasureKeyError(
            f"the state store records erasures but no erasure key was found: set {ERASURE_KEY_FILE_ENV} to the "
            "key the service uses"
        )
    return ErasedIds(logged.keyed | frozenset(served), logged.legacy, logged.key)


# --- the fold -----------------------------------------------------------------------------------------------


def fold_service_data(
    ds: Dataset,
    store: StateStore,
    *,
    window: timedelta = DEFAULT_WINDOW,
    delivered_channels: Iterable[str] = (),
    event_types: list[str] | None = None,
) -> dict[str, Any]:
    """Fold the store's new events and the exposures of its decisions into ``ds`` (step 1 of the module
    docstring); returns what was folded, quarantined (with reasons) and skipped.

    Args:
        ds: the dataset.
        store: the service's state store (only read).
        window: how long after a decision a response may still come.
        delivered_channels: channels whose decisions count as shown without a response.
        event_types: accepted event types (default: those of the dataset's feature config).
    """
    ds.require()
    rolled_back = roll_back_pending(ds)
    state = read_fold_state(ds)
    key = store_key(store)
    after = state.watermarks.get(key)
    events, last_change = live_events(store, after)
    erased = erased_everywhere(ds, store)
    config = built_config(ds)
    event_batch = sort_live_events(
        events,
        known_ids=folded_ids(ds, "events"),
        erased=erased,
        event_types=event_types or config.event_types,
    )

    previous = next((f for f in reversed(state.folds) if f.get("store") == key), {})
    since = datetime.fromisoformat(previous["decisions_since"]) if previous.get("decisions_since") else None
    decisions = decision_log(store, since)
    responses = store.responses_frame(since=since)
    latest = [
        t
        for t in (
            event_batch.accepted[TIMESTAMP_COL].max() if event_batch.accepted.height else None,
            decisions[TIMESTAMP_COL].max(),
            responses[TIMESTAMP_COL].max(),
            data_as_of(ds) if ds.has_table("events") else None,
        )
        if isinstance(t, datetime)
    ]
    as_of = max(latest) if latest else datetime.now(UTC).replace(tzinfo=None)
    split = exposures_from_decisions(
        decisions, responses, as_of=as_of, window=window, delivered_channels=delivered_channels
    )
    known = folded_ids(ds, "actions")
    if ds.has_table("actions"):
        known |= set(ds.scan("actions").select(EXPOSURE_ID).collect()[EXPOSURE_ID].to_list())
    catalog = (
        set(ds.read("action_catalog")["action_id"].to_list()) if ds.has_table("action_catalog") else None
    )
    exposure_batch = sort_exposures(split.exposures, known_ids=known, erased=erased, catalog_actions=catalog)

    # Decisions still waiting for a response are read again next time; older ones are settled for good.
    waiting = decisions.filter(pl.col(TIMESTAMP_COL) + window > as_of)[TIMESTAMP_COL].min()
    next_since = waiting if isinstance(waiting, datetime) else as_of - window
    summary = {
        "folded_at": datetime.now().isoformat(timespec="microseconds"),
        "store": key,
        "changes": [after or 0, last_change],
        "as_of": as_of.isoformat(),
        "decisions_since": next_since.isoformat(),
        "events": event_batch.counts(),
        "exposures": {
            **exposure_batch.counts(),
            "decisions_read": decisions.height,
            "pending": split.pending,
            "not_shown": split.not_shown,
            "no_choice": split.no_choice,
            "responses_read": responses.height,
            "responses_ignored": split.responses_ignored,
        },
    }
    committed = commit_fold(
        ds, [event_batch, exposure_batch], store=key, watermark=last_change, summary=summary
    )
    # An erasure that arrived after the rows were read: its customers leave the new parts at once.
    scrubbed = scrub_parts(ds, committed.parts.values(), erased_everywhere(ds, store))
    warnings = [f"folded part {p} is gone (was the table imported again?)" for p in missing_parts(ds)]
    if config.as_of is not None and as_of > config.as_of:
        warnings.append(
            f"the feature config fixes as_of {config.as_of.isoformat()}: data after it is left out of features"
        )
    return {
        **summary,
        "parts": committed.parts,
        "quarantine": committed.quarantine,
        "scrubbed_after_erasure": scrubbed,
        "rolled_back": rolled_back,
        "warnings": warnings,
    }


# --- features -----------------------------------------------------------------------------------------------


def _erasure_fingerprint(ds: Dataset) -> str:
    path = ds.root / ERASURE_LOG
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def rebuild_features(ds: Dataset, *, progress: bool = False, attempts: int = 3) -> dict[str, Any]:
    """Rebuild the features with their own config and swap them in whole (step 2); again when an erasure landed
    during the build (its rows could be in it). Returns the manifest."""
    config = built_config(ds)
    for _ in range(attempts):
        before = _erasure_fingerprint(ds)
        manifest = build_features_atomically(ds, config, progress=progress)
        if _erasure_fingerprint(ds) == before:
            return manifest
    raise RetrainError(
        f"{ds.root}: erasures kept arriving during {attempts} feature builds; run retrain again"
    )


# --- training -----------------------------------------------------------------------------------------------


def champion_run_configs(
    tracking_uri: str, registered_model: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The ``config.json`` of the run behind ``registered_model@champion`` and the champion's ``name/version``;
    (None, None) when there is no champion (or no registry yet)."""
    from mlflow import MlflowClient

    from nextbest.training.tracking import CHAMPION, CONFIG_ARTIFACT, sqlite_path, version_by_alias

    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return None, None
    client = MlflowClient(tracking_uri, tracking_uri)
    version = version_by_alias(client, registered_model, CHAMPION)
    if version is None or not version.run_id:
        return None, None
    with tempfile.TemporaryDirectory(prefix="nextbest-retrain-") as tmp:
        path = client.download_artifacts(version.run_id, CONFIG_ARTIFACT, tmp)
        configs = json.loads(Path(path).read_text())
    return configs, f"{registered_model}/{version.version}"


@dataclass
class ModelOutcome:
    """What retrain did for one model."""

    kind: str
    config_from: str
    trained: bool = False
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def retrain_recommender(ds: Dataset, tracking_uri: str, *, progress: bool = False) -> ModelOutcome:
    """Train the recommender challenger with the champion's config, refit on all data, and promote through the
    gate (steps 3 and 4)."""
    from nextbest.training.cf import train_cf
    from nextbest.training.promotion import promote_recommender
    from nextbest.training.tracking import REGISTERED_MODEL, TrackingConfig

    tracking = TrackingConfig(tracking_uri=tracking_uri)
    configs, label = champion_run_configs(tracking_uri, REGISTERED_MODEL)
    model = (configs or {}).get("model", "als")
    options = (configs or {}).get("run_options", {})
    outcome = ModelOutcome("recommender", f"champion {label}" if label else "defaults (no champion yet)")
    result = train_cf(
        ds,
        model,
        (configs or {}).get("config"),
        tracking=tracking,
        seed=int(options.get("seed", 0)),
        threads=int(options.get("threads", 0)),
        refit="all",
        progress=progress,
    )
    meta = result.bundle.metadata if result.bundle is not None else {}
    outcome.trained = True
    outcome.version = result.tracking.get("version")
    outcome.metrics = {
        "model": model,
        **{k: result.metrics[k] for k in ("ndcg_at_10", "new_ndcg_at_10") if k in result.metrics},
        **{f"test_{k}": v for k, v in (result.test_metrics or {}).items() if k == "ndcg_at_10"},
    }
    outcome.tags = {k: str(meta[k]) for k in ("refit", "data_until") if meta.get(k) is not None}
    outcome.promotion = promote_recommender(tracking, data=ds.root).model_dump(mode="json")
    return outcome


def retrain_propensity(ds: Dataset, tracking_uri: str, *, progress: bool = False) -> ModelOutcome:
    """Train the propensity challenger with the champion's configs, tag what it saw, promote through the gate."""
    from nextbest.training.propensity_data import PropensityDataConfig
    from nextbest.training.propensity_tuning import REGISTERED_MODEL, promote_propensity, train_propensity
    from nextbest.training.tracking import TrackingConfig, set_version_tags

    tracking = TrackingConfig(tracking_uri=tracking_uri)
    configs, label = champion_run_configs(tracking_uri, REGISTERED_MODEL)
    outcome = ModelOutcome("propensity", f"champion {label}" if label else "defaults (no champion yet)")
    data_config = PropensityDataConfig.model_validate((configs or {}).get("data_config") or {})
    device = (configs or {}).get("run_options", {}).get("device", "auto")
    result = train_propensity(
        ds,
        (configs or {}).get("config"),
        data_config=data_config,
        tracking=tracking,
        device=device,
        progress=progress,
    )
    outcome.trained = True
    outcome.version = result.get("version")
    outcome.metrics = {k: result[k] for k in ("val_log_loss", "val_auc", "auc") if result.get(k) is not None}
    if ds.has_table("actions"):
        last = ds.scan("actions").select(pl.col(TIMESTAMP_COL).max()).collect().item()
        outcome.tags = {"refit": "train", "data_until": last.isoformat() if last else ""}
        if outcome.version:
            set_version_tags(tracking_uri, result["registered_model"], outcome.version, outcome.tags)
    outcome.promotion = promote_propensity(tracking, data=ds.root).model_dump(mode="json")
    return outcome


# --- the whole job ------------------------------------------------------------------------------------------


@dataclass
class RetrainReport:
    """What :func:`retrain` did; ``to_dict`` is the JSON the CLI prints."""

    data: str
    fold: dict[str, Any]
    features: dict[str, Any]
    models: dict[str, ModelOutcome]
    seconds: float
    skipped: str | None = None

    @property
    def promoted(self) -> list[str]:
        return [k for k, m in self.models.items() if m.promotion and m.promotion.get("promoted")]

    @property
    def failed(self) -> list[str]:
        return [k for k, m in self.models.items() if m.error]

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "fold": self.fold,
            "features": self.features,
            "models": {k: m.to_dict() for k, m in self.models.items()},
            "promoted": self.promoted,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        """The human summary."""
        ev, ex = self.fold["events"], self.fold["exposures"]
        out = [
            f"retrained {self.data} from {self.fold['store']} (changes {self.fold['changes'][0]}–"
            f"{self.fold['changes'][1]})",
            f"  events: {ev['folded']:,} folded, {ev['quarantined']:,} quarantined, {ev['duplicates']:,} "
            f"duplicates skipped, {ev['erased']:,} of erased customers left out (of {ev['rows_in']:,} read)",
            f"  exposures: {ex['folded']:,} folded from {ex['decisions_read']:,} decisions, {ex['quarantined']:,} "
            f"quarantined, {ex['duplicates']:,} already folded, {ex['erased']:,} erased, {ex['pending']:,} "
            f"waiting for a response, {ex['not_shown']:,} not shown",
        ]
        for table, counts in (("events", ev), ("exposures", ex)):
            out += [f"    quarantined {table}: {n} × {r}" for r, n in counts["quarantine_reasons"].items()]
        out += [f"  warning: {w}" for w in self.fold.get("warnings", [])]
        if self.skipped:
            return [*out, f"  {self.skipped}"]
        rc = self.features.get("row_counts", {})
        out.append(
            f"  features rebuilt and swapped in: as of {self.features.get('as_of')}, "
            f"{rc.get('raw_events', 0):,} raw events, splits {self.features.get('splits')}"
        )
        for kind, m in self.models.items():
            if m.error:
                out.append(f"  {kind}: not retrained: {m.error}")
                continue
            tags = ", ".join(f"{k}={v}" for k, v in m.tags.items())
            out.append(f"  {kind}: challenger v{m.version} with the config of {m.config_from} ({tags})")
            if m.promotion:
                out.append(
                    f"    {'promoted' if m.promotion['promoted'] else 'not promoted'}: {m.promotion['reason']}"
                )
        return out


def retrain(
    data: Dataset | str | Path,
    store: StateStore,
    *,
    tracking_uri: str,
    window: timedelta = DEFAULT_WINDOW,
    delivered_channels: Iterable[str] = (),
    force: bool = False,
    progress: bool = False,
) -> RetrainReport:
    """The whole job (see the module docstring). When the fold brings nothing new, it stops there (features and
    models are left as they are) unless ``force``.

    Raises:
        RetrainLockedError: another retrain of the dataset is running.
        RetrainError: the features could not be rebuilt consistently.
    """
    from nextbest.features.splits import SplitError
    from nextbest.training.cf_data import CFDataError

    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    ds.require()
    started = time.perf_counter()
    with DatasetLock(ds, "retrain"):
        steps = tqdm(total=4, desc="retrain", unit="step", disable=not progress)
        try:
            steps.set_postfix_str("folding live data")
            with write_lock(ds, "retrain (fold)"):  # an erasure of the service's waits, and is waited for
                fold = fold_service_data(ds, store, window=window, delivered_channels=delivered_channels)
            steps.update()
            if not force and fold["events"]["folded"] == 0 and fold["exposures"]["folded"] == 0:
                why = "nothing new since the last retrain: features and models left as they are (--force retrains)"
                return RetrainReport(str(ds.root), fold, {}, {}, time.perf_counter() - started, skipped=why)
            steps.set_postfix_str("features")
            manifest = rebuild_features(ds, progress=progress)
            features = {k: manifest.get(k) for k in ("as_of", "splits", "row_counts", "warnings")}
            steps.update()
            models: dict[str, ModelOutcome] = {}
            for kind, train in (("recommender", retrain_recommender), ("propensity", retrain_propensity)):
                steps.set_postfix_str(kind)
                try:
                    models[kind] = train(ds, tracking_uri, progress=progress)
                except (CFDataError, SplitError, ValueError, FileNotFoundError) as exc:
                    models[kind] = ModelOutcome(kind, "", error=" ".join(str(exc).split()))
                steps.update()
        finally:
            steps.close()
    return RetrainReport(str(ds.root), fold, features, models, time.perf_counter() - started)
