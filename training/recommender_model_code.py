"""MLflow "models from code" entry point of the recommender pyfunc: MLflow runs this file; nothing imports it.

Registering the model object here (instead of pickling an instance) keeps pickle out of the logged model.
"""

import mlflow.models

from nextbest.training.recommender_pyfunc import RecommenderPythonModel

mlflow.models.set_model(RecommenderPythonModel())
