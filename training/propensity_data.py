"""Loading the propensity training table of a dataset: exposures, as-of features, affinity, consent view, split.

:func:`load_propensity_data` orchestrates the parts, each its own module: :mod:`training.propensity_targets`
(exposures, derived targets, as-of profiles, time splits), :mod:`training.activity` (activity features),
:mod:`training.affinity` (the CF affinity), :mod:`training.campaign_inputs` (the customer's history with an
action's target items and with earlier actions) and :mod:`training.encoder` (the feature encoder shared with
serving). Their public names are re-exported here, so older imports keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset, DatasetError
from nextbest.features.pipeline import FeatureConfig, clean_events, data_as_of
from nextbest.features.privacy import consent_granted, consent_state
from nextbest.features.profiles import DEMOGRAPHICS, SEGMENT_FEATURES, age_band
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    EXPOSURE_ID,
    RESPONDED,
    TIMESTAMP_COL,
)
from nextbest.training.activity import (
    ACTIVITY_WINDOWS,
    CHANNEL_SHARE_PREFIX,
    RECENT_EVENT_DAYS,
    SESSIONS_PREFIX,
    activity_asof,
    activity_channels,
    customer_activity,
    item_reference_prices,
    price_reference_columns,
    reference_prices,
)
from nextbest.training.affinity import (
    AFFINITY,
    AFFINITY_FILE,
    AFFINITY_META_FILE,
    ActionAffinity,
    action_target_items,
    affinity_asof,
    build_action_affinity,
    champion_affinity_config,
    fit_affinity_als,
    foldable_factor_model,
    registered_recommender,
)
from nextbest.training.campaign_inputs import (
    CAMPAIGN_COLUMNS,
    ActionTargets,
    action_targets,
    campaign_inputs_asof,
    campaign_inputs_for,
)
from nextbest.training.encoder import (
    ACTION_PREFIX,
    EXCLUDED_CUSTOMER_COLUMNS,
    HOUR,
    PAIR_NUMERIC_COLUMNS,
    UNKNOWN_INDEX,
    WEEKDAY,
    EncodedRows,
    EncoderState,
    FeatureEncoder,
    FeatureSpec,
    MatchPair,
    NumericStat,
    infer_feature_spec,
)
from nextbest.training.propensity_config import P_TRUE, SNAPSHOT_AT, PropensityDataConfig, PropensityDataError
from nextbest.training.propensity_targets import (
    DERIVED_KIND,
    PropensityData,
    build_training_table,
    default_derived_attribute,
    derived_action_id,
    derived_action_log,
    exposure_snapshots,
    join_profiles_asof,
    period_cutoffs,
    profile_snapshots,
    snapshot_times,
    split_table,
    time_cutoffs,
)

__all__ = [
    "ACTION_PREFIX",
    "ACTIVITY_WINDOWS",
    "AFFINITY",
    "AFFINITY_FILE",
    "AFFINITY_META_FILE",
    "CAMPAIGN_COLUMNS",
    "CHANNEL_SHARE_PREFIX",
    "DERIVED_KIND",
    "EXCLUDED_CUSTOMER_COLUMNS",
    "EXPOSURE_COLUMNS",
    "HOUR",
    "PAIR_NUMERIC_COLUMNS",
    "P_TRUE",
    "RECENT_EVENT_DAYS",
    "SESSIONS_PREFIX",
    "SNAPSHOT_AT",
    "UNKNOWN_INDEX",
    "WEEKDAY",
    "ActionAffinity",
    "ActionTargets",
    "EncodedRows",
    "EncoderState",
    "FeatureEncoder",
    "FeatureSpec",
    "MatchPair",
    "NumericStat",
    "PropensityData",
    "PropensityDataConfig",
    "PropensityDataError",
    "action_target_items",
    "action_targets",
    "activity_asof",
    "activity_channels",
    "affinity_asof",
    "build_action_affinity",
    "build_training_table",
    "campaign_inputs_asof",
    "campaign_inputs_for",
    "champion_affinity_config",
    "customer_activity",
    "default_derived_attribute",
    "derived_action_id",
    "derived_action_log",
    "exposure_snapshots",
    "fit_affinity_als",
    "foldable_factor_model",
    "infer_feature_spec",
    "item_reference_prices",
    "join_profiles_asof",
    "load_propensity_data",
    "model_sees",
    "model_view",
    "period_cutoffs",
    "price_reference_columns",
    "profile_snapshots",
    "reference_prices",
    "registered_recommender",
    "snapshot_times",
    "split_table",
    "time_cutoffs",
]

EXPOSURE_COLUMNS = frozenset({EXPOSURE_ID, CUSTOMER_ID, ACTION_ID, CHANNEL, TIMESTAMP_COL, RESPONDED})


def model_sees(column: str, *, personalisation: bool, profiling: bool) -> bool:
    """Whether the propensity model may see a customer's ``column``, given the consent in force: with
    personalisation, every customer column; without it, only the segment (:data:`SEGMENT_FEATURES`); the
    customer–action affinity (:data:`AFFINITY`, made from the customer's interactions) only with both
    personalisation and profiling.

    The one rule of what the model sees: :func:`model_view` (offline, over training rows) and
    :func:`serving.customer_view.model_features` (online, one customer) both call it.
    """
    if column == AFFINITY:
        return personalisation and profiling
    return personalisation or column in SEGMENT_FEATURES


def _model_sees_expr(column: str, personalisation: pl.Expr, profiling: pl.Expr) -> pl.Expr:
    """:func:`model_sees` over rows: the consent cases where it holds, as one boolean expression."""
    cases = [
        personalisation.eq(p) & profiling.eq(q)
        for p in (True, False)
        for q in (True, False)
        if model_sees(column, personalisation=p, profiling=q)
    ]
    return pl.any_horizontal(cases) if cases else pl.lit(False)


def model_view(
    table: pl.DataFrame,
    customer_columns: Sequence[str],
    customers: pl.DataFrame | None,
    state: pl.DataFrame,
    *,
    default: bool,
) -> pl.DataFrame:
    """Apply to training rows the rule the service applies to a request (``Engine.model_inputs``; both call :func:`model_sees`), so that
    the model learns from what it will be shown:

    * personalisation granted: the profile (present only with profiling consent and earlier events) with the
      customer's demographics (:data:`DEMOGRAPHICS` from the customers table) filling what it lacks — a new
      customer without events still has an age;
    * personalisation declined: only the segment (:data:`SEGMENT_FEATURES`, the age band derived from the age
      where the profile has none); every other customer column is null;
    * the customer–action affinity needs both personalisation and profiling consent.

    Args:
        table: training rows (``customer_id`` plus ``customer_columns``).
        customer_columns: the model's customer columns.
        customers: the customers table (None: there is none).
        state: the consent in force (:func:`features.privacy.consent_state`).
        default: consent assumed without a record (the feature config's ``consent_default``).

    Returns:
        ``table`` with its customer columns replaced, rows and order unchanged.
    """
    columns = set(customer_columns)
    known = set() if customers is None else set(customers.columns)
    demo = [c for c in DEMOGRAPHICS if c in columns and c in known]
    # The age is read for the age band of a customer without personalisation even when it is not an input.
    loaded = [*demo, *(["age"] if "age" in known and "age" not in demo and "age_band" in columns else [])]
    work = table.join(
        state.select(CUSTOMER_ID, "personalisation", "profiling"),
        on=CUSTOMER_ID,
        how="left",
        maintain_order="left",
    )
    if loaded:
        renamed = customers.select(CUSTOMER_ID, *[pl.col(c).alias(f"__demo_{c}") for c in loaded]).unique(
            CUSTOMER_ID, keep="last"
        )
        work = work.join(renamed, on=CUSTOMER_ID, how="left", maintain_order="left")
    personal = consent_granted("personalisation", default=default)
    profiled = consent_granted("profiling", default=default)
    exprs = []
    for c in customer_columns:
        value = (
            pl.coalesce(pl.col(c), pl.col(f"__demo_{c}").cast(table.schema[c])) if c in demo else pl.col(c)
        )
        if c == "age_band" and "age" in loaded:
            # Without the profile (personalisation declined, or no events yet) the band of the customers
            # table's age, as the service derives it.
            band = age_band(pl.col("__demo_age")).replace("unknown", None)
            value = pl.when(personal).then(value).otherwise(pl.coalesce(value, band.cast(table.schema[c])))
        sees = _model_sees_expr(c, personal, profiled)
        exprs.append(pl.when(sees).then(value).otherwise(pl.lit(None, dtype=table.schema[c])).alias(c))
    return work.with_columns(exprs).select(table.columns)


def load_propensity_data(
    ds: Dataset,
    config: PropensityDataConfig | None = None,
    *,
    feature_config: FeatureConfig | None = None,
    progress: bool = False,
    recommender: Any | None = None,
    recommender_label: str | None = None,
) -> PropensityData:
    """The propensity training table of a dataset, split by time.

    Uses the action log (``raw/actions`` and ``raw/action_catalog``) when there is one (or ``config.target``
    says so), otherwise derived follow-up purchase targets. Profiles and activity come from events consented
    for profiling, cleaned with ``feature_config`` (default: the config of the dataset's feature build, from its
    manifest, else the defaults). On generated data the planted ``p_true`` of ``truth/propensity.parquet`` is joined by ``exposure_id``.

    With ``config.affinity`` (the default) each row also gets ``cf_affinity``, the customer–action affinity at
    the row's profile snapshot (see :func:`build_action_affinity` for which CF model gives it). Actions'
    target items come from ``raw/action_targets`` where the dataset has it, else from their attributes. With
    ``config.campaign_inputs`` rows also get the campaign inputs (:func:`campaign_inputs_asof`).

    Args:
        ds: the dataset.
        config: how the table is built and split.
        feature_config: event cleaning and profile definitions.
        progress: show progress bars.
        recommender: a fitted recommender bundle (the registered champion, see
            :func:`registered_recommender`) to take the affinity's item factors from.
        recommender_label: its registry name and version (recorded with the affinity).

    Raises:
        DatasetError: a required table is missing.
        PropensityDataError: the data cannot be split or has nothing to predict.
    """
    config = config or PropensityDataConfig()
    ds.require()
    if feature_config is None:
        # The settings the dataset's features were built with (consent default, retention, profile rules).
        built = ds.read_manifest().get("config") if ds.manifest_path.exists() else None
        feature_config = FeatureConfig.model_validate(built) if built else FeatureConfig()
    target = config.target
    if target == "auto":
        target = "actions" if ds.has_table("actions") else "derived"
    steps = tqdm(total=3, desc="propensity data", disable=not progress, unit="step")
    steps.set_postfix_str("events")
    # The data's "now", as the feature build takes it (identity resolution never changes timestamps, so the raw
    # files' statistics give it): the events' retention and the consent in force are both read at it.
    as_of = feature_config.as_of or data_as_of(ds)
    events = clean_events(ds, feature_config, purpose="profiling", as_of=as_of).collect()
    items = ds.scan("items", required=False)
    customers = ds.scan("customers", required=False)
    steps.update()
    steps.set_postfix_str("exposures")
    if target == "actions":
        if not ds.has_table("action_catalog"):
            raise DatasetError(f"{ds.raw_dir} has an action log but no action_catalog table")
        history = ds.read("actions")
        exposures = history.select(EXPOSURE_ID, CUSTOMER_ID, ACTION_ID, CHANNEL, TIMESTAMP_COL, RESPONDED)
        catalog = ds.read("action_catalog")
        target_name = "actions"
    else:
        attribute = config.derived_attribute or default_derived_attribute(items)
        exposures, catalog = derived_action_log(
            events,
            items,
            attribute=attribute,
            horizon_days=config.horizon_days,
            every_days=config.snapshot_days,
            values=config.derived_values,
            active_days=config.active_days,
            max_rows=config.max_rows,
            seed=config.seed,
        )
        target_name = f"derived:{attribute}:{config.horizon_days}d"
        history = exposures
    if exposures.is_empty():
        raise PropensityDataError(f"{ds.root}: no exposures to learn from")
    steps.update()
    steps.set_postfix_str("as-of profiles")
    table = build_training_table(
        exposures,
        events,
        items,
        customers,
        snapshot_days=config.snapshot_days,
        config=feature_config.profiles,
        progress=False,
    )
    truth_path = ds.truth_dir / "propensity.parquet"
    if target == "actions" and truth_path.exists():
        truth = pl.read_parquet(truth_path).select(EXPOSURE_ID, pl.col(P_TRUE).cast(pl.Float64))
        table = table.join(truth, on=EXPOSURE_ID, how="left", maintain_order="left")
    # Explicit target items (the products a campaign's coupons cover) where the dataset lists them.
    targets = ds.read("action_targets") if target == "actions" and ds.has_table("action_targets") else None
    affinity = None
    if config.affinity and items is not None:
        validation_start, _ = period_cutoffs(table[TIMESTAMP_COL], config)
        affinity = build_action_affinity(
            events,
            items.collect(),
            catalog,
            config,
            interactions=feature_config.interactions,
            before=validation_start,
            dataset=ds,
            recommender=recommender,
            recommender_label=recommender_label,
            targets=targets,
        )
        if affinity is not None:
            table = table.with_columns(
                affinity_asof(table, events, affinity, feature_config.interactions, progress=progress)
            )
    if config.campaign_inputs:
        prepared = action_targets(
            catalog, items.collect(), targets, group_attribute=config.campaign_group_attribute
        )
        inputs = campaign_inputs_asof(
            table,
            events,
            history,
            prepared,
            response_days=config.horizon_days if target == "derived" else config.response_days,
        )
        table = pl.concat([table.drop(inputs.columns, strict=False), inputs], how="horizontal")
    steps.update()
    steps.close()
    customer_columns = [
        c
        for c in table.columns
        if c not in EXPOSURE_COLUMNS and c not in {SNAPSHOT_AT, P_TRUE, *PAIR_NUMERIC_COLUMNS}
    ]
    customer_columns = [c for c in customer_columns if c not in exposures.columns]
    # What the service would show the model for each row's customer (consent, demographics of new customers).
    table = model_view(
        table,
        customer_columns,
        None if customers is None else customers.collect(),
        consent_state(ds.scan("consent", required=False), as_of=as_of).collect(),
        default=feature_config.consent_default,
    )
    return split_table(
        table,
        catalog,
        customer_columns,
        config,
        target=target_name,
        label_days=config.horizon_days if target == "derived" else None,
        affinity=affinity,
    )
