"""Off-policy estimators: the value a target policy would have had, from decisions a logging policy made.

Pure numpy functions over logged bandit data, one entry per logged decision i:

* ``r_i`` — the reward observed for the logged action a_i (acceptance 0/1, or a value);
* ``μ_i = μ(a_i | x_i)`` — the probability with which the logging policy chose a_i, in (0, 1]
  (1.0 where it was deterministic);
* ``π_i = π(a_i | x_i)`` — the probability with which the target policy would choose a_i, in [0, 1];
* for doubly robust only: a reward model ``q̂(x_i, a)`` for every candidate action a and the target's whole
  distribution ``π(a | x_i)`` over the same actions.

With the importance weight ``w_i = π_i / μ_i``:

* IPS (inverse propensity scoring):        V̂ = (1/n) Σ_i w_i r_i
* SNIPS (self-normalised IPS):             V̂ = Σ_i w_i r_i / Σ_i w_i
* DR (doubly robust):                      V̂ = (1/n) Σ_i [ Σ_a π(a|x_i) q̂(x_i, a) + w_i (r_i − q̂(x_i, a_i)) ]

IPS and DR are unbiased when μ_i > 0 wherever π_i > 0 (DR also when q̂ is wrong; a good q̂ only shrinks its
variance). SNIPS trades a small bias for a lower variance and is undefined when no logged decision has π_i > 0.

Each estimate comes with a bootstrap percentile interval (decisions resampled with replacement, ``resamples``
times, seeded), the number of decisions, its *support* (decisions with π_i > 0: the only ones whose reward
counts) and the effective sample size of the weights, (Σ w_i)² / Σ w_i².
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from nextbest.features.errors import NextbestError

ESTIMATORS: tuple[str, ...] = ("ips", "snips", "dr")
DEFAULT_RESAMPLES = 1_000
DEFAULT_LEVEL = 0.95
_BOOTSTRAP_CELLS = 2_000_000
"""Resampled indices drawn at once (resamples × decisions), to bound memory on large logs."""
_SUM_TOLERANCE = 1e-6


class OPEInputError(NextbestError, ValueError):
    """Logged data an estimator cannot use: empty, mismatched lengths, probabilities out of range, NaN rewards."""


@dataclass(frozen=True)
class Estimate:
    """One off-policy estimate.

    Attributes:
        estimator: ``ips``, ``snips`` or ``dr``.
        estimate: the point estimate (NaN for SNIPS without support).
        low: lower end of the bootstrap percentile interval.
        high: upper end of the bootstrap percentile interval.
        level: the interval's coverage (0.95 for a 95 % interval).
        decisions: logged decisions used.
        support: decisions where the target gives the logged action a positive probability.
        effective_sample_size: (Σ w)² / Σ w² of the importance weights (0 without support).
    """

    estimator: str
    estimate: float
    low: float
    high: float
    level: float
    decisions: int
    support: int
    effective_sample_size: float

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON-ready values (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise OPEInputError(f"{name} must be one value per decision (1-D), got shape {x.shape}")
    return x


def _check_logged(
    rewards: ArrayLike, logging_probability: ArrayLike, target_probability: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = _vector(rewards, "rewards")
    mu = _vector(logging_probability, "logging_probability")
    pi = _vector(target_probability, "target_probability")
    if r.size == 0:
        raise OPEInputError("no logged decisions: an estimate needs at least one")
    if not (r.size == mu.size == pi.size):
        raise OPEInputError(
            f"one value per decision is needed: {r.size} rewards, {mu.size} logging probabilities, "
            f"{pi.size} target probabilities"
        )
    if not np.all(np.isfinite(r)):
        raise OPEInputError(
            f"rewards must be finite; decision {int(np.flatnonzero(~np.isfinite(r))[0])} is not"
        )
    bad = ~((mu > 0) & (mu <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OPEInputError(
            f"logging probabilities must be in (0, 1]; decision {i} has {mu[i]!r} "
            "(a logged action must have had a positive probability of being chosen)"
        )
    bad = ~((pi >= 0) & (pi <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OPEInputError(f"target probabilities must be in [0, 1]; decision {i} has {pi[i]!r}")
    return r, mu, pi


def _check_options(resamples: int, level: float) -> None:
    if resamples < 1:
        raise OPEInputError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise OPEInputError(f"level must be in (0, 1), got {level}")


def bootstrap_interval(
    numerator: ArrayLike,
    denominator: ArrayLike | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of Σ numerator / Σ denominator over decisions resampled with replacement.

    With ``denominator`` None the statistic is the mean of ``numerator`` (Σ numerator / n). Resamples whose
    denominator sums to 0 are left out; with none left the interval is (NaN, NaN).

    Args:
        numerator: one term per decision.
        denominator: one term per decision, or None.
        resamples: bootstrap resamples.
        level: coverage of the interval.
        seed: seeds the resampling, so equal inputs give equal intervals.
    """
    _check_options(resamples, level)
    num = np.asarray(numerator, dtype=np.float64)
    den = None if denominator is None else np.asarray(denominator, dtype=np.float64)
    n = num.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    stats = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        top = num[idx].sum(axis=1)
        if den is None:
            stats[start : start + size] = top / n
        else:
            bottom = den[idx].sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                stats[start : start + size] = np.where(
                    bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan
                )
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _weights_summary(w: np.ndarray, pi: np.ndarray) -> tuple[int, float]:
    total, squares = float(w.sum()), float(np.square(w).sum())
    ess = total * total / squares if squares > 0 else 0.0
    return int(np.count_nonzero(pi > 0)), ess


def ips(
    rewards: ArrayLike,
    logging_probability: ArrayLike,
    target_probability: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Estimate:
    """Inverse propensity scoring: V̂ = (1/n) Σ_i (π_i / μ_i) r_i.

    Args:
        rewards: r_i, the reward of each logged decision.
        logging_probability: μ_i in (0, 1], the logging policy's probability of the logged action.
        target_probability: π_i in [0, 1], the target policy's probability of the logged action.
        resamples: bootstrap resamples for the interval.
        level: coverage of the interval.
        seed: seeds the bootstrap.

    Raises:
        OPEInputError: empty input, mismatched lengths, a probability out of range or a non-finite reward.
    """
    r, mu, pi = _check_logged(rewards, logging_probability, target_probability)
    _check_options(resamples, level)
    w = pi / mu
    terms = w * r
    low, high = bootstrap_interval(terms, resamples=resamples, level=level, seed=seed)
    support, ess = _weights_summary(w, pi)
    return Estimate("ips", float(terms.mean()), low, high, level, int(r.size), support, ess)


def snips(
    rewards: ArrayLike,
    logging_probability: ArrayLike,
    target_probability: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Estimate:
    """Self-normalised IPS: V̂ = Σ_i w_i r_i / Σ_i w_i with w_i = π_i / μ_i (NaN when Σ_i w_i = 0).

    Arguments and errors as for :func:`ips`.
    """
    r, mu, pi = _check_logged(rewards, logging_probability, target_probability)
    _check_options(resamples, level)
    w = pi / mu
    total = float(w.sum())
    value = float((w * r).sum() / total) if total > 0 else math.nan
    low, high = bootstrap_interval(w * r, w, resamples=resamples, level=level, seed=seed)
    support, ess = _weights_summary(w, pi)
    return Estimate("snips", value, low, high, level, int(r.size), support, ess)


def doubly_robust(
    rewards: ArrayLike,
    logging_probability: ArrayLike,
    reward_model: ArrayLike,
    target_distribution: ArrayLike,
    logged_action: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Estimate:
    """Doubly robust: V̂ = (1/n) Σ_i [ Σ_a π(a|x_i) q̂(x_i, a) + w_i (r_i − q̂(x_i, a_i)) ], w_i = π(a_i|x_i) / μ_i.

    Actions are columns 0 … K−1 shared by every decision; an action that was not a candidate in decision i
    has π(a|x_i) = 0 there (its q̂ is then never read).

    Args:
        rewards: r_i, the reward of each logged decision.
        logging_probability: μ_i in (0, 1].
        reward_model: (n × K) q̂(x_i, a), the predicted reward of every action in every decision.
        target_distribution: (n × K) π(a | x_i); each row in [0, 1] and summing to 1.
        logged_action: (n,) the column of the logged action a_i.
        resamples: bootstrap resamples for the interval.
        level: coverage of the interval.
        seed: seeds the bootstrap.

    Raises:
        OPEInputError: as for :func:`ips`; shapes that do not match; a row of π not summing to 1; a logged
            action outside 0 … K−1; a non-finite q̂.
    """
    q = np.asarray(reward_model, dtype=np.float64)
    p = np.asarray(target_distribution, dtype=np.float64)
    a = np.asarray(logged_action)
    if q.ndim != 2 or p.shape != q.shape:
        raise OPEInputError(
            f"reward_model and target_distribution must both be (decisions × actions); got {q.shape} and {p.shape}"
        )
    if a.ndim != 1 or a.size != q.shape[0]:
        raise OPEInputError(
            f"logged_action must hold one action per decision ({q.shape[0]}), got shape {a.shape}"
        )
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= q.shape[1]):
        raise OPEInputError(f"logged_action must be column indices in 0 … {q.shape[1] - 1}")
    if not np.all(np.isfinite(q)):
        raise OPEInputError("the reward model q̂ must be finite everywhere")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise OPEInputError("target probabilities must be in [0, 1]")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1) > _SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise OPEInputError(f"the target distribution of decision {i} sums to {sums[i]:.6g}, not 1")
    rows = np.arange(a.size)
    pi = p[rows, a] if a.size else np.zeros(0)
    r, mu, pi = _check_logged(rewards, logging_probability, pi)
    _check_options(resamples, level)
    w = pi / mu
    terms = (p * q).sum(axis=1) + w * (r - q[rows, a])
    low, high = bootstrap_interval(terms, resamples=resamples, level=level, seed=seed)
    support, ess = _weights_summary(w, pi)
    return Estimate("dr", float(terms.mean()), low, high, level, int(r.size), support, ess)
