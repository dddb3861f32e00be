"""A fitted recommender with the histories and vocabularies it needs to answer by customer and item id."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from nextbest.features.interactions import Interactions
from nextbest.features.schema import CUSTOMER_ID, ITEM_ID
from nextbest.training.recommenders import MISSING_ID, Recommender, load_recommender

BUNDLE_FILE = "bundle.json"
MODEL_DIR = "model"
HISTORY_DIR = "history"
RANK = "rank"
SCORE = "score"


@dataclass
class RecommenderBundle:
    """A model, the interaction histories it ranks from (rows = its fitted customers) and metadata.

    Attributes:
        model: the fitted recommender.
        history: the matrix it was fitted on, with customer and item vocabularies.
        metadata: JSON-able facts (model kind, data, cut-offs, metrics) kept with it.
    """

    model: Recommender
    history: Interactions
    metadata: dict[str, Any] = field(default_factory=dict)

    def recommend(
        self, customer_ids: list[str], n: int = 10, *, filter_already_liked: bool = False
    ) -> pl.DataFrame:
        """Top-``n`` items per customer id, unknown ids included (they get the fallback ranking).

        Returns:
            long frame ``customer_id, rank (1-based), item_id, score``, in input order then rank.
        """
        ids = [str(c) for c in customer_ids]
        rows = self.history.customers.indices(ids)
        empty = sp.csr_matrix((1, self.history.matrix.shape[1]), dtype=np.float32)
        if len(ids):
            user_items = sp.vstack(
                [self.history.matrix[r] if r >= 0 else empty for r in rows.tolist()], format="csr"
            )
            item_idx, scores = self.model.recommend(
                rows, user_items, n, filter_already_liked=filter_already_liked
            )
        else:
            item_idx, scores = np.empty((0, 0), np.int64), np.empty((0, 0), np.float32)
        valid = item_idx != MISSING_ID
        r, c = np.nonzero(valid)
        return pl.DataFrame(
            {
                CUSTOMER_ID: [ids[i] for i in r.tolist()],
                RANK: (c + 1).astype(np.int64),
                ITEM_ID: self.history.items.lookup(item_idx[r, c]),
                SCORE: scores[r, c].astype(np.float64),
            },
            schema={CUSTOMER_ID: pl.String, RANK: pl.Int64, ITEM_ID: pl.String, SCORE: pl.Float64},
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``model/`` (recommender), ``history/`` (matrix and vocabularies) and ``bundle.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save(d / MODEL_DIR)
        self.history.save(d / HISTORY_DIR)
        (d / BUNDLE_FILE).write_text(json.dumps(self.metadata, indent=2, default=str) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> RecommenderBundle:
        d = Path(directory)
        meta_path = d / BUNDLE_FILE
        metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(load_recommender(d / MODEL_DIR), Interactions.load(d / HISTORY_DIR), metadata)


def find_bundle(root: str | Path) -> RecommenderBundle | None:
    """The bundle saved under ``root`` (an MLflow model directory, downloaded or copied into a model store), the
    first in path order; None when there is none."""
    found = sorted(Path(root).rglob(BUNDLE_FILE))
    return RecommenderBundle.load(found[0].parent) if found else None
