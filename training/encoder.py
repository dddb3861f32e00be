"""The propensity feature encoder shared by training and serving: rows (customer profile, action, context) in,
model inputs out.

The :class:`FeatureEncoder` turns rows into model inputs in one place for both paths: a whole frame offline
(:meth:`FeatureEncoder.encode_frame`) and one customer against many actions online
(:meth:`FeatureEncoder.encode_one`). Only reading values differs between the two (Polars columns versus a
dict); every derived feature (days since a date, hour and weekday, customer–action matches, normalisation) is
computed by the same NumPy code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from nextbest.features.schema import ACTION_ID, CHANNEL, CUSTOMER_ID, TIMESTAMP, TIMESTAMP_COL
from nextbest.training.activity import CHANNEL_SHARE_PREFIX
from nextbest.training.affinity import AFFINITY
from nextbest.training.campaign_inputs import CAMPAIGN_COLUMNS
from nextbest.training.propensity_config import SNAPSHOT_AT, PropensityDataError

HOUR = "hour"
WEEKDAY = "weekday"
ACTION_PREFIX = "action."
UNKNOWN_INDEX = 0
"""Index 0 of every categorical vocabulary: missing, unseen or too rare a value."""
PAIR_NUMERIC_COLUMNS: tuple[str, ...] = (AFFINITY, *CAMPAIGN_COLUMNS)
"""Training-table columns that vary by customer *and* action (not customer columns: see :class:`FeatureSpec`)."""

EXCLUDED_CUSTOMER_COLUMNS = frozenset({CUSTOMER_ID, SNAPSHOT_AT, "recency_days"})
"""Profile columns that are not model inputs: ids, and ``recency_days``, which is relative to the snapshot;
the model derives the exact recency at the exposure time from ``last_purchase`` instead."""
_EPOCH = datetime(1970, 1, 1)
_DAY_SECONDS = 86_400.0
_LOG_ABOVE = 10.0
"""Non-negative numeric features whose training maximum exceeds this are log1p-transformed (counts, money, days)."""
_CLIP = 5.0


def _kind_of(dtype: pl.DataType) -> str | None:
    if dtype in (pl.String, pl.Boolean) or isinstance(dtype, pl.Categorical | pl.Enum):
        return "categorical"
    if isinstance(dtype, pl.Datetime) or dtype == pl.Date:
        return "date"
    if dtype.is_numeric():
        return "numeric"
    return None


class MatchPair(BaseModel):
    """A customer preference and the action attribute it is compared with (``preferred_brand`` vs ``brand``).

    Attributes:
        customer: the customer's categorical column.
        action: the action catalogue column.
        share: the customer's share column of that preference, if any.
    """

    model_config = ConfigDict(extra="forbid")

    customer: str
    action: str
    share: str | None = None


class FeatureSpec(BaseModel):
    """Which columns feed the model, and how. Inferred from the data at training time, stored with the model.

    Categorical inputs are, in order: customer categoricals, ``action_id``, action categoricals, ``channel``,
    ``hour``, ``weekday``. Numeric inputs are, in order: customer numerics, days since each customer date, action
    numerics, days until each action date, one match flag per pair, one matched share per pair with a share, and
    the per (customer, action) numerics (``cf_affinity``).
    """

    model_config = ConfigDict(extra="forbid")

    customer_categorical: list[str] = Field(default_factory=list)
    customer_numeric: list[str] = Field(default_factory=list)
    customer_dates: list[str] = Field(default_factory=list)
    action_categorical: list[str] = Field(default_factory=list)
    action_numeric: list[str] = Field(default_factory=list)
    action_dates: list[str] = Field(default_factory=list)
    pairs: list[MatchPair] = Field(default_factory=list)
    pair_numeric: list[str] = Field(default_factory=list)
    """Numerics that vary by customer and action (:data:`PAIR_NUMERIC_COLUMNS`): a column offline, a value per
    action online (:meth:`FeatureEncoder.encode_one`'s ``affinities``)."""
    skipped: list[str] = Field(default_factory=list)
    """Columns left out because their type is not usable (lists, structs)."""

    @property
    def categorical_names(self) -> list[str]:
        return [
            *self.customer_categorical,
            ACTION_ID,
            *(ACTION_PREFIX + c for c in self.action_categorical),
            CHANNEL,
            HOUR,
            WEEKDAY,
        ]

    @property
    def numeric_names(self) -> list[str]:
        """Names of the raw numeric inputs (before missing-value indicators are appended)."""
        return [
            *self.customer_numeric,
            *(f"days_since_{c}" for c in self.customer_dates),
            *(ACTION_PREFIX + c for c in self.action_numeric),
            *(f"{ACTION_PREFIX}days_until_{c}" for c in self.action_dates),
            *(f"match_{p.action}" for p in self.pairs),
            *(f"match_{p.action}_share" for p in self.pairs if p.share),
            *self.pair_numeric,
        ]


def infer_feature_spec(
    table_schema: pl.Schema, customer_columns: Sequence[str], catalog: pl.DataFrame
) -> FeatureSpec:
    """The feature spec of a training table: each column's role from its dtype.

    Text and boolean columns are categorical, numbers numeric, dates and datetimes become day differences to
    the exposure time; a customer column ``preferred_<A>`` and a catalogue column ``<A>`` form a match pair.
    """
    spec = FeatureSpec()
    spec.pair_numeric = [c for c in PAIR_NUMERIC_COLUMNS if c in table_schema]
    for c in customer_columns:
        if c in EXCLUDED_CUSTOMER_COLUMNS or c in PAIR_NUMERIC_COLUMNS or c not in table_schema:
            continue
        kind = _kind_of(table_schema[c])
        target = {
            "categorical": spec.customer_categorical,
            "numeric": spec.customer_numeric,
            "date": spec.customer_dates,
        }.get(kind or "")
        (target if target is not None else spec.skipped).append(c)
    for c, dtype in catalog.schema.items():
        if c == ACTION_ID:
            continue
        kind = _kind_of(dtype)
        target = {
            "categorical": spec.action_categorical,
            "numeric": spec.action_numeric,
            "date": spec.action_dates,
        }.get(kind or "")
        if target is not None:
            target.append(c)
        else:
            spec.skipped.append(ACTION_PREFIX + c)
    for a in spec.action_categorical:
        pref = f"preferred_{a}"
        if pref in spec.customer_categorical:
            share = f"{pref}_share"
            spec.pairs.append(
                MatchPair(customer=pref, action=a, share=share if share in spec.customer_numeric else None)
            )
    return spec


class NumericStat(BaseModel):
    """How one raw numeric input is normalised: optional log1p, then standardised; NaN becomes 0 (the mean)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    log: bool = False
    mean: float = 0.0
    std: float = 1.0
    missing_indicator: bool = False
    """Whether a 0/1 "was missing" input is appended (the column had missing values in training)."""


class EncoderState(BaseModel):
    """The learned state of a :class:`FeatureEncoder` (JSON; the action catalogue is stored beside it)."""

    model_config = ConfigDict(extra="forbid")

    spec: FeatureSpec
    vocabularies: dict[str, list[str]]
    """Known values per categorical input (index = position + 1; 0 is unknown)."""
    numeric: list[NumericStat]


@dataclass
class EncodedRows:
    """Model inputs: categorical indices (int64, rows × categorical inputs) and numerics (float32)."""

    categorical: np.ndarray
    numeric: np.ndarray

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def take(self, index: np.ndarray) -> EncodedRows:
        return EncodedRows(self.categorical[index], self.numeric[index])


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _to_float(value: Any) -> float:
    if value is None or isinstance(value, str):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _to_epoch_seconds(value: Any) -> float:
    """Seconds since 1970 of a naive-UTC datetime, date or ISO string; NaN when absent or unreadable."""
    if value is None:
        return float("nan")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return float("nan")
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return (value - _EPOCH).total_seconds()
    if isinstance(value, date):
        return (datetime(value.year, value.month, value.day) - _EPOCH).total_seconds()
    return float("nan")


def _epoch_column(series: pl.Series) -> np.ndarray:
    s = series.cast(TIMESTAMP) if series.dtype == pl.Date else series
    if isinstance(s.dtype, pl.Datetime) and s.dtype.time_zone is not None:
        s = s.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return (s.dt.epoch("ms").cast(pl.Float64) / 1000.0).fill_null(float("nan")).to_numpy()


def _float_column(series: pl.Series) -> np.ndarray:
    return series.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()


def _broadcast(block: np.ndarray, n: int) -> np.ndarray:
    return block if block.shape[0] == n else np.broadcast_to(block, (n, block.shape[1]))


class FeatureEncoder:
    """Turns exposure rows (customer profile, action, channel, time) into model inputs; fitted on training rows.

    Build with :meth:`fit`; restore with :meth:`from_state`. The action catalogue is part of the encoder: rows
    name an ``action_id`` and the encoder supplies the action's attributes.
    """

    def __init__(self, state: EncoderState, catalog: pl.DataFrame) -> None:
        self.state = state
        self.spec = state.spec
        self.catalog = catalog
        self._maps = {c: {v: i + 1 for i, v in enumerate(vals)} for c, vals in state.vocabularies.items()}
        cust_cat = self.spec.customer_categorical
        act_cat = [ACTION_ID, *(ACTION_PREFIX + c for c in self.spec.action_categorical)]
        self._pair_customer = np.array([cust_cat.index(p.customer) for p in self.spec.pairs], dtype=np.int64)
        self._pair_action = np.array(
            [act_cat.index(ACTION_PREFIX + p.action) for p in self.spec.pairs], dtype=np.int64
        )
        self._pair_share = np.array(
            [self.spec.customer_numeric.index(p.share) for p in self.spec.pairs if p.share], dtype=np.int64
        )
        self._pair_has_share = np.array([p.share is not None for p in self.spec.pairs], dtype=bool)
        stats = state.numeric
        self._log = np.array([s.log for s in stats], dtype=bool)
        self._mean = np.array([s.mean for s in stats], dtype=np.float64)
        self._std = np.array([s.std for s in stats], dtype=np.float64)
        self._indicators = np.array([s.missing_indicator for s in stats], dtype=bool)
        # The action block is encoded once; row 0 stands for an action the catalogue does not know.
        ids = catalog[ACTION_ID].to_list()
        self._action_row = {a: i + 1 for i, a in enumerate(ids)}
        self._all_rows = np.arange(1, len(ids) + 1, dtype=np.int64)
        a_cat = np.column_stack(
            [self._codes(catalog[ACTION_ID], ACTION_ID)]
            + [self._codes(catalog[c], ACTION_PREFIX + c) for c in self.spec.action_categorical]
        )
        a_num = self._floats([catalog[c] for c in self.spec.action_numeric], catalog.height)
        a_dates = self._epochs([catalog[c] for c in self.spec.action_dates], catalog.height)
        self._act_cat = np.vstack([np.zeros((1, a_cat.shape[1]), np.int64), a_cat])
        self._act_num = np.vstack([np.full((1, a_num.shape[1]), np.nan), a_num])
        self._act_dates = np.vstack([np.full((1, a_dates.shape[1]), np.nan), a_dates])

    # -- fitting --------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        catalog: pl.DataFrame,
        customer_columns: Sequence[str],
        *,
        min_count: int = 5,
    ) -> FeatureEncoder:
        """Learn vocabularies and normalisation from training rows.

        Args:
            train: training rows (exposure columns plus customer profile columns).
            catalog: the action catalogue.
            customer_columns: the profile columns of ``train``.
            min_count: categorical values (action ids included) seen fewer times in training are treated as
                unknown; the catalogue's attribute values are always kept.
        """
        spec = infer_feature_spec(train.schema, customer_columns, catalog)
        vocab: dict[str, list[str]] = {}

        def frequent(series: pl.Series) -> set[str]:
            counts = series.cast(pl.String).drop_nulls().value_counts()
            return set(counts.filter(pl.col("count") >= min_count)[series.name].to_list())

        for c in spec.customer_categorical:
            vocab[c] = sorted(frequent(train[c]))
        # Actions without enough training exposures (new campaigns) share the unknown index, which training
        # teaches by hiding some rows' action ids (PropensityConfig.action_dropout); their attributes still count.
        vocab[ACTION_ID] = sorted(
            set(catalog[ACTION_ID].cast(pl.String).drop_nulls().to_list()) & frequent(train[ACTION_ID])
        )
        for c in spec.action_categorical:
            vocab[ACTION_PREFIX + c] = sorted(set(catalog[c].cast(pl.String).drop_nulls().to_list()))
        for p in spec.pairs:
            # One vocabulary for both sides, so that equal values get equal indices and can be matched.
            shared = sorted(set(vocab[p.customer]) | set(vocab[ACTION_PREFIX + p.action]))
            vocab[p.customer] = vocab[ACTION_PREFIX + p.action] = shared
        vocab[CHANNEL] = sorted(frequent(train[CHANNEL])) if CHANNEL in train.columns else []
        vocab[HOUR] = [f"{h:02d}" for h in range(24)]
        vocab[WEEKDAY] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        provisional = EncoderState(
            spec=spec,
            vocabularies=vocab,
            numeric=[NumericStat(name=n) for n in spec.numeric_names],
        )
        raw = cls(provisional, catalog)._raw_frame(train)[1]
        stats = []
        for j, name in enumerate(spec.numeric_names):
            col = raw[:, j]
            finite = col[np.isfinite(col)]
            log = bool(finite.size and finite.min() >= 0 and finite.max() > _LOG_ABOVE)
            values = np.log1p(finite) if log else finite
            mean = float(values.mean()) if values.size else 0.0
            std = float(values.std()) if values.size else 1.0
            stats.append(
                NumericStat(
                    name=name,
                    log=log,
                    mean=mean,
                    std=std if std > 1e-9 else 1.0,
                    missing_indicator=bool(finite.size < col.size),
                )
            )
        return cls(EncoderState(spec=spec, vocabularies=vocab, numeric=stats), catalog)

    @classmethod
    def from_state(cls, state: EncoderState | Mapping[str, Any], catalog: pl.DataFrame) -> FeatureEncoder:
        """Restore an encoder from its saved state and catalogue."""
        if not isinstance(state, EncoderState):
            state = EncoderState.model_validate(state)
        return cls(state, catalog)

    # -- shapes ---------------------------------------------------------------------------------------------

    @property
    def cardinalities(self) -> list[int]:
        """Vocabulary size (unknown included) of each categorical input, in input order."""
        return [len(self.state.vocabularies[c]) + 1 for c in self.spec.categorical_names]

    @property
    def n_numeric(self) -> int:
        """Number of numeric inputs (normalised values plus missing-value indicators)."""
        return len(self.state.numeric) + int(self._indicators.sum())

    @property
    def numeric_input_names(self) -> list[str]:
        return [s.name for s in self.state.numeric] + [
            f"{s.name}_missing" for s in self.state.numeric if s.missing_indicator
        ]

    @property
    def activity_channels(self) -> list[str]:
        """The event channels whose shares are inputs (pass them to :func:`customer_activity` when serving)."""
        return [
            c.removeprefix(CHANNEL_SHARE_PREFIX)
            for c in self.spec.customer_numeric
            if c.startswith(CHANNEL_SHARE_PREFIX)
        ]

    @property
    def action_id_position(self) -> int:
        """Column of ``action_id`` among the categorical inputs."""
        return len(self.spec.customer_categorical)

    @property
    def action_ids(self) -> list[str]:
        return self.catalog[ACTION_ID].to_list()

    # -- reading values -------------------------------------------------------------------------------------

    def _codes(self, series: pl.Series, vocab: str) -> np.ndarray:
        mapping = self._maps[vocab]
        return (
            series.cast(pl.String)
            .replace_strict(mapping, default=UNKNOWN_INDEX, return_dtype=pl.Int64)
            .fill_null(UNKNOWN_INDEX)
            .to_numpy()
        )

    @staticmethod
    def _floats(columns: Sequence[pl.Series], n: int) -> np.ndarray:
        if not columns:
            return np.zeros((n, 0))
        return np.column_stack([_float_column(c) for c in columns])

    @staticmethod
    def _epochs(columns: Sequence[pl.Series], n: int) -> np.ndarray:
        if not columns:
            return np.zeros((n, 0))
        return np.column_stack([_epoch_column(c) for c in columns])

    def known_actions(self, action_ids: Sequence[str]) -> list[str]:
        """The ids among ``action_ids`` that the catalogue holds, in order."""
        rows = self._action_row
        return [a for a in action_ids if a in rows]

    def action_rows(self, action_ids: Sequence[str] | None) -> np.ndarray:
        """Rows of the encoded catalogue for ``action_ids`` (0 for unknown ids; None: every action)."""
        if action_ids is None:
            return self._all_rows
        get = self._action_row.get
        return np.fromiter((get(a, 0) for a in action_ids), dtype=np.int64, count=len(action_ids))

    def _raw_frame(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        n = frame.height
        missing = [c for c in (ACTION_ID, TIMESTAMP_COL) if c not in frame.columns]
        if missing:
            raise PropensityDataError(f"rows to encode lack column(s) {', '.join(missing)}")

        def column(c: str, dtype: pl.DataType) -> pl.Series:
            return frame[c] if c in frame.columns else pl.Series(c, [None] * n, dtype=dtype)

        cust_cat = (
            np.column_stack([self._codes(column(c, pl.String), c) for c in spec.customer_categorical])
            if spec.customer_categorical
            else np.zeros((n, 0), np.int64)
        )
        cust_num = self._floats([column(c, pl.Float64) for c in spec.customer_numeric], n)
        cust_dates = self._epochs([column(c, TIMESTAMP) for c in spec.customer_dates], n)
        rows = self._action_row
        act_rows = (
            frame[ACTION_ID]
            .cast(pl.String)
            .replace_strict(rows, default=0, return_dtype=pl.Int64)
            .fill_null(0)
            .to_numpy()
        )
        channel = self._codes(column(CHANNEL, pl.String), CHANNEL)
        at = _epoch_column(frame[TIMESTAMP_COL])
        pair = self._floats([column(c, pl.Float64) for c in spec.pair_numeric], n)
        return self._assemble(cust_cat, cust_num, cust_dates, act_rows, channel, at, pair, normalise=False)

    # -- the one shared derivation --------------------------------------------------------------------------

    def _assemble(
        self,
        cust_cat: np.ndarray,
        cust_num: np.ndarray,
        cust_dates: np.ndarray,
        act_rows: np.ndarray,
        channel: np.ndarray,
        at_seconds: np.ndarray,
        pair_num: np.ndarray,
        *,
        normalise: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Combine customer blocks (one row, or one per action row) with action rows, per (customer, action)
        numerics (one row per action row) and context."""
        n = act_rows.shape[0]
        a_cat = self._act_cat[act_rows]
        a_num = self._act_num[act_rows]
        a_dates = self._act_dates[act_rows]
        at = np.broadcast_to(at_seconds.reshape(-1, 1), (n, 1))
        at_known = np.isfinite(at)
        safe_at = np.where(at_known, at, 0.0)
        hour = np.where(at_known, (safe_at // 3600) % 24 + 1, UNKNOWN_INDEX).astype(np.int64)
        # 1970-01-01 was a Thursday: (days + 3) % 7 counts from Monday.
        weekday = np.where(at_known, (safe_at // _DAY_SECONDS + 3) % 7 + 1, UNKNOWN_INDEX).astype(np.int64)
        cust_cat = _broadcast(cust_cat, n)
        categorical = np.concatenate(
            [cust_cat, a_cat, _broadcast(channel.reshape(-1, 1), n), hour, weekday], axis=1
        )
        cust_num = _broadcast(cust_num, n)
        days_since = (at - _broadcast(cust_dates, n)) / _DAY_SECONDS
        days_until = (a_dates - at) / _DAY_SECONDS
        pref = cust_cat[:, self._pair_customer]
        match = ((pref == a_cat[:, self._pair_action]) & (pref != UNKNOWN_INDEX)).astype(np.float64)
        shares = np.nan_to_num(cust_num[:, self._pair_share], nan=0.0)
        matched_share = match[:, self._pair_has_share] * shares
        raw = np.concatenate(
            [cust_num, days_since, a_num, days_until, match, matched_share, pair_num], axis=1
        )
        if not normalise:
            return categorical, raw
        return categorical, self._normalise(raw)

    def _normalise(self, raw: np.ndarray) -> np.ndarray:
        x = np.array(raw, dtype=np.float64)
        missing = ~np.isfinite(x)
        if self._log.any():
            logged = x[:, self._log]
            x[:, self._log] = np.log1p(np.clip(logged, 0.0, None))
        x = (x - self._mean) / self._std
        x[missing] = 0.0
        np.clip(x, -_CLIP, _CLIP, out=x)
        out = np.concatenate([x, missing[:, self._indicators].astype(np.float64)], axis=1)
        return out.astype(np.float32)

    # -- public encoding ------------------------------------------------------------------------------------

    def encode_frame(self, frame: pl.DataFrame) -> EncodedRows:
        """Encode rows with ``action_id``, ``timestamp``, optional ``channel`` and the customer profile columns
        (absent profile columns count as missing)."""
        categorical, raw = self._raw_frame(frame)
        return EncodedRows(categorical, self._normalise(raw))

    def encode_one(
        self,
        customer: Mapping[str, Any],
        action_ids: Sequence[str] | None,
        channel: str | None,
        at: datetime,
        *,
        affinities: Mapping[str, float] | None = None,
        pair_values: Mapping[str, Mapping[str, float]] | None = None,
    ) -> EncodedRows:
        """Encode one customer against many actions (the online path).

        Args:
            customer: the customer's profile row (as in ``profiles.parquet``; missing keys count as missing).
            action_ids: the actions to score; None for the whole catalogue.
            channel: the channel of the request.
            at: the time of the request (naive UTC, or aware).
            affinities: action id → the customer's ``cf_affinity`` (:meth:`ActionAffinity.score_items`);
                absent actions and None count as missing.
            pair_values: other per (customer, action) inputs of :attr:`FeatureSpec.pair_numeric`, as column →
                action id → value (:func:`training.campaign_inputs.campaign_inputs_for`); absent ones are missing.
        """
        spec = self.spec
        maps = self._maps
        get = customer.get
        cust_cat = np.array(
            [[maps[c].get(_to_text(get(c)), UNKNOWN_INDEX) for c in spec.customer_categorical]],
            dtype=np.int64,
        ).reshape(1, -1)
        cust_num = np.array([[_to_float(get(c)) for c in spec.customer_numeric]], dtype=np.float64).reshape(
            1, -1
        )
        cust_dates = np.array(
            [[_to_epoch_seconds(get(c)) for c in spec.customer_dates]], dtype=np.float64
        ).reshape(1, -1)
        rows = self.action_rows(action_ids)
        chan = np.array([maps[CHANNEL].get(channel, UNKNOWN_INDEX) if channel else UNKNOWN_INDEX])
        at_seconds = np.array([_to_epoch_seconds(at)])
        pair = np.full((rows.shape[0], len(spec.pair_numeric)), np.nan)
        ids = self.action_ids if action_ids is None else action_ids
        given = {**(pair_values or {}), **({AFFINITY: affinities} if affinities else {})}
        for j, c in enumerate(spec.pair_numeric):
            values = given.get(c)
            if values:
                pair[:, j] = [_to_float(values.get(a)) for a in ids]
        categorical, numeric = self._assemble(cust_cat, cust_num, cust_dates, rows, chan, at_seconds, pair)
        return EncodedRows(categorical, numeric)

    def one_hot_matrix(self, rows: EncodedRows) -> Any:
        """The same inputs as a sparse design matrix (one-hot categoricals, then numerics) for linear models."""
        import scipy.sparse as sp

        cards = np.array(self.cardinalities, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
        n, k = rows.categorical.shape
        cols = (rows.categorical + offsets).ravel()
        indptr = np.arange(0, n * k + 1, k)
        onehot = sp.csr_matrix((np.ones(n * k, np.float32), cols, indptr), shape=(n, int(cards.sum())))
        return sp.hstack([onehot, sp.csr_matrix(rows.numeric)], format="csr")
