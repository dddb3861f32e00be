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
for this customer: segment, lifecycle, churn risk). A condition is a string ``FIELD OP OPERAND`` parsed by
:func:`parse_condition` (never ``eval``), or a table ``{ field = "age", op = ">=", value = 18 }`` (or
``value_field = "other.field"`` to compare two fields). Operators: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``,
``in``, ``not in``, ``is null``, ``is not null``. Operands: numbers, quoted text, ``true``/``false``, lists
``['a', 'b']``, or a field.

Fields: ``action.X`` is an attribute of the action, ``context.X`` of the request context, ``profile.X`` of the
customer profile; a bare name is looked up in the profile, then in the context. A missing field fails every
comparison (the reason says so), except ``is null``, so a rule never lets an action through on missing data.

``channels`` restricts the request channels an action may be offered on; ``delivery_channel`` is the channel the
contact itself goes through (contact limits count there). Templates in ``[kinds.*]`` become actions when
:func:`attach_catalog` meets the catalogue. Levers can be changed at run time through :class:`PolicyState`,
which persists them to a JSON file.

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
import numbers
import re
import threading
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
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
from nextbest.features.schema import ACTION_ID, CHANNEL, KIND, VALUE
from nextbest.serving.times import UtcDateTime

DEFAULT_POLICY_PATH = Path(__file__).parent / "policies" / "default.toml"
NO_ACTION_KIND = "none"
RULE_GROUPS: tuple[str, ...] = ("eligibility", "applicability", "suitability")
OPERATORS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null")
NULL_OPERATORS = frozenset({"is null", "is not null"})
FIELD_SCOPES: tuple[str, ...] = ("action", "context", "profile")


class PolicyError(NextbestError, ValueError):
    """A policy file (or a change to it) is invalid; the message names the file, the action and the field."""


# --- the rule language --------------------------------------------------------------------------------------

_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[\[\],])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"in", "not", "is", "null", "true", "false"}
_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class _Token:
    kind: str  # string, number, op, punct, word, end
    text: str
    column: int  # 1-based


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos]!r} at column {pos + 1}")
        if m.lastgroup != "space":
            tokens.append(_Token(m.lastgroup or "", m.group(), pos + 1))
        pos = m.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    """A recursive-descent parser for one condition: ``FIELD OP OPERAND`` or ``FIELD is [not] null``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, what: str, tok: _Token) -> ValueError:
        found = "the end" if tok.kind == "end" else repr(tok.text)
        return ValueError(f"expected {what} at column {tok.column}, found {found}")

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok.kind == "word" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    def condition(self) -> Condition:
        tok = self.take()
        if tok.kind != "word" or tok.text.lower() in _KEYWORDS:
            raise self.fail("a field name", tok)
        field = tok.text
        op_tok = self.peek()
        if op_tok.kind == "op":
            self.take()
            op = op_tok.text
        elif self.keyword("in"):
            op = "in"
        elif self.keyword("not"):
            if not self.keyword("in"):
                raise self.fail("'in' after 'not'", self.peek())
            op = "not in"
        elif self.keyword("is"):
            negated = self.keyword("not")
            if not self.keyword("null"):
                raise self.fail("'null' after 'is'" + (" not" if negated else ""), self.peek())
            self.end()
            return Condition(field=field, op="is not null" if negated else "is null")
        else:
            raise self.fail(f"an operator ({', '.join(OPERATORS)})", op_tok)
        operand_tok = self.peek()
        if operand_tok.kind == "word" and operand_tok.text.lower() not in _KEYWORDS:
            self.take()
            self.end()
            return Condition(field=field, op=op, value_field=operand_tok.text)
        value = self.literal(allow_list=True)
        if value is None:
            raise ValueError(
                f"compare with null using 'is null' or 'is not null', not {op!r} (column {operand_tok.column})"
            )
        self.end()
        return Condition(field=field, op=op, value=value)

    def literal(self, *, allow_list: bool) -> Any:
        tok = self.take()
        if tok.kind == "string":
            return tok.text[1:-1]
        if tok.kind == "number":
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "word" and tok.text.lower() in _CONSTANTS:
            return _CONSTANTS[tok.text.lower()]
        if tok.kind == "punct" and tok.text == "[" and allow_list:
            items: list[Any] = []
            while True:
                if self.peek().kind == "punct" and self.peek().text == "]":
                    self.take()
                    return items
                items.append(self.literal(allow_list=False))
                sep = self.take()
                if sep.kind == "punct" and sep.text == "]":
                    return items
                if not (sep.kind == "punct" and sep.text == ","):
                    raise self.fail("',' or ']'", sep)
        raise self.fail("a value (number, 'quoted text', true, false, [list]) or a field", tok)

    def end(self) -> None:
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail("the end of the rule", tok)


def parse_condition(text: str) -> Condition:
    """Parse a rule string such as ``"age >= 18"`` or ``"lifecycle in ['active', 'new']"``.

    Raises:
        ValueError: the text is not a condition; the message quotes it and names the column.
    """
    try:
        return _Parser(text).condition()
    except ValidationError as e:
        reason = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ValueError(f"invalid rule {text!r}: {reason}") from None
    except ValueError as e:
        raise ValueError(f"cannot parse rule {text!r}: {e}") from None


def _format_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_literal(v) for v in value) + "]"
    return str(value)


def _is_number(x: Any) -> bool:
    # numbers.Real takes numpy scalars too (profile rows may come from numpy); bool is not a number here.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _comparable(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    for kind in (str, datetime, date):
        if isinstance(a, kind) and isinstance(b, kind):
            return isinstance(a, datetime) == isinstance(b, datetime)
    return False


def _equal(a: Any, b: Any) -> bool:
    if type(a) is type(b):  # the common case (text == text), decided without the type ladder
        return bool(a == b)
    # bool is an int in Python; a rule writing ``flag == 1`` must not match True by accident.
    return _comparable(a, b) and a == b


@dataclass(frozen=True)
class RuleOutcome:
    """The result of one condition for one action and customer."""

    passed: bool
    detail: str


class Condition(BaseModel):
    """One comparison: ``field op value`` or ``field op value_field`` (``is null`` ops take neither)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str
    op: str
    value: Any = None
    value_field: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            return parse_condition(data).model_dump(exclude_defaults=True)
        return data

    @model_validator(mode="after")
    def _check(self) -> Condition:
        for name in (self.field, self.value_field):
            if name is not None and not _FIELD_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a field name (letters, digits, _ and dots)")
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}: expected one of {', '.join(OPERATORS)}")
        if self.op in NULL_OPERATORS:
            if self.value is not None or self.value_field is not None:
                raise ValueError(f"{self.op!r} takes no value")
            return self
        if (self.value is None) == (self.value_field is None):
            raise ValueError(f"{self.field} {self.op} needs exactly one of value or value_field")
        if self.op in ("in", "not in") and self.value is not None and not isinstance(self.value, list):
            raise ValueError(f"{self.op!r} needs a list value, got {_format_literal(self.value)}")
        if self.op in ("==", "!=") and isinstance(self.value, list):
            raise ValueError(f"{self.op!r} compares with one value; use 'in' for a list")
        if self.op in ("<", "<=", ">", ">=") and isinstance(self.value, list | bool):
            raise ValueError(f"{self.op!r} needs a number, text or date, got {_format_literal(self.value)}")
        return self

    @property
    def text(self) -> str:
        """The condition written as a rule string."""
        if self.op in NULL_OPERATORS:
            return f"{self.field} {self.op}"
        rhs = self.value_field if self.value_field is not None else _format_literal(self.value)
        return f"{self.field} {self.op} {rhs}"

    def fields(self) -> list[str]:
        """The field names this condition reads."""
        return [f for f in (self.field, self.value_field) if f is not None]

    def evaluate(self, scope: RuleScope) -> RuleOutcome:
        """Evaluate against a customer, a context and an action; never raises on data.

        The detail (the values the rule saw) is written out only when the rule fails: that is when a
        decision shows it, and building it for every passing rule would cost more than the comparison.
        """
        left = scope.get(self.field)
        if self.op == "is null":
            return RuleOutcome(True, "") if left is None else self._failed(left, None)
        if self.op == "is not null":
            return RuleOutcome(False, f"{self.field} is missing") if left is None else RuleOutcome(True, "")
        right = self.value if self.value_field is None else scope.get(self.value_field)
        if left is None:
            return RuleOutcome(False, f"{self.field} is missing")
        if right is None:
            return RuleOutcome(False, f"{self.value_field} is missing")
        op = self.op
        if op == "in" or op == "not in":
            if not isinstance(right, list | tuple | set | frozenset):
                return RuleOutcome(False, f"{self.value_field} is not a list")
            result = any(_equal(left, r) for r in right) == (op == "in")
        elif op == "==":
            result = _equal(left, right)
        elif op == "!=":
            result = not _equal(left, right)
        elif not _comparable(left, right) or isinstance(left, bool):
            return RuleOutcome(False, f"cannot compare {_format_literal(left)} with {_format_literal(right)}")
        elif op == "<":
            result = left < right
        elif op == "<=":
            result = left <= right
        elif op == ">":
            result = left > right
        else:
            result = left >= right
        return RuleOutcome(True, "") if result else self._failed(left, right)

    def _failed(self, left: Any, right: Any) -> RuleOutcome:
        shown = f"{self.field} = {_format_literal(left)}"
        if self.value_field is not None:
            shown += f", {self.value_field} = {_format_literal(right)}"
        return RuleOutcome(False, shown)


@dataclass(frozen=True)
class RuleScope:
    """What a condition's fields are looked up in."""

    profile: Mapping[str, Any]
    context: Mapping[str, Any]
    action: Mapping[str, Any]

    def get(self, name: str) -> Any:
        """The value of field ``name``; None when missing (see the module docstring for the lookup order)."""
        head, _, rest = name.partition(".")
        if rest and head in FIELD_SCOPES:
            value = getattr(self, head).get(rest)
        else:
            value = self.profile.get(name)
            if value is None:
                value = self.context.get(name)
        # Profiles read through numpy hold numpy scalars and arrays; rules compare plain Python values.
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        return value


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


# --- run-time levers ----------------------------------------------------------------------------------------


class LeverChange(BaseModel):
    """One change of a lever, for the audit log."""

    action_id: str
    old: float
    new: float
    actor: str
    at: UtcDateTime
    policy_version: str


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class PolicyState:
    """A policy plus its run-time lever overrides, kept in the state store so a restart and every replica see them.

    Overrides for actions the current policy no longer has are left out on load and listed in
    :attr:`dropped_overrides`.
    """

    def __init__(self, policy: ActionPolicy, store: Any = None) -> None:
        """Load the saved levers, if any.

        Args:
            policy: the loaded policy.
            store: the :class:`~serving.state_store.StateStore` holding the levers; None keeps them in memory.
        """
        self.policy = policy
        self.store = store
        self._lock = threading.Lock()
        self._overrides: dict[str, float] = {}
        self._history: list[dict[str, Any]] = []
        self.dropped_overrides: dict[str, float] = {}
        self.reload()

    def reload(self) -> None:
        """Read the levers and their history from the store again (another replica may have changed one)."""
        if self.store is None:
            return
        saved, history = self.store.levers(), self.store.lever_history()
        with self._lock:
            self._overrides = {a: v for a, v in saved.items() if a in self.policy.actions}
            self.dropped_overrides = {a: v for a, v in saved.items() if a not in self.policy.actions}
            self._history = history

    @property
    def levers(self) -> dict[str, float]:
        """The effective lever of every action (override, else the policy's)."""
        with self._lock:
            return {a: self._overrides.get(a, float(r.lever or 0.0)) for a, r in self.policy.actions.items()}

    def lever(self, action_id: str) -> float:
        rule = self.policy.action(action_id)
        with self._lock:
            return self._overrides.get(action_id, float(rule.lever or 0.0))

    @property
    def history(self) -> list[LeverChange]:
        with self._lock:
            return [LeverChange.model_validate(h) for h in self._history]

    def set_lever(
        self, action_id: str, value: float, actor: str, *, at: datetime | None = None
    ) -> LeverChange:
        """Change the lever of one action now and persist it.

        Returns:
            the change record (old and new value, who, when), for the caller to log.

        Raises:
            PolicyError: unknown action, a negative or non-finite value, or an empty actor.
        """
        rule = self.policy.action(action_id)
        if isinstance(value, bool) or not _is_number(value) or not math.isfinite(value) or value < 0:
            raise PolicyError(f"lever of {action_id!r} must be a finite number ≥ 0, got {value!r}")
        if not actor or not actor.strip():
            raise PolicyError("a lever change needs an actor (who made it)")
        with self._lock:
            old = self._overrides.get(action_id, float(rule.lever or 0.0))
            change = LeverChange(
                action_id=action_id,
                old=old,
                new=float(value),
                actor=actor,
                at=at or _utcnow(),
                policy_version=self.policy.version,
            )
            if self.store is not None:
                self.store.set_lever(action_id, float(value), change.model_dump(mode="json"))
            self._overrides[action_id] = float(value)
            self._history.append(change.model_dump(mode="json"))
        return change
