"""Why an item is recommended, in words a customer reads; and the attribute filters of ``/recommend``.

Reasons come from the customer's profile (``preferred_<attr>`` and its share), the item's attributes and,
optionally, the history item most like the recommended one ("often bought after Trail Runner X").

Filters are include/exclude tables by item attribute, ``{"colour": "white"}`` or ``{"brand": ["A", "B"]}``:
an item passes when, for every include attribute, its value is one of the given ones, and for no exclude
attribute its value is one of those. :class:`ItemAttributes` encodes the attributes once, aligned with the
model's item vocabulary, so a mask over tens of thousands of items costs microseconds per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from nextbest.features.errors import NextbestError
from nextbest.features.schema import ITEM_ID, Vocabulary

FilterValue = str | int | float | bool | list[str | int | float | bool]
DEFAULT_REASON_ATTRIBUTES: tuple[str, ...] = ("sport", "brand", "colour", "category")
NAME_COLUMNS: tuple[str, ...] = ("name", "title")

_TEMPLATES: dict[str, str] = {
    "sport": "matches your preferred sport: {value}",
    "brand": "your favourite brand: {value}",
    "colour": "in your favourite colour: {value}",
    "category": "from a category you like: {value}",
}
_HISTORY_TEMPLATES: dict[str, str] = {
    "purchase": "often bought after {name}",
    "add_to_cart": "goes well with {name} in your basket",
    "view": "similar to {name}, which you viewed",
    "click": "similar to {name}, which you viewed",
}


class FilterError(NextbestError, ValueError):
    """A filter names an unknown attribute or gives values of the wrong type; the message names it."""


class ItemFilters(BaseModel):
    """Include/exclude by item attribute (a request body field of ``/recommend`` and ``/similar_items``)."""

    model_config = ConfigDict(extra="forbid")

    include: dict[str, FilterValue] = Field(default_factory=dict)
    exclude: dict[str, FilterValue] = Field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.include and not self.exclude


def _values(value: FilterValue) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


@dataclass(frozen=True)
class ItemAttributes:
    """Item attributes aligned with an item vocabulary, dictionary-encoded for fast masks.

    Attributes:
        ids: item ids in vocabulary order.
        codes: per attribute, an int32 array (``-1`` where the item has no value or is not in the items table).
        levels: per attribute, value → code.
        dtypes: per attribute, the Polars dtype of the column.
    """

    ids: tuple[str, ...]
    codes: dict[str, np.ndarray]
    levels: dict[str, dict[Any, int]]
    dtypes: dict[str, pl.DataType]
    rows: dict[str, dict[str, Any]]

    @classmethod
    def from_frame(cls, items: pl.DataFrame, vocabulary: Vocabulary | Sequence[str]) -> ItemAttributes:
        """Encode ``items`` (the items table) for the items of ``vocabulary`` (the model's item order)."""
        ids = tuple(vocabulary.ids if isinstance(vocabulary, Vocabulary) else vocabulary)
        order = pl.DataFrame({ITEM_ID: list(ids)}, schema={ITEM_ID: pl.String})
        aligned = order.join(
            items.unique(ITEM_ID, keep="first"), on=ITEM_ID, how="left", maintain_order="left"
        )
        codes: dict[str, np.ndarray] = {}
        levels: dict[str, dict[Any, int]] = {}
        dtypes: dict[str, pl.DataType] = {}
        for name in items.columns:
            col = aligned[name]
            if col.dtype.is_nested():  # lists and structs are not filterable attributes
                continue
            uniques = col.drop_nulls().unique(maintain_order=True).to_list()
            lookup = {v: i for i, v in enumerate(uniques)}
            enum = pl.Series(name, uniques, dtype=col.dtype)
            physical = col.replace_strict(enum, pl.Series(range(len(uniques)), dtype=pl.Int32), default=-1)
            codes[name] = physical.fill_null(-1).to_numpy().astype(np.int32, copy=False)
            levels[name] = lookup
            dtypes[name] = col.dtype
        rows = {r[ITEM_ID]: r for r in items.iter_rows(named=True)}
        return cls(ids=ids, codes=codes, levels=levels, dtypes=dtypes, rows=rows)

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, item_id: str) -> dict[str, Any]:
        """The items-table row of ``item_id`` (``{"item_id": item_id}`` if the table lacks it)."""
        return self.rows.get(item_id, {ITEM_ID: item_id})

    def _codes_of(self, attribute: str, value: FilterValue, which: str) -> np.ndarray:
        if attribute not in self.codes:
            known = ", ".join(sorted(self.codes))
            raise FilterError(f"{which} filter: unknown item attribute {attribute!r}; items have {known}")
        values = _values(value)
        if not values:
            raise FilterError(f"{which} filter on {attribute!r}: give at least one value")
        dtype = self.dtypes[attribute]
        for v in values:
            ok = (
                isinstance(v, str)
                if dtype == pl.String
                else (isinstance(v, bool) if dtype == pl.Boolean else not isinstance(v, str | bool))
            )
            if not ok:
                raise FilterError(
                    f"{which} filter on {attribute!r}: {v!r} does not fit the attribute's type ({dtype})"
                )
        lookup = self.levels[attribute]
        return np.array([lookup[v] for v in values if v in lookup], dtype=np.int32)

    def mask(self, filters: ItemFilters | Mapping[str, Any] | None) -> np.ndarray:
        """Boolean mask over the vocabulary: True where the item passes ``filters``.

        Raises:
            FilterError: an unknown attribute, an empty value list, or a value of the wrong type.
        """
        if filters is None:
            return np.ones(len(self.ids), dtype=bool)
        if not isinstance(filters, ItemFilters):
            try:
                filters = ItemFilters.model_validate(filters)
            except ValueError as e:
                raise FilterError(f"filters: {e}") from None
        keep = np.ones(len(self.ids), dtype=bool)
        for attribute, value in filters.include.items():
            keep &= self._matches(attribute, self._codes_of(attribute, value, "include"))
        for attribute, value in filters.exclude.items():
            keep &= ~self._matches(attribute, self._codes_of(attribute, value, "exclude"))
        return keep

    def _matches(self, attribute: str, codes: np.ndarray) -> np.ndarray:
        # A lookup table indexed by code is one gather over the items (np.isin sorts); the extra last
        # slot is where code -1 (no value) lands, and it never matches.
        table = np.zeros(len(self.levels[attribute]) + 1, dtype=bool)
        table[codes] = True
        return table[self.codes[attribute]]


def item_mask(
    items: pl.DataFrame,
    vocabulary: Vocabulary | Sequence[str],
    filters: ItemFilters | Mapping[str, Any] | None,
) -> np.ndarray:
    """Boolean mask over ``vocabulary``: True for items passing ``filters`` (see the module docstring).

    Items in the vocabulary but not in ``items`` match no attribute filter (only ``item_id`` ones). For many
    requests build :class:`ItemAttributes` once and call its ``mask``.

    Raises:
        FilterError: an unknown attribute (named), an empty value list, or a value of the wrong type.
    """
    return ItemAttributes.from_frame(items, vocabulary).mask(filters)


def _display_name(item: Mapping[str, Any]) -> str:
    for c in NAME_COLUMNS:
        if item.get(c):
            return str(item[c])
    return str(item.get(ITEM_ID, "an item you have"))


def item_reasons(
    profile: Mapping[str, Any] | None,
    item: Mapping[str, Any],
    *,
    because_of: Mapping[str, Any] | None = None,
    because_of_event: str = "purchase",
    attributes: Sequence[str] = DEFAULT_REASON_ATTRIBUTES,
    min_share: float = 0.0,
    max_reasons: int = 3,
) -> list[str]:
    """Human-readable reasons for recommending ``item`` to a customer.

    Args:
        profile: the customer's profile (``preferred_<attr>`` and ``preferred_<attr>_share``); None for a
            customer without one (only history evidence then).
        item: the item's attributes (an items-table row).
        because_of: the history item most like this one (an items-table row), e.g. from
            :func:`most_similar_item`; gives "often bought after <name>".
        because_of_event: what the customer did with ``because_of`` (purchase, add_to_cart, view, click).
        attributes: which preferences to check, in this order of precedence for equal shares.
        min_share: mention a preference only when its share of the customer's interactions is at least this.
        max_reasons: at most this many reasons.

    Returns:
        reasons, history evidence first, then matching preferences by share (strongest first); may be empty.
    """
    reasons: list[str] = []
    if because_of is not None and because_of.get(ITEM_ID) != item.get(ITEM_ID):
        template = _HISTORY_TEMPLATES.get(because_of_event, _HISTORY_TEMPLATES["purchase"])
        reasons.append(template.format(name=_display_name(because_of)))
    matches: list[tuple[float, int, str]] = []
    for position, attr in enumerate(attributes):
        value = item.get(attr)
        preferred = (profile or {}).get(f"preferred_{attr}")
        if value is None or preferred is None or str(value) != str(preferred):
            continue
        share = (profile or {}).get(f"preferred_{attr}_share")
        share = float(share) if isinstance(share, int | float) else 0.0
        if share < min_share:
            continue
        template = _TEMPLATES.get(attr, "matches your preferred " + attr.replace("_", " ") + ": {value}")
        matches.append((-share, position, template.format(value=value)))
    reasons.extend(text for _, _, text in sorted(matches))
    return reasons[:max_reasons]


SIMILARITY_TIE = 1e-6
"""Cosine similarities this close count as a tie (which then goes to the smallest row): float32 unit vectors of
parallel items differ in their last bits."""


def unit_rows(factors: np.ndarray) -> np.ndarray:
    """``factors`` with every row scaled to unit length (float32; a zero row stays zero), so that one matrix
    product gives cosine similarities."""
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    return (factors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def most_similar_items(
    recommended: Sequence[int] | np.ndarray, history: Iterable[int], unit_factors: np.ndarray
) -> list[int | None]:
    """For each recommended row, the history row whose factor vector is most similar (cosine) to it: one matrix
    product for the whole list.

    Args:
        recommended: rows of the recommended items in ``unit_factors``.
        history: rows of the items the customer interacted with.
        unit_factors: items × factors scaled to unit length (:func:`unit_rows`).

    Returns:
        per recommended item, the most similar history row other than itself (the smallest on ties, see
        :data:`SIMILARITY_TIE`), or None when no history row qualifies (only the item itself, or zero vectors).
    """
    ids = np.asarray(recommended, dtype=np.int64).reshape(-1)
    rows = np.unique(np.fromiter(history, dtype=np.int64))  # sorted: the first of a tie is the smallest row
    if ids.size == 0 or rows.size == 0:
        return [None] * ids.size
    target = unit_factors[ids].astype(np.float64)
    cands = unit_factors[rows].astype(np.float64)
    valid = (
        (ids[:, None] != rows[None, :])
        & np.any(target != 0, axis=1)[:, None]
        & np.any(cands != 0, axis=1)[None, :]
    )
    sims = np.where(valid, target @ cands.T, -np.inf)
    best = sims.max(axis=1)
    first = np.argmax(sims >= (best - SIMILARITY_TIE)[:, None], axis=1)
    return [
        int(rows[f]) if np.isfinite(b) else None for f, b in zip(first.tolist(), best.tolist(), strict=True)
    ]


def most_similar_item(item_index: int, history: Sequence[int], item_factors: np.ndarray) -> int | None:
    """The history item whose factor vector is most similar (cosine) to ``item_index``'s (one item of
    :func:`most_similar_items`).

    Args:
        item_index: the recommended item's row in ``item_factors``.
        history: rows of the items the customer interacted with.
        item_factors: items × factors (e.g. ALS item factors).

    Returns:
        the most similar history row (the smallest on ties), or None if ``history`` holds nothing but
        ``item_index`` itself or only zero vectors.
    """
    return most_similar_items([item_index], history, unit_rows(item_factors))[0]


def recommendation_reasons(
    profile: Mapping[str, Any] | None,
    recommended: Sequence[int],
    history: Mapping[int, str],
    items: ItemAttributes,
    *,
    item_factors: np.ndarray | None = None,
    unit_factors: np.ndarray | None = None,
    max_reasons: int = 3,
) -> list[list[str]]:
    """Reasons for each item of a recommendation list (the batch form of :func:`item_reasons`); the service's
    ``/recommend`` answers with these (:func:`serving.ranking.reasons`).

    Args:
        profile: the customer's profile, or None.
        recommended: vocabulary indices of the recommended items.
        history: vocabulary index → the customer's strongest event with that item (purchase, add_to_cart,
            view, click); the evidence for "often bought after …" is taken from it.
        items: item attributes aligned with the same vocabulary.
        item_factors: items × factors of the model (e.g. ALS item factors); without it (and without
            ``unit_factors``) no history evidence.
        unit_factors: the same scaled to unit length (:func:`unit_rows`), when the caller keeps them.
        max_reasons: at most this many reasons per item.

    Returns:
        one list of reasons per recommended item, in the same order.
    """
    if unit_factors is None and item_factors is not None:
        unit_factors = unit_rows(item_factors)
    because: list[int | None] = [None] * len(recommended)
    if unit_factors is not None and history:
        because = most_similar_items(recommended, history.keys(), unit_factors)
    return [
        item_reasons(
            profile,
            items.item(items.ids[int(index)]),
            because_of=None if best is None else items.item(items.ids[best]),
            because_of_event="purchase" if best is None else history[best],
            max_reasons=max_reasons,
        )
        for index, best in zip(recommended, because, strict=True)
    ]
