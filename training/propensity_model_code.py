"""MLflow "models from code" entry point of the propensity pyfunc: MLflow runs this file; nothing imports it.

``predict`` takes exposure rows (``action_id``, ``timestamp``, optional ``channel`` and the customer's profile
and activity columns) and returns one calibrated ``propensity`` per row. The learned state is the saved model
directory logged as the artifact ``propensity`` (tensors and JSON, no pickle).
"""

import mlflow.models
import mlflow.pyfunc

PROPENSITY_ARTIFACT = "propensity"


class PropensityPythonModel(mlflow.pyfunc.PythonModel):
    """Loads the saved propensity model from the artifacts once; scores batches of exposure rows."""

    # Logged without a signature (the profile columns vary by dataset); this opts out of MLflow wrapping
    # ``predict`` for type-hint validation.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from nextbest.training.propensity_scorer import load_propensity_model

        self.model = load_propensity_model(context.artifacts[PROPENSITY_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import polars as pl

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        probabilities = self.model.predict_proba(pl.from_pandas(frame))
        return pd.DataFrame({"propensity": probabilities}, index=frame.index)


mlflow.models.set_model(PropensityPythonModel())
