"""The CUDA path of the propensity model: trains on the GPU as well as on the CPU, and what it saves scores on the
CPU. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextbest.training.device import cuda_available, select_device
from nextbest.training.propensity import PropensityConfig, PropensityModel, fit_propensity
from nextbest.training.propensity_data import PropensityDataConfig, split_table
from nextbest.training.propensity_eval import evaluate_propensity
from nextbest.training.propensity_scorer import PropensityScorer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def synthetic():
    from tests.test_propensity import synthetic_table

    table, catalog, columns = synthetic_table(customers=800, per_customer=20, seed=3)
    return split_table(table, catalog, columns, PropensityDataConfig())


def test_auto_picks_the_gpu():
    assert select_device("auto").type == "cuda"
    assert select_device("cuda:0") == torch.device("cuda:0")


def test_gpu_training_matches_cpu_quality_and_scores_on_cpu(synthetic, tmp_path):
    config = PropensityConfig(epochs=12, batch_size=512, seed=0)
    gpu = fit_propensity(synthetic, config, device="cuda")
    cpu = fit_propensity(synthetic, config, device="cpu")
    assert gpu.device.startswith("cuda") and gpu.model.device.type == "cuda"
    m_gpu = evaluate_propensity(gpu, synthetic, baselines=False).metrics
    m_cpu = evaluate_propensity(cpu, synthetic, baselines=False).metrics
    assert abs(m_gpu["auc"] - m_cpu["auc"]) < 0.02
    assert m_gpu["ece"] < 0.04

    on_gpu = gpu.model.predict_proba(synthetic.test)
    loaded = PropensityModel.load(gpu.model.save(tmp_path / "gpu-model"))  # loads onto the CPU
    assert loaded.device.type == "cpu"
    np.testing.assert_allclose(loaded.predict_proba(synthetic.test), on_gpu, atol=1e-5)
    scorer = PropensityScorer(loaded)
    row = synthetic.test.row(0, named=True)
    p = scorer.score(
        {c: row[c] for c in synthetic.customer_columns},
        [row["action_id"]],
        row["channel"],
        now=row["timestamp"],
    )
    assert p[row["action_id"]] == pytest.approx(on_gpu[0], abs=1e-5)
