"""The action policy: the rule language, values, file loading and its errors, catalogue templates, levers."""

from __future__ import annotations

import json
import textwrap
import tomllib
from datetime import date, datetime

import numpy as np
import polars as pl
import pytest

import nextbest.serving.policy
from nextbest.serving.levers import PolicyState
from nextbest.serving.policy import (
    DEFAULT_POLICY_PATH,
    ActionPolicy,
    PolicyError,
    attach_catalog,
    load_policy,
    policy_from_dict,
    unpoliced_actions,
)
from nextbest.serving.policy_rules import Condition, RuleScope, parse_condition
from nextbest.serving.state_store import StateStore, StateStoreError, default_state_url, import_state_dir


def scope(profile=None, context=None, action=None) -> RuleScope:
    return RuleScope(profile=profile or {}, context=context or {}, action=action or {})


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "op", "value", "value_field"),
    [
        ("age >= 18", "age", ">=", 18, None),
        ("age>=18", "age", ">=", 18, None),
        ("  age   <  18.5 ", "age", "<", 18.5, None),
        ("balance > -2.5e1", "balance", ">", -25.0, None),
        ("region == 'north east'", "region", "==", "north east", None),
        ('region != "south"', "region", "!=", "south", None),
        ("churn_risk_flag == false", "churn_risk_flag", "==", False, None),
        ("vip == TRUE", "vip", "==", True, None),
        ("lifecycle in ['active', 'new']", "lifecycle", "in", ["active", "new"], None),
        ("lifecycle not in ['lapsed',]", "lifecycle", "not in", ["lapsed"], None),
        ("x in []", "x", "in", [], None),
        ("n in [1, 2.5, true]", "n", "in", [1, 2.5, True], None),
        ("action.brand not in bought_brand", "action.brand", "not in", None, "bought_brand"),
        ("preferred_sport == action.sport", "preferred_sport", "==", None, "action.sport"),
        ("age is null", "age", "is null", None, None),
        ("age IS NOT NULL", "age", "is not null", None, None),
    ],
)
def test_parse_condition(text, field, op, value, value_field):
    c = parse_condition(text)
    assert (c.field, c.op, c.value, c.value_field) == (field, op, value, value_field)
    # The canonical text parses back to the same condition.
    assert parse_condition(c.text) == c


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("age >== 18", "unexpected '=' at column 7"),
        ("age", "expected an operator (==, !=, <, <=, >, >=, in, not in, is null, is not null) at column 4"),
        (">= 18", "expected a field name at column 1, found '>='"),
        ("age >= ", "expected a value (number, 'quoted text', true, false, [list]) or a field at column 8"),
        ("age >= 18 and x", "expected the end of the rule at column 11, found 'and'"),
        ("lifecycle in ['a', 'b'", "expected ',' or ']' at column 23, found the end"),
        ("lifecycle in ['a' 'b']", "expected ',' or ']' at column 19, found \"'b'\""),
        ("name == 'abc", 'unexpected "\'" at column 9'),
        ("age == null", "compare with null using 'is null' or 'is not null'"),
        ("age is 5", "expected 'null' after 'is' at column 8"),
        ("age not 5", "expected 'in' after 'not' at column 9"),
        ("in in [1]", "expected a field name at column 1, found 'in'"),
        ("__import__('os').system('rm')", "unexpected '(' at column 11"),
        ("x in [[1]]", "expected a value"),
    ],
)
def test_parse_errors_quote_the_rule_and_the_column(text, message):
    with pytest.raises(ValueError) as err:
        parse_condition(text)
    assert f"rule {text!r}" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("age in 5", "'in' needs a list value, got 5"),
        ("age == [1, 2]", "use 'in' for a list"),
        ("age > true", "'>' needs a number, text or date, got true"),
    ],
)
def test_parsed_but_invalid_rules(text, message):
    with pytest.raises(ValueError, match="invalid rule") as err:
        parse_condition(text)
    assert message in str(err.value)


def test_structured_conditions_are_checked():
    assert Condition.model_validate({"field": "age", "op": ">=", "value": 18}) == parse_condition("age >= 18")
    with pytest.raises(ValueError, match="unknown operator '=~'"):
        Condition.model_validate({"field": "age", "op": "=~", "value": 1})
    with pytest.raises(ValueError, match="exactly one of value or value_field"):
        Condition.model_validate({"field": "age", "op": "==", "value": 1, "value_field": "b"})
    with pytest.raises(ValueError, match="exactly one of value or value_field"):
        Condition.model_validate({"field": "age", "op": "=="})
    with pytest.raises(ValueError, match="'is null' takes no value"):
        Condition.model_validate({"field": "age", "op": "is null", "value": 1})
    with pytest.raises(ValueError, match="'a b' is not a field name"):
        Condition.model_validate({"field": "a b", "op": "is null"})


# --- evaluation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "profile", "passed"),
    [
        ("age >= 18", {"age": 18}, True),
        ("age >= 18", {"age": 17}, False),
        ("age > 17.5", {"age": 18}, True),
        ("region == 'north'", {"region": "north"}, True),
        ("region != 'north'", {"region": "south"}, True),
        ("lifecycle in ['active', 'new']", {"lifecycle": "new"}, True),
        ("lifecycle in ['active', 'new']", {"lifecycle": "lapsed"}, False),
        ("lifecycle not in ['lapsed']", {"lifecycle": "active"}, True),
        ("x in []", {"x": 1}, False),
        ("x not in []", {"x": 1}, True),
        # bool is an int in Python; the rule language keeps them apart.
        ("flag == 1", {"flag": True}, False),
        ("flag != 1", {"flag": True}, True),
        ("flag == true", {"flag": True}, True),
        ("n == 2", {"n": 2.0}, True),
        ("n in [1, 2]", {"n": True}, False),
        ("since >= '2026-01-01'", {"since": "2026-03-01"}, True),
        ("age is null", {}, True),
        ("age is null", {"age": None}, True),
        ("age is null", {"age": 3}, False),
        ("age is not null", {"age": 3}, True),
    ],
)
def test_evaluate(rule, profile, passed):
    assert parse_condition(rule).evaluate(scope(profile)).passed is passed


def test_missing_or_mistyped_data_fails_with_a_reason_and_never_raises():
    out = parse_condition("age >= 18").evaluate(scope({}))
    assert (out.passed, out.detail) == (False, "age is missing")
    # != and not in are not let through by a missing value either.
    assert parse_condition("region != 'north'").evaluate(scope({"region": None})).passed is False
    out = parse_condition("action.brand not in bought_brand").evaluate(scope({}, action={"brand": "Apex"}))
    assert (out.passed, out.detail) == (False, "bought_brand is missing")
    out = parse_condition("age >= 18").evaluate(scope({"age": "old"}))
    assert (out.passed, out.detail) == (False, "cannot compare 'old' with 18")
    out = parse_condition("flag > 0").evaluate(scope({"flag": True}))
    assert out.passed is False
    out = parse_condition("a in b").evaluate(scope({"a": 1, "b": 5}))
    assert (out.passed, out.detail) == (False, "b is not a list")
    out = parse_condition("d < '2026-01-01'").evaluate(scope({"d": date(2025, 1, 1)}))
    assert out.passed is False  # a date is not compared with text
    assert (
        parse_condition("d < t")
        .evaluate(scope({"d": datetime(2025, 1, 1), "t": datetime(2026, 1, 1)}))
        .passed
    )


def test_numpy_values_compare_like_python_ones():
    s = scope(
        {"flag": np.bool_(False), "age": np.int64(30), "share": np.float32(0.5), "tags": np.array(["a"])},
        action={"tag": np.str_("a")},
    )
    assert parse_condition("flag == false").evaluate(s).passed
    assert parse_condition("age >= 18").evaluate(s).passed
    assert parse_condition("share < 0.6").evaluate(s).passed
    assert parse_condition("action.tag in tags").evaluate(s).passed
    assert RuleScope({}, {}, {}).get("x") is None
    assert s.get("tags") == ["a"]


def test_field_lookup_order_and_scopes():
    s = scope(
        profile={"channel": None, "age": 30, "bought_brand": ["Apex"]},
        context={"channel": "web", "age": 12},
        action={"brand": "Apex", "sport": "cycling"},
    )
    assert s.get("age") == 30  # profile first
    assert s.get("channel") == "web"  # then context (the profile's is null)
    assert s.get("context.age") == 12
    assert s.get("profile.age") == 30
    assert s.get("action.brand") == "Apex"
    assert s.get("action.colour") is None
    assert s.get("brand") is None  # action attributes only through action.
    out = parse_condition("action.brand not in bought_brand").evaluate(s)
    assert (out.passed, out.detail) == (False, "action.brand = 'Apex', bought_brand = ['Apex']")
    assert parse_condition("preferred_sport == action.sport").evaluate(s).passed is False


# --- values -------------------------------------------------------------------------------------------------


def _policy(**actions) -> ActionPolicy:
    return policy_from_dict({"version": "t", "defaults": {"expected_basket": 50.0}, "actions": actions})


def test_values_fixed_basket_and_tier():
    p = _policy(
        fixed={"value": 12},
        basket={"value": {"margin": 0.4, "cost": 5}},
        discount={"value": {"margin": 0.4, "discount_pct_attribute": "discount_pct"}},
        own_default={"value": {"margin": 0.5, "default_basket": 10}},
        tier={"value": {"tiers": {"low": 2, "high": 9}, "default": 1}},
    )
    d = p.defaults
    buyer = {"monetary": 300.0, "frequency": 4, "value_tier": "high"}
    assert p.actions["fixed"].value.compute(buyer, d, {}) == (12.0, "fixed 12")
    # 0.4 × 300 / 4 − 5 = 25
    assert p.actions["basket"].value.compute(buyer, d, {}) == (
        pytest.approx(25.0),
        "margin 0.4 × expected basket 75.00 − cost 5",
    )
    # (0.4 − 10 %) × 75 = 22.5
    value, text = p.actions["discount"].value.compute(buyer, d, {"discount_pct": 10})
    assert value == pytest.approx(22.5)
    assert text == "(margin 0.4 − discount 10%) × expected basket 75.00"
    # No orders: the defaults' basket (50), or the action's own default (10).
    assert p.actions["basket"].value.compute({"frequency": 0}, d, {})[0] == pytest.approx(0.4 * 50 - 5)
    assert p.actions["own_default"].value.compute({}, d, {})[0] == pytest.approx(5.0)
    assert p.actions["tier"].value.compute(buyer, d, {}) == (9.0, "value_tier high: 9")
    assert p.actions["tier"].value.compute({"value_tier": "mid"}, d, {}) == (
        1.0,
        "value_tier 'mid': default 1",
    )


# --- policy files -------------------------------------------------------------------------------------------


def test_default_policy_loads_and_round_trips_through_json(tmp_path):
    p = load_policy()
    assert p.version == "2026-11-22.1"
    assert {"free_shipping", "retention_call", "newsletter", "no_action"} <= set(p.actions)
    assert {"discount", "bundle"} <= set(p.kinds)
    assert p.no_action is not None and p.no_action.action_id == "no_action"
    assert p.actions["retention_call"].delivery_channel == "call"
    # The action's own contact limits override the defaults field by field.
    assert p.actions["retention_call"].contact.max_rejections == 1
    assert p.actions["free_shipping"].contact == p.defaults.contact
    assert p.actions["free_shipping"].marketing is True
    assert p.kinds["discount"].lever == 1.0
    path = tmp_path / "policy.json"
    path.write_text(p.model_dump_json())
    assert load_policy(path) == p
    assert "age" in p.referenced_fields()
    assert "kinds.discount.adult" in p.referenced_fields()["age"]


def load_error(path) -> str:
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    return str(err.value)


def test_policy_file_errors_name_file_action_and_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        'version = "1"\n'
        "[actions.discount_apex]\n"
        "value = 3\n"
        "[actions.discount_apex.eligibility]\n"
        'adult = "age >== 18"\n'
    )
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == (
        f"{path}: action 'discount_apex', field eligibility.adult: cannot parse rule 'age >== 18': "
        "unexpected '=' at column 7"
    )

    path.write_text('version = "1"\n[actions.a]\nvalue = 3\ncolour = "x"\n[actions.b]\nvalue = "x"\n')
    message = load_error(path)
    assert f"{path}: action 'a', field colour: not a known field (a typo?)" in message
    assert f"{path}: action 'b', field value: a value is a number" in message

    path.write_text('version = "1"\n[kinds.discount]\nvalue = { margin = 3 }\n')
    message = load_error(path)
    assert message == (
        f"{path}: template for kind 'discount', field value.margin: Input should be less than or equal to 1"
    )

    path.write_text("[actions.a]\nvalue = 1\n")
    assert load_error(path) == f"{path}: field version: Field required"

    path.write_text("version = \n")
    assert "not valid TOML" in load_error(path)
    missing = tmp_path / "none.toml"
    assert f"{missing}: cannot read the policy file" in load_error(missing)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"version": "1"}, "a policy needs at least one action"),
        ({"version": "", "actions": {"a": {"value": 1}}}, "field version: String should have at least 1"),
        (
            {
                "version": "1",
                "actions": {
                    "a": {"value": 1},
                    "b": {"value": 1, "kind": "none"},
                    "c": {"value": 2, "kind": "none"},
                },
            },
            "only one action may have kind 'none'; found b, c",
        ),
        (
            {
                "version": "1",
                "actions": {
                    "a": {"value": 1, "eligibility": {"r": "x == 1"}, "suitability": {"r": "y == 1"}}
                },
            },
            "action 'a': rule name 'r' is used in eligibility and suitability",
        ),
        ({"version": "1", "actions": {"a": {"value": 1, "action_id": "b"}}}, "action 'a' says action_id 'b'"),
        ({"version": "1", "actions": {"a": {"value": 1, "lever": -1}}}, "action 'a', field lever"),
        ({"version": "1", "actions": {"a": {"value": {"colour": 1}}}}, "a value is a number"),
        (
            {"version": "1", "actions": {"a": {"value": 1, "contact": {"max_rejections": 0}}}},
            "action 'a', field contact.max_rejections",
        ),
    ],
)
def test_invalid_policies(doc, message):
    with pytest.raises(PolicyError, match=r"^x\.toml: ") as err:
        policy_from_dict(doc, source="x.toml")
    assert message in str(err.value)


# --- the catalogue ------------------------------------------------------------------------------------------


CATALOG = pl.DataFrame(
    {
        "action_id": [
            "discount_apex",
            "discount_zenith",
            "bundle_cycling",
            "free_shipping",
            "retention_call",
            "newsletter",
            "no_action",
            "mystery",
        ],
        "kind": ["discount", "discount", "bundle", "shipping", "call", "newsletter", "none", "gift"],
        "value": [None, None, None, None, None, None, None, None],
        "brand": ["Apex", "Zenith", None, None, None, None, None, None],
        "discount_pct": [10, 20, None, None, None, None, None, None],
        "sport": [None, None, "cycling", None, None, None, None, None],
        "channel": [None, None, None, None, "call", "email", None, None],
    },
    schema_overrides={"value": pl.Float64},
)


def test_attach_catalog_expands_templates_and_attributes():
    policy = load_policy()
    p = attach_catalog(policy, CATALOG)
    assert set(p.actions) == set(CATALOG["action_id"]) - {"mystery"}
    apex = p.actions["discount_apex"]
    assert (apex.kind, apex.attributes) == ("discount", {"brand": "Apex", "discount_pct": 10})
    assert apex.eligibility == policy.kinds["discount"].eligibility
    assert p.actions["discount_zenith"].attributes["discount_pct"] == 20
    assert p.actions["bundle_cycling"].attributes == {"sport": "cycling"}
    assert p.actions["free_shipping"].kind == "shipping"  # taken from the catalogue
    assert p.actions["retention_call"].attributes == {"channel": "call"}
    assert p.actions["retention_call"].delivery_channel == "call"
    assert p.actions["newsletter"].delivery_channel == "email"  # set by the policy and the catalogue alike
    assert p.actions["discount_apex"].delivery_channel is None
    assert p.no_action is not None and p.no_action.action_id == "no_action"
    assert unpoliced_actions(policy, CATALOG) == ["mystery"]
    assert "discount_apex" not in policy.actions  # the loaded policy is left as it was


def test_attach_catalog_rejects_policy_actions_missing_from_the_catalogue():
    with pytest.raises(PolicyError, match="action\\(s\\) newsletter, no_action are not in action_catalog"):
        attach_catalog(load_policy(), CATALOG.filter(~pl.col("action_id").is_in(["newsletter", "no_action"])))


# --- levers -------------------------------------------------------------------------------------------------


def _store(tmp_path) -> StateStore:
    """The embedded store in tmp_path (a new StateStore each call, as after a restart)."""
    return StateStore(default_state_url(tmp_path / "state"))


def test_levers_change_at_run_time_and_survive_a_restart(tmp_path):
    policy = _policy(a={"value": 1, "lever": 2.0}, b={"value": 1})
    state = PolicyState(policy, _store(tmp_path))
    assert state.levers == {"a": 2.0, "b": 1.0}
    change = state.set_lever("a", 0.5, "alice", at=datetime(2026, 11, 22, 9, 0))
    assert change.model_dump() == {
        "action_id": "a",
        "old": 2.0,
        "new": 0.5,
        "actor": "alice",
        "at": datetime(2026, 11, 22, 9, 0),
        "policy_version": "t",
    }
    state.set_lever("a", 3, "bob")
    assert state.lever("a") == 3.0

    restarted = PolicyState(policy, _store(tmp_path))
    assert restarted.levers == {"a": 3.0, "b": 1.0}
    assert [(h.actor, h.old, h.new) for h in restarted.history] == [("alice", 2.0, 0.5), ("bob", 0.5, 3.0)]
    assert _store(tmp_path).levers() == {"a": 3.0}

    # A policy without the action drops the override (and says so) instead of failing.
    trimmed = PolicyState(_policy(b={"value": 1}), _store(tmp_path))
    assert trimmed.levers == {"b": 1.0}
    assert trimmed.dropped_overrides == {"a": 3.0}


def test_reload_sees_a_lever_changed_by_another_replica(tmp_path):
    policy = _policy(a={"value": 1, "lever": 2.0}, b={"value": 1})
    mine, other = PolicyState(policy, _store(tmp_path)), PolicyState(policy, _store(tmp_path))
    other.set_lever("b", 0.25, "carol")
    assert mine.lever("b") == 1.0  # not until it reloads
    mine.reload()
    assert mine.levers == {"a": 2.0, "b": 0.25}
    assert [(h.actor, h.action_id, h.old, h.new) for h in mine.history] == [("carol", "b", 1.0, 0.25)]


def test_levers_without_a_store_are_kept_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = PolicyState(_policy(a={"value": 1}))
    state.set_lever("a", 0.5, "alice")
    state.reload()
    assert state.levers == {"a": 0.5} and len(state.history) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("action", "value", "actor", "message"),
    [
        ("zzz", 1.0, "alice", "unknown action 'zzz'; known: a"),
        ("a", -1.0, "alice", "lever of 'a' must be a finite number ≥ 0, got -1.0"),
        ("a", float("nan"), "alice", "must be a finite number"),
        ("a", True, "alice", "must be a finite number"),
        ("a", 1.0, " ", "needs an actor"),
    ],
)
def test_bad_lever_changes(action, value, actor, message, tmp_path):
    state = PolicyState(_policy(a={"value": 1}), _store(tmp_path))
    with pytest.raises(PolicyError, match=message):
        state.set_lever(action, value, actor)
    assert _store(tmp_path).levers() == {} and _store(tmp_path).lever_history() == []
    assert state.levers == {"a": 1.0} and state.history == []


def test_default_policy_path_is_inside_the_package():
    assert DEFAULT_POLICY_PATH.name == "default.toml"
    assert DEFAULT_POLICY_PATH.parent.parent.name == "serving"


def test_the_example_in_the_module_docstring_is_a_valid_policy():
    block = nextbest.serving.policy.__doc__.split("::\n\n", 1)[1].split("\nValues:")[0]
    p = policy_from_dict(tomllib.loads(textwrap.dedent(block)), source="docstring")
    assert sorted(p.actions) == ["no_action", "retention_call"] and list(p.kinds) == ["discount"]
    assert p.actions["retention_call"].contact.max_rejections == 3  # from the defaults


def test_a_damaged_levers_file_is_reported_and_not_imported(tmp_path):
    # The levers file of earlier versions is imported into the store once; a damaged one stops the import.
    path = tmp_path / "levers.json"
    path.write_text("{not json")
    store = _store(tmp_path)
    with pytest.raises(StateStoreError, match=f"cannot import {tmp_path}: "):
        import_state_dir(store, tmp_path)
    assert path.exists() and store.levers() == {} and store.lever_history() == []
    assert PolicyState(_policy(a={"value": 1}), store).levers == {"a": 1.0}


def test_a_levers_file_of_an_earlier_version_is_imported_once(tmp_path):
    path = tmp_path / "levers.json"
    change = {"action_id": "a", "old": 1.0, "new": 0.5, "actor": "alice", "at": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps({"levers": {"a": 0.5}, "history": [{**change, "policy_version": "t"}]}))
    store = _store(tmp_path)
    assert import_state_dir(store, tmp_path) == {"levers.json": 1}
    assert not path.exists()
    state = PolicyState(_policy(a={"value": 1}), store)
    assert state.levers == {"a": 0.5} and [(h.actor, h.new) for h in state.history] == [("alice", 0.5)]
