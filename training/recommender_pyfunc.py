"""The MLflow pyfunc face of a :class:`~training.recommender_bundle.RecommenderBundle`.

``predict`` takes a DataFrame with a ``customer_id`` column and params ``{"n": 10, "filter_already_liked": False}``
and returns ``customer_id, rank, item_id, score`` rows. The model is logged "from code"
(``recommender_model_code.py``), so MLflow stores no pickle of it.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

from nextbest.features.schema import CUSTOMER_ID

BUNDLE_ARTIFACT = "bundle"
DEFAULT_PARAMS: dict[str, Any] = {"n": 10, "filter_already_liked": False}


class RecommenderPythonModel(mlflow.pyfunc.PythonModel):
    """Loads the bundle from the model's artifacts once; answers batches of customer ids."""

    # The model is logged with an explicit signature; this opts out of MLflow wrapping ``predict`` for
    # type-hint validation (and of its warning that ``predict`` has no type hints).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from nextbest.training.recommender_bundle import RecommenderBundle

        self.bundle = RecommenderBundle.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        p = {**DEFAULT_PARAMS, **(params or {})}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if CUSTOMER_ID not in frame.columns:
            raise ValueError(
                f"input needs a {CUSTOMER_ID!r} column; got {', '.join(map(str, frame.columns))}"
            )
        out = self.bundle.recommend(
            frame[CUSTOMER_ID].astype(str).tolist(),
            int(p["n"]),
            filter_already_liked=bool(p["filter_already_liked"]),
        )
        return out.to_pandas()
