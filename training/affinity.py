"""Customer–action affinity from a collaborative-filtering model: how well an action's target items match a
customer's taste, folded in from any point-in-time history (training rows and the online path alike)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp
from tqdm.auto import tqdm

from nextbest.features.dataset import Dataset
from nextbest.features.interactions import InteractionConfig
from nextbest.features.schema import (
    ACTION_ID,
    CHANNEL,
    CUSTOMER_ID,
    ITEM_ID,
    KIND,
    TIMESTAMP,
    TIMESTAMP_COL,
)
from nextbest.training.propensity_config import SNAPSHOT_AT, PropensityDataConfig, PropensityDataError
from nextbest.training.recommenders import ALSConfig
from nextbest.training.registry import CHAMPION, RECOMMENDER

# --- customer–action affinity from a collaborative-filtering model -----------------------------------------

AFFINITY = "cf_affinity"
"""The per (customer, action) input: how well the action's items match the customer's taste (see
:class:`ActionAffinity`). Null for actions without target items and customers without history."""
AFFINITY_FILE = "affinity.npz"
AFFINITY_META_FILE = "affinity.json"
_NOT_ITEM_ATTRIBUTES = frozenset(
    {ITEM_ID, ACTION_ID, KIND, CHANNEL, "name", "title", "description", "channels"}
)


def action_target_items(
    catalog: pl.DataFrame, items: pl.DataFrame, targets: pl.DataFrame | None = None
) -> dict[str, list[str]]:
    """Each action's target items: its rows of ``targets`` (the ``action_targets`` table: the products a
    campaign's coupons cover) when it has any, else the items matching every attribute the action sets.

    An attribute is a text column of both the catalogue and the items table (``brand`` of a brand discount,
    ``sport`` of a bundle, the attribute of a derived "buy an item with A = c" action). An action that sets
    none of them and has no explicit targets (free shipping, a newsletter, no action) has no target items.

    Returns:
        action id → item ids (sorted), in catalogue order.
    """
    shared = [
        c
        for c, t in catalog.schema.items()
        if c in items.columns
        and c not in _NOT_ITEM_ATTRIBUTES
        and t == pl.String
        and items.schema[c] == pl.String
    ]
    explicit: dict[str, list[str]] = {}
    if targets is not None and targets.height:
        grouped = targets.select(ACTION_ID, ITEM_ID).unique().group_by(ACTION_ID).agg(pl.col(ITEM_ID).sort())
        explicit = dict(zip(grouped[ACTION_ID].to_list(), grouped[ITEM_ID].to_list(), strict=True))
    out: dict[str, list[str]] = {}
    for row in catalog.select(ACTION_ID, *shared).iter_rows(named=True):
        if row[ACTION_ID] in explicit:
            out[row[ACTION_ID]] = explicit[row[ACTION_ID]]
            continue
        wanted = {c: row[c] for c in shared if row[c] is not None}
        if not wanted:
            out[row[ACTION_ID]] = []
            continue
        match = pl.all_horizontal([pl.col(c) == v for c, v in wanted.items()])
        out[row[ACTION_ID]] = sorted(items.filter(match)[ITEM_ID].to_list())
    return out


class ActionAffinity:
    """Customer–action affinity from a factor model's item factors (ALS), for training rows and online alike.

    A customer's factor is folded in from their interaction weights alone, against fixed item factors, by
    the ALS least-squares step (``implicit``'s ``recalculate_user``: ``x = (YᵀY + Yᵀ(C − I)Y + λI)⁻¹ YᵀCp``,
    ``C = alpha · weight``), so it can be computed from any point-in-time history. The customer's scores over
    all items ``s_i = x·y_i`` are standardised per customer (minus their mean, over their standard deviation),
    which makes them comparable across customers; the affinity of an action is the ``mean`` (or ``max``) of the
    standardised scores of its target items (:func:`action_target_items`). NaN when the action has no target
    items or the customer no history among the model's items.

    Learned state (saved beside the propensity model by :meth:`save`, no pickle): the item vocabulary and
    factors, the fold-in's regularisation and alpha, the target item indices per action, the aggregate and
    a JSON description of where the factors come from.
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        item_factors: np.ndarray,
        *,
        regularization: float,
        alpha: float,
        targets: Mapping[str, Sequence[str]],
        aggregate: Literal["mean", "max"] = "mean",
        source: Mapping[str, Any] | None = None,
    ) -> None:
        from nextbest.features.schema import Vocabulary

        self.items = Vocabulary(tuple(str(i) for i in item_ids))
        y = np.asarray(item_factors, dtype=np.float64)
        if y.ndim != 2 or y.shape[0] != len(self.items):
            raise PropensityDataError(
                f"item factors have shape {y.shape}, expected ({len(self.items)}, factors)"
            )
        if aggregate not in ("mean", "max"):
            raise PropensityDataError(f"affinity aggregate {aggregate!r} is not one of mean, max")
        self.item_factors = y
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.aggregate: Literal["mean", "max"] = aggregate
        self.source = dict(source or {})
        self.action_ids = list(targets)
        self.targets = [np.unique(self.items.indices([str(i) for i in targets[a]])) for a in self.action_ids]
        self.targets = [t[t >= 0] for t in self.targets]
        k = y.shape[1]
        self._base = y.T @ y + self.regularization * np.eye(k)
        self._mean = y.mean(axis=0)
        centred = y - self._mean
        self._cov = centred.T @ centred / max(len(y), 1)
        self._has_targets = np.array([t.size > 0 for t in self.targets], dtype=bool)
        self._centroids = (
            np.stack([y[t].mean(axis=0) if t.size else np.zeros(k) for t in self.targets])
            if self.targets
            else np.zeros((0, k))
        )

    @property
    def n_factors(self) -> int:
        return int(self.item_factors.shape[1])

    def action_index(self) -> dict[str, int]:
        return {a: j for j, a in enumerate(self.action_ids)}

    # -- computing ------------------------------------------------------------------------------------------

    def user_factors(self, user_items: sp.csr_matrix, *, chunk: int = 1024) -> np.ndarray:
        """Folded-in customer factors, one per row of ``user_items`` (customers × this model's items)."""
        m = sp.csr_matrix(user_items, dtype=np.float64)
        if m.shape[1] != len(self.items):
            raise PropensityDataError(
                f"user_items has {m.shape[1]} columns, the model {len(self.items)} items"
            )
        y = self.item_factors
        k = y.shape[1]
        out = np.zeros((m.shape[0], k))
        for start in range(0, m.shape[0], chunk):
            stop = min(start + chunk, m.shape[0])
            a = np.broadcast_to(self._base, (stop - start, k, k)).copy()
            b = np.zeros((stop - start, k))
            has = np.zeros(stop - start, dtype=bool)
            for r in range(start, stop):
                lo, hi = m.indptr[r], m.indptr[r + 1]
                idx, w = m.indices[lo:hi], m.data[lo:hi]
                keep = w > 0
                if not keep.any():
                    continue
                yi, c = y[idx[keep]], self.alpha * w[keep]
                a[r - start] += (yi.T * (c - 1.0)) @ yi
                b[r - start] = c @ yi
                has[r - start] = True
            if has.any():
                out[start:stop][has] = np.linalg.solve(a[has], b[has][..., None])[..., 0]
        return out

    def from_user_factors(self, x: np.ndarray) -> np.ndarray:
        """Affinities (customers × actions) of customer factors ``x``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.n_factors)
        mean = x @ self._mean
        sd = np.sqrt(np.maximum(np.einsum("nk,kl,nl->n", x, self._cov, x), 0.0))
        if self.aggregate == "mean":
            raw = x @ self._centroids.T
        else:
            raw = np.full((x.shape[0], len(self.targets)), np.nan)
            for j, t in enumerate(self.targets):
                if t.size:
                    raw[:, j] = (x @ self.item_factors[t].T).max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (raw - mean[:, None]) / sd[:, None]
        out[:, ~self._has_targets] = np.nan
        out[sd <= 1e-12 * max(1.0, float(np.abs(self.item_factors).max(initial=0.0))), :] = np.nan
        return out

    def score_matrix(self, user_items: sp.csr_matrix) -> np.ndarray:
        """Affinities (customers × actions, in :attr:`action_ids` order) of interaction rows."""
        return self.from_user_factors(self.user_factors(user_items))

    def interaction_matrix(self, weights: pl.DataFrame, customers: Sequence[str]) -> sp.csr_matrix:
        """``customer_id, item_id, weight`` rows as a matrix over ``customers`` × this model's items (items it
        does not know are left out)."""
        from nextbest.features.interactions import WEIGHT, build_interactions
        from nextbest.features.schema import Vocabulary

        built = build_interactions(
            weights.select(CUSTOMER_ID, ITEM_ID, WEIGHT),
            customers=Vocabulary(tuple(customers)),
            items=self.items,
        )
        return built.matrix

    def score_items(self, item_weights: Mapping[str, float]) -> dict[str, float]:
        """One customer's affinities from their interaction weights by item id (the online path).

        Returns:
            action id → affinity (NaN when unknown), for every action of the model.
        """
        idx = self.items.indices([str(i) for i in item_weights])
        w = np.fromiter((float(v) for v in item_weights.values()), dtype=np.float64, count=len(item_weights))
        return self.score_indexed(idx, w)

    def score_indexed(self, item_index: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """One customer's affinities from their weights over this model's item indices (−1: unknown, skipped)."""
        idx = np.asarray(item_index, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        keep = idx >= 0
        row = sp.csr_matrix(
            (w[keep], (np.zeros(int(keep.sum()), np.int64), idx[keep])), shape=(1, len(self.items))
        )
        values = self.score_matrix(row)[0]
        return dict(zip(self.action_ids, values.tolist(), strict=True))

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_recommender(
        cls,
        model: Any,
        item_ids: Sequence[str],
        targets: Mapping[str, Sequence[str]],
        *,
        aggregate: Literal["mean", "max"] = "mean",
        source: Mapping[str, Any] | None = None,
    ) -> ActionAffinity:
        """From a fitted ALS recommender (or a blend whose CF part is ALS) of ``training.recommenders``.

        Raises:
            PropensityDataError: the model cannot fold customers in (BPR, item-kNN, popularity, repeat).
        """
        als = foldable_factor_model(model)
        if als is None:
            raise PropensityDataError(
                f"a {getattr(model, 'name', type(model).__name__)} model cannot fold a customer's history in: "
                "the customer–action affinity needs ALS (or a blend whose CF part is ALS)"
            )
        implicit_model = als.implicit_model
        return cls(
            item_ids,
            np.asarray(implicit_model.item_factors),
            regularization=float(implicit_model.regularization),
            alpha=float(getattr(implicit_model, "alpha", 1.0)),
            targets=targets,
            aggregate=aggregate,
            source=source,
        )

    # -- saving ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``affinity.npz`` (factors, target indices) and ``affinity.json`` (the rest) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        lengths = np.array([t.size for t in self.targets], dtype=np.int64)
        flat = np.concatenate(self.targets) if self.targets else np.zeros(0, np.int64)
        np.savez(
            out / AFFINITY_FILE,
            item_factors=self.item_factors.astype(np.float32),
            target_index=flat.astype(np.int64),
            target_lengths=lengths,
        )
        meta = {
            "item_ids": list(self.items.ids),
            "action_ids": self.action_ids,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "aggregate": self.aggregate,
            "source": self.source,
        }
        (out / AFFINITY_META_FILE).write_text(json.dumps(meta, default=str) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ActionAffinity | None:
        """Read what :meth:`save` wrote; None when ``directory`` holds no affinity."""
        src = Path(directory)
        if not (src / AFFINITY_META_FILE).exists():
            return None
        meta = json.loads((src / AFFINITY_META_FILE).read_text())
        with np.load(src / AFFINITY_FILE, allow_pickle=False) as arrays:
            factors = arrays["item_factors"]
            flat = arrays["target_index"]
            lengths = arrays["target_lengths"]
        ids = meta["item_ids"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        targets = {
            a: [ids[i] for i in flat[bounds[j] : bounds[j + 1]].tolist()]
            for j, a in enumerate(meta["action_ids"])
        }
        return cls(
            ids,
            factors,
            regularization=meta["regularization"],
            alpha=meta["alpha"],
            targets=targets,
            aggregate=meta["aggregate"],
            source=meta.get("source"),
        )


def foldable_factor_model(model: Any) -> Any | None:
    """The ALS part of a recommender that can fold customers in (ALS itself, or a blend's ALS), else None."""
    name = getattr(model, "name", "")
    if name == "blend":
        return foldable_factor_model(getattr(model, "cf", None))
    if name == "als" and getattr(model, "implicit_model", None) is not None:
        return model
    return None


def fit_affinity_als(
    events: pl.DataFrame,
    *,
    before: datetime,
    interactions: InteractionConfig,
    als: ALSConfig | None = None,
    seed: int = 0,
) -> tuple[Any, list[str]]:
    """An ALS recommender fitted on the interactions of events strictly before ``before`` (the propensity
    training period), with its item ids.

    Raises:
        PropensityDataError: no interaction before ``before``.
    """
    from nextbest.features.interactions import build_interactions, interaction_weights
    from nextbest.training.recommenders import ALSRecommender

    past = events.lazy().filter(pl.col(TIMESTAMP_COL) < before)
    built = build_interactions(interaction_weights(past, interactions, as_of=before))
    if built.matrix.nnz == 0:
        raise PropensityDataError(
            f"no interactions before {before.isoformat()} to fit the affinity's ALS model on"
        )
    model = ALSRecommender(als or ALSConfig(), seed=seed, threads=1).fit(built.matrix)
    return model, list(built.items.ids)


def build_action_affinity(
    events: pl.DataFrame,
    items: pl.DataFrame,
    catalog: pl.DataFrame,
    config: PropensityDataConfig,
    *,
    interactions: InteractionConfig,
    before: datetime,
    dataset: Dataset | None = None,
    recommender: Any | None = None,
    recommender_label: str | None = None,
    targets: pl.DataFrame | None = None,
) -> ActionAffinity | None:
    """The affinity model of a propensity table: the given recommender's item factors when
    ``config.affinity_source`` is ``auto`` and it can fold customers in (ALS, or a blend's ALS) and was trained on
    this dataset; else ALS fitted on the interactions strictly before ``before`` (the validation start). None
    when no action has target items (nothing to compare a taste with). ``targets``: the ``action_targets``
    table, if the dataset has one (see :func:`action_target_items`)."""
    target_items = action_target_items(catalog, items, targets)
    if not any(target_items.values()):
        return None
    aggregate = config.affinity_aggregate
    model = getattr(recommender, "model", None)
    trained_on = (getattr(recommender, "metadata", None) or {}).get("dataset")
    same_data = dataset is None or trained_on is None or Path(trained_on) == dataset.root.resolve()
    if (
        config.affinity_source == "auto"
        and model is not None
        and foldable_factor_model(model) is not None
        and same_data
    ):
        meta = recommender.metadata or {}
        source = {
            "from": "registry",
            "registered_model": recommender_label,
            "model": meta.get("model", getattr(model, "name", None)),
            "trained_until": meta.get("trained_until"),
            "aggregate": aggregate,
        }
        return ActionAffinity.from_recommender(
            model, list(recommender.history.items.ids), target_items, aggregate=aggregate, source=source
        )
    fitted, item_ids = fit_affinity_als(
        events, before=before, interactions=interactions, als=config.affinity_als, seed=config.seed
    )
    source = {
        "from": "fit",
        "model": "als",
        "trained_until": before.isoformat(),
        "config": config.affinity_als.model_dump(mode="json"),
        "config_from": recommender_label if recommender is None else None,
        "aggregate": aggregate,
    }
    return ActionAffinity.from_recommender(fitted, item_ids, target_items, aggregate=aggregate, source=source)


def champion_affinity_config(
    ds: Dataset, config: PropensityDataConfig, *, tracking_uri: str | None = None
) -> tuple[PropensityDataConfig, str | None]:
    """``config`` with ``affinity_als`` set to the registered champion recommender's ALS hyperparameters (an
    ALS model, or a blend's ALS part, trained on ``ds``), and the champion's ``name/version``; ``config``
    unchanged and None when there is none, or the affinity is off or set to ``fit``.

    The affinity's ALS is then refitted on the propensity training period with those hyperparameters rather
    than taking the champion's item factors, which were fitted on later purchases too (responses to the
    validation and test exposures could leak into their features).
    """
    if not config.affinity or config.affinity_source != "auto":
        return config, None
    found = registered_recommender(ds, tracking_uri=tracking_uri)
    if found is None:
        return config, None
    bundle, label = found
    als = foldable_factor_model(bundle.model)
    if als is None or not isinstance(als.config, ALSConfig):
        return config, None
    return config.model_copy(update={"affinity_als": als.config}), label


def registered_recommender(
    ds: Dataset,
    *,
    tracking_uri: str | None = None,
    name: str = RECOMMENDER,
    alias: str = CHAMPION,
) -> tuple[Any, str] | None:
    """The registered recommender ``name@alias`` as a bundle with its ``name/version`` label, when the registry
    has one trained on ``ds`` whose model can fold customers in; None otherwise (no registry, no such version,
    another dataset, a model without item factors)."""
    from mlflow import MlflowClient

    from nextbest.training.recommender_bundle import find_bundle
    from nextbest.training.registry import download_version
    from nextbest.training.tracking import resolve_tracking_uri, sqlite_path, version_by_alias

    uri = tracking_uri or resolve_tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    version = version_by_alias(MlflowClient(uri, uri), name, alias)
    if version is None:
        return None
    tags = dict(version.tags or {})
    if tags.get("dataset") and Path(tags["dataset"]) != ds.root.resolve():
        return None
    bundle = find_bundle(download_version(uri, name, version.version))
    if bundle is None or foldable_factor_model(bundle.model) is None:
        return None
    trained_on = bundle.metadata.get("dataset")
    if trained_on is not None and Path(trained_on) != ds.root.resolve():
        return None
    return bundle, f"{name}/{version.version}"


def affinity_asof(
    rows: pl.DataFrame,
    events: pl.DataFrame,
    affinity: ActionAffinity,
    interactions: InteractionConfig,
    *,
    progress: bool = False,
) -> pl.Series:
    """The affinity of each row's (customer, action) at the row's ``snapshot_at``, from the customer's
    interactions strictly before it (null where ``snapshot_at`` is null, the action has no target items or the
    customer no history).

    Args:
        rows: ``customer_id``, ``action_id``, ``snapshot_at``.
        events: clean events.
        affinity: the affinity model.
        interactions: event weights (as the CF model was fitted with).
        progress: show a progress bar over snapshots.

    Returns:
        a Float64 series named :data:`AFFINITY`, one value per row, in order.
    """
    from nextbest.features.interactions import interaction_weights

    keyed = rows.select(CUSTOMER_ID, ACTION_ID, pl.col(SNAPSHOT_AT).cast(TIMESTAMP)).with_row_index("__row")
    snaps = keyed.filter(pl.col(SNAPSHOT_AT).is_not_null()).select(SNAPSHOT_AT, CUSTOMER_ID).unique()
    ts = pl.col(TIMESTAMP_COL)
    parts: list[pl.DataFrame] = []
    grouped = snaps.group_by(SNAPSHOT_AT).agg(pl.col(CUSTOMER_ID).sort()).sort(SNAPSHOT_AT)
    for s, customers in tqdm(
        grouped.iter_rows(), total=grouped.height, desc="affinity", disable=not progress, unit="snapshot"
    ):
        past = events.lazy().filter((ts < s) & pl.col(CUSTOMER_ID).is_in(customers))
        weights = interaction_weights(past, interactions, as_of=s).collect()
        values = affinity.score_matrix(affinity.interaction_matrix(weights, customers))
        parts.append(
            pl.DataFrame(
                {
                    CUSTOMER_ID: [c for c in customers for _ in affinity.action_ids],
                    ACTION_ID: affinity.action_ids * len(customers),
                    AFFINITY: values.ravel(),
                },
                schema={CUSTOMER_ID: pl.String, ACTION_ID: pl.String, AFFINITY: pl.Float64},
            ).with_columns(pl.lit(s).cast(TIMESTAMP).alias(SNAPSHOT_AT))
        )
    if not parts:
        return pl.Series(AFFINITY, [None] * rows.height, dtype=pl.Float64)
    table = pl.concat(parts).with_columns(pl.col(AFFINITY).fill_nan(None))
    joined = keyed.join(table, on=[CUSTOMER_ID, ACTION_ID, SNAPSHOT_AT], how="left").sort("__row")
    return joined[AFFINITY]
