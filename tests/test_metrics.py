"""Ranking metrics against a hand-computed 10-customer fixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from nextbest.training import metrics as M

# Ten customers, lists of five (−1 = empty slot), items 0..9 of a 20-item catalogue.
RECOMMENDED = np.array(
    [
        [0, 1, 2, 3, 4],  # r0  relevant {0, 2}          hits 1 0 1 0 0   R=2
        [5, 6, 7, 8, 9],  # r1  relevant {9}             hits 0 0 0 0 1   R=1
        [1, 0, 3, 2, 4],  # r2  relevant {7}             hits 0 0 0 0 0   R=1
        [2, 3, 4, 5, 6],  # r3  relevant {2,3,4,5,6,7}   hits 1 1 1 1 1   R=6
        [7, -1, -1, -1, -1],  # r4 relevant {7, 8}       hits 1 0 0 0 0   R=2 (a short list)
        [9, 8, 7, 6, 5],  # r5  relevant {5}             hits 0 0 0 0 1   R=1
        [0, 2, 4, 6, 8],  # r6  relevant {0,1,3,5,7,9}   hits 1 0 0 0 0   R=6
        [3, 1, 4, 0, 5],  # r7  relevant {4}             hits 0 0 1 0 0   R=1
        [6, 7, 8, 9, 0],  # r8  relevant {6, 7}          hits 1 1 0 0 0   R=2
        [4, 3, 2, 1, 0],  # r9  relevant {0,1,2,3,4}     hits 1 1 1 1 1   R=5
    ]
)
RELEVANT_SETS = [
    {0, 2},
    {9},
    {7},
    {2, 3, 4, 5, 6, 7},
    {7, 8},
    {5},
    {0, 1, 3, 5, 7, 9},
    {4},
    {6, 7},
    {0, 1, 2, 3, 4},
]
N_ITEMS = 20

D1, D2, D3 = 1.0, 1 / math.log2(3), 1 / math.log2(4)  # rank discounts 1/log2(rank + 1)


def _relevant() -> sp.csr_matrix:
    rows = [r for r, s in enumerate(RELEVANT_SETS) for _ in s]
    cols = [i for s in RELEVANT_SETS for i in sorted(s)]
    return M.relevance_matrix(np.array(rows), np.array(cols), (10, N_ITEMS))


@pytest.fixture
def hits() -> np.ndarray:
    return M.hit_matrix(RECOMMENDED, _relevant())


@pytest.fixture
def n_rel() -> np.ndarray:
    return M.relevant_counts(_relevant())


def test_hit_matrix_and_counts(hits, n_rel):
    assert hits.astype(int).tolist()[:5] == [
        [1, 0, 1, 0, 0],
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert n_rel.tolist() == [2, 1, 1, 6, 2, 1, 6, 1, 2, 5]


def test_precision(hits):
    # @3: 2/3, 0, 0, 1, 1/3, 0, 1/3, 1/3, 2/3, 1 → 13/3 over 10 customers
    assert M.precision_at_k(hits, 3).mean() == pytest.approx(13 / 30)
    # @5: hits 2+1+0+5+1+1+1+1+2+5 = 19, each divided by 5 (the short list of r4 too)
    assert M.precision_at_k(hits, 5).mean() == pytest.approx(19 / 50)


def test_recall(hits, n_rel):
    # @3: 1, 0, 0, 3/6, 1/2, 0, 1/6, 1, 1, 3/5
    assert M.recall_at_k(hits, n_rel, 3).mean() == pytest.approx((1 + 0.5 + 0.5 + 1 / 6 + 1 + 1 + 0.6) / 10)
    # @5: 1, 1, 0, 5/6, 1/2, 1, 1/6, 1, 1, 1 = 7.5
    assert M.recall_at_k(hits, n_rel, 5).mean() == pytest.approx(0.75)


def test_hit_rate(hits):
    # @3: every customer except r1, r2, r5; @5 only r2 misses
    assert M.hit_rate_at_k(hits, 3).mean() == pytest.approx(0.7)
    assert M.hit_rate_at_k(hits, 5).mean() == pytest.approx(0.9)


def test_ndcg(hits, n_rel):
    per = M.ndcg_at_k(hits, n_rel, 3)
    expected = [
        (D1 + D3) / (D1 + D2),  # r0: hits at 1 and 3; ideal = 2 relevant at the top
        0.0,
        0.0,
        1.0,  # r3: three hits, three possible
        D1 / (D1 + D2),  # r4: one hit, two relevant
        0.0,
        D1 / (D1 + D2 + D3),  # r6: one hit of six relevant (ideal fills all three ranks)
        D3 / D1,  # r7: hit at rank 3, one relevant
        1.0,  # r8: both relevant at ranks 1-2
        1.0,
    ]
    assert per == pytest.approx(expected)
    assert per.mean() == pytest.approx(sum(expected) / 10)


def test_map(hits, n_rel):
    # AP@3 = Σ hit_i · P@i / min(3, R)
    expected = [
        (1 + 2 / 3) / 2,  # r0: P@1 = 1, P@3 = 2/3
        0,
        0,
        (1 + 1 + 1) / 3,
        1 / 2,  # r4: P@1 = 1, R = 2
        0,
        1 / 3,  # r6: P@1 = 1, min(3, 6) = 3
        (1 / 3) / 1,  # r7: P@3 = 1/3
        (1 + 1) / 2,
        1.0,
    ]
    assert M.average_precision_at_k(hits, n_rel, 3) == pytest.approx(expected)
    assert M.average_precision_at_k(hits, n_rel, 3).mean() == pytest.approx(0.5)


def test_coverage():
    # top-3 lists together hold items 0..9: 10 of 20; first items only: {0,5,1,2,7,9,3,6,4} = 9 of 20
    assert M.catalogue_coverage(RECOMMENDED, N_ITEMS, 3) == pytest.approx(0.5)
    assert M.catalogue_coverage(RECOMMENDED, N_ITEMS, 1) == pytest.approx(0.45)


def test_popularity_bias_and_arp():
    popularity = np.arange(10, dtype=float)  # item i bought by i customers: percentile i/10 (no ties)
    recs = RECOMMENDED[:, :1]  # first items 0,5,1,2,7,9,0,3,6,4 sum to 37
    assert M.popularity_bias_at_k(recs, popularity, 1).mean() == pytest.approx(0.37)
    assert M.arp_at_k(recs, popularity, 1).mean() == pytest.approx(3.7)
    # r4's list holds only item 7: the mean is over the items present, not over K
    assert M.arp_at_k(RECOMMENDED, popularity, 3)[4] == pytest.approx(7.0)


def test_popularity_percentiles_with_ties():
    # pop 5,5,1,0: item 0 has two below and one tie → (2 + 0.5) / 4; item 2 has one below → 1/4
    assert M.popularity_percentiles(np.array([5, 5, 1, 0])).tolist() == [0.625, 0.625, 0.25, 0.0]


def test_customer_without_relevant_items_scores_zero_not_nan():
    hits = np.zeros((1, 3), dtype=bool)
    n = np.array([0])
    assert M.recall_at_k(hits, n, 3).tolist() == [0.0]
    assert M.ndcg_at_k(hits, n, 3).tolist() == [0.0]
    assert M.average_precision_at_k(hits, n, 3).tolist() == [0.0]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="k must be"):
        M.precision_at_k(np.zeros((1, 1), dtype=bool), 0)
    with pytest.raises(ValueError, match="rows"):
        M.hit_matrix(RECOMMENDED, _relevant()[:3])


def test_paired_bootstrap_known_answers():
    # A constant shift: every resample's difference is exactly 0.1, so the interval collapses onto it.
    rng = np.random.default_rng(1)
    theirs = rng.random(500)
    out = M.paired_bootstrap(theirs + 0.1, theirs, resamples=200)
    assert out["difference"] == pytest.approx(0.1)
    assert out["low"] == pytest.approx(0.1) and out["high"] == pytest.approx(0.1)
    assert out["customers"] == 500
    # NaN pairs are left out of both sides: means over the 3 complete pairs
    out = M.paired_bootstrap(np.array([1.0, 2.0, np.nan, 3.0]), np.array([0.5, np.nan, 1.0, 1.5]))
    assert (out["ours"], out["theirs"], out["customers"]) == (2.0, 1.0, 2)
    assert out["relative"] == pytest.approx(1.0)
    # Pure noise around the same mean: the 95% interval of the difference contains 0 and is about
    # ±1.96·sqrt(2/n)·σ wide (σ = 1/sqrt(12) for uniform noise, n = 2000 → ±0.0258)
    a, b = rng.random(2000), rng.random(2000)
    out = M.paired_bootstrap(a, b, resamples=4000, seed=3)
    assert out["low"] < 0 < out["high"]
    assert (out["high"] - out["low"]) / 2 == pytest.approx(
        1.96 * math.sqrt(2 / 2000) / math.sqrt(12), rel=0.1
    )
    with pytest.raises(ValueError, match="one length"):
        M.paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="no customer"):
        M.paired_bootstrap(np.array([np.nan]), np.array([1.0]))
