"""The off-policy estimators on a known answer: a contextual bandit with planted reward probabilities, a
stochastic logging policy with known probabilities and a deterministic target whose true value is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextbest.training.ope import (
    Estimate,
    OPEInputError,
    bootstrap_interval,
    doubly_robust,
    ips,
    snips,
)

# Four contexts, three actions. P(x), the planted acceptance probability R[x, a], the logging policy μ(a|x)
# (every action at least 0.2, so every weight is at most 5) and a deterministic target π(x).
PX = np.array([0.4, 0.3, 0.2, 0.1])
R = np.array(
    [
        [0.10, 0.50, 0.80],
        [0.60, 0.20, 0.30],
        [0.30, 0.70, 0.40],
        [0.90, 0.15, 0.05],
    ]
)
MU = np.array(
    [
        [0.6, 0.2, 0.2],
        [0.2, 0.5, 0.3],
        [0.3, 0.3, 0.4],
        [0.2, 0.6, 0.2],
    ]
)
TARGET = np.array([2, 0, 1, 0])
N = 20_000
TRUE_VALUE = float(np.sum(PX * R[np.arange(4), TARGET]))  # 0.4·0.8 + 0.3·0.6 + 0.2·0.7 + 0.1·0.9 = 0.73


def _ips_standard_error() -> float:
    """The exact standard error of IPS here: Var(w r) = Σ_x P(x) R(x, π(x)) / μ(x, π(x)) − V², over √N."""
    rows = np.arange(4)
    second_moment = float(np.sum(PX * R[rows, TARGET] / MU[rows, TARGET]))
    return math.sqrt((second_moment - TRUE_VALUE**2) / N)


# Every estimate must land within 4 standard errors of IPS (≈ 0.037 with N = 20,000): a fresh seed misses that
# with probability < 1e-4 for IPS, and SNIPS and DR (perfect or constant q̂) have smaller errors here. The seed
# is fixed, so the test is deterministic.
TOLERANCE = 4 * _ips_standard_error()


def _log(seed: int, n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contexts, logged actions (drawn from μ) and 0/1 rewards (drawn from R)."""
    rng = np.random.default_rng(seed)
    x = rng.choice(4, size=n, p=PX)
    u = rng.random(n)
    a = (u[:, None] > np.cumsum(MU[x], axis=1)).sum(axis=1)
    r = (rng.random(n) < R[x, a]).astype(np.float64)
    return x, a, r


@pytest.fixture(scope="module")
def logged() -> dict[str, np.ndarray]:
    x, a, r = _log(seed=11)
    rows = np.arange(x.size)
    target = np.zeros((x.size, 3))
    target[rows, TARGET[x]] = 1.0
    return {
        "x": x,
        "a": a,
        "r": r,
        "mu": MU[x, a],
        "pi": target[rows, a],
        "target": target,
        "q_perfect": R[x],
        "q_constant": np.full((x.size, 3), 0.5),
    }


def test_the_tolerance_is_what_the_sample_size_allows():
    assert pytest.approx(0.73) == TRUE_VALUE
    assert 0.02 < TOLERANCE < 0.05


def test_ips_snips_and_dr_recover_the_planted_value_and_cover_it(logged):
    estimates = [
        ips(logged["r"], logged["mu"], logged["pi"], seed=1),
        snips(logged["r"], logged["mu"], logged["pi"], seed=1),
        doubly_robust(logged["r"], logged["mu"], logged["q_perfect"], logged["target"], logged["a"], seed=1),
        doubly_robust(logged["r"], logged["mu"], logged["q_constant"], logged["target"], logged["a"], seed=1),
    ]
    for e in estimates:
        assert abs(e.estimate - TRUE_VALUE) < TOLERANCE, e
        assert e.low <= TRUE_VALUE <= e.high, e
        assert e.low < e.estimate < e.high
        assert e.level == 0.95
        assert e.decisions == N
    # The target agrees with the log where the logged action is its choice: about Σ P(x) μ(x, π(x)) = 0.31.
    support = int((logged["pi"] > 0).sum())
    assert all(e.support == support for e in estimates)
    assert support / N == pytest.approx(float(np.sum(PX * MU[np.arange(4), TARGET])), abs=0.01)


def test_dr_with_a_perfect_reward_model_varies_much_less_than_ips(logged):
    # Per decision, Var(IPS term) = Σ P(x) R/μ − V² = 2.88 and Var(DR term) = Σ P(x) R(1 − R)/μ + Var(R) = 0.87
    # (at the target's actions): a variance 3.3 times smaller, an interval 1.8 times narrower.
    plain = ips(logged["r"], logged["mu"], logged["pi"], seed=2)
    dr = doubly_robust(logged["r"], logged["mu"], logged["q_perfect"], logged["target"], logged["a"], seed=2)
    assert (dr.high - dr.low) < 0.6 * (plain.high - plain.low)
    # The same on the per-decision terms whose mean each estimator is.
    rows = np.arange(logged["x"].size)
    w = logged["pi"] / logged["mu"]
    dr_terms = (logged["target"] * logged["q_perfect"]).sum(axis=1) + w * (
        logged["r"] - logged["q_perfect"][rows, logged["a"]]
    )
    assert dr_terms.var() < 0.4 * (w * logged["r"]).var()


def test_a_target_equal_to_the_logging_policy_gives_the_logged_mean_exactly(logged):
    e = ips(logged["r"], logged["mu"], logged["mu"])
    assert e.estimate == logged["r"].mean()
    assert snips(logged["r"], logged["mu"], logged["mu"]).estimate == pytest.approx(
        logged["r"].mean(), abs=1e-12
    )
    assert e.support == N
    assert e.effective_sample_size == pytest.approx(N)


def test_a_deterministic_log_and_a_target_that_agrees_everywhere_is_the_plain_mean():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    ones = np.ones(5)
    for estimator in (ips, snips):
        e = estimator(r, ones, ones, resamples=50)
        assert e.estimate == pytest.approx(0.6)
        assert 0.0 <= e.low <= 0.6 <= e.high <= 1.0


def test_the_bootstrap_is_seeded():
    x, a, r = _log(seed=3, n=500)
    mu = MU[x, a]
    pi = (a == TARGET[x]).astype(float)
    assert ips(r, mu, pi, seed=5) == ips(r, mu, pi, seed=5)
    assert ips(r, mu, pi, seed=5).low != ips(r, mu, pi, seed=6).low


def test_hand_computed_estimates():
    # Three decisions: rewards 1, 0, 2; μ = 0.5, 1, 0.25; π = 1, 0, 0.5 → w = 2, 0, 2.
    r, mu, pi = [1.0, 0.0, 2.0], [0.5, 1.0, 0.25], [1.0, 0.0, 0.5]
    assert ips(r, mu, pi, resamples=10).estimate == pytest.approx((2 + 0 + 4) / 3)
    assert snips(r, mu, pi, resamples=10).estimate == pytest.approx(6 / 4)
    e = ips(r, mu, pi, resamples=10)
    assert e.support == 2
    assert e.effective_sample_size == pytest.approx(16 / 8)
    # DR with two actions: q̂ = [[0.5, 0], [0, 1], [1, 1]], π rows [1, 0], [0, 1], [0.5, 0.5], logged 0, 0, 1.
    q = np.array([[0.5, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    a = np.array([0, 0, 1])
    # terms: 0.5 + 2(1 − 0.5) = 1.5; 1 + 0 = 1; 1 + 2(2 − 1) = 3
    assert doubly_robust(r, mu, q, p, a, resamples=10).estimate == pytest.approx((1.5 + 1 + 3) / 3)


def test_snips_without_support_is_undefined_not_zero():
    e = snips([1.0, 0.0], [0.5, 0.5], [0.0, 0.0], resamples=20)
    assert math.isnan(e.estimate) and math.isnan(e.low) and math.isnan(e.high)
    assert e.support == 0 and e.effective_sample_size == 0.0
    assert e.to_dict()["estimate"] is None
    assert ips([1.0, 0.0], [0.5, 0.5], [0.0, 0.0], resamples=20).estimate == 0.0


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_interval([2.0, 2.0, 2.0], resamples=30) == (2.0, 2.0)
    assert bootstrap_interval([1.0, 3.0], [1.0, 1.0], resamples=30, seed=1)[0] >= 1.0


@pytest.mark.parametrize(
    ("r", "mu", "pi", "message"),
    [
        ([], [], [], "no logged decisions"),
        ([1.0], [0.0], [1.0], r"logging probabilities must be in \(0, 1\]"),
        ([1.0], [1.5], [1.0], r"logging probabilities must be in \(0, 1\]"),
        ([1.0], [float("nan")], [1.0], r"logging probabilities must be in \(0, 1\]"),
        ([1.0], [0.5], [1.2], r"target probabilities must be in \[0, 1\]"),
        ([1.0], [0.5], [-0.1], r"target probabilities must be in \[0, 1\]"),
        ([1.0, 0.0], [0.5], [0.5], "one value per decision"),
        ([float("inf")], [0.5], [0.5], "rewards must be finite"),
    ],
)
def test_bad_input_is_a_named_error(r, mu, pi, message):
    for estimator in (ips, snips):
        with pytest.raises(OPEInputError, match=message):
            estimator(r, mu, pi)


def test_bad_dr_input_is_a_named_error():
    q = np.zeros((2, 2))
    p = np.array([[1.0, 0.0], [0.5, 0.4]])
    with pytest.raises(OPEInputError, match=r"sums to 0\.9, not 1"):
        doubly_robust([1.0, 0.0], [1.0, 1.0], q, p, np.array([0, 1]))
    with pytest.raises(OPEInputError, match="column indices"):
        doubly_robust([1.0, 0.0], [1.0, 1.0], q, np.eye(2), np.array([0, 2]))
    with pytest.raises(OPEInputError, match="decisions × actions"):
        doubly_robust([1.0, 0.0], [1.0, 1.0], q, np.eye(3), np.array([0, 1]))
    with pytest.raises(OPEInputError, match="no logged decisions"):
        doubly_robust([], [], np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, dtype=int))
    with pytest.raises(OPEInputError, match="resamples"):
        ips([1.0], [1.0], [1.0], resamples=0)
    with pytest.raises(OPEInputError, match="level"):
        ips([1.0], [1.0], [1.0], level=1.0)


def test_estimate_is_a_plain_record():
    e = ips([1.0, 0.0], [1.0, 1.0], [1.0, 1.0], resamples=10)
    assert isinstance(e, Estimate)
    assert set(e.to_dict()) == {
        "estimator",
        "estimate",
        "low",
        "high",
        "level",
        "decisions",
        "support",
        "effective_sample_size",
    }
