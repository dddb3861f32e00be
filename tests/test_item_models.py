"""Known answers for EASE, RP3beta and the repurchase-timing model (TIFU), and their place in the blend.

The contract (ranking, filters, save/load, unknown customers) runs over them in ``test_recommenders.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from nextbest.training import item_models
from nextbest.training.recommenders import (
    ALSConfig,
    BlendConfig,
    BlendRecommender,
    EASEConfig,
    ItemKNNConfig,
    RepeatConfig,
    RP3BetaConfig,
    TIFUConfig,
    config_for,
    load_recommender,
    make_recommender,
)


def csr(rows: list[list[float]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


def one_row(items: list[int], n: int, weights: list[float] | None = None) -> sp.csr_matrix:
    w = np.ones(len(items), np.float32) if weights is None else np.array(weights, np.float32)
    return sp.csr_matrix((w, ([0] * len(items), items)), shape=(1, n), dtype=np.float32)


# --- EASE -----------------------------------------------------------------------------------------------------


def two_blocks(a_customers: int = 10, b_customers: int = 10) -> sp.csr_matrix:
    """Items 0–4 form block A, 5–9 block B; each customer buys four of their block's five items."""
    cells = []
    for u in range(a_customers):
        cells += [(u, i) for i in range(5) if i != u % 5]
    for u in range(b_customers):
        cells += [(a_customers + u, 5 + i) for i in range(5) if i != u % 5]
    r, c = zip(*cells, strict=True)
    return sp.csr_matrix(
        (np.ones(len(r), np.float32), (r, c)), shape=(a_customers + b_customers, 10), dtype=np.float32
    )


def test_ease_weights_are_the_closed_form_with_a_zero_diagonal():
    x = two_blocks()
    b = item_models.ease_weights(x, l2=2.0)
    g = (x.T @ x).toarray().astype(np.float64) + 2.0 * np.eye(10)
    p = np.linalg.inv(g)
    expected = np.eye(10) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(b, expected, atol=1e-5)
    assert np.all(np.diag(b) == 0)
    # Blocks never co-occur: no weight crosses them.
    np.testing.assert_allclose(b[:5, 5:], 0, atol=1e-6)
    np.testing.assert_allclose(b[5:, :5], 0, atol=1e-6)
    with pytest.raises(ValueError, match="l2"):
        item_models.ease_weights(x, l2=0)


def test_ease_recommends_the_other_items_of_the_block():
    model = make_recommender("ease", EASEConfig(l2=1.0)).fit(two_blocks())
    ids, _ = model.recommend(-1, one_row([0, 1, 2], 10), 2)
    assert set(ids.tolist()) == {3, 4}
    ids, _ = model.recommend(-1, one_row([6, 8], 10), 3)
    assert set(ids.tolist()) == {5, 7, 9}
    assert model.n_items_used == 10


def test_ease_learns_on_the_most_bought_items_only():
    # Block A has 12 customers, block B 10: the five items of block A are the most bought.
    x = two_blocks(a_customers=12)
    model = make_recommender("ease", EASEConfig(l2=1.0, max_items=5)).fit(x)
    assert model.n_items_used == 5 and model.items_used.tolist() == [0, 1, 2, 3, 4]
    assert model.weights.shape == (5, 5)
    # A block A history: block A items first, then the items outside the learned set (by popularity).
    ids, scores = model.recommend(-1, one_row([0, 1], 10), 10)
    assert set(ids[:3].tolist()) == {2, 3, 4}
    assert set(ids[3:].tolist()) == set(range(5, 10)) and np.all(scores[3:] < scores[2])
    # A history entirely outside the learned set carries no signal: popularity.
    ids, _ = model.recommend(-1, one_row([6], 10), 4)
    np.testing.assert_array_equal(ids, model.tie_order[model.tie_order != 6][:4])


def test_ease_binary_ignores_weights_and_weighted_does_not():
    x = two_blocks()
    heavy = x.copy()
    heavy.data *= 7
    a = make_recommender("ease", EASEConfig(l2=1.0)).fit(x)
    b = make_recommender("ease", EASEConfig(l2=1.0)).fit(heavy)
    np.testing.assert_allclose(a.weights, b.weights)
    c = make_recommender("ease", EASEConfig(l2=1.0, binary=False)).fit(heavy)
    assert not np.allclose(a.weights, c.weights)


# --- RP3beta --------------------------------------------------------------------------------------------------

ANCHOR, POPULAR, NICHE = 0, 1, 2


def anchor_popular_niche() -> sp.csr_matrix:
    """Customers 0–3 buy the anchor; 0 and 1 also the niche item; all ten customers buy the popular item."""
    rows = np.zeros((10, 3), dtype=np.float32)
    rows[:4, ANCHOR] = 1
    rows[:2, NICHE] = 1
    rows[:, POPULAR] = 1
    return sp.csr_matrix(rows)


def test_rp3beta_walk_by_hand():
    # From the anchor, each of its 4 customers is reached with 1/4; customers 0 and 1 have 3 items (1/3 each),
    # 2 and 3 have 2 (1/2 each): W[A, P] = ¼(⅓+⅓+½+½) = 5/12, W[A, N] = ¼(⅓+⅓) = 1/6, W[A, A] = 5/12.
    w = item_models.rp3beta_similarity(anchor_popular_niche(), alpha=1.0, beta=0.0, k=3).toarray()
    np.testing.assert_allclose(w[ANCHOR], [5 / 12, 5 / 12, 1 / 6], rtol=1e-6)
    # beta divides by popularity ** beta: anchor 4 customers, popular 10, niche 2.
    w = item_models.rp3beta_similarity(anchor_popular_niche(), alpha=1.0, beta=0.8, k=3).toarray()
    np.testing.assert_allclose(w[ANCHOR], [5 / 12 / 4**0.8, 5 / 12 / 10**0.8, 1 / 6 / 2**0.8], rtol=1e-5)
    # alpha squares every transition probability: W[A, N] = (¼)²((⅓)² + (⅓)²) = 1/72.
    w = item_models.rp3beta_similarity(anchor_popular_niche(), alpha=2.0, beta=0.0, k=3).toarray()
    assert w[ANCHOR, NICHE] == pytest.approx(1 / 72)
    # K keeps the strongest neighbours of each item only.
    w = item_models.rp3beta_similarity(anchor_popular_niche(), alpha=1.0, beta=0.8, k=1)
    assert np.diff(w.indptr).tolist() == [1, 1, 1]


def test_rp3beta_beta_demotes_the_popular_item_against_the_niche_one():
    x = anchor_popular_niche()
    history = one_row([ANCHOR], 3)
    walk = make_recommender("rp3beta", RP3BetaConfig(alpha=1.0, beta=0.0, K=10)).fit(x)
    assert walk.recommend(-1, history, 2)[0].tolist() == [POPULAR, NICHE]
    penalised = make_recommender("rp3beta", RP3BetaConfig(alpha=1.0, beta=0.8, K=10)).fit(x)
    ids, scores = penalised.recommend(-1, history, 2)
    assert ids.tolist() == [NICHE, POPULAR]
    assert scores == pytest.approx([1 / 6 / 2**0.8, 5 / 12 / 10**0.8], rel=1e-5)


# --- repurchase timing ----------------------------------------------------------------------------------------

# Customer 0: item 0 bought 4× (last 30 days ago), item 1 bought 4× (last yesterday), item 2 once, 120 days ago
# (so 120 days observed: a usual interval of 30 days for items 0 and 1). Customer 1 bought item 2 three times in
# 90 days: item 2's typical interval is 30 days. Weights are 5 per purchase, as the feature build writes them.
TIMING_WEIGHTS = csr([[20, 20, 5, 0], [0, 0, 15, 5]])
TIMING_AGES = csr([[30, 1, 120, 0], [0, 0, 10, 90]])


NO_DECAY = 1e9
"""A half-life so long that the time-decayed count is the plain count (to 1e-6)."""


def test_decayed_frequency_by_hand():
    # one purchase 30 days ago at a 30-day half-life counts ½; three purchases, the latest today, over 60 days:
    # 1 + 2 × mean of 0.5 ** (t / 30) over [0, 60] = 1 + 2 × (30 / ln 2) × (1 − ¼) / 60
    got = item_models.decayed_frequency(
        np.array([1.0, 3.0]), np.array([30.0, 0.0]), np.array([30.0, 60.0]), 30.0
    )
    np.testing.assert_allclose(got, [0.5, 1 + 2 * 30 / np.log(2) * 0.75 / 60], rtol=1e-9)


def test_purchase_timing_by_hand():
    params = item_models.TimingParameters(
        half_life_days=NO_DECAY, horizon_days=7.0, lapse_intervals=4.0, due_weight=1.0
    )
    scores = item_models.purchase_timing(
        counts=np.array([4.0, 4.0, 1.0, 4.0]),
        ages=np.array([30.0, 1.0, 120.0, np.nan]),
        tenure=np.array([120.0, 120.0, 120.0, np.nan]),
        fallback_interval=np.array([99.0, 99.0, 30.0, 99.0]),
        params=params,
    )
    # usual interval 120 / 4 = 30 days. Due now: 4 × readiness 1; bought yesterday: 4 × (1 + 7) / 30; bought
    # once, interval 30 from the fallback, 3 intervals overdue: 1 × 0.5 ** (3 / 4); unknown age: the count.
    np.testing.assert_allclose(scores, [4.0, 4.0 * 8 / 30, 0.5**0.75, 4.0], rtol=1e-5)
    # due_weight 0: the timing is ignored, the decayed count is left.
    flat = item_models.purchase_timing(
        np.array([4.0, 4.0]),
        np.array([30.0, 1.0]),
        np.array([120.0, 120.0]),
        np.array([99.0, 99.0]),
        item_models.TimingParameters(NO_DECAY, 7.0, 4.0, 0.0),
    )
    np.testing.assert_allclose(flat, [4.0, 4.0], rtol=1e-5)


def test_timing_ranks_an_item_due_now_above_one_bought_yesterday():
    config = TIFUConfig(
        half_life_days=NO_DECAY, horizon_days=7, lapse_intervals=4, due_weight=1.0, neighbours=0
    )
    model = make_recommender("tifu", config).fit(TIMING_WEIGHTS, recency=TIMING_AGES)
    assert model.unit == 5.0
    assert model.tenure.tolist() == [120.0, 90.0]
    assert model.item_interval[2] == pytest.approx(30.0)
    ids, scores = model.recommend(0, TIMING_WEIGHTS[0], 3, filter_already_liked=False)
    assert ids.tolist() == [0, 1, 2]
    assert scores == pytest.approx([1.0, 8 / 30, 0.25 * 0.5**0.75], rel=1e-5)
    # With the default 90-day half-life the more recent purchases of item 1 count more, yet item 0 (due) leads.
    timed = make_recommender("tifu", config.model_copy(update={"half_life_days": 90.0})).fit(
        TIMING_WEIGHTS, recency=TIMING_AGES
    )
    assert timed.recommend(0, TIMING_WEIGHTS[0], 2, filter_already_liked=False)[0].tolist() == [0, 1]
    untimed = make_recommender("tifu", config.model_copy(update={"half_life_days": 90.0, "due_weight": 0.0}))
    untimed.fit(TIMING_WEIGHTS, recency=TIMING_AGES)
    assert untimed.recommend(0, TIMING_WEIGHTS[0], 2, filter_already_liked=False)[0].tolist() == [1, 0]
    # A customer the model was not fitted on has no purchase ages: the purchase counts decide.
    ids, scores = model.recommend(-1, TIMING_WEIGHTS[0], 3, filter_already_liked=False)
    assert set(ids[:2].tolist()) == {0, 1} and ids[2] == 2
    assert scores == pytest.approx([1.0, 1.0, 0.25])


def test_timing_without_recency_is_purchase_frequency():
    model = make_recommender("tifu", TIFUConfig(neighbours=0)).fit(TIMING_WEIGHTS)
    ids, scores = model.recommend(1, TIMING_WEIGHTS[1], 2, filter_already_liked=False)
    assert ids.tolist() == [2, 3] and scores == pytest.approx([1.0, 1 / 3])


def test_timing_neighbours_bring_items_the_customer_never_bought():
    # Fitted customers who bought item 0 also bought item 1; someone who bought only item 0 gets item 1 next.
    x = csr([[5, 5, 0, 0], [10, 5, 0, 0], [0, 0, 5, 5], [0, 0, 0, 5]])
    model = make_recommender("tifu", TIFUConfig(neighbours=2, neighbour_weight=0.5)).fit(x)
    ids, scores = model.recommend(-1, one_row([0], 4, [5.0]), 1)
    assert ids.tolist() == [1]
    # Customers 0 and 1 are its neighbours: own vectors [1, 1, 0, 0] and [1, 0.5, 0, 0] → item 1: 0.5 · 0.75.
    assert scores == pytest.approx([0.375])
    own_only = make_recommender("tifu", TIFUConfig(neighbours=2, neighbour_weight=0.0)).fit(x)
    ids, _ = own_only.recommend(-1, one_row([0], 4, [5.0]), 3)
    np.testing.assert_array_equal(ids, own_only.tie_order[own_only.tie_order != 0][:3])  # popularity


def test_saved_timing_model_keeps_the_ages(tmp_path):
    model = make_recommender("tifu", TIFUConfig(horizon_days=7, neighbours=1)).fit(
        TIMING_WEIGHTS, recency=TIMING_AGES
    )
    loaded = load_recommender(model.save(tmp_path / "tifu"))
    users = np.array([0, 1, -1])
    rows = sp.vstack([TIMING_WEIGHTS[0], TIMING_WEIGHTS[1], TIMING_WEIGHTS[0]]).tocsr()
    np.testing.assert_array_equal(model.scores(users, rows), loaded.scores(users, rows))
    assert loaded.unit == 5.0


# --- in the blend ---------------------------------------------------------------------------------------------


def test_blend_takes_the_new_models_as_parts():
    config = BlendConfig(repeat=TIFUConfig(neighbours=0), cf=EASEConfig(l2=1.0), repeat_weight=0.0)
    blend = make_recommender("blend", config).fit(two_blocks())
    ease = make_recommender("ease", EASEConfig(l2=1.0)).fit(two_blocks())
    history = two_blocks()[[0, 12]]
    users = np.array([0, 12])
    np.testing.assert_array_equal(blend.recommend(users, history, 2)[0], ease.recommend(users, history, 2)[0])
    # repeat_weight 1: the timing part alone orders the customer's own items (here: by purchase count).
    weights = sp.csr_matrix(np.array([[15, 5, 10, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32))
    only_repeat = make_recommender(
        "blend", config.model_copy(update={"repeat_weight": 1.0, "cf": RP3BetaConfig(K=5)})
    ).fit(two_blocks())
    ids, _ = only_repeat.recommend(-1, weights, 3, filter_already_liked=False)
    assert ids.tolist() == [0, 2, 1]
    tifu = make_recommender("tifu", config.repeat).fit(two_blocks())
    rp3 = make_recommender("rp3beta", RP3BetaConfig(K=5)).fit(two_blocks())
    joined = BlendRecommender.from_parts(only_repeat.config, tifu, rp3)
    np.testing.assert_array_equal(joined.recommend(-1, weights, 3, filter_already_liked=False)[0], ids)


def test_blend_configs_without_a_part_kind_load_as_before():
    old = {
        "repeat": {"recency_mix": 0.4, "half_life_days": 90.0},
        "cf": {"factors": 16},
        "knn": {"K": 50},
        "repeat_weight": 0.7,
    }
    config = config_for("blend", old)
    assert config.repeat == RepeatConfig(recency_mix=0.4, half_life_days=90.0)
    assert config.cf == ALSConfig(factors=16)
    assert config.knn == ItemKNNConfig(K=50)
    new = config_for(
        "blend",
        {"repeat": {"kind": "tifu"}, "cf": {"kind": "rp3beta", "beta": 0.3}, "knn": {"kind": "ease"}},
    )
    assert new.repeat == TIFUConfig() and new.cf == RP3BetaConfig(beta=0.3) and new.knn == EASEConfig()
    again = BlendConfig.model_validate_json(new.model_dump_json())
    assert again == new
