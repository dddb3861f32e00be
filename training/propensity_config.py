"""The propensity training table's configuration, its error, and the column names every part of it shares."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nextbest.features.errors import NextbestError
from nextbest.training.recommenders import ALSConfig

SNAPSHOT_AT = "snapshot_at"
"""The time of the profile snapshot a training row's customer features come from (events strictly before it)."""
P_TRUE = "p_true"
"""The planted response probability of an exposure (``truth/propensity.parquet``, generated data only)."""


class PropensityDataError(NextbestError, ValueError):
    """The dataset cannot give a propensity training table (no exposures, no attribute to derive targets, …)."""


class PropensityDataConfig(BaseModel):
    """How the propensity training table is built. Round-trips through JSON.

    Attributes:
        target: ``actions`` (the action log), ``derived`` (follow-up purchases) or ``auto`` (the action log when
            the dataset has one).
        snapshot_days: profiles are rebuilt every this many days; a row uses the latest snapshot at or before
            its exposure (smaller is more exact and slower).
        validation_fraction: share of exposures (by time) in the validation period when no cut-off is given.
        test_fraction: share of exposures (by time) in the test period when no cut-off is given.
        validation_start: explicit first time of the validation period.
        test_start: explicit first time of the test period.
        derived_attribute: item attribute of the derived targets; default ``category``, else ``brand``, else the
            first text attribute of the items table.
        horizon_days: derived targets: a purchase within this many days after the snapshot is a response.
        derived_values: derived targets: the most purchased values of the attribute that become actions.
        active_days: derived targets: customers with an event in this many days before a snapshot are exposed.
        max_rows: derived targets: customers are sampled per snapshot to keep at most about this many rows.
        seed: seed of that sampling (and of the affinity's ALS fit).
        affinity: add the customer–action affinity from a collaborative-filtering model as an input
            (:class:`ActionAffinity`); off leaves the table as before.
        affinity_source: ``auto`` uses the recommender passed to :func:`load_propensity_data` (the registered
            champion) when it can fold customers in and was trained on this dataset, else fits ALS on the
            training period's interactions; ``fit`` always fits.
        affinity_aggregate: ``mean`` or ``max`` of the action's target items' standardised scores (``mean``
            was better on validation on the generated world).
        affinity_als: the ALS fitted when no registered model is used.
        campaign_inputs: add the campaign inputs (:mod:`training.campaign_inputs`): the customer's past spend on
            the action's target items and their groups, and earlier exposures and responses (overall and of the
            action's kind), all point-in-time. Needs an action log; off leaves the table as before.
        campaign_group_attribute: the item attribute that groups target items (default ``department``, else
            ``category``).
        response_days: campaign inputs: an earlier exposure's outcome counts as known this many days after it
            when the log has no ``responded_at`` and its action no ``end_date`` (derived targets: the horizon).
    """

    model_config = ConfigDict(extra="forbid")

    target: Literal["auto", "actions", "derived"] = "auto"
    snapshot_days: int = Field(7, ge=1)
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    validation_start: datetime | None = None
    test_start: datetime | None = None
    derived_attribute: str | None = None
    horizon_days: int = Field(14, ge=1)
    derived_values: int = Field(20, ge=1)
    active_days: int = Field(60, ge=1)
    max_rows: int | None = Field(1_000_000, ge=1)
    seed: int = 0
    affinity: bool = True
    affinity_source: Literal["auto", "fit"] = "auto"
    affinity_aggregate: Literal["mean", "max"] = "mean"
    affinity_als: ALSConfig = Field(default_factory=lambda: ALSConfig(factors=32))
    campaign_inputs: bool = False
    campaign_group_attribute: str | None = None
    response_days: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _fractions_leave_training(self) -> PropensityDataConfig:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"validation_fraction + test_fraction must leave at least 10% for training, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        return self
