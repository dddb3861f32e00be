"""The data a recommender trains and is judged on: a dataset's clean events split at the feature manifest's
cut-offs into period matrices and evaluation periods, prepared once for training and tuning alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl
import scipy.sparse as sp
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.errors import NextbestError
from nextbest.features.interactions import Interactions, build_interactions, interaction_weights
from nextbest.features.pipeline import FeatureConfig, clean_events
from nextbest.features.profiles import build_profiles
from nextbest.features.schema import TIMESTAMP_COL
from nextbest.features.splits import temporal_split
from nextbest.training.evaluation import EvaluationConfig, EvaluationTask, prepare_evaluation
from nextbest.training.histories import purchase_matrix, recency_matrix
from nextbest.training.tracking import DataManifest


class CFDataError(NextbestError, ValueError):
    """A dataset cannot be trained on yet (no features built, no split, no purchases in a period)."""


@dataclass(frozen=True)
class PeriodMatrices:
    """A training matrix with the matrices the models and the evaluation need beside it.

    Attributes:
        interactions: weighted interactions (model input) with vocabularies.
        bought: purchase counts, same shape (left out of discovery lists).
        recency: age in days of each pair's latest event at ``as_of`` (repeat model).
        as_of: the cut-off the matrices describe.
        last_event: the latest event in them (None when not known).
    """

    interactions: Interactions
    bought: sp.csr_matrix
    recency: sp.csr_matrix
    as_of: datetime
    last_event: datetime | None = None


@dataclass(frozen=True)
class CFData:
    """Everything train and tune need from a dataset, prepared once.

    Attributes:
        dataset: the dataset.
        validation_start, test_start: the cut-offs from the feature manifest.
        feature_config: the config the features were built with.
        train: matrices of the events before ``validation_start``.
        validation: the validation period, aligned with ``train``.
        full: matrices of the events before ``test_start`` (None without test evaluation).
        test: the test period aligned with ``full`` (None without test evaluation).
        event_counts: clean personalisation events in all (``events``) and per period (``train_events``,
            ``validation_events``, ``test_events``), for the run's data manifest.
        everything: matrices of every event up to the data's ``as_of`` (only for ``refit="all"``).
    """

    dataset: Dataset
    validation_start: datetime
    test_start: datetime
    feature_config: FeatureConfig
    train: PeriodMatrices
    validation: EvaluationTask
    full: PeriodMatrices | None = None
    test: EvaluationTask | None = None
    event_counts: dict[str, int] = field(default_factory=dict)
    everything: PeriodMatrices | None = None

    def cutoffs(self) -> dict[str, str]:
        return {
            "validation_start": self.validation_start.isoformat(),
            "test_start": self.test_start.isoformat(),
        }

    def manifest(self) -> DataManifest:
        """The run's data manifest: cut-offs from the feature manifest, events, interactions and customers."""
        rows = dict(self.event_counts)
        matrix = self.train.interactions.matrix
        rows.update(
            {
                "train_interactions": int(matrix.nnz),
                "train_customers": int(matrix.shape[0]),
                "train_items": int(matrix.shape[1]),
                "validation_purchases": self.validation.counts.get("period_purchases", 0),
                "validation_customers": self.validation.counts.get("customers", 0),
            }
        )
        if self.full is not None and self.test is not None:
            rows.update(
                {
                    "full_interactions": int(self.full.interactions.matrix.nnz),
                    "test_purchases": self.test.counts.get("period_purchases", 0),
                    "test_customers": self.test.counts.get("customers", 0),
                }
            )
        return DataManifest.describe(
            self.dataset,
            validation_start=self.validation_start,
            test_start=self.test_start,
            split={"source": "feature manifest"},
            rows=rows,
        )


def _period_matrices(events: pl.LazyFrame, config: FeatureConfig, as_of: datetime) -> PeriodMatrices:
    weights = interaction_weights(events, config.interactions, as_of=as_of).collect()
    interactions = build_interactions(weights)
    return PeriodMatrices(
        interactions,
        purchase_matrix(events, interactions.customers, interactions.items),
        recency_matrix(events, interactions.customers, interactions.items, as_of=as_of),
        as_of,
        events.select(pl.col(TIMESTAMP_COL).max()).collect().item(),
    )


def _profiles_at(ds: Dataset, config: FeatureConfig, as_of: datetime) -> pl.DataFrame:
    # Segments as they stood at the cut-off (journey phase changes over time), from profiling-consented events.
    events = clean_events(ds, config, purpose="profiling").filter(pl.col(TIMESTAMP_COL) < as_of)
    return build_profiles(
        events,
        ds.scan("items", required=False),
        ds.scan("customers", required=False),
        as_of=as_of,
        config=config.profiles,
    ).collect()


def prepare_cf_data(
    data: Dataset | str | Path,
    *,
    evaluation: EvaluationConfig | None = None,
    with_test: bool = True,
    refit_all: bool = False,
    progress: bool = False,
) -> CFData:
    """Split the clean events at the manifest's cut-offs and build the matrices and evaluation periods (and,
    with ``refit_all``, the matrices of every event up to the manifest's ``as_of``).

    Raises:
        DatasetError: the dataset or its manifest is missing (run ``nextbest features build``).
        CFDataError: the manifest has no split, or the training period has no interactions.
    """
    ds = data if isinstance(data, Dataset) else Dataset.at(data)
    ds.require()
    manifest = ds.read_manifest()
    splits = manifest.get("splits")
    if not splits:
        why = "; ".join(manifest.get("warnings", [])) or "the manifest has no splits"
        raise CFDataError(f"{ds.root}: cannot train without a train/validation/test split ({why})")
    validation_start = datetime.fromisoformat(splits["validation_start"])
    test_start = datetime.fromisoformat(splits["test_start"])
    config = FeatureConfig.model_validate(manifest.get("config", {}))
    evaluation = evaluation or EvaluationConfig()
    steps = tqdm(total=4 if with_test else 2, desc="preparing data", disable=not progress, unit="step")
    events = clean_events(ds, config, purpose="personalisation").collect().lazy()
    ts = pl.col(TIMESTAMP_COL)
    event_counts = (
        events.select(
            pl.len().alias("events"),
            (ts < validation_start).sum().alias("train_events"),
            ((ts >= validation_start) & (ts < test_start)).sum().alias("validation_events"),
            (ts >= test_start).sum().alias("test_events"),
        )
        .collect()
        .row(0, named=True)
    )
    split = temporal_split(events, validation_start=validation_start, test_start=test_start)
    train = _period_matrices(split.train, config, validation_start)
    if train.interactions.matrix.nnz == 0:
        raise CFDataError(f"{ds.root}: no interactions before {validation_start.isoformat()} to train on")
    steps.update()
    validation = prepare_evaluation(
        train.interactions,
        split.validation,
        bought=train.bought,
        profiles=_profiles_at(ds, config, validation_start),
        config=evaluation,
    )
    steps.update()
    full = test = None
    if with_test:
        full = _period_matrices(events.filter(pl.col(TIMESTAMP_COL) < test_start), config, test_start)
        steps.update()
        test = prepare_evaluation(
            full.interactions,
            split.test,
            bought=full.bought,
            profiles=_profiles_at(ds, config, test_start),
            config=evaluation,
        )
        steps.update()
    everything = None
    if refit_all:
        everything = _period_matrices(events, config, datetime.fromisoformat(manifest["as_of"]))
    steps.close()
    return CFData(
        ds,
        validation_start,
        test_start,
        config,
        train,
        validation,
        full,
        test,
        {k: int(v) for k, v in event_counts.items()},
        everything,
    )
