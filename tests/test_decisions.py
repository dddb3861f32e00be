"""Arbitration by P × V × L (hand-computed rankings), its gates, and champion/challenger assignment."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import datetime, timedelta

import polars as pl
import pytest

from nextbest.serving.arms import arm_position, assign_arm
from nextbest.serving.contact import ContactLedger
from nextbest.serving.decisions import ActionCandidate, arbitrate, bought_attributes
from nextbest.serving.policy import attach_catalog, load_policy, policy_from_dict
from tests.test_policy import CATALOG

NOW = datetime(2026, 11, 22, 12, 0)
ALL_CONSENT = {"personalisation": True, "marketing": True}


def policy(**actions):
    return policy_from_dict({"version": "v1", "actions": actions})


# A, B, C and no-action with fixed values: every score below is worked out by hand.
FIXED = policy(
    a={"value": 10},
    b={"value": 5, "lever": 3.0},
    c={"value": 20, "lever": 0.5},
    no_action={"kind": "none", "value": 2},
)


def cands(**ps: float) -> list[ActionCandidate]:
    return [ActionCandidate(a, p) for a, p in ps.items()]


def ids(decision) -> list[str]:
    return [a.action_id for a in decision.actions]


def test_hand_computed_ranking():
    # a: 0.1 × 10 × 1 = 1.0; b: 0.1 × 5 × 3 = 1.5; c: 0.05 × 20 × 0.5 = 0.5; no_action: 0.2 × 2 × 1 = 0.4
    d = arbitrate(cands(a=0.1, b=0.1, c=0.05, no_action=0.2), FIXED, {}, {}, ALL_CONSENT, None, 5)
    assert ids(d) == ["b", "a", "c", "no_action"]
    assert [a.score for a in d.actions] == pytest.approx([1.5, 1.0, 0.5, 0.4])
    assert [(a.propensity, a.value, a.lever) for a in d.actions] == [
        (0.1, 5.0, 3.0),
        (0.1, 10.0, 1.0),
        (0.05, 20.0, 0.5),
        (0.2, 2.0, 1.0),
    ]
    assert [a.rank for a in d.actions] == [1, 2, 3, 4]
    assert d.chosen.action_id == "b" and not d.is_no_action
    assert d.filtered == []

    top2 = arbitrate(cands(a=0.1, b=0.1, c=0.05, no_action=0.2), FIXED, {}, {}, ALL_CONSENT, None, 2)
    assert ids(top2) == ["b", "a"]
    assert [(a.action_id, a.reason) for a in top2.filtered] == [
        ("c", "ranked below the top 2"),
        ("no_action", "ranked below the top 2"),
    ]


def test_no_action_wins_when_nothing_beats_it():
    # no_action: 0.5 × 2 = 1.0 ties with a (1.0): the tie goes to doing nothing; c (0.5) is below it too.
    d = arbitrate(cands(a=0.1, b=0.1, c=0.05, no_action=0.5), FIXED, {}, {}, ALL_CONSENT, None, 3)
    assert ids(d) == ["b", "no_action"]
    reasons = {a.action_id: a.reason for a in d.filtered}
    assert reasons == {"a": "scores 1, below no action (1)", "c": "scores 0.5, below no action (1)"}

    d = arbitrate(cands(a=0.01, b=0.01, no_action=0.5), FIXED, {}, {}, ALL_CONSENT, None, 3)
    assert ids(d) == ["no_action"] and d.is_no_action
    assert d.chosen.delivery_channel is None


def test_no_action_enters_with_its_default_propensity_when_the_model_gives_none():
    p = policy(a={"value": 10}, stay={"kind": "none", "value": 10, "default_propensity": 0.2})
    d = arbitrate(cands(a=0.1), p, {}, {}, ALL_CONSENT, None, 3)
    assert ids(d) == ["stay"]  # 0.2 × 10 = 2 beats 0.1 × 10 = 1
    assert d.filtered[0].action_id == "a"
    # Without a no-action in the policy nothing competes, and nothing passing means no answer at all.
    d = arbitrate(
        cands(a=0.1), policy(a={"value": 10, "eligibility": {"adult": "age >= 18"}}), {}, {}, {}, None, 3
    )
    assert d.actions == [] and d.chosen is None and d.is_no_action


def test_ties_break_by_action_id():
    p = policy(zeta={"value": 1}, alpha={"value": 1}, mid={"value": 1})
    d = arbitrate(cands(zeta=0.3, mid=0.3, alpha=0.3), p, {}, {}, ALL_CONSENT, None, 3)
    assert ids(d) == ["alpha", "mid", "zeta"]


def test_levers_override_the_policy():
    # With a's lever at 2: a = 0.1 × 10 × 2 = 2.0 now beats b (1.5).
    d = arbitrate(cands(a=0.1, b=0.1), FIXED, {}, {}, ALL_CONSENT, None, 2, levers={"a": 2.0})
    assert ids(d) == ["a", "b"]
    assert d.actions[0].lever == 2.0 and d.actions[0].score == pytest.approx(2.0)
    # b at lever 0 scores 0, below no-action (which enters with P = 0: also 0, and wins the tie).
    d = arbitrate(cands(a=0.1, b=0.1), FIXED, {}, {}, ALL_CONSENT, None, 3, levers={"b": 0.0})
    assert ids(d) == ["a", "no_action"]
    assert d.filtered[0].reason == "scores 0, below no action (0)"


def test_derived_values_use_the_profile():
    p = policy(
        basket={"value": {"margin": 0.4, "cost": 5}},
        tier={"value": {"tiers": {"low": 2, "high": 40}}},
    )
    profile = {"customer_id": "C1", "monetary": 300.0, "frequency": 4, "value_tier": "high"}
    # basket: 0.2 × (0.4 × 75 − 5) = 5.0; tier: 0.1 × 40 = 4.0
    d = arbitrate(cands(basket=0.2, tier=0.1), p, profile, {}, ALL_CONSENT, None, 3)
    assert [(a.action_id, round(a.score, 6)) for a in d.actions] == [("basket", 5.0), ("tier", 4.0)]
    assert d.actions[0].value_basis == "margin 0.4 × expected basket 75.00 − cost 5"
    assert d.customer_id == "C1"


def test_consent_gates():
    p = policy(
        offer={"value": 10, "marketing": True},
        service={"value": 5},
        no_action={"kind": "none", "value": 1, "marketing": True},
    )
    c = cands(offer=0.5, service=0.5, no_action=0.1)
    d = arbitrate(c, p, {}, {}, {"personalisation": False, "marketing": False}, None, 3)
    assert ids(d) == ["service", "no_action"]
    assert d.filtered[0].action_id == "offer" and d.filtered[0].reason == "no marketing consent"
    assert d.personalised is False
    d = arbitrate(c, p, {}, {}, {}, None, 3)  # a purpose without a record counts as not granted
    assert ids(d) == ["service", "no_action"] and d.personalised is False
    d = arbitrate(c, p, {}, {}, ALL_CONSENT, None, 3)
    assert ids(d) == ["offer", "service", "no_action"] and d.personalised is True
    assert d.actions[0].rules_passed == ["marketing_consent"]


def test_rules_and_channels_say_what_let_an_action_through_or_stopped_it():
    p = policy(
        discount={
            "value": 10,
            "channels": ["web", "app"],
            "attributes": {"brand": "Apex"},
            "eligibility": {"adult": "age >= 18"},
            "applicability": {"not_owned": "action.brand not in bought_brand"},
            "suitability": {"not_churning": {"field": "churn_risk_flag", "op": "==", "value": False}},
        }
    )
    ok = {"age": 30, "bought_brand": ["Zenith"], "churn_risk_flag": False}
    d = arbitrate(cands(discount=0.5), p, ok, {"channel": "web"}, ALL_CONSENT, None, 1)
    assert d.actions[0].rules_passed == ["channel", "adult", "not_owned", "not_churning"]

    d = arbitrate(cands(discount=0.5), p, ok, {"channel": "call"}, ALL_CONSENT, None, 1)
    assert d.filtered[0].reason == "channel 'call' not allowed (allowed: web, app)"

    minor = {**ok, "age": 16, "bought_brand": ["Apex"]}
    d = arbitrate(cands(discount=0.5), p, minor, {"channel": "web"}, ALL_CONSENT, None, 1)
    assert d.actions == []
    assert d.filtered[0].reason == (
        "eligibility rule adult (age >= 18) failed: age = 16; "
        "applicability rule not_owned (action.brand not in bought_brand) failed: "
        "action.brand = 'Apex', bought_brand = ['Apex']"
    )
    assert d.filtered[0].rules_passed == ["channel", "not_churning"]

    d = arbitrate(cands(discount=0.5), p, {"age": 30}, {"channel": "web"}, ALL_CONSENT, None, 1)
    assert "bought_brand is missing" in d.filtered[0].reason
    assert "churn_risk_flag is missing" in d.filtered[0].reason


class RecordingGate:
    """A contact gate that refuses one action and records what it was asked."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.asked: list[tuple] = []

    def allowed(self, customer_id, action_id, channel, now):
        self.asked.append((customer_id, action_id, channel, now))
        return (action_id != self.refuse, "contact cap: too many" if action_id == self.refuse else "ok")


def test_contact_gate_is_asked_with_the_delivery_channel_and_its_reason_kept():
    p = policy(
        a={"value": 10},
        mail={"value": 10, "delivery_channel": "email"},
        failing={"value": 10, "eligibility": {"x": "x == 1"}},
        no_action={"kind": "none", "value": 1},
    )
    gate = RecordingGate(refuse="a")
    d = arbitrate(
        cands(a=0.5, mail=0.4, failing=0.9, no_action=0.01),
        p,
        {"customer_id": "C7"},
        {"channel": "web", "now": "2026-11-22T12:00:00+01:00"},
        ALL_CONSENT,
        gate,
        3,
    )
    assert ids(d) == ["mail", "no_action"]
    assert d.actions[0].rules_passed == ["contact_policy"] and d.actions[0].delivery_channel == "email"
    assert [(a.action_id, a.reason) for a in d.filtered] == [
        ("a", "contact cap: too many"),
        ("failing", "eligibility rule x (x == 1) failed: x is missing"),
    ]
    # Only actions that passed every rule reach the ledger; no-action never does. ``now`` is read from the
    # context and converted to naive UTC.
    assert gate.asked == [
        ("C7", "a", "web", datetime(2026, 11, 22, 11, 0)),
        ("C7", "mail", "email", datetime(2026, 11, 22, 11, 0)),
    ]


def test_unknown_and_invalid_candidates():
    d = arbitrate(cands(a=0.1, ghost=0.9), FIXED, {}, {}, ALL_CONSENT, None, 3)
    assert d.filtered[0].action_id == "ghost" and d.filtered[0].reason == "not in policy v1"
    with pytest.raises(ValueError, match=r"propensity of 'a' must be a probability in \[0, 1\], got 1\.5"):
        arbitrate(cands(a=1.5), FIXED, {}, {}, ALL_CONSENT, None, 3)
    with pytest.raises(ValueError, match="got nan"):
        arbitrate(cands(a=float("nan")), FIXED, {}, {}, ALL_CONSENT, None, 3)
    with pytest.raises(ValueError, match="'a' appears twice"):
        arbitrate([ActionCandidate("a", 0.1), ActionCandidate("a", 0.2)], FIXED, {}, {}, ALL_CONSENT, None, 3)
    with pytest.raises(ValueError, match="n must be at least 1"):
        arbitrate(cands(a=0.1), FIXED, {}, {}, ALL_CONSENT, None, 0)


def test_contact_ledger_stops_a_repeated_offer():
    p = policy(a={"value": 10, "contact": {"max_contacts": 1, "period_days": 7}}, b={"value": 1})
    ledger = ContactLedger(None, p)
    d = arbitrate(
        cands(a=0.5, b=0.5), p, {"customer_id": "C1"}, {"channel": "web"}, ALL_CONSENT, ledger, 1, now=NOW
    )
    assert d.chosen.action_id == "a"
    ledger.record_contact("C1", "a", "web", NOW)
    d = arbitrate(
        cands(a=0.5, b=0.5), p, {"customer_id": "C1"}, {"channel": "web"}, ALL_CONSENT, ledger, 1, now=NOW
    )
    assert d.chosen.action_id == "b"
    assert d.filtered[0].reason == "contact cap: 1 contacts with a on web in the last 7 days (max 1)"
    later = NOW + timedelta(days=8)
    d = arbitrate(
        cands(a=0.5, b=0.5), p, {"customer_id": "C1"}, {"channel": "web"}, ALL_CONSENT, ledger, 1, now=later
    )
    assert d.chosen.action_id == "a"


def test_default_policy_on_a_world_like_catalogue():
    p = attach_catalog(load_policy(), CATALOG)
    profile = {
        "customer_id": "C1",
        "age": 34,
        "monetary": 400.0,
        "frequency": 5,
        "value_tier": "high",
        "lifecycle": "active",
        "journey_phase": "orientation",
        "churn_risk_flag": False,
        "preferred_sport": "cycling",
        "bought_brand": ["Apex"],
        "bought_sport": [],
    }
    c = cands(
        discount_apex=0.30,
        discount_zenith=0.10,
        bundle_cycling=0.05,
        free_shipping=0.08,
        retention_call=0.5,
        newsletter=0.2,
        no_action=0.02,
    )
    d = arbitrate(c, p, profile, {"channel": "web"}, ALL_CONSENT, ContactLedger(None, p), 3, now=NOW)
    # basket 400 / 5 = 80. discount_zenith: 0.10 × (0.40 − 0.20) × 80 = 1.6; free_shipping: 0.08 × (0.4 × 80 −
    # 4.95) = 2.164; bundle_cycling: 0.05 × 25 = 1.25; newsletter: 0.2 × 1.5 = 0.3; no_action 0.02 × 32 = 0.64.
    assert [(a.action_id, round(a.score, 4)) for a in d.actions] == [
        ("free_shipping", 2.164),
        ("discount_zenith", 1.6),
        ("bundle_cycling", 1.25),
    ]
    reasons = {a.action_id: a.reason for a in d.filtered}
    assert reasons["discount_apex"].startswith("applicability rule not_owned")
    assert reasons["retention_call"].startswith("suitability rule at_risk (churn_risk_flag == true) failed")
    assert reasons["newsletter"] == "scores 0.3, below no action (0.64)"
    assert reasons["no_action"] == "ranked below the top 3"


def test_bought_attributes():
    items = pl.DataFrame(
        {
            "item_id": ["I1", "I2", "I3", "I4"],
            "brand": ["Apex", "Zenith", "Apex", None],
            "sport": ["running", "cycling", "cycling", "running"],
        }
    )
    assert bought_attributes(["I3", "I1", "I4", "I9"], items) == {
        "bought_brand": ["Apex"],
        "bought_sport": ["cycling", "running"],
    }
    assert bought_attributes([], items, ["brand", "colour"]) == {"bought_brand": [], "bought_colour": []}
    assert bought_attributes(["I2"], items, ["colour"]) == {"bought_colour": []}


# --- champion / challenger -----------------------------------------------------------------------------------


def test_arm_shares_are_respected():
    customers = [f"C{i:07d}" for i in range(10_000)]
    for share in (0.0, 0.1, 0.5):
        n = sum(assign_arm(c, share, salt="exp-1") == "challenger" for c in customers)
        # Binomial sd at 10k is at most 50; 4 sd of tolerance.
        assert abs(n - share * 10_000) <= 200, (share, n)
    assert all(assign_arm(c, 1.0) == "challenger" for c in customers[:100])
    # A different salt draws a different split of the same customers.
    a = {c for c in customers if assign_arm(c, 0.5, salt="a") == "challenger"}
    b = {c for c in customers if assign_arm(c, 0.5, salt="b") == "challenger"}
    assert 0.4 < len(a & b) / len(a) < 0.6


def test_arms_are_stable_across_processes_and_nested_in_share():
    customers = [f"C{i}" for i in range(200)]
    here = [assign_arm(c, 0.3, salt="s") for c in customers]
    code = (
        "from nextbest.serving.arms import assign_arm;"
        f"print(','.join(assign_arm(c, 0.3, salt='s') for c in {customers!r}))"
    )
    # PYTHONHASHSEED differs from this process: a hash()-based split would move customers.
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().split(",") == here
    # A known value pins the hash itself: SHA-256 of salt, unit separator, id; first 8 bytes / 2**64.
    digest = hashlib.sha256(b"\x1fC0000001").digest()
    assert arm_position("C0000001") == int.from_bytes(digest[:8], "big") / 2**64 == pytest.approx(0.925697)
    # Raising the share only moves champions to the challenger, never back.
    small = {c for c in customers if assign_arm(c, 0.1) == "challenger"}
    large = {c for c in customers if assign_arm(c, 0.3) == "challenger"}
    assert small <= large


def test_arm_share_is_validated():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="challenger_share must be in \\[0, 1\\]"):
            assign_arm("C1", bad)


def test_policy_actions_without_a_model_propensity_use_their_default():
    p = policy(a={"value": 10}, fresh={"value": 10, "default_propensity": 0.3}, stale={"value": 100})
    d = arbitrate(cands(a=0.1), p, {}, {}, ALL_CONSENT, None, 3)
    # fresh: 0.3 × 10 = 3 (policy default P); a: 0.1 × 10 = 1; stale has no P at all and is not considered.
    assert [(a.action_id, a.propensity) for a in d.actions] == [("fresh", 0.3), ("a", 0.1)]
    assert d.filtered == []
