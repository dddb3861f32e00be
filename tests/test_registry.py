"""The registry module reads the registry it is given and never moves MLflow's process-wide URI: a service's
model watcher and a training job in one process cannot redirect each other's runs or models."""

from __future__ import annotations

import mlflow
import pytest

from nextbest.serving.engine_config import EngineConfig
from nextbest.serving.models import load_serving_models
from nextbest.training.registry import (
    CHAMPION,
    PROPENSITY,
    RECOMMENDER,
    download_version,
    registry_client,
    version_by_alias,
)
from tests.conftest import process_wide_mlflow_uri

# both read the session's trained_world: training and registering its models through MLflow takes ~20 s
pytestmark = pytest.mark.slow


def test_loading_champions_reads_the_given_registry_and_leaves_the_global_uri_alone(trained_world, tmp_path):
    elsewhere = f"sqlite:///{tmp_path}/someone-elses.db"
    with process_wide_mlflow_uri(elsewhere):
        client = registry_client(trained_world.tracking_uri)
        for name in (RECOMMENDER, PROPENSITY):
            champion = version_by_alias(client, name, CHAMPION)
            assert champion is not None
            assert any(download_version(trained_world.tracking_uri, name, champion.version).iterdir())
        models = load_serving_models(
            EngineConfig(
                data=trained_world.ds.root, tracking_uri=trained_world.tracking_uri, model_source="mlflow"
            )
        )
        assert models.labels()["recommender"][CHAMPION].startswith(f"{RECOMMENDER}/")
        assert mlflow.get_tracking_uri() == elsewhere
        assert mlflow.get_registry_uri() == elsewhere


def test_a_missing_alias_is_none_not_an_error(trained_world):
    assert version_by_alias(registry_client(trained_world.tracking_uri), RECOMMENDER, "no-such-alias") is None
    assert version_by_alias(registry_client(trained_world.tracking_uri), "no-such-model", CHAMPION) is None
