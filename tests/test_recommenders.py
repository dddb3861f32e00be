"""One contract suite run against every recommender, plus known answers for popularity, repeat and blend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextbest.training.recommenders import (
    MISSING_ID,
    MODEL_NAMES,
    ALSConfig,
    BlendConfig,
    BlendRecommender,
    BPRConfig,
    EASEConfig,
    ItemKNNConfig,
    PopularityConfig,
    Recommender,
    RecommenderError,
    RepeatConfig,
    RP3BetaConfig,
    TIFUConfig,
    config_for,
    load_recommender,
    make_recommender,
    top_n,
)

N = 50
HELD_OUT = 5

# Small-rank configs: the checkerboard has rank 2, and 64 factors on 50 items would memorise the training cells.
CONTRACT = {
    "als": ("als", ALSConfig(factors=2, regularization=0.01, iterations=15)),
    "bpr": ("bpr", BPRConfig(factors=4)),
    "itemknn-cosine": ("itemknn", ItemKNNConfig(weighting="cosine", K=50)),
    "itemknn-bm25": ("itemknn", ItemKNNConfig(weighting="bm25", K=50)),
    "popularity": ("popularity", PopularityConfig()),
    "repeat": ("repeat", RepeatConfig()),
    "blend": ("blend", BlendConfig(cf=ALSConfig(factors=2, regularization=0.01))),
    "blend-knn": (
        "blend",
        BlendConfig(cf=ALSConfig(factors=2, regularization=0.01), knn=ItemKNNConfig(K=50), knn_weight=0.5),
    ),
    "ease": ("ease", EASEConfig(l2=10.0)),
    "ease-weighted-top-items": ("ease", EASEConfig(l2=10.0, max_items=40, binary=False)),
    "rp3beta": ("rp3beta", RP3BetaConfig(alpha=1.0, beta=0.5, K=50)),
    "tifu": ("tifu", TIFUConfig(neighbours=10, neighbour_weight=0.5)),
    "blend-ease-tifu": (
        "blend",
        BlendConfig(repeat=TIFUConfig(neighbours=10), cf=EASEConfig(l2=10.0), repeat_weight=0.3),
    ),
}
CF_MODELS = [
    "als",
    "bpr",
    "itemknn-cosine",
    "itemknn-bm25",
    "blend",
    "blend-knn",
    "ease",
    "rp3beta",
    "tifu",
    "blend-ease-tifu",
]


def checkerboard() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Even customers like even items, odd like odd; 5 liked cells per customer held out.

    Returns (train, held_out); train has one extra, empty row (customer 50) for the empty-history contract.
    """
    rng = np.random.default_rng(7)
    train_cells, test_cells = [], []
    for u in range(N):
        liked = np.arange(u % 2, N, 2)
        held = set(rng.choice(liked, HELD_OUT, replace=False).tolist())
        for i in liked:
            (test_cells if i in held else train_cells).append((u, i))

    def csr(cells, rows):
        r, c = zip(*cells, strict=True)
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(rows, N))

    return csr(train_cells, N + 1), csr(test_cells, N)


TRAIN, HELD = checkerboard()


@pytest.fixture(scope="module", params=list(CONTRACT))
def fitted(request) -> tuple[str, Recommender]:
    name, config = CONTRACT[request.param]
    return request.param, make_recommender(name, config, seed=3, threads=1).fit(TRAIN)


def empty_row() -> sp.csr_matrix:
    return sp.csr_matrix((1, N), dtype=np.float32)


def popularity_top(model: Recommender, n: int) -> np.ndarray:
    return model.tie_order[:n]


# --- the contract ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CF_MODELS)
def test_checkerboard_precision_is_one(key):
    name, config = CONTRACT[key]
    model = make_recommender(name, config, seed=3, threads=1).fit(TRAIN)
    users = np.arange(N)
    ids, _ = model.recommend(users, TRAIN[users], HELD_OUT)
    # With already-liked cells filtered, exactly the held-out cells are left of the customer's parity:
    # precision@5 == 1 means the top 5 are exactly the held-out items.
    for u in range(N):
        assert set(ids[u].tolist()) == set(HELD[u].indices.tolist()), (key, u)
    unfiltered, _ = model.recommend(users, TRAIN[users], 10, filter_already_liked=False)
    assert ((unfiltered % 2) == (users[:, None] % 2)).all()


def test_save_load_gives_identical_recommendations(fitted, tmp_path):
    key, model = fitted
    path = model.save(tmp_path / key)
    assert {p.suffix for p in path.rglob("*") if p.is_file()} <= {".json", ".npz"}
    for npz in path.rglob("*.npz"):
        with np.load(npz, allow_pickle=False) as arrays:  # raises if anything needed pickle
            _ = {k: arrays[k] for k in arrays.files}
    loaded = load_recommender(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    users = np.arange(N + 1)
    a_ids, a_scores = model.recommend(users, TRAIN[users], 7, filter_already_liked=False)
    b_ids, b_scores = loaded.recommend(users, TRAIN[users], 7, filter_already_liked=False)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_scores, b_scores)
    np.testing.assert_array_equal(
        model.similar_items(np.arange(N), 4)[0], loaded.similar_items(np.arange(N), 4)[0]
    )


def test_unknown_customer_without_history_gets_popularity(fitted):
    _, model = fitted
    for unknown in (-1, N + 1, 10**6):
        ids, scores = model.recommend(unknown, empty_row(), 5)
        np.testing.assert_array_equal(ids, popularity_top(model, 5))
        assert np.all(np.diff(scores) <= 0)


def test_fitted_customer_with_empty_history_gets_popularity(fitted):
    _, model = fitted
    ids, _ = model.recommend(N, TRAIN[N], 5)  # row 50 exists in the fit but is empty
    np.testing.assert_array_equal(ids, popularity_top(model, 5))


def test_batch_shapes_and_filters(fitted):
    _, model = fitted
    users = np.array([0, 1, -1])
    rows = sp.vstack([TRAIN[0], TRAIN[1], empty_row()]).tocsr()
    ids, scores = model.recommend(users, rows, 3)
    assert ids.shape == scores.shape == (3, 3)
    for r in range(2):
        assert not set(ids[r].tolist()) & set(rows[r].indices.tolist())
    # candidates restrict, exclude removes per customer
    ids, _ = model.recommend(users, rows, 10, filter_already_liked=False, candidates=np.array([3, 4, 5]))
    assert ids.shape == (3, 3) and set(ids.ravel().tolist()) == {3, 4, 5}
    exclude = sp.csr_matrix(([1.0], ([0], [3])), shape=(3, N), dtype=np.float32)
    ids, _ = model.recommend(
        users, rows, 10, filter_already_liked=False, candidates=np.array([3, 4, 5]), exclude=exclude
    )
    assert 3 not in ids[0] and ids[0][-1] == MISSING_ID and set(ids[1].tolist()) == {3, 4, 5}


def test_single_customer_length_is_min_of_n_and_valid(fitted):
    _, model = fitted
    valid = N - TRAIN[0].nnz
    ids, scores = model.recommend(0, TRAIN[0], 1000)
    assert len(ids) == len(scores) == valid
    assert len(set(ids.tolist())) == valid and np.isfinite(scores).all()
    assert len(model.recommend(0, TRAIN[0], 0)[0]) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    users=st.lists(st.integers(-3, N + 3), min_size=1, max_size=6),
    n=st.integers(0, N + 5),
    filter_liked=st.booleans(),
    candidates=st.none() | st.lists(st.integers(0, N - 1), min_size=1, max_size=N),
)
def test_rankings_sorted_finite_and_complete(fitted, users, n, filter_liked, candidates):
    _, model = fitted
    users = np.array(users)
    rows = sp.vstack([TRAIN[u] if 0 <= u <= N else empty_row() for u in users]).tocsr()
    cand = None if candidates is None else np.array(candidates)
    ids, scores = model.recommend(users, rows, n, filter_already_liked=filter_liked, candidates=cand)
    allowed = set(range(N)) if cand is None else set(cand.tolist())
    for r in range(len(users)):
        valid = allowed - (set(rows[r].indices.tolist()) if filter_liked else set())
        got = ids[r][ids[r] != MISSING_ID]
        assert len(got) == min(n, len(valid))
        assert set(got.tolist()) <= valid and len(set(got.tolist())) == len(got)
        s = scores[r][: len(got)]
        assert not np.isnan(scores[r]).any() and np.isfinite(s).all()
        assert np.all(np.diff(s) <= 0)
        assert np.all(scores[r][len(got) :] == -np.inf)


def test_wrong_user_items_rows_are_rejected(fitted):
    _, model = fitted
    with pytest.raises(RecommenderError, match="one row per customer"):
        model.recommend(np.array([0, 1]), TRAIN, 3)


# --- known answers of the baselines ---------------------------------------------------------------------------


def small_history() -> sp.csr_matrix:
    # customer 0 bought item 2 ×3, item 0 ×1, item 4 ×2; customer 1 bought item 1 ×1, item 3 ×5, item 4 ×1.
    return sp.csr_matrix(
        np.array([[1, 0, 3, 0, 2, 0], [0, 1, 0, 5, 1, 0]], dtype=np.float32),
    )


def test_popularity_known_answer():
    m = small_history()
    model = make_recommender("popularity").fit(m)
    # distinct customers per item: [1,1,1,1,2,0] → item 4 first, then 0,1,2,3 (ties by index), item 5 last
    ids, scores = model.recommend(0, m[0], 6, filter_already_liked=False)
    assert ids.tolist() == [4, 0, 1, 2, 3, 5]
    assert scores.tolist() == [1.0, 0.5, 0.5, 0.5, 0.5, 0.0]
    by_weight = make_recommender("popularity", {"measure": "weight"}).fit(m)
    # summed weights: [1,1,3,5,3,0] → 3, then 2 and 4 tie (index order), then 0, 1
    assert by_weight.recommend(0, m[0], 5, filter_already_liked=False)[0].tolist() == [3, 2, 4, 0, 1]


def test_repeat_by_frequency_then_popular():
    m = small_history()
    model = make_recommender("repeat", RepeatConfig(recency_mix=0.0)).fit(m)
    ids, scores = model.recommend(0, m[0], 6, filter_already_liked=False)
    # own items by count 3 > 2 > 1 (scores count / max count), then the rest by popularity
    assert ids.tolist() == [2, 4, 0, 1, 3, 5]
    assert scores[:3] == pytest.approx([1.0, 2 / 3, 1 / 3])
    # discovery: with own items filtered, repeat is popularity
    assert model.recommend(0, m[0], 3)[0].tolist() == [1, 3, 5]


def test_repeat_by_recency():
    m = small_history()
    # customer 0 last saw item 0 today, item 4 thirty days ago, item 2 sixty days ago
    ages = sp.csr_matrix(np.array([[0.5, 0, 60, 0, 30, 0], [0, 1, 0, 1, 1, 0]], dtype=np.float32))
    only_recency = make_recommender("repeat", RepeatConfig(recency_mix=1.0, half_life_days=30)).fit(
        m, recency=ages
    )
    ids, scores = only_recency.recommend(0, m[0], 3, filter_already_liked=False)
    assert ids.tolist() == [0, 4, 2]
    assert scores == pytest.approx([0.5 ** (0.5 / 30), 0.5, 0.25])
    mixed = make_recommender("repeat", RepeatConfig(recency_mix=0.5, half_life_days=30)).fit(m, recency=ages)
    # item 2: 0.5·1 + 0.5·0.25 = 0.625; item 0: 0.5·(1/3) + 0.5·0.988 = 0.661; item 4: 0.5·(2/3) + 0.25 = 0.583
    assert mixed.recommend(0, m[0], 3, filter_already_liked=False)[0].tolist() == [0, 2, 4]
    # a customer the model never saw has no recency: frequency decides
    ids, _ = mixed.recommend(-1, m[0], 3, filter_already_liked=False)
    assert ids.tolist() == [2, 4, 0]


def test_blend_extremes():
    model = make_recommender("blend", BlendConfig(repeat_weight=1.0, cf=ALSConfig(factors=2))).fit(TRAIN)
    ids, _ = model.recommend(0, TRAIN[0], TRAIN[0].nnz + 3, filter_already_liked=False)
    assert set(ids[: TRAIN[0].nnz].tolist()) == set(TRAIN[0].indices.tolist())  # own items first
    cf_only = make_recommender("blend", BlendConfig(repeat_weight=0.0, cf=ALSConfig(factors=2)), seed=3).fit(
        TRAIN
    )
    als = make_recommender("als", ALSConfig(factors=2), seed=3).fit(TRAIN)
    users = np.arange(N)
    np.testing.assert_array_equal(
        cf_only.recommend(users, TRAIN[users], 5)[0], als.recommend(users, TRAIN[users], 5)[0]
    )


def test_blend_knn_weight_one_ranks_new_items_like_item_knn():
    # repeat_weight 0 and knn_weight 1: the score is item-kNN's, min-max scaled per customer (same order)
    config = BlendConfig(repeat_weight=0.0, cf=ALSConfig(factors=2), knn=ItemKNNConfig(K=50), knn_weight=1.0)
    blend = make_recommender("blend", config, seed=3).fit(TRAIN)
    knn = make_recommender("itemknn", ItemKNNConfig(K=50), seed=3).fit(TRAIN)
    users = np.arange(N)
    ours, _ = blend.recommend(users, TRAIN[users], HELD_OUT)
    theirs, _ = knn.recommend(users, TRAIN[users], HELD_OUT)
    np.testing.assert_array_equal(np.sort(ours, axis=1), np.sort(theirs, axis=1))


def test_blend_from_fitted_parts_equals_a_fitted_blend():
    config = BlendConfig(repeat_weight=0.3, cf=ALSConfig(factors=2), knn=ItemKNNConfig(K=50), knn_weight=0.4)
    fitted = make_recommender("blend", config, seed=3).fit(TRAIN)
    repeat = make_recommender("repeat", config.repeat, seed=3).fit(TRAIN)
    als = make_recommender("als", config.cf, seed=3).fit(TRAIN)
    knn = make_recommender("itemknn", config.knn, seed=3).fit(TRAIN)
    joined = BlendRecommender.from_parts(config, repeat, als, knn)
    users = np.arange(N)
    np.testing.assert_array_equal(
        joined.recommend(users, TRAIN[users], 5)[0], fitted.recommend(users, TRAIN[users], 5)[0]
    )
    with pytest.raises(RecommenderError, match="blend part knn: config and model"):
        BlendRecommender.from_parts(config, repeat, als)
    with pytest.raises(RecommenderError, match="blend part cf: fitted with"):
        BlendRecommender.from_parts(config.model_copy(update={"cf": ALSConfig(factors=3)}), repeat, als, knn)
    small = make_recommender("itemknn", config.knn).fit(TRAIN[:10])
    with pytest.raises(RecommenderError, match="blend part knn was fitted on 10"):
        BlendRecommender.from_parts(config, repeat, als, small)


# --- implicit equivalence, fold-in and configs ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["als", "itemknn-bm25"])
def test_same_ranking_as_implicit(key):
    name, config = CONTRACT[key]
    model = make_recommender(name, config, seed=3, threads=1).fit(TRAIN)
    users = np.arange(N)
    ours, our_scores = model.recommend(users, TRAIN[users], HELD_OUT)
    theirs, their_scores = model.implicit_model.recommend(users, TRAIN[users], N=HELD_OUT)
    np.testing.assert_array_equal(np.sort(ours, axis=1), np.sort(theirs, axis=1))
    np.testing.assert_allclose(our_scores, their_scores, rtol=1e-4, atol=1e-5)


def test_als_folds_in_fresh_histories():
    model = make_recommender("als", CONTRACT["als"][1], seed=3).fit(TRAIN)
    fresh = sp.csr_matrix(([1.0] * 4, ([0] * 4, [1, 3, 5, 7])), shape=(1, N), dtype=np.float32)
    ids, _ = model.recommend(-1, fresh, 5)
    assert (ids % 2 == 1).all()  # an odd history gives odd items
    recalculated, _ = model.recommend(0, fresh, 5, recalculate_user=True)  # customer 0 is even
    assert (recalculated % 2 == 1).all()
    with pytest.raises(RecommenderError, match="bpr cannot"):
        make_recommender("bpr", BPRConfig(iterations=1)).fit(TRAIN).recommend(
            0, TRAIN[0], 3, recalculate_user=True
        )


@pytest.mark.parametrize(
    "config",
    [
        ALSConfig(factors=8),
        BPRConfig(learning_rate=0.1),
        ItemKNNConfig(weighting="cosine", K=5),
        PopularityConfig(measure="weight"),
        RepeatConfig(recency_mix=1.0),
        BlendConfig(cf=ItemKNNConfig()),
        EASEConfig(l2=50.0, max_items=100, binary=False),
        RP3BetaConfig(alpha=0.7, beta=0.2, K=10),
        TIFUConfig(horizon_days=3.0, neighbours=0),
        BlendConfig(repeat=TIFUConfig(), cf=RP3BetaConfig()),
    ],
)
def test_configs_round_trip_through_json(config):
    again = type(config).model_validate_json(config.model_dump_json())
    assert again == config
    assert config_for(config.kind, json.loads(config.model_dump_json())) == config


def test_factory_errors():
    assert set(MODEL_NAMES) == {
        "als",
        "bpr",
        "itemknn",
        "popularity",
        "repeat",
        "blend",
        "ease",
        "rp3beta",
        "tifu",
    }
    with pytest.raises(RecommenderError, match="unknown model"):
        make_recommender("svd")
    with pytest.raises(RecommenderError, match="needs a ALSConfig"):
        make_recommender("als", BPRConfig())
    with pytest.raises(RecommenderError, match="not fitted"):
        make_recommender("als").recommend(0, empty_row(), 3)


def test_top_n_breaks_ties_by_the_given_order():
    scores = np.array([[1.0, 2.0, 2.0, -np.inf, 2.0]], dtype=np.float32)
    ids, vals = top_n(scores, 3, tie_order=np.array([4, 3, 2, 1, 0]))
    assert ids.tolist() == [[4, 2, 1]] and vals.tolist() == [[2.0, 2.0, 2.0]]
    ids, vals = top_n(scores, 10)
    assert ids.tolist() == [[1, 2, 4, 0]]


def test_set_threads_reaches_every_implicit_part_and_keeps_the_ranking():
    blend = make_recommender(
        "blend", BlendConfig(repeat_weight=0.3, cf=ALSConfig(factors=2), knn=ItemKNNConfig(K=5)), seed=3
    ).fit(TRAIN)
    users = np.arange(N)
    before = blend.recommend(users, TRAIN[users], 5, recalculate_user=True)[0]
    blend.set_threads(1)
    assert blend.threads == 1
    assert [p.threads for p in (blend.repeat, blend.cf, blend.knn)] == [1, 1, 1]
    assert blend.cf.implicit_model.num_threads == 1 and blend.knn.implicit_model.num_threads == 1
    np.testing.assert_array_equal(blend.recommend(users, TRAIN[users], 5, recalculate_user=True)[0], before)
