"""The BentoML service over HTTP: a real ``bentoml serve`` on loopback, called with httpx.

The session's trained world (``trained_world`` in conftest: a small world, its features, a recommender and a
propensity model with tiny settings in a temporary MLflow registry, both promoted to champion) is copied, and a
module fixture starts the server on the copy in its own process group. The durability test starts a server of its
own on another copy, kills it with SIGKILL and restarts it on the same state directory, so no test depends on
another's order.
"""

from __future__ import annotations

import json

import httpx
import polars as pl
import pytest

from nextbest.features.privacy import ERASURE_LOG, erasure_key, id_digest
from nextbest.serving.engine import EngineLoadError
from nextbest.serving.server import start
from tests.conftest import RunningService, stored_state

pytestmark = [
    pytest.mark.slow,  # a real bentoml serve
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # BentoML 1.4 and its dependency pathspec warn about APIs they use themselves, on import.
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

TOKEN = "http-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
NOW = {"now": "2026-04-30T12:00:00"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_world) -> RunningService:
    s = RunningService.on_copy(trained_world, tmp_path_factory.mktemp("served"), admin_token=TOKEN).start()
    yield s
    s.stop()


def consent(served: RunningService) -> pl.DataFrame:
    return pl.read_parquet(served.ds.features_dir / "consent_state.parquet")


def known_customers(served: RunningService, k: int) -> list[str]:
    """Customers with every consent and a profile (the model was fitted on them)."""
    state = consent(served).filter(pl.col("personalisation") & pl.col("profiling") & pl.col("marketing"))
    profiled = set(pl.read_parquet(served.ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    return [c for c in sorted(state["customer_id"].to_list()) if c in profiled][:k]


def items(served: RunningService) -> pl.DataFrame:
    return served.ds.read("items")


# --- contracts ------------------------------------------------------------------------------------------------


def test_recommend_contract(served):
    c = known_customers(served, 1)[0]
    r = served.post("/recommend", {"customer_id": c, "n": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"customer_id", "items", "personalised", "basis", "note", "model_version", "arm"}
    assert body["customer_id"] == c and body["personalised"] and body["basis"] == "model"
    assert body["model_version"] == "nextbest-recommender/1" and body["arm"] == "champion"
    assert len(body["items"]) == 7
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(
        isinstance(i["reasons"], list) and all(isinstance(x, str) for x in i["reasons"])
        for i in body["items"]
    )
    assert any(i["reasons"] for i in body["items"])
    bought = set(served.post("/profile", {"customer_id": c}, headers=ADMIN).json()["purchases"])
    assert not bought & {i["item_id"] for i in body["items"]}
    colour = dict(zip(items(served)["item_id"], items(served)["colour"], strict=True))
    white = served.post(
        "/recommend", {"customer_id": c, "n": 5, "filters": {"include": {"colour": ["white"]}}}
    )
    assert white.status_code == 200 and all(colour[i["item_id"]] == "white" for i in white.json()["items"])


def test_similar_items_contract(served):
    item = items(served)["item_id"][0]
    r = served.post("/similar_items", {"item_id": item, "n": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["item_id"] == item and body["basis"] == "model" and len(body["items"]) == 4
    assert item not in [i["item_id"] for i in body["items"]]
    missing = served.post("/similar_items", {"item_id": "NO-SUCH-ITEM"})
    assert missing.status_code == 404 and "NO-SUCH-ITEM" in missing.json()["error"]


def test_propensity_contract(served):
    c = known_customers(served, 1)[0]
    asked = ["newsletter", "free_shipping", "retention_call"]
    r = served.post("/propensity", {"customer_id": c, "action_ids": asked, "channel": "web", "context": NOW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["action_id"] for p in body["propensities"]] == asked
    assert all(0.0 <= p["propensity"] <= 1.0 for p in body["propensities"])
    assert body["personalised"] and body["model_version"] == "nextbest-propensity/1"
    everything = served.post("/propensity", {"customer_id": c}).json()["propensities"]
    assert len(everything) >= 10
    bad = served.post("/propensity", {"customer_id": c, "action_ids": ["newsletter", "teleport"]})
    assert bad.status_code == 400 and "teleport" in bad.json()["error"]


def test_next_best_action_contract(served):
    c = known_customers(served, 2)[1]
    r = served.post(
        "/next_best_action", {"customer_id": c, "channel": "web", "n": 3, "context": NOW, "explain": True}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["actions"], "no action is still an answer"
    for rank, a in enumerate(body["actions"], start=1):
        assert a["rank"] == rank and a["reason"] is None
        assert a["score"] == pytest.approx(a["propensity"] * a["value"] * a["lever"])
        assert isinstance(a["rules_passed"], list)
    assert body["no_action"] == (body["actions"][0]["kind"] == "none")
    assert all(a["reason"] for a in body["filtered"])
    assert body["model_versions"] == {
        "recommender": "nextbest-recommender/1",
        "propensity": "nextbest-propensity/1",
    }
    decisions = stored_state(served.state)["decisions"].splitlines()
    assert json.loads(decisions[-1])["decision_id"] == body["decision_id"]


def test_builtin_endpoints_and_openapi(served):
    for path in ("/livez", "/readyz", "/healthz"):
        assert httpx.get(f"{served.url}{path}").status_code == 200
    assert "bentoml_service" in httpx.get(f"{served.url}/metrics").text
    spec = httpx.get(f"{served.url}/docs.json").json()
    for route in ("/recommend", "/similar_items", "/propensity", "/next_best_action", "/events", "/profile"):
        assert route in spec["paths"]


# --- behaviour --------------------------------------------------------------------------------------------------


def test_a_view_event_changes_the_next_recommendation(served):
    sport = dict(zip(items(served)["item_id"], items(served)["sport"], strict=True))
    c = known_customers(served, 3)[2]
    before = [i["item_id"] for i in served.post("/recommend", {"customer_id": c}).json()["items"]]
    profile = served.post("/profile", {"customer_id": c}, headers=ADMIN).json()["profile"]
    other = next(s for s in ("football", "swimming", "tennis", "yoga") if s != profile["preferred_sport"])
    picks = [i for i, s in sport.items() if s == other][:5]
    r = served.post(
        "/events", {"events": [{"customer_id": c, "item_id": i, "event_type": "view"} for i in picks]}
    )
    assert r.status_code == 200
    assert r.json() == {"accepted": 5, "responses": 0, "duplicates": 0, "customers": [c]}
    after = served.post("/recommend", {"customer_id": c}).json()
    assert [i["item_id"] for i in after["items"]] != before
    assert sum(sport[i["item_id"]] == other for i in after["items"]) > sum(sport[i] == other for i in before)
    assert served.post("/profile", {"customer_id": c}, headers=ADMIN).json()["live_profile"]
    # A newcomer's session alone steers their list.
    newcomer = "N-http-session"
    cold = served.post("/recommend", {"customer_id": newcomer}).json()
    assert not cold["personalised"] and "nothing known" in cold["note"]
    served.post(
        "/events",
        {"events": [{"customer_id": newcomer, "item_id": i, "event_type": "view"} for i in picks[:3]]},
    )
    warm = served.post("/recommend", {"customer_id": newcomer}).json()
    assert warm["personalised"] and warm["basis"] == "session"
    assert sum(sport[i["item_id"]] == other for i in warm["items"]) >= 4  # chance: about one in eight


def test_consent_fallbacks(served):
    state = consent(served)
    declined = sorted(state.filter(~pl.col("personalisation"))["customer_id"].to_list())[0]
    r = served.post("/recommend", {"customer_id": declined, "n": 5}).json()
    assert not r["personalised"] and r["basis"] in ("segment_popularity", "popularity")
    assert "no consent to personalisation" in r["note"]
    assert all(i["reasons"] and i["reasons"][0].startswith("popular") for i in r["items"])
    assert not served.post("/propensity", {"customer_id": declined}).json()["personalised"]
    nba = served.post("/next_best_action", {"customer_id": declined, "channel": "web", "context": NOW}).json()
    assert not nba["personalised"]
    no_marketing = sorted(
        state.filter(~pl.col("marketing") & pl.col("personalisation"))["customer_id"].to_list()
    )
    for c in no_marketing[:3]:
        d = served.post(
            "/next_best_action",
            {
                "customer_id": c,
                "channel": "web",
                "n": 5,
                "context": NOW,
                "explain": True,
                "record_contact": False,
            },
        ).json()
        # Every action of the default policy but "no action" needs marketing consent.
        assert [a["kind"] for a in d["actions"]] == ["none"]
        assert any("no marketing consent" in a["reason"] for a in d["filtered"])


def test_cold_start_is_never_an_error(served):
    stranger = "never-seen-before-42"
    r = served.post("/recommend", {"customer_id": stranger, "n": 6})
    assert r.status_code == 200 and len(r.json()["items"]) == 6 and not r.json()["personalised"]
    assert r.json()["basis"] == "popularity"
    for path, body in (
        ("/propensity", {"customer_id": stranger, "channel": "app"}),
        ("/next_best_action", {"customer_id": stranger, "channel": "app"}),
        ("/similar_items", {"item_id": items(served)["item_id"][5], "customer_id": stranger}),
    ):
        assert served.post(path, body).status_code == 200, path
    p = served.post("/profile", {"customer_id": stranger}, headers=ADMIN).json()
    assert not p["known"] and p["events"] == [] and p["profile"] is None


def _offerable(served: RunningService, customer: str) -> str | None:
    d = served.post(
        "/next_best_action",
        {
            "customer_id": customer,
            "channel": "web",
            "n": 20,
            "context": NOW,
            "explain": True,
            "record_contact": False,
        },
    ).json()
    for a in d["actions"] + d["filtered"]:
        if a["kind"] in ("discount", "bundle") and (
            a["reason"] is None or a["reason"].startswith(("scores", "ranked"))
        ):
            return a["action_id"]
    return None


def test_contact_policy_suppresses_an_action_after_rejections(served):
    customer, action = next(
        (c, a) for c in known_customers(served, 60)[5:] if (a := _offerable(served, c)) is not None
    )
    rejections = [
        {
            "customer_id": customer,
            "action_id": action,
            "accepted": False,
            "timestamp": f"2026-04-30T1{k}:00:00",
        }
        for k in range(3)
    ]
    r = served.post("/events", {"responses": rejections[:2]})
    assert r.status_code == 200 and r.json()["responses"] == 2
    assert _offerable(served, customer) == action  # two rejections are within the policy
    served.post("/events", {"responses": rejections[2:]})
    d = served.post(
        "/next_best_action",
        {
            "customer_id": customer,
            "channel": "web",
            "n": 20,
            "context": {"now": "2026-04-30T14:00:00"},
            "explain": True,
            "record_contact": False,
        },
    ).json()
    assert action not in [a["action_id"] for a in d["actions"]]
    reason = next(a["reason"] for a in d["filtered"] if a["action_id"] == action)
    assert "suppressed until" in reason and "after 3 rejections" in reason
    contacts = served.post("/profile", {"customer_id": customer}, headers=ADMIN).json()["contacts"]
    assert [c["accepted"] for c in contacts if c["action_id"] == action] == [False, False, False]


def test_admin_levers(served):
    assert served.post("/levers", {}).status_code == 401
    assert served.post("/levers", {}, headers={"Authorization": "Bearer nope"}).status_code == 401
    read = served.post("/levers", {}, headers=ADMIN)
    assert read.status_code == 200 and read.json()["levers"]["newsletter"] == 1.0
    changed = served.post(
        "/levers", {"action_id": "newsletter", "lever": 4.0, "actor": "tests"}, headers=ADMIN
    )
    assert changed.status_code == 200 and changed.json()["changed"]["new"] == 4.0
    c = known_customers(served, 8)[7]
    d = served.post(
        "/next_best_action",
        {
            "customer_id": c,
            "channel": "web",
            "n": 20,
            "context": NOW,
            "explain": True,
            "record_contact": False,
        },
    ).json()
    newsletter = next(a for a in d["actions"] + d["filtered"] if a["action_id"] == "newsletter")
    assert newsletter["lever"] == 4.0
    bad = served.post("/levers", {"action_id": "teleport", "lever": 2.0}, headers=ADMIN)
    assert bad.status_code == 400 and "teleport" in bad.json()["error"]
    assert served.post("/levers", {"action_id": "newsletter"}, headers=ADMIN).status_code == 400
    served.post("/levers", {"action_id": "newsletter", "lever": 1.0, "actor": "tests"}, headers=ADMIN)


def test_erasure_leaves_no_trace(served):
    c = known_customers(served, 12)[11]
    item = items(served)["item_id"][7]
    served.post("/events", {"events": [{"customer_id": c, "item_id": item, "event_type": "add_to_cart"}]})
    served.post("/next_best_action", {"customer_id": c, "channel": "web", "context": NOW})
    served.post("/events", {"responses": [{"customer_id": c, "action_id": "newsletter", "accepted": False}]})
    assert c in stored_state(served.state)["events"]
    assert served.post("/forget", {"customer_id": c}).status_code == 401
    r = served.post("/forget", {"customer_id": c}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["live_state"] and body["events_removed"] == 1 and body["decisions_removed"] >= 1
    assert body["contacts_removed"] >= 1
    p = served.post("/profile", {"customer_id": c}, headers=ADMIN).json()
    assert not p["known"] and p["profile"] is None and p["demographics"] is None
    for key in ("events", "live_events", "contacts", "decisions", "interactions", "purchases"):
        assert p[key] == [], key
    assert not served.post("/recommend", {"customer_id": c}).json()["personalised"]
    for table, held in stored_state(served.state).items():
        assert c not in held, table
    erasures = (served.ds.root / ERASURE_LOG).read_text()
    assert id_digest(c, erasure_key()) in erasures and c not in erasures


def test_bad_inputs_get_4xx_naming_the_field(served):
    c = known_customers(served, 1)[0]
    cases = [
        ("/recommend", {"customer_id": c, "n": "many"}, 400, "n"),
        ("/recommend", {"customer_id": c, "n": 101}, 400, "n"),
        ("/recommend", {"customer_id": 42}, 400, "customer_id"),
        ("/recommend", {"customer_id": c, "colour": "red"}, 400, "colour"),
        ("/recommend", {}, 400, "customer_id"),
        ("/recommend", {"customer_id": "x" * 129}, 400, "customer_id"),
        ("/recommend", {"customer_id": c, "filters": {"include": {"flavour": "salty"}}}, 400, "flavour"),
        ("/recommend", {"customer_id": c, "filters": {"include": {"item_id": "NO-SUCH"}}}, 400, "NO-SUCH"),
        ("/next_best_action", {"customer_id": c, "n": 0}, 400, "n"),
        ("/next_best_action", {"customer_id": c, "context": {"now": "yesterday"}}, 400, "context.now"),
        (
            "/events",
            {"events": [{"customer_id": c, "item_id": "I1", "event_type": "stare"}]},
            400,
            "events[0]",
        ),
        ("/events", {"events": [{"customer_id": c, "item_id": "I1"}]}, 400, "event_type"),
        ("/events", {}, 400, "at least one"),
        (
            "/events",
            {"responses": [{"customer_id": c, "action_id": "teleport", "accepted": True}]},
            400,
            "teleport",
        ),
    ]
    for path, body, status, word in cases:
        r = served.post(path, body)
        assert r.status_code == status, (path, body, r.text)
        assert word in r.text, (path, body, r.text)
    too_many = {"events": [{"customer_id": c, "item_id": "I00001", "event_type": "view"}] * 1001}
    r = served.post("/events", too_many)
    assert r.status_code == 400 and "events" in r.text
    huge = b'{"customer_id": "' + b"x" * (2 << 20) + b'"}'
    r = httpx.post(f"{served.url}/recommend", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]
    r = httpx.post(
        f"{served.url}/recommend", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "json" in r.text.lower()
    # Nothing of the refused batches was stored.
    assert "stare" not in stored_state(served.state)["events"]


# --- durability (a server of its own, killed and restarted) ---------------------------------------------------


def test_acknowledged_events_survive_sigkill(tmp_path, trained_world):
    served = RunningService.on_copy(trained_world, tmp_path, admin_token=TOKEN).start()
    try:
        acknowledged_events_survive_sigkill(served)
    finally:
        served.stop()


def acknowledged_events_survive_sigkill(served: RunningService) -> None:
    customers = known_customers(served, 20)[13:17]
    catalogue = items(served)["item_id"].to_list()
    sent: dict[str, list[tuple[str, str]]] = {c: [] for c in customers}
    for k in range(8):
        batch = [
            {
                "customer_id": c,
                "item_id": catalogue[(7 * k + j) % len(catalogue)],
                "event_type": ("view", "click", "add_to_cart", "purchase")[k % 4],
                "timestamp": f"2026-04-30T10:{k:02d}:{j:02d}",
            }
            for j, c in enumerate(customers)
        ]
        r = served.post("/events", {"events": batch})
        assert r.status_code == 200 and r.json()["accepted"] == len(batch)
        for e in batch:
            sent[e["customer_id"]].append((e["item_id"], e["event_type"]))
    before = {c: served.post("/recommend", {"customer_id": c}).json()["items"] for c in customers}
    served.server.kill()  # SIGKILL: no shutdown hook, no flush
    served.start()
    for c in customers:
        p = served.post("/profile", {"customer_id": c}, headers=ADMIN).json()
        assert [(e["item_id"], e["event_type"]) for e in p["live_events"]] == sent[c]
        assert p["live_profile"]
        bought = {i for i, t in sent[c] if t == "purchase"}
        assert bought <= set(p["purchases"])
        assert served.post("/recommend", {"customer_id": c}).json()["items"] == before[c]


# --- packaging and start-up -------------------------------------------------------------------------------------


def test_missing_models_are_one_line_saying_what_to_run(served, tmp_path):
    with pytest.raises(EngineLoadError, match=r"nextbest train cf --data") as e:
        start(served.ds.root, tracking_uri=f"sqlite:///{tmp_path}/empty/mlflow.db")
    assert "\n" not in str(e.value)
