"""Reasons for recommended items, the most similar history item, and the attribute filters of /recommend."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from nextbest.features.schema import Vocabulary
from nextbest.serving.explain import (
    FilterError,
    ItemAttributes,
    ItemFilters,
    item_mask,
    item_reasons,
    most_similar_item,
    most_similar_items,
    recommendation_reasons,
    unit_rows,
)

PROFILE = {
    "customer_id": "C1",
    "preferred_sport": "cycling",
    "preferred_sport_share": 0.6,
    "preferred_brand": "Apex",
    "preferred_brand_share": 0.8,
    "preferred_colour": "white",
    "preferred_colour_share": 0.3,
    "preferred_category": None,
}
BIKE = {"item_id": "I9", "name": "Road Bike 2", "sport": "cycling", "brand": "Apex", "colour": "white"}
SHOE = {"item_id": "I1", "name": "Trail Runner X", "sport": "running", "brand": "Apex", "colour": "red"}


def test_reasons_from_preferences_strongest_first():
    assert item_reasons(PROFILE, BIKE) == [
        "your favourite brand: Apex",
        "matches your preferred sport: cycling",
        "in your favourite colour: white",
    ]
    assert item_reasons(PROFILE, BIKE, max_reasons=1) == ["your favourite brand: Apex"]
    assert item_reasons(PROFILE, BIKE, min_share=0.5) == [
        "your favourite brand: Apex",
        "matches your preferred sport: cycling",
    ]
    assert item_reasons(PROFILE, {"item_id": "I5", "sport": "tennis", "brand": "Zenith"}) == []
    assert item_reasons(None, BIKE) == []


def test_history_evidence_comes_first():
    assert item_reasons(PROFILE, BIKE, because_of=SHOE) == [
        "often bought after Trail Runner X",
        "your favourite brand: Apex",
        "matches your preferred sport: cycling",
    ]
    assert item_reasons({}, BIKE, because_of=SHOE, because_of_event="view") == [
        "similar to Trail Runner X, which you viewed"
    ]
    # Without a name column the id stands in; an item is never its own evidence.
    assert item_reasons({}, BIKE, because_of={"item_id": "I2"}) == ["often bought after I2"]
    assert item_reasons({}, BIKE, because_of=BIKE) == []


def test_other_attributes_get_a_generic_reason_and_ties_keep_the_given_order():
    profile = {
        "preferred_fit": "slim",
        "preferred_fit_share": 0.5,
        "preferred_sport": "cycling",
        "preferred_sport_share": 0.5,
    }
    item = {"item_id": "I3", "fit": "slim", "sport": "cycling"}
    assert item_reasons(profile, item, attributes=["fit", "sport"]) == [
        "matches your preferred fit: slim",
        "matches your preferred sport: cycling",
    ]


def test_most_similar_item():
    factors = np.array(
        [
            [1.0, 0.0],  # 0: the recommended item
            [0.0, 1.0],  # 1: orthogonal
            [2.0, 0.2],  # 2: almost parallel
            [1.0, 0.1],  # 3: parallel to 2 (ties with it)
            [0.0, 0.0],  # 4: no signal
        ]
    )
    assert most_similar_item(0, [1, 2], factors) == 2
    assert most_similar_item(0, [3, 2, 1], factors) == 2  # tie → the smaller row
    assert most_similar_item(0, [0], factors) is None
    assert most_similar_item(0, [4], factors) is None
    assert most_similar_item(0, [], factors) is None
    # An orthogonal item (cosine 0) is still evidence when it is all the history holds; a zero vector never is.
    assert most_similar_item(0, [1, 4], factors) == 1


def cosine_reference(item: int, history: list[int], factors: np.ndarray) -> int | None:
    """Most similar history row by a plain float64 loop: not the item, never a zero vector, ties to the smaller."""
    best, best_row = -np.inf, None
    for h in sorted(set(history)):
        norms = np.linalg.norm(factors[h]) * np.linalg.norm(factors[item])
        if h == item or norms == 0:
            continue
        cos = float(factors[h] @ factors[item] / norms)
        if cos > best + 1e-6:
            best, best_row = cos, h
    return best_row


def test_most_similar_items_matches_a_plain_cosine_loop():
    """The batch form both the service and the offline reasons call (one product over float32 unit vectors)
    picks what a plain float64 cosine loop picks, for every item against every history, ties and zero vectors
    included."""
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(30, 4))
    factors[5] = 0.0  # a zero vector
    factors[7] = 3 * factors[6]  # parallel to 6: a tie, which goes to 6
    factors[8] = -factors[2]  # opposite to 2: cosine -1, still the best when alone
    unit = unit_rows(factors)
    assert unit.dtype == np.float32 and np.allclose(
        np.linalg.norm(unit[np.arange(30) != 5], axis=1), 1, atol=1e-6
    )
    histories = [[6, 7, 1], [7, 6], [5], [2], [8], [0, 5, 9, 13], list(range(30)), []]
    for history in histories:
        batch = most_similar_items(np.arange(30), history, unit)
        assert batch == [cosine_reference(i, history, factors) for i in range(30)], history
    assert most_similar_items([0], [7, 6], unit) == [6]
    assert most_similar_items([2], [8], unit) == [8]
    assert most_similar_items([5], [1, 2], unit) == [None]  # the recommended item has no factors


ITEMS = pl.DataFrame(
    {
        "item_id": ["I1", "I2", "I3", "I4", "I5"],
        "colour": ["white", "black", "white", None, "red"],
        "brand": ["Apex", "Apex", "Zenith", "Orbit", "Zenith"],
        "price": [10.0, 20.0, 30.0, 40.0, 50.0],
        "size": [1, 2, 3, 4, 5],
    }
)
# The model's item order differs from the table's, and holds an item the table lacks.
VOCAB = Vocabulary(("I5", "I4", "I3", "I2", "I1", "I9"))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (None, ["I5", "I4", "I3", "I2", "I1", "I9"]),
        ({}, ["I5", "I4", "I3", "I2", "I1", "I9"]),
        ({"include": {"colour": "white"}}, ["I3", "I1"]),
        ({"include": {"brand": ["Apex", "Orbit"]}}, ["I4", "I2", "I1"]),
        ({"include": {"colour": "white", "brand": "Apex"}}, ["I1"]),
        ({"exclude": {"colour": "white"}}, ["I5", "I4", "I2", "I9"]),
        ({"include": {"brand": "Zenith"}, "exclude": {"colour": ["red"]}}, ["I3"]),
        ({"include": {"colour": "green"}}, []),
        ({"exclude": {"colour": "green"}}, ["I5", "I4", "I3", "I2", "I1", "I9"]),
        ({"include": {"size": [2, 5]}}, ["I5", "I2"]),
        ({"include": {"item_id": ["I2", "I9"]}}, ["I2", "I9"]),
    ],
)
def test_item_mask(filters, expected):
    mask = item_mask(ITEMS, VOCAB, filters)
    assert mask.dtype == bool and mask.shape == (len(VOCAB),)
    assert [i for i, keep in zip(VOCAB.ids, mask, strict=True) if keep] == expected


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (
            {"include": {"flavour": "mint"}},
            "include filter: unknown item attribute 'flavour'; items have "
            "brand, colour, item_id, price, size",
        ),
        ({"exclude": {"Colour": "white"}}, "exclude filter: unknown item attribute 'Colour'"),
        ({"include": {"colour": []}}, "include filter on 'colour': give at least one value"),
        (
            {"include": {"colour": 5}},
            "include filter on 'colour': 5 does not fit the attribute's type (String)",
        ),
        ({"include": {"price": "cheap"}}, "'cheap' does not fit the attribute's type (Float64)"),
        ({"includ": {"colour": "white"}}, "filters: 1 validation error"),
    ],
)
def test_bad_filters_name_the_problem(filters, message):
    with pytest.raises(FilterError) as err:
        item_mask(ITEMS, VOCAB, filters)
    assert message in str(err.value)


def test_item_attributes_are_encoded_once_and_reused():
    attrs = ItemAttributes.from_frame(ITEMS, VOCAB)
    assert len(attrs) == 6
    assert attrs.item("I3")["brand"] == "Zenith"
    assert attrs.item("I9") == {"item_id": "I9"}
    f = ItemFilters(include={"brand": "Apex"})
    assert attrs.mask(f).tolist() == [False, False, False, True, True, False]
    assert ItemFilters().is_empty and not f.is_empty
    # Many masks over a large vocabulary stay cheap: the encoding is done once.
    big = pl.DataFrame({"item_id": [f"I{i}" for i in range(50_000)], "colour": ["white", "red"] * 25_000})
    enc = ItemAttributes.from_frame(big, [f"I{i}" for i in range(50_000)])
    assert enc.mask({"include": {"colour": "white"}}).sum() == 25_000


def test_recommendation_reasons_for_a_list():
    items = pl.DataFrame(
        {
            "item_id": ["S1", "S2", "B1", "B2"],
            "name": ["Trail Runner X", "Running Socks", "Road Bike 2", "Bike Helmet"],
            "sport": ["running", "running", "cycling", "cycling"],
            "brand": ["Apex", "Apex", "Zenith", "Zenith"],
        }
    )
    attrs = ItemAttributes.from_frame(items, ["S1", "S2", "B1", "B2"])
    factors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    profile = {"preferred_sport": "running", "preferred_sport_share": 0.7}
    history = {0: "purchase", 2: "view"}  # bought the trail runner, viewed the bike
    assert recommendation_reasons(profile, [1, 3], history, attrs, item_factors=factors) == [
        ["often bought after Trail Runner X", "matches your preferred sport: running"],
        ["similar to Road Bike 2, which you viewed"],
    ]
    assert recommendation_reasons(profile, [1, 3], history, attrs) == [
        ["matches your preferred sport: running"],
        [],
    ]
