"""The rule language of the action policy: conditions parsed from text (never ``eval``), checked, and evaluated
against a customer, a request context and an action.

A condition is a string ``FIELD OP OPERAND`` parsed by :func:`parse_condition`, or a table
``{ field = "age", op = ">=", value = 18 }`` (or ``value_field = "other.field"`` to compare two fields).
Operators: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``, ``is null``, ``is not null``.
Operands: numbers, quoted text, ``true``/``false``, lists ``['a', 'b']``, or a field.

Fields: ``action.X`` is an attribute of the action, ``context.X`` of the request context, ``profile.X`` of the
customer profile; a bare name is looked up in the profile, then in the context. A missing field fails every
comparison (the reason says so), except ``is null``, so a rule never lets an action through on missing data.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

OPERATORS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=", "in", "not in", "is null", "is not null")
NULL_OPERATORS = frozenset({"is null", "is not null"})
FIELD_SCOPES: tuple[str, ...] = ("action", "context", "profile")

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
