"""Request and response bodies of the service: flat JSON objects, validated, with bounded sizes.

Every request model forbids unknown fields, takes numbers and booleans strictly (``true`` is not a number,
``"yes"`` not a boolean, ``"5"`` not an integer, though ``5.0`` is five) and bounds what a client can send (ids ≤ 128 characters, ``n``
≤ 100, at most 1000 events per call, small context and filter tables), so a bad body is answered 400 naming the
field before any work is done. The response models are the OpenAPI schema of the service; :data:`ROUTES` says
which request model and which credential each endpoint takes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StringConstraints,
    field_validator,
    model_validator,
)

from nextbest.serving.contact import ContactEntry
from nextbest.serving.decision_log import ResponseKind
from nextbest.serving.decisions import ScoredAction
from nextbest.serving.explain import ItemFilters
from nextbest.serving.levers import LeverChange
from nextbest.serving.times import UtcDateTime

MAX_ID_LENGTH = 128
MAX_N = 100
MAX_EVENTS = 1000
MAX_CONTEXT_KEYS = 32
MAX_FILTER_ATTRIBUTES = 16
MAX_FILTER_VALUES = 200

CustomerId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)]
ItemId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)]
ActionId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)]
Channel = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]


def _whole_number(value: Any) -> Any:
    # JSON has one kind of number: 5 and 5.0 are both the whole number five; true and "5" are not numbers.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a whole number (not a string or a boolean)")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a whole number")
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
"""An integer field: a JSON number with no fractional part (``5`` or ``5.0``); never ``true`` or ``"5"``."""
EventId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)]
DecisionId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ContextValue = ShortText | int | float | bool | None
Context = Annotated[dict[ContextKey, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_filters(filters: ItemFilters | None) -> ItemFilters | None:
    if filters is None:
        return None
    for which, table in (("include", filters.include), ("exclude", filters.exclude)):
        if len(table) > MAX_FILTER_ATTRIBUTES:
            raise ValueError(f"{which}: at most {MAX_FILTER_ATTRIBUTES} attributes, got {len(table)}")
        for attribute, value in table.items():
            if len(attribute) > 64:
                raise ValueError(f"{which}: attribute names are at most 64 characters")
            values = value if isinstance(value, list) else [value]
            if len(values) > MAX_FILTER_VALUES:
                raise ValueError(
                    f"{which}.{attribute}: at most {MAX_FILTER_VALUES} values, got {len(values)}"
                )
            if any(isinstance(v, str) and len(v) > MAX_ID_LENGTH for v in values):
                raise ValueError(f"{which}.{attribute}: values are at most {MAX_ID_LENGTH} characters")
    return filters


# --- /recommend and /similar_items ---------------------------------------------------------------------------


class RecommendRequest(_Request):
    """``POST /recommend``: the follow-up purchases to show a customer now."""

    customer_id: CustomerId
    n: WholeNumber = Field(10, ge=1, le=MAX_N)
    filters: ItemFilters | None = None
    """Include/exclude by item attribute, e.g. ``{"include": {"colour": "white"}, "exclude": {"brand": "Apex"}}``."""
    exclude_purchased: StrictBool = True
    context: Context = Field(default_factory=dict)
    """Free request context (``channel``, ``page`` …); accepted for clients' convenience, not used by the
    ranking yet."""

    @field_validator("filters")
    @classmethod
    def _bounded(cls, v: ItemFilters | None) -> ItemFilters | None:
        return _check_filters(v)


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    reasons: list[str]
    """Human-readable reasons, e.g. "matches your preferred sport: cycling", "often bought after X"."""


class RecommendResponse(BaseModel):
    customer_id: str
    items: list[RecommendedItem]
    personalised: bool
    """False when the list is not about this customer: no personalisation consent, or nothing known yet."""
    basis: str
    """How the list was made: ``model``, ``session`` (similar to this session's items), ``segment_popularity``
    or ``popularity``."""
    note: str = ""
    """Why the list is not personalised, when it is not."""
    model_version: str
    arm: str


class SimilarItemsRequest(_Request):
    """``POST /similar_items``: items like one item (e.g. for a product page)."""

    item_id: ItemId
    n: WholeNumber = Field(10, ge=1, le=MAX_N)
    filters: ItemFilters | None = None
    customer_id: CustomerId | None = None
    """Optional: picks the champion/challenger arm of this customer."""

    @field_validator("filters")
    @classmethod
    def _bounded(cls, v: ItemFilters | None) -> ItemFilters | None:
        return _check_filters(v)


class SimilarItemsResponse(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    basis: str
    """``model`` (learned item similarity) or ``attributes`` (an item the model has not seen: same attributes)."""
    model_version: str
    arm: str


# --- /propensity and /next_best_action -----------------------------------------------------------------------


class PropensityRequest(_Request):
    """``POST /propensity``: calibrated probabilities that the customer responds to each action."""

    customer_id: CustomerId
    action_ids: Annotated[list[ActionId], Field(min_length=1, max_length=MAX_N)] | None = None
    """Actions to score (default: every action the model knows)."""
    channel: Channel | None = None
    """One of the channels the policy file names."""
    context: Context = Field(default_factory=dict)


class ActionPropensity(BaseModel):
    action_id: str
    propensity: float


class PropensityResponse(BaseModel):
    customer_id: str
    propensities: list[ActionPropensity]
    personalised: bool
    """False without personalisation consent: the probabilities are those of the customer's segment."""
    model_version: str
    arm: str


class NextBestActionRequest(_Request):
    """``POST /next_best_action``: the best actions now, by P × V × L within rules, consent and contact limits."""

    customer_id: CustomerId
    channel: Channel | None = None
    """One of the channels the policy file names (``web``, ``app``, ``email`` … for the shipped policy)."""
    n: WholeNumber = Field(3, ge=1, le=MAX_N)
    context: Context = Field(default_factory=dict)
    record_contact: StrictBool = True
    """Record the chosen action as a contact and the decision in the decision log (turn off to preview a
    decision without counting or logging it; a preview never explores)."""
    explain: StrictBool = False
    """Also return the actions that were filtered out, each with its reason."""


class NextBestActionResponse(BaseModel):
    decision_id: str
    customer_id: str
    channel: str | None
    actions: list[ScoredAction]
    """Offered actions, best first; the no-action alternative is a legitimate answer."""
    no_action: bool
    """True when the best answer is to do nothing."""
    personalised: bool
    policy_version: str
    model_versions: dict[str, str]
    arm: str
    contact_recorded: bool
    filtered: list[ScoredAction] = Field(default_factory=list)
    """With ``explain``: every action not offered, with the reason."""
    explored: bool = False
    """The first action was chosen by the policy's exploration (ε-greedy or Thompson), not as the best by score."""
    probability: float = 1.0
    """The probability with which the first action was chosen (1.0 without exploration), as logged."""


# --- /events ---------------------------------------------------------------------------------------------------


class EventIn(_Request):
    """One interaction, as in the events table of the data contract."""

    customer_id: CustomerId
    item_id: ItemId
    event_type: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]
    event_id: EventId | None = None
    """The client's id of the event: a retry with an id already stored is acknowledged and not stored again
    (give one wherever a request may be retried after a timeout)."""
    timestamp: datetime | None = None
    """Naive UTC or with an offset; default: the time the service receives it. Refused when more than
    :data:`~serving.engine.FUTURE_TOLERANCE` ahead of the service's clock or older than the retention window."""
    session_id: Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)] | None = None
    channel: Channel | None = None
    quantity: WholeNumber | None = Field(None, ge=0, le=100_000)
    price: StrictFloat | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)


class OfferResponseIn(_Request):
    """What the customer did with an action they were offered: ``shown``, ``accepted``, ``dismissed`` or
    ``converted`` (give ``kind``; ``accepted: true/false`` alone, the earlier form, means accepted/dismissed).

    With ``decision_id`` (the id ``/next_best_action`` answered) the response is tied to that decision: it must be
    about the decision's customer and an action the decision offered, and a decision takes one response of each
    kind per action (a second is refused with 409). Accepted, converted and dismissed responses also count in
    the contact policy (acceptances reset the rejection streak, dismissals extend it).
    """

    customer_id: CustomerId
    action_id: ActionId
    decision_id: DecisionId | None = None
    """The ``decision_id`` of the ``/next_best_action`` answer that offered the action (unknown ids: 404)."""
    kind: ResponseKind | None = None
    accepted: StrictBool | None = None
    """The earlier form of ``kind``: true = accepted, false = dismissed (when both are given they must agree)."""
    value: StrictFloat | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)
    """What the response was worth, e.g. the basket of a conversion."""
    event_id: EventId | None = None
    """As for events: a retry with an id already stored is acknowledged and not stored again."""
    channel: Channel | None = None
    timestamp: datetime | None = None
    """Bounded like an event's timestamp."""

    @model_validator(mode="after")
    def _kind_or_accepted(self) -> OfferResponseIn:
        if self.kind is None and self.accepted is None:
            raise ValueError(
                "give kind (shown, accepted, dismissed or converted) or accepted (true or false)"
            )
        if self.kind is not None and self.accepted is not None:
            agrees = self.kind in ("accepted", "converted") if self.accepted else self.kind == "dismissed"
            if not agrees:
                raise ValueError(
                    f"accepted: {str(self.accepted).lower()} contradicts kind {self.kind!r} (give one of them)"
                )
        return self

    @property
    def response_kind(self) -> ResponseKind:
        """``kind``, or what ``accepted`` means."""
        if self.kind is not None:
            return self.kind
        return "accepted" if self.accepted else "dismissed"


class EventsRequest(_Request):
    """``POST /events``: interactions and offer responses, stored durably before the call returns."""

    events: Annotated[list[EventIn], Field(max_length=MAX_EVENTS)] = Field(default_factory=list)
    responses: Annotated[list[OfferResponseIn], Field(max_length=MAX_EVENTS)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> EventsRequest:
        if not self.events and not self.responses:
            raise ValueError("send at least one entry in events or responses")
        return self


class EventsResponse(BaseModel):
    accepted: int
    """Events stored (durably) and applied."""
    responses: int
    """Offer responses stored (and applied to the contact policy state)."""
    duplicates: int = 0
    """Events and responses whose ``event_id`` was stored before: acknowledged, not stored again."""
    customers: list[str]
    """Customers whose live state changed."""


# --- /profile and /forget ----------------------------------------------------------------------------------


class CustomerRequest(_Request):
    """``POST /profile`` and ``POST /forget``: one customer."""

    customer_id: CustomerId


class ProfileResponse(BaseModel):
    """Everything the service stores and derives about a customer (the GDPR right of access)."""

    customer_id: str
    known: bool
    """The dataset holds data about this customer (events, profile, demographics or consent)."""
    consent: dict[str, bool | None]
    """The recorded consent per purpose (null: no record)."""
    consent_effective: dict[str, bool]
    """What the service applies (a missing record takes the dataset's default)."""
    demographics: dict[str, Any] | None
    profile: dict[str, Any] | None
    """The derived profile (segments, preferences, RFM, churn risk), live events included."""
    live_profile: bool
    """The profile was recomputed from events received by the service."""
    interactions: list[dict[str, Any]]
    """Item → interaction weight the recommender sees."""
    purchases: list[str]
    events: list[dict[str, Any]]
    """Events held in the dataset."""
    live_events: list[dict[str, Any]]
    """Events received by the service."""
    contacts: list[ContactEntry]
    decisions: list[dict[str, Any]]
    responses: list[dict[str, Any]] = Field(default_factory=list)
    """The customer's responses to decisions (shown, accepted, dismissed, converted), oldest first."""
    arm: str


ErasureState = Literal["queued", "running", "done", "failed"]


class ForgetResponse(BaseModel):
    customer_id: str
    ids_erased: int
    """The customer's id, every id linked to it and their unlinked forms (``web:…``)."""
    live_state: bool
    """The service held live state about the customer (now erased)."""
    events_removed: int
    contacts_removed: int
    decisions_removed: int
    responses_removed: int = 0
    erasure_log: str
    """Where the erasure is recorded (by keyed digest), so the next feature build and training leave the ids
    out."""
    erasure_id: str
    """Follow the dataset's erasure with ``POST /erasure``."""
    dataset: ErasureState
    """The dataset's erasure (raw tables, quarantine, truth, features rebuilt): ``queued`` on return; a
    background worker takes it within a second and finishes within one feature build."""


class ErasureRequest(_Request):
    """``POST /erasure`` (admin): the state of a dataset erasure that ``/forget`` queued."""

    erasure_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class ErasureStatus(BaseModel):
    erasure_id: str
    state: ErasureState
    requested_at: UtcDateTime
    finished_at: UtcDateTime | None = None
    rows_removed: int | None = None
    """Rows removed from the dataset's files (done; null where erasures queued together were done as one)."""
    error: str | None = None
    """Why it failed (it is retried at the service's next start)."""


# --- /levers ---------------------------------------------------------------------------------------------------


class LeversRequest(_Request):
    """``POST /levers`` (admin): read the levers, or change one (give ``action_id`` and ``lever``)."""

    action_id: ActionId | None = None
    lever: StrictFloat | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    actor: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_ID_LENGTH)
    ] = "admin"

    @model_validator(mode="after")
    def _both_or_neither(self) -> LeversRequest:
        if (self.action_id is None) != (self.lever is None):
            raise ValueError("give both action_id and lever to change a lever, or neither to read them")
        return self


class LeversResponse(BaseModel):
    policy_version: str
    levers: dict[str, float]
    changed: LeverChange | None = None
    history: list[LeverChange]


class ErrorDetail(BaseModel):
    """One invalid field of a request body."""

    loc: list[str | int]
    """Where: the field's path, e.g. ``["events", 0, "timestamp"]``."""
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every error the service answers (4xx, 5xx)."""

    error: str
    """What is wrong, naming the field and the value where there is one."""
    detail: list[ErrorDetail] | None = None
    """With 400 for an invalid body: every invalid field."""


# --- /reload ---------------------------------------------------------------------------------------------------


class ReloadRequest(_Request):
    """``POST /reload`` (admin): look for new champions (and rebuilt features) now and swap them in."""

    force: StrictBool = False
    """Reload the models even when the registry names the versions already serving."""


class ReloadResponse(BaseModel):
    swapped: bool
    """Whether another set of models (or features) now serves."""
    models: dict[str, dict[str, str]]
    """Kind (``recommender``, ``propensity``) → arm → ``name/version`` serving now."""
    previous: dict[str, dict[str, str]]
    """The same before this call."""
    features_reloaded: bool
    """Whether the dataset's features were rebuilt since they were loaded, and were loaded again."""


# --- what each endpoint takes ------------------------------------------------------------------------------

Credential = Literal["app", "admin"]
"""``app``: ``NEXTBEST_APP_TOKEN`` (or the admin token); ``admin``: ``NEXTBEST_ADMIN_TOKEN`` only."""


class Endpoint(NamedTuple):
    request: type[BaseModel]
    response: type[BaseModel]
    credential: Credential


ROUTES: dict[str, Endpoint] = {
    "/recommend": Endpoint(RecommendRequest, RecommendResponse, "app"),
    "/similar_items": Endpoint(SimilarItemsRequest, SimilarItemsResponse, "app"),
    "/propensity": Endpoint(PropensityRequest, PropensityResponse, "app"),
    "/next_best_action": Endpoint(NextBestActionRequest, NextBestActionResponse, "app"),
    "/events": Endpoint(EventsRequest, EventsResponse, "app"),
    "/profile": Endpoint(CustomerRequest, ProfileResponse, "admin"),
    "/forget": Endpoint(CustomerRequest, ForgetResponse, "admin"),
    "/erasure": Endpoint(ErasureRequest, ErasureStatus, "admin"),
    "/levers": Endpoint(LeversRequest, LeversResponse, "admin"),
    "/reload": Endpoint(ReloadRequest, ReloadResponse, "admin"),
}
"""Every endpoint of the service (all ``POST`` with a JSON body): its request and answer models and the
credential it needs."""
