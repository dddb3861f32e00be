"""The action policy: a versioned TOML file saying, per action, its value, lever, rules, channels and contact limits.

A policy file looks like this (``serving/policies/default.toml`` is the one for the generated world)::

    version = "2026-11-22.1"

    [defaults]                        # what an action does not set itself
    lever = 1.0
    marketing = true                  # needs marketing consent
    expected_basket = 40.0            # basket of customers without orders, for margin × basket values
    contact = { max_contacts = 2, period_days = 7, max_rejections = 3, suppress_days = 30 }

    [channel_caps.email]              # across all actions: at most 3 e-mails a week
    max_contacts = 3
    period_days = 7

    [exploration]                     # off unless a method is named (the default is method = "none")
    method = "epsilon_greedy"         # "none", "epsilon_greedy" or "thompson"
    epsilon = 0.05                    # explore in 5 % of decisions: a uniform draw among the allowed actions
    budget = 0.1                      # at most 10 % of a UTC day's logged decisions explore …
    budget_per_day = 500              # … and at most 500 a day (either, both or neither)

    [kinds.discount]                  # a template for every catalogue action of kind "discount"
    value = { margin = 0.40, discount_pct_attribute = "discount_pct" }
    channels = ["web", "app", "email"]
    [kinds.discount.eligibility]
    adult = "age >= 18"
    [kinds.discount.applicability]
    not_owned = "action.brand not in bought_brand"
    [kinds.discount.suitability]
    not_churning = { field = "churn_risk_flag", op = "==", value = false }

    [actions.retention_call]          # one action, by its action_catalog id
    value = { tiers = { low = 10, mid = 30, high = 80 }, default = 0 }
    delivery_channel = "call"
    contact = { max_contacts = 1, period_days = 90 }
    [actions.retention_call.suitability]
    at_risk = "churn_risk_flag == true"

    [actions.no_action]               # the do-nothing alternative; competes with its own P × V × L
    kind = "none"
    value = { margin = 0.40 }
    default_propensity = 0.02

Values: a number (fixed); ``{ margin = m, cost = c, default_basket = b, discount_pct_attribute = "a" }``
((m − the action's attribute a / 100) × expected basket − c, the expected basket being the customer's
monetary / frequency); or ``{ tiers = { low = 2, high = 12 }, field = "value_tier", default = 1 }``.

Rules are named conditions in three groups, all of which must hold: *eligibility* (may this customer get it at
all: age, legal), *applicability* (does it apply now: context, not already owned) and *suitability* (is it right
for this customer: segment, lifecycle, churn risk). A condition is a string ``FIELD OP OPERAND`` such as
``"age >= 18"``, or a table ``{ field = "age", op = ">=", value = 18 }``: its language (operators, operands, how
``action.X``, ``context.X`` and ``profile.X`` fields are looked up, what a missing field does) is
:mod:`serving.policy_rules`.

``channels`` restricts the request channels an action may be offered on; ``delivery_channel`` is the channel the
contact itself goes through (contact limits count there). Templates in ``[kinds.*]`` become actions when
:func:`attach_catalog` meets the catalogue. Levers can be changed at run time through
:class:`serving.levers.PolicyState`, which persists them to a JSON file.

Exploration (:class:`Exploration`, the ``[exploration]`` table; off by default): with ``method =
"epsilon_greedy"`` a decision explores with probability ``epsilon``: it then chooses uniformly among the k
*arms*, the actions that passed every rule, consent and contact check (the no-action alternative included when
it passed), instead of the best one; rules are never explored away. With ``method = "thompson"`` each arm's
propensity is drawn from Beta(P·s, (1 − P)·s) (s = ``prior_strength``, how many responses the model's P is
worth: the smaller, the more exploration) and the arm with the best drawn P × V × L is chosen; ``samples`` draws
estimate each arm's probability of being chosen (the first draw chooses). The draws come from a random
generator seeded by ``seed`` and the decision's id, so a decision can be replayed. Every logged decision
records the probability with which its chosen action was chosen: for ε-greedy 1 − ε + ε / k for the best arm,
ε / k for any other; for Thompson the share of the draws it wins (1.0 when exploration is off, when one arm
passed, or when the budget is spent). A decision *explored* when ε-greedy's draw fired, or when Thompson chose
another arm than the best. ``budget`` caps the share of a UTC
day's logged decisions that explore (a decision may explore only while fewer than ``budget`` × the day's
decisions so far, this one included, have), ``budget_per_day`` their number; once spent, decisions are the best
arm with probability 1.0 until the day ends (the count is the state store's: replicas deciding at the same moment
may each take the last unit). Previews (``record_contact = false``) never explore.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nextbest.features.errors import NextbestError
from nextbest.features.moved_names import moved_names
from nextbest.features.schema import ACTION_ID, CHANNEL, KIND, VALUE
from nextbest.serving.policy_rules import Condition, _format_literal, _is_number

DEFAULT_POLICY_PATH = Path(__file__).parent / "policies" / "default.toml"
NO_ACTION_KIND = "none"
RULE_GROUPS: tuple[str, ...] = ("eligibility", "applicability", "suitability")


class PolicyError(NextbestError, ValueError):
    """A policy file (or a change to it) is invalid; the message names the file, the action and the field."""


# Moved out by the split, still importable from here: each is imported from its new module on first use (the
# levers import this module, so importing them back at the top would be a cycle).
__getattr__ = moved_names(
    __name__,
    {
        "nextbest.serving.policy_rules": "FIELD_SCOPES NULL_OPERATORS OPERATORS Condition RuleOutcome RuleScope "
        "parse_condition",
        "nextbest.serving.levers": "LeverChange PolicyState",
    },
)


# --- values, contact limits, actions --------------------------------------------------------------------------


class FixedValue(BaseModel):
    """A fixed value per accepted action."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["fixed"] = "fixed"
    amount: float

    def compute(
        self, profile: Mapping[str, Any], defaults: PolicyDefaults, attributes: Mapping[str, Any]
    ) -> tuple[float, str]:
        return self.amount, f"fixed {self.amount:g}"


class BasketValue(BaseModel):
    """``margin × expected basket − cost``; the expected basket is the customer's monetary / frequency."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["margin_basket"] = "margin_basket"
    margin: float = Field(ge=-1.0, le=1.0)
    cost: float = 0.0
    default_basket: float | None = Field(default=None, ge=0.0)
    """Basket of customers without orders; None uses ``defaults.expected_basket``."""
    discount_pct_attribute: str | None = None
    """An action attribute holding a discount in percent (e.g. ``discount_pct``) that the margin gives up."""

    def compute(
        self, profile: Mapping[str, Any], defaults: PolicyDefaults, attributes: Mapping[str, Any]
    ) -> tuple[float, str]:
        monetary, frequency = profile.get("monetary"), profile.get("frequency")
        if _is_number(monetary) and _is_number(frequency) and frequency > 0:
            basket, source = float(monetary) / float(frequency), "expected basket"
        else:
            basket = self.default_basket if self.default_basket is not None else defaults.expected_basket
            source = "default basket"
        margin, margin_text = self.margin, f"margin {self.margin:g}"
        if self.discount_pct_attribute is not None:
            pct = attributes.get(self.discount_pct_attribute)
            pct = float(pct) if _is_number(pct) else 0.0
            margin -= pct / 100.0
            margin_text = f"(margin {self.margin:g} − discount {pct:g}%)"
        value = margin * basket - self.cost
        text = f"{margin_text} × {source} {basket:.2f}"
        return value, text + (f" − cost {self.cost:g}" if self.cost else "")


class TierValue(BaseModel):
    """A value per customer tier (``value_tier`` by default: low, mid, high, none)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["tier"] = "tier"
    field: str = "value_tier"
    tiers: dict[str, float]
    default: float = 0.0

    def compute(
        self, profile: Mapping[str, Any], defaults: PolicyDefaults, attributes: Mapping[str, Any]
    ) -> tuple[float, str]:
        tier = profile.get(self.field)
        if isinstance(tier, str) and tier in self.tiers:
            return self.tiers[tier], f"{self.field} {tier}: {self.tiers[tier]:g}"
        return self.default, f"{self.field} {_format_literal(tier)}: default {self.default:g}"


ValueSpec = Annotated[FixedValue | BasketValue | TierValue, Field(discriminator="type")]


class ContactLimits(BaseModel):
    """Contact policy of one action: a cap per channel and period, and suppression after rejections."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_contacts: int | None = Field(default=None, ge=0)
    """K: at most this many contacts with this action per channel in ``period_days`` (None: no cap)."""
    period_days: float = Field(default=7.0, gt=0)
    max_rejections: int | None = Field(default=None, ge=1)
    """R: after this many rejections in a row the action is suppressed (None: never)."""
    suppress_days: float = Field(default=30.0, gt=0)
    """D: how long the suppression lasts after the R-th rejection."""


class ChannelCap(BaseModel):
    """A cap over all actions on one channel: at most ``max_contacts`` in ``period_days``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_contacts: int = Field(ge=0)
    period_days: float = Field(default=7.0, gt=0)


class PolicyDefaults(BaseModel):
    """What an action does not set itself."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lever: float = Field(default=1.0, ge=0)
    marketing: bool = False
    channels: list[str] | None = None
    expected_basket: float = Field(default=0.0, ge=0)
    contact: ContactLimits = Field(default_factory=ContactLimits)


_VALUE_FORMS = "a value is a number, { margin = … } (margin × expected basket − cost) or { tiers = { … } }"


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {x}")
    return x


class ActionRule(BaseModel):
    """Everything the policy says about one action."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    action_id: str = ""
    """Filled from the table key; must match ``action_catalog.action_id``."""
    kind: str | None = None
    """As in ``action_catalog`` (:func:`attach_catalog` fills it in when the policy leaves it out); ``none``
    marks the no-action alternative, which is never gated by consent or contact limits."""
    description: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)
    """Read by rules as ``action.<name>`` (e.g. brand, sport); :func:`attach_catalog` fills them in."""
    value: ValueSpec
    lever: float | None = Field(default=None, ge=0)
    marketing: bool | None = None
    """Needs marketing consent; None takes ``defaults.marketing``."""
    channels: list[str] | None = None
    """Request channels on which the action may be offered; None takes ``defaults.channels`` (None: any)."""
    delivery_channel: str | None = None
    """Channel the contact goes through (a newsletter is an e-mail whatever the request channel); None: the
    request channel. Contact limits count on this channel."""
    default_propensity: float | None = Field(default=None, ge=0, le=1)
    """P used when the model supplies none (e.g. the organic response rate of ``no_action``)."""
    eligibility: dict[str, Condition] = Field(default_factory=dict)
    applicability: dict[str, Condition] = Field(default_factory=dict)
    suitability: dict[str, Condition] = Field(default_factory=dict)
    contact: ContactLimits | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _value_shorthand(cls, v: Any) -> Any:
        if _is_number(v):
            return {"type": "fixed", "amount": _finite(float(v), "value")}
        if isinstance(v, Mapping) and "type" not in v:
            if "tiers" in v:
                return {"type": "tier", **v}
            if "margin" in v:
                return {"type": "margin_basket", **v}
            if "amount" in v:
                return {"type": "fixed", **v}
            raise ValueError(_VALUE_FORMS)
        if not isinstance(v, Mapping | BaseModel):
            raise ValueError(f"{_VALUE_FORMS}; got {v!r}")
        return v

    @property
    def is_no_action(self) -> bool:
        return self.kind == NO_ACTION_KIND

    def rules(self) -> list[tuple[str, str, Condition]]:
        """``(group, name, condition)`` of every rule, groups in evaluation order."""
        return [(g, name, c) for g in RULE_GROUPS for name, c in getattr(self, g).items()]


class Exploration(BaseModel):
    """The ``[exploration]`` table: how decisions explore, and how many may (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["none", "epsilon_greedy", "thompson"] = "none"
    epsilon: float = Field(default=0.0, ge=0, le=1)
    """The probability that a decision explores (ε-greedy)."""
    prior_strength: float = Field(default=100.0, gt=0)
    """Thompson: how many responses a propensity is worth; each arm's P is drawn from Beta(P·s, (1 − P)·s)."""
    samples: int = Field(default=1000, ge=100, le=100_000)
    """Thompson: the draws that estimate each arm's probability of being chosen (the first one chooses)."""
    budget: float | None = Field(default=None, gt=0, le=1)
    """At most this share of a UTC day's logged decisions explore (None: no cap but ε)."""
    budget_per_day: int | None = Field(default=None, ge=0)
    """At most this many logged decisions explore per UTC day (None: no cap)."""
    seed: int = Field(default=0, ge=0)
    """Mixed with the decision id into the seed of the decision's random draw."""

    @model_validator(mode="after")
    def _check(self) -> Exploration:
        if self.method != "epsilon_greedy" and self.epsilon > 0:
            raise ValueError(
                f"epsilon = {self.epsilon:g} needs method = 'epsilon_greedy' (the method is {self.method!r})"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether any decision may explore."""
        if self.budget_per_day == 0:
            return False
        return self.method == "thompson" or (self.method == "epsilon_greedy" and self.epsilon > 0)

    @property
    def budgeted(self) -> bool:
        """Whether a budget caps exploration (the day's decisions must be counted)."""
        return self.budget is not None or self.budget_per_day is not None

    def may_explore(self, decided_today: int, explored_today: int) -> bool:
        """Whether the budget leaves room for one more exploring decision.

        Args:
            decided_today: decisions logged so far this UTC day (this one left out).
            explored_today: how many of them explored.
        """
        if not self.active:
            return False
        if self.budget_per_day is not None and explored_today >= self.budget_per_day:
            return False
        return self.budget is None or explored_today < self.budget * (decided_today + 1)


class ActionPolicy(BaseModel):
    """A whole policy file: version, defaults, channel caps, actions and per-kind templates (defaults applied).

    ``kinds`` holds templates: ``[kinds.discount]`` applies to every ``action_catalog`` action of kind
    ``discount`` that ``[actions]`` does not list itself. :func:`attach_catalog` expands them into
    :attr:`actions`; until then only the explicitly listed actions are known.
    """

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1)
    description: str = ""
    defaults: PolicyDefaults = Field(default_factory=PolicyDefaults)
    channel_caps: dict[str, ChannelCap] = Field(default_factory=dict)
    actions: dict[str, ActionRule] = Field(default_factory=dict)
    kinds: dict[str, ActionRule] = Field(default_factory=dict)
    exploration: Exploration = Field(default_factory=Exploration)

    @model_validator(mode="before")
    @classmethod
    def _fill_ids(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for section, key_field in (("actions", "action_id"), ("kinds", "kind")):
            if isinstance(data.get(section), Mapping):
                data[section] = {
                    key: {key_field: key, **rule} if isinstance(rule, Mapping) else rule
                    for key, rule in data[section].items()
                }
        return data

    @model_validator(mode="after")
    def _resolve(self) -> ActionPolicy:
        if not self.actions and not self.kinds:
            raise ValueError("a policy needs at least one action under [actions] or template under [kinds]")
        no_actions = [a for a, r in self.actions.items() if r.is_no_action]
        if len(no_actions) > 1:
            raise ValueError(f"only one action may have kind 'none'; found {', '.join(no_actions)}")
        for key, rule in self.actions.items():
            if rule.action_id != key:
                raise ValueError(f"action {key!r} says action_id {rule.action_id!r}")
            self._complete(f"action {key!r}", rule)
        for key, rule in self.kinds.items():
            if rule.kind != key:
                raise ValueError(f"template [kinds.{key}] says kind {rule.kind!r}")
            if rule.action_id:
                raise ValueError(f"template [kinds.{key}] cannot name an action_id")
            self._complete(f"template {key!r}", rule)
        return self

    def _complete(self, what: str, rule: ActionRule) -> None:
        seen: dict[str, str] = {}
        for group, name, _ in rule.rules():
            if name in seen:
                raise ValueError(f"{what}: rule name {name!r} is used in {seen[name]} and {group}")
            seen[name] = group
        d = self.defaults
        if rule.lever is None:
            rule.lever = d.lever
        if rule.marketing is None:
            rule.marketing = d.marketing
        if rule.channels is None and d.channels is not None:
            rule.channels = list(d.channels)
        overrides = rule.contact.model_dump(exclude_unset=True) if rule.contact is not None else {}
        rule.contact = d.contact.model_copy(update=overrides)

    @property
    def no_action(self) -> ActionRule | None:
        """The action of kind ``none``, if the policy has one."""
        return next((r for r in self.actions.values() if r.is_no_action), None)

    def action(self, action_id: str) -> ActionRule:
        """The rule of ``action_id``.

        Raises:
            PolicyError: the policy has no such action.
        """
        try:
            return self.actions[action_id]
        except KeyError:
            raise PolicyError(
                f"policy {self.version}: unknown action {action_id!r}; known: {', '.join(sorted(self.actions))}"
            ) from None

    def named_channels(self) -> list[str]:
        """Every channel the policy names: actions' request and delivery channels, and the channel caps."""
        named = set(self.channel_caps) | set(self.defaults.channels or ())
        for rule in (*self.actions.values(), *self.kinds.values()):
            named |= set(rule.channels or ())
            if rule.delivery_channel is not None:
                named.add(rule.delivery_channel)
        return sorted(named)

    def referenced_fields(self) -> dict[str, list[str]]:
        """Profile/context fields each rule reads (``action.*`` left out), for checking against a profile schema."""
        out: dict[str, list[str]] = {}
        owners = [(a, r) for a, r in self.actions.items()] + [
            (f"kinds.{k}", r) for k, r in self.kinds.items()
        ]
        for owner, rule in owners:
            for _, name, cond in rule.rules():
                for f in cond.fields():
                    if not f.startswith("action."):
                        out.setdefault(f, []).append(f"{owner}.{name}")
        return out


def _describe_loc(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in loc]
    # Discriminated unions add the chosen tag to the location; it is noise to a policy author.
    parts = [p for p in parts if p not in ("fixed", "margin_basket", "tier", "function-after[_check()]")]
    if len(parts) >= 2 and parts[0] in ("actions", "kinds"):
        field = ".".join(parts[2:]) or "(the action itself)"
        what = "action" if parts[0] == "actions" else "template for kind"
        return f"{what} {parts[1]!r}, field {field}"
    return "field " + (".".join(parts) or "(top level)")


def _policy_error(source: str, err: ValidationError) -> PolicyError:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "not a known field (a typo?)"
        lines.append(f"{source}: {_describe_loc(e['loc'])}: {msg}")
    return PolicyError("\n".join(lines))


def policy_from_dict(data: Mapping[str, Any], *, source: str = "<policy>") -> ActionPolicy:
    """Validate a parsed policy document.

    Raises:
        PolicyError: naming ``source``, the action and the field of every problem.
    """
    try:
        return ActionPolicy.model_validate(data)
    except ValidationError as e:
        raise _policy_error(source, e) from None


def load_policy(path: str | Path = DEFAULT_POLICY_PATH) -> ActionPolicy:
    """Load a TOML policy file (JSON, as written by ``model_dump_json``, is accepted too).

    Raises:
        PolicyError: the file is missing, is not TOML, or does not describe a valid policy.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy file ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    return policy_from_dict(data, source=str(path))


def attach_catalog(policy: ActionPolicy, catalog: pl.DataFrame) -> ActionPolicy:
    """A copy of ``policy`` for this catalogue: templates expanded, catalogue attributes attached.

    Every catalogue action the policy does not list but whose kind has a ``[kinds.<kind>]`` template becomes an
    action made from that template. Each action's attributes are the catalogue's (``kind`` and ``value``
    aside) overlaid with those the policy sets; its kind, and its delivery channel when the catalogue has a
    ``channel`` column, come from the catalogue where the policy leaves them out. Catalogue actions with neither an entry nor a template are
    never offered (:func:`unpoliced_actions` lists them).

    Args:
        policy: the loaded policy.
        catalog: the ``action_catalog`` table (action_id, kind, value, attribute columns).

    Raises:
        PolicyError: a policy action is not in the catalogue.
    """
    rows = {r[ACTION_ID]: r for r in catalog.iter_rows(named=True)}
    missing = sorted(a for a in policy.actions if a not in rows)
    if missing:
        raise PolicyError(
            f"policy {policy.version}: action(s) {', '.join(missing)} are not in action_catalog "
            f"(which has {', '.join(sorted(rows)) or 'none'})"
        )
    out = policy.model_copy(deep=True)
    for action_id, row in rows.items():
        template = out.kinds.get(str(row.get(KIND)))
        if action_id not in out.actions and template is not None:
            out.actions[action_id] = template.model_copy(deep=True, update={"action_id": action_id})
    for action_id, rule in out.actions.items():
        if rule.kind is None and rows[action_id].get(KIND) is not None:
            rule.kind = str(rows[action_id][KIND])
        if rule.delivery_channel is None and not rule.is_no_action and rows[action_id].get(CHANNEL):
            rule.delivery_channel = str(rows[action_id][CHANNEL])
        extra = {
            k: v for k, v in rows[action_id].items() if k not in (ACTION_ID, KIND, VALUE) and v is not None
        }
        rule.attributes = {**extra, **rule.attributes}
    no_actions = [a for a, r in out.actions.items() if r.is_no_action]
    if len(no_actions) > 1:
        raise PolicyError(
            f"policy {policy.version}: only one action may have kind 'none'; found {', '.join(no_actions)}"
        )
    return out


def unpoliced_actions(policy: ActionPolicy, catalog: pl.DataFrame) -> list[str]:
    """Catalogue actions that ``policy`` neither lists nor covers by a kind template (never offered)."""
    return sorted(
        str(r[ACTION_ID])
        for r in catalog.iter_rows(named=True)
        if r[ACTION_ID] not in policy.actions and str(r.get(KIND)) not in policy.kinds
    )
