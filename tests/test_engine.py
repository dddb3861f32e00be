"""The serving engine called directly: recommendations, fallbacks, decisions, live events, erasure and restarts.

The models are trained on a small generated world without MLflow (the registry path is covered by the HTTP
tests); the world's planted preferences give known answers (customers are recommended their own sport).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.privacy import ERASURE_LOG, erasure_key, id_digest
from nextbest.serving import api
from nextbest.serving.arms import CHALLENGER, CHAMPION, assign_arm
from nextbest.serving.engine import (
    PROPENSITY_MODEL,
    RECOMMENDER_MODEL,
    BadRequest,
    Engine,
    EngineConfig,
    EngineLoadError,
    Forbidden,
    NotFound,
    ServingData,
    Unauthorized,
    check_registry,
)
from tests.conftest import EngineWorld, stored_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOKEN = "engine-test-token"
NOW = {"now": "2026-04-30T12:00:00"}


@pytest.fixture(scope="module")
def trained(engine_world: EngineWorld) -> EngineWorld:
    return engine_world


def make_engine(
    trained: EngineWorld, state: Path, *, data: Path | None = None, challenger: bool = False, **cfg
):
    cfg.setdefault("admin_token", TOKEN)
    return Engine(
        EngineConfig(data=data or trained.ds.root, state_dir=state, **cfg),
        trained.models(challenger=challenger),
    )


@pytest.fixture
def engine(trained, tmp_path) -> Iterator[Engine]:
    """A fresh engine per test (its own state directory): tests that post events or record contacts change
    nothing another test sees."""
    engine = make_engine(trained, tmp_path / "state")
    yield engine
    engine.close()


def consenting_known(engine: Engine, k: int) -> list[str]:
    slot = engine.recommenders[CHAMPION]
    out = []
    for c in slot.registered.model.history.customers.ids:
        consent = engine.consent(c)
        if slot.customer_row(c) >= 0 and all(consent.values()) and engine.data.features.get(c):
            out.append(c)
    return out[:k]


def sport_of(engine: Engine) -> dict[str, str]:
    items = engine.data.items
    return dict(zip(items["item_id"], items["sport"], strict=True))


def views(customer: str, items: list[str], event_type: str = "view") -> api.EventsRequest:
    return api.EventsRequest(
        events=[api.EventIn(customer_id=customer, item_id=i, event_type=event_type) for i in items]
    )


# --- recommendations ------------------------------------------------------------------------------------------


def test_known_customers_get_their_planted_sport_with_truthful_reasons(engine, trained):
    truth = pl.read_parquet(trained.ds.truth_dir / "preferences.parquet")
    preferred = dict(zip(truth["customer_id"], truth["sport"], strict=True))
    sport = sport_of(engine)
    hits = total = 0
    for c in consenting_known(engine, 25):
        r = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
        assert r.personalised and r.basis == "model" and r.arm == CHAMPION
        assert r.model_version == f"{RECOMMENDER_MODEL}/1"
        ids = [i.item_id for i in r.items]
        assert len(ids) == 10 == len(set(ids))
        scores = [i.score for i in r.items]
        assert scores == sorted(scores, reverse=True)
        bought = set(engine.profile(api.CustomerRequest(customer_id=c)).purchases)
        assert not bought & set(ids)  # exclude_purchased is the default
        profile = engine.data.features.get(c)
        for item in r.items:
            for reason in item.reasons:
                if reason.startswith("matches your preferred sport: "):
                    value = reason.removeprefix("matches your preferred sport: ")
                    assert value == sport[item.item_id] == profile["preferred_sport"]
        hits += sum(sport[i] == preferred[c] for i in ids)
        total += len(ids)
    # Eight sports: by chance an eighth of the items would be the customer's planted sport.
    assert hits / total > 0.4


def test_recommendation_reasons_are_one_rule_offline_and_online(engine):
    """The service's reasons (``/recommend``) and the batch form a notebook or report calls
    (``explain.recommendation_reasons`` over the customer's dataset events, their profile and the model's raw item
    factors) agree for the same customers, item by item."""
    from nextbest.serving.explain import recommendation_reasons
    from nextbest.serving.serving_data import EVENT_RANK, RANK_EVENT

    slot = engine.recommenders[CHAMPION]
    vocab = slot.registered.model.history.items
    similar = 0
    customers = consenting_known(engine, 8)  # a fresh engine: none has live events
    assert len(customers) == 8
    for c in customers:
        answer = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
        strongest = (
            engine.data.customer_events(c)
            .group_by("item_id")
            .agg(pl.col("event_type").replace_strict(EVENT_RANK, default=1).max().alias("rank"))
        )
        history = {vocab.index(i): RANK_EVENT[k] for i, k in strongest.iter_rows() if i in vocab}
        ids = vocab.indices([i.item_id for i in answer.items]).tolist()
        offline = recommendation_reasons(
            engine.data.features.get(c), ids, history, slot.items, item_factors=slot.item_factors
        )
        assert [i.reasons for i in answer.items] == offline, c
        similar += sum(any(r.startswith("similar to ") for r in reasons) for reasons in offline)
    assert similar > 0  # the history evidence was compared, not only the preferences


def test_a_session_of_views_steers_a_newcomer_and_a_known_customer(engine):
    sport = sport_of(engine)
    cycling = [i for i, s in sport.items() if s == "cycling"]
    newcomer = "N-session-1"
    before = engine.recommend(api.RecommendRequest(customer_id=newcomer, n=10))
    assert not before.personalised and before.basis in ("popularity", "segment_popularity")
    assert "nothing known" in before.note
    engine.events(views(newcomer, cycling[:3]))
    after = engine.recommend(api.RecommendRequest(customer_id=newcomer, n=10))
    assert after.personalised and after.basis == "session"
    # One sport in eight: by chance a list of ten would hold one or two cycling items.
    assert Counter(sport[i.item_id] for i in after.items)["cycling"] >= 4
    assert any(r.startswith("similar to ") for i in after.items for r in i.reasons)

    moved = 0
    for c in consenting_known(engine, 6)[1:]:
        favourite = engine.data.features.get(c)["preferred_sport"]
        other = next(s for s in ("football", "swimming", "tennis") if s != favourite)
        first = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
        n_events = engine.profile(api.CustomerRequest(customer_id=c)).profile["n_events"]
        picks = [i for i, s in sport.items() if s == other][:6]
        engine.events(views(c, picks))
        second = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
        assert [i.item_id for i in second.items] != [i.item_id for i in first.items]
        moved += sum(sport[i.item_id] == other for i in second.items) - sum(
            sport[i.item_id] == other for i in first.items
        )
        profile = engine.profile(api.CustomerRequest(customer_id=c))
        assert profile.live_profile and profile.profile["n_events"] == n_events + 6
    assert moved > 0


def test_filters_restrict_and_unknown_filters_are_refused(engine):
    c = consenting_known(engine, 1)[0]
    colour = dict(zip(engine.data.items["item_id"], engine.data.items["colour"], strict=True))
    white = engine.recommend(
        api.RecommendRequest(customer_id=c, n=5, filters={"include": {"colour": "white"}, "exclude": {}})
    )
    assert white.items and all(colour[i.item_id] == "white" for i in white.items)
    for filters, words in (
        ({"include": {"hue": "white"}}, "hue"),
        ({"include": {"colour": "whte"}}, "whte"),
        ({"exclude": {"item_id": ["NOPE"]}}, "NOPE"),
    ):
        with pytest.raises(BadRequest, match=words):
            engine.recommend(api.RecommendRequest(customer_id=c, filters=filters))


def test_similar_items_share_attributes_and_unknown_items_are_404(engine):
    item = engine.data.items["item_id"][0]
    r = engine.similar_items(api.SimilarItemsRequest(item_id=item, n=5))
    assert r.basis == "model" and len(r.items) == 5 and item not in [i.item_id for i in r.items]
    target = engine.data.item_attributes.item(item)
    for i in r.items:
        other = engine.data.item_attributes.item(i.item_id)
        for reason in i.reasons:
            attribute, value = reason.removeprefix("same ").split(": ")
            assert other[attribute] == target[attribute] == value
    with pytest.raises(NotFound, match="NOPE"):
        engine.similar_items(api.SimilarItemsRequest(item_id="NOPE"))


# --- consent ------------------------------------------------------------------------------------------------


def customers_with(trained: EngineWorld, **consent: bool) -> list[str]:
    state = pl.read_parquet(trained.ds.features_dir / "consent_state.parquet")
    for purpose, granted in consent.items():
        state = state.filter(pl.col(purpose) == granted)
    return sorted(state["customer_id"].to_list())


def test_without_personalisation_consent_answers_are_segment_level(engine, trained):
    c = next(
        c
        for c in customers_with(trained, personalisation=False, profiling=True)
        if engine.data.features.get(c)
    )
    r = engine.recommend(api.RecommendRequest(customer_id=c, n=5))
    assert (
        not r.personalised and r.basis == "segment_popularity" and "no consent to personalisation" in r.note
    )
    band = engine.data.features.get(c)["age_band"]
    popularity = engine.data.segment_popularity[band]
    expected = sorted(range(len(popularity)), key=lambda i: (-popularity[i], i))[:5]
    assert [i.item_id for i in r.items] == [engine.data.item_vocab.ids[i] for i in expected]
    p = engine.propensity(api.PropensityRequest(customer_id=c, channel="web", context=NOW))
    assert not p.personalised
    segment_only = engine.propensities[CHAMPION].scorer.score(
        {"age_band": band, "region": engine.data.features.get(c)["region"]},
        None,
        "web",
        now=datetime.fromisoformat(NOW["now"]),
    )
    assert {a.action_id: a.propensity for a in p.propensities} == pytest.approx(segment_only)


def test_without_marketing_consent_no_marketing_action_is_offered(engine, trained):
    policy = engine.policy
    for c in customers_with(trained, marketing=False, personalisation=True)[:5]:
        d = engine.next_best_action(
            api.NextBestActionRequest(customer_id=c, channel="web", n=5, context=NOW, explain=True)
        )

        def marketing(action_id: str) -> bool:
            rule = policy.actions[action_id]
            return bool(rule.marketing) and not rule.is_no_action

        assert not any(marketing(a.action_id) for a in d.actions)
        refused = [a for a in d.filtered if marketing(a.action_id)]
        assert refused and all("no marketing consent" in a.reason for a in refused)


# --- decisions and the contact policy ---------------------------------------------------------------------------


def _offerable(engine: Engine, customer: str) -> str | None:
    """A marketing action whose rules all pass for the customer (possibly scored below no action)."""
    d = engine.next_best_action(
        api.NextBestActionRequest(
            customer_id=customer, channel="web", n=20, context=NOW, explain=True, record_contact=False
        )
    )
    for a in [*d.actions, *d.filtered]:
        rule = engine.policy.actions[a.action_id]
        if rule.is_no_action or not rule.marketing or rule.channels is None or "web" not in rule.channels:
            continue
        if a.reason is None or a.reason.startswith(("scores ", "ranked below")):
            return a.action_id
    return None


def test_decisions_score_p_v_l_log_contacts_and_respect_the_contact_cap(trained, tmp_path):
    engine = make_engine(trained, tmp_path / "state")
    customer, action = next(
        (c, a) for c in customers_with(trained, marketing=True) if (a := _offerable(engine, c)) is not None
    )
    engine.levers_request(api.LeversRequest(action_id=action, lever=1000.0, actor="test"), f"Bearer {TOKEN}")
    request = api.NextBestActionRequest(customer_id=customer, channel="web", n=3, context=NOW)
    first = engine.next_best_action(request)
    assert first.actions[0].action_id == action and first.contact_recorded and not first.no_action
    for rank, a in enumerate(first.actions, start=1):
        assert a.rank == rank and a.score == pytest.approx(a.propensity * a.value * a.lever)
    assert first.actions[0].lever == 1000.0
    logged = engine.store.all_decisions()
    assert logged[-1]["decision_id"] == first.decision_id and logged[-1]["chosen"] == action
    assert logged[-1]["model_versions"]["propensity"] == f"{PROPENSITY_MODEL}/1"
    # The policy allows two contacts with an action per channel and week: the third decision must pass it by.
    engine.next_best_action(request)
    third = engine.next_best_action(request.model_copy(update={"explain": True}))
    assert action not in [a.action_id for a in third.actions]
    capped = next(a for a in third.filtered if a.action_id == action)
    assert "contact cap: 2 contacts" in capped.reason
    contacts = [e for e in engine.ledger.entries(customer) if e.type == "contact"]
    assert [e.action_id for e in contacts] == [action, action]


def test_rejections_suppress_an_action(trained, tmp_path):
    engine = make_engine(trained, tmp_path / "state")
    customer, action = next(
        (c, a) for c in customers_with(trained, marketing=True) if (a := _offerable(engine, c)) is not None
    )
    at = datetime.fromisoformat(NOW["now"]) - timedelta(hours=1)
    responses = [
        api.OfferResponseIn(
            customer_id=customer, action_id=action, accepted=False, timestamp=at + timedelta(minutes=k)
        )
        for k in range(3)
    ]
    result = engine.events(api.EventsRequest(responses=responses))
    assert result.responses == 3 and result.customers == [customer]
    d = engine.next_best_action(
        api.NextBestActionRequest(customer_id=customer, channel="web", n=20, context=NOW, explain=True)
    )
    suppressed = next(a for a in d.filtered if a.action_id == action)
    assert "suppressed until" in suppressed.reason and "after 3 rejections" in suppressed.reason
    with pytest.raises(BadRequest, match=r"responses\[0\]\.action_id"):
        engine.events(
            api.EventsRequest(
                responses=[api.OfferResponseIn(customer_id=customer, action_id="NOPE", accepted=True)]
            )
        )


# --- admin ------------------------------------------------------------------------------------------------


def test_admin_endpoints_need_the_token_and_are_off_without_one(trained, tmp_path):
    engine = make_engine(trained, tmp_path / "state")
    with pytest.raises(Unauthorized):
        engine.levers_request(api.LeversRequest(), None)
    with pytest.raises(Unauthorized):
        engine.forget(api.CustomerRequest(customer_id="C0000001"), "Bearer wrong")
    with pytest.raises(BadRequest, match="NOPE"):
        engine.levers_request(api.LeversRequest(action_id="NOPE", lever=2.0), f"Bearer {TOKEN}")
    changed = engine.levers_request(
        api.LeversRequest(action_id="newsletter", lever=2.5, actor="ops"), f"Bearer {TOKEN}"
    )
    assert changed.levers["newsletter"] == 2.5 and changed.changed.actor == "ops"
    # Persisted: a restart keeps the lever and its history.
    again = make_engine(trained, tmp_path / "state")
    read = again.levers_request(api.LeversRequest(), f"bearer {TOKEN}")
    assert read.levers["newsletter"] == 2.5 and [h.new for h in read.history] == [2.5]
    off = make_engine(trained, tmp_path / "other", admin_token=None)
    with pytest.raises(Forbidden, match="disabled"):
        off.levers_request(api.LeversRequest(), f"Bearer {TOKEN}")


# --- live state, erasure, restarts ---------------------------------------------------------------------------


def test_invalid_events_are_refused_whole(engine):
    before = stored_state(engine.config.state_path)
    with pytest.raises(BadRequest, match=r"events\[1\]: event_type 'viewed'"):
        engine.events(
            api.EventsRequest(
                events=[
                    api.EventIn(customer_id="C0000001", item_id="I00001", event_type="view"),
                    api.EventIn(customer_id="C0000001", item_id="I00002", event_type="viewed"),
                ]
            )
        )
    assert stored_state(engine.config.state_path) == before


def test_erasure_leaves_no_trace_and_survives_a_restart(trained, tmp_path):
    data = tmp_path / "world"
    shutil.copytree(trained.ds.root, data)
    state = tmp_path / "state"
    engine = make_engine(trained, state, data=data)
    gone, kept = consenting_known(engine, 2)
    item = engine.data.items["item_id"][3]
    for c in (gone, kept):
        engine.events(views(c, [item]))
        engine.next_best_action(api.NextBestActionRequest(customer_id=c, channel="web", context=NOW))
    engine.events(
        api.EventsRequest(
            responses=[api.OfferResponseIn(customer_id=gone, action_id="newsletter", accepted=False)]
        )
    )
    with pytest.raises(Unauthorized):
        engine.forget(api.CustomerRequest(customer_id=gone), None)
    result = engine.forget(api.CustomerRequest(customer_id=gone), f"Bearer {TOKEN}")
    assert result.live_state and result.events_removed == 1
    assert result.decisions_removed >= 1 and result.contacts_removed >= 1

    def no_trace(e: Engine) -> None:
        p = e.profile(api.CustomerRequest(customer_id=gone))
        assert not p.known and p.profile is None and p.demographics is None
        assert p.events == [] and p.live_events == [] and p.contacts == [] and p.decisions == []
        assert p.interactions == [] and p.purchases == []
        assert gone not in e.live_customers()
        r = e.recommend(api.RecommendRequest(customer_id=gone))
        assert not r.personalised
        held = stored_state(state)
        for table in ("events", "contacts", "decisions"):
            assert gone not in held[table], table
        assert kept in held["events"]

    no_trace(engine)
    logged = {json.loads(line)["hmac"] for line in (data / ERASURE_LOG).read_text().splitlines()}
    assert id_digest(gone, erasure_key()) in logged and gone not in (data / ERASURE_LOG).read_text()
    # Keyed: hashing candidate ids without the key finds nothing.
    assert hashlib.sha256(gone.encode()).hexdigest() not in logged
    assert engine.erasures.wait_idle(120)
    restarted = make_engine(trained, state, data=data)
    no_trace(restarted)
    assert kept in restarted.live_customers()


def test_erasure_is_one_rule_offline_and_online(trained, tmp_path):
    """The same customers erased offline (``nextbest forget``: ``features.privacy.forget`` on the dataset) and
    online (``/forget``: ``Engine.forget``) erase the same ids — the customer, every id linked to them and every
    ``<system>:<id>`` form (``features.privacy.erasure_ids``) — as the keyed digests each path logs show."""
    from nextbest.features.privacy import erasure_ids, forget

    offline, online = tmp_path / "offline", tmp_path / "online"
    shutil.copytree(trained.ds.root, offline)
    shutil.copytree(trained.ds.root, online)
    identities = trained.ds.scan("identities", required=False)
    engine = make_engine(trained, tmp_path / "state", data=online)
    try:
        linked = [c for c in consenting_known(engine, 200) if len(erasure_ids(identities, c)) > 1][:2]
        assert len(linked) == 2  # customers with cookies or e-mail ids linked to them
        for c in linked:
            forget(Dataset.at(offline), c)
            engine.forget(api.CustomerRequest(customer_id=c), f"Bearer {TOKEN}")
        assert engine.erasures.wait_idle(120)
    finally:
        engine.close()

    def logged(root: Path) -> set[str]:
        return {json.loads(line)["hmac"] for line in (root / ERASURE_LOG).read_text().splitlines()}

    key = erasure_key()
    expected = {id_digest(i, key) for c in linked for i in erasure_ids(identities, c)}
    assert logged(offline) == logged(online) == expected


def test_the_service_logs_keep_to_the_retention_window(trained, tmp_path):
    state = tmp_path / "state"
    engine = make_engine(trained, state)
    old, recent = consenting_known(engine, 2)
    start = engine.retention_start()
    assert start == min(engine.now(), engine.data.as_of) - timedelta(days=365)
    item = engine.data.items["item_id"][0]
    # Entries written before the window (a year-old log) and inside it.
    engine.event_log.append(
        [
            {
                "customer_id": old,
                "item_id": item,
                "event_type": "view",
                "timestamp": start - timedelta(days=3),
            },
            {
                "customer_id": recent,
                "item_id": item,
                "event_type": "view",
                "timestamp": start + timedelta(days=3),
            },
        ]
    )
    engine.ledger.record_contact(old, "newsletter", "email", start - timedelta(days=2))
    engine.ledger.record_contact(recent, "newsletter", "email", start + timedelta(days=2))
    for who, at in ((old, start - timedelta(days=1)), (recent, start + timedelta(days=1))):
        engine.next_best_action(
            api.NextBestActionRequest(customer_id=who, channel="web", context={"now": at.isoformat()})
        )
    assert engine.trim_logs() == {"events": 1, "contacts": 1, "decisions": 1, "responses": 0, "erasures": 0}
    held = stored_state(state)["events"]
    assert old not in held and recent in held
    assert [e.customer_id for e in engine.ledger.entries(recent)] == [recent]
    assert engine.ledger.entries(old) == []
    assert engine.decision_log.records_of(old) == [] and len(engine.decision_log.records_of(recent)) == 1
    assert engine.trim_logs() == {"events": 0, "contacts": 0, "decisions": 0, "responses": 0, "erasures": 0}


def test_events_outside_the_accepted_time_range_are_refused(engine):
    c = consenting_known(engine, 4)[3]
    item = engine.data.items["item_id"][1]
    too_late = engine.now() + timedelta(days=2)
    too_early = engine.retention_start() - timedelta(minutes=1)
    for at, words in ((too_late, "ahead of the service's clock"), (too_early, "before the retention window")):
        with pytest.raises(BadRequest, match=words):
            engine.events(
                api.EventsRequest(
                    events=[api.EventIn(customer_id=c, item_id=item, event_type="view", timestamp=at)]
                )
            )
    within = engine.now() + timedelta(hours=23)
    accepted = engine.events(
        api.EventsRequest(
            events=[api.EventIn(customer_id=c, item_id=item, event_type="view", timestamp=within)]
        )
    )
    assert accepted.accepted == 1


def test_a_restart_replays_the_event_log(trained, tmp_path):
    state = tmp_path / "state"
    engine = make_engine(trained, state)
    customer = consenting_known(engine, 3)[2]
    items = list(engine.data.items["item_id"][10:14])
    engine.events(views(customer, items[:2]))
    engine.events(views(customer, items[2:], event_type="add_to_cart"))
    before = engine.profile(api.CustomerRequest(customer_id=customer))
    ranking = engine.recommend(api.RecommendRequest(customer_id=customer))
    restarted = make_engine(trained, state)
    after = restarted.profile(api.CustomerRequest(customer_id=customer))
    assert after.live_events == before.live_events and len(after.live_events) == 4
    assert after.live_profile and after.interactions == before.interactions
    assert after.profile.keys() == before.profile.keys()
    for key, value in before.profile.items():
        # Sums of money may add up in another order (Polars aggregates in parallel).
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert after.profile[key] == expected, key
    assert restarted.recommend(api.RecommendRequest(customer_id=customer)) == ranking


# --- champion and challenger ---------------------------------------------------------------------------------


def test_a_stable_share_of_customers_gets_the_challenger(trained, tmp_path):
    engine = make_engine(trained, tmp_path / "state", challenger=True, challenger_share=0.5)
    ids = [f"C{k:07d}" for k in range(1, 201)]
    arms = {}
    for c in ids:
        r = engine.recommend(api.RecommendRequest(customer_id=c, n=3))
        assert r.arm == assign_arm(c, 0.5)
        assert r.model_version == f"{RECOMMENDER_MODEL}/{'2' if r.arm == CHALLENGER else '1'}"
        arms[c] = r.arm
    share = sum(a == CHALLENGER for a in arms.values()) / len(ids)
    assert 0.35 < share < 0.65
    assert all(engine.recommend(api.RecommendRequest(customer_id=c, n=3)).arm == arms[c] for c in ids[:20])
    d = engine.next_best_action(api.NextBestActionRequest(customer_id=ids[0], channel="web", context=NOW))
    assert d.arm == arms[ids[0]]


# --- start-up -------------------------------------------------------------------------------------------------


def test_start_up_problems_say_what_to_run(tmp_path, trained):
    config = EngineConfig(data=trained.ds.root, tracking_uri=f"sqlite:///{tmp_path}/none/mlflow.db")
    with pytest.raises(EngineLoadError, match="nextbest train cf --data"):
        check_registry(config)
    bare = Dataset.at(tmp_path / "bare")
    bare.ensure()
    with pytest.raises(EngineLoadError, match="nextbest features build"):
        ServingData.load(bare)
    with pytest.raises(EngineLoadError, match="NEXTBEST_CHALLENGER_SHARE"):
        EngineConfig.from_env({"NEXTBEST_DATA": "x", "NEXTBEST_CHALLENGER_SHARE": "2"})
    env = EngineConfig.from_env(
        {"NEXTBEST_DATA": "d", "NEXTBEST_ADMIN_TOKEN": "s3cret", "NEXTBEST_CLOCK": "data"}
    )
    assert env.admin_token == "s3cret" and env.clock == "data" and env.state_path == Path("d") / "service"
    assert "s3cret" not in env.model_dump_json() + repr(env)  # the token never leaves the process


def test_batched_answers_equal_single_ones_and_errors_stay_in_place(engine):
    customers = consenting_known(engine, 4)
    recs = [
        api.RecommendRequest(customer_id=customers[0], n=5),
        api.RecommendRequest(customer_id=customers[1], n=8, filters={"include": {"colour": "black"}}),
        api.RecommendRequest(customer_id=customers[2], filters={"include": {"colour": "plaid"}}),
        api.RecommendRequest(customer_id="N-batch-stranger", n=3),
        api.RecommendRequest(customer_id=customers[3], n=10),
    ]
    batched = engine.recommend_many(recs)
    assert isinstance(batched[2], BadRequest) and "plaid" in batched[2].message
    for request, answer in zip(recs, batched, strict=True):
        if request.customer_id != customers[2]:
            single = engine.recommend(request)
            # One matrix product for the batch may round the last bits of a score differently.
            assert answer.model_dump(exclude={"items"}) == single.model_dump(exclude={"items"})
            assert [(i.item_id, i.reasons) for i in answer.items] == [
                (i.item_id, i.reasons) for i in single.items
            ]
            assert [i.score for i in answer.items] == pytest.approx([i.score for i in single.items], rel=1e-5)
    decisions = [
        api.NextBestActionRequest(
            customer_id=c, channel=ch, n=4, context=NOW, record_contact=False, explain=True
        )
        for c, ch in zip(customers, ("web", "app", "email", "web"), strict=True)
    ]
    many = engine.next_best_action_many(
        [*decisions, api.NextBestActionRequest(customer_id="x", context={"now": "soon"})]
    )
    assert isinstance(many[-1], BadRequest) and "context.now" in many[-1].message
    for request, answer in zip(decisions, many[:-1], strict=True):
        single = engine.next_best_action(request)
        assert answer.model_dump(exclude={"decision_id", "actions", "filtered"}) == single.model_dump(
            exclude={"decision_id", "actions", "filtered"}
        )
        for mine, theirs in ((answer.actions, single.actions), (answer.filtered, single.filtered)):
            floats = {"propensity", "score"}
            assert [a.model_dump(exclude=floats) for a in mine] == [
                a.model_dump(exclude=floats) for a in theirs
            ]
            # One forward pass for the batch may round the last bits differently.
            assert [a.score for a in mine] == pytest.approx([a.score for a in theirs], rel=1e-5)
        scored = {a.action_id: a.propensity for a in [*answer.actions, *answer.filtered]}
        alone = engine.propensity(
            api.PropensityRequest(customer_id=request.customer_id, channel=request.channel, context=NOW)
        )
        assert scored == pytest.approx(
            {p.action_id: p.propensity for p in alone.propensities if p.action_id in scored}
        )


def test_served_propensity_reads_the_customer_action_affinity(engine):
    """The served probabilities are the model's with the affinities of the customer's own interactions (the
    same function as offline, on the item factors saved with the propensity model), not with them missing."""
    from nextbest.features.interactions import interaction_weights

    scorer = engine.propensities[CHAMPION].scorer
    assert scorer.affinity is not None and scorer.model.info["affinity"]["from"] == "fit"
    cid = consenting_known(engine, 60)[-1]  # a fresh engine: none has live events
    events = engine.data.customer_events(cid).lazy()
    weights = interaction_weights(events, engine.data.feature_config.interactions).collect()
    expected = scorer.affinities(dict(zip(weights["item_id"], weights["weight"], strict=True)))
    assert any(v == v for v in expected.values())  # some action has target items the customer relates to
    served = engine.propensity(api.PropensityRequest(customer_id=cid, channel="web", context=NOW))
    got = {p.action_id: p.propensity for p in served.propensities}
    features = engine.model_inputs(cid)
    now = datetime.fromisoformat(NOW["now"])
    with_affinity = scorer.score(features, list(got), "web", now=now, affinities=expected)
    without = scorer.score(features, list(got), "web", now=now)
    assert got == pytest.approx(with_affinity, abs=1e-6)
    assert max(abs(with_affinity[a] - without[a]) for a in got) > 1e-4


def test_training_rows_show_the_model_what_the_service_shows_it(engine, trained):
    """Offline (``model_view`` over training rows) and online (``Engine.model_inputs``) apply one consent rule:
    the same profile and customers table give the same model inputs, for every consent case and for a customer
    without events (known from the customers table only)."""
    from nextbest.features.privacy import consent_state
    from nextbest.training.propensity_data import model_view

    ds = trained.ds
    state = consent_state(ds.scan("consent")).collect()
    customers = ds.read("customers")
    schema = engine.data.features.frame.schema
    columns = [c for c in schema if c != "customer_id"] + ["cf_affinity"]
    cases = {
        "everything granted": consenting_known(engine, 1)[0],
        "personalisation declined": next(
            c
            for c in customers_with(trained, personalisation=False, profiling=True)
            if engine.data.features.get(c)
        ),
        "profiling declined": next(iter(customers_with(trained, personalisation=True, profiling=False))),
        "no events yet": next(
            c
            for c in customers["customer_id"].to_list()
            if c not in engine.data.features and engine.consent(c)["personalisation"]
        ),
    }
    for case, cid in cases.items():
        profile = (
            engine.data.features.get(cid)
            if state.filter(pl.col("customer_id") == cid)["profiling"].item() is not False
            else None
        )
        row = {c: (profile or {}).get(c) for c in columns if c != "cf_affinity"}
        table = pl.DataFrame(
            [{"customer_id": cid, **row, "cf_affinity": 0.5}],
            schema={"customer_id": pl.String, **{c: schema[c] for c in row}, "cf_affinity": pl.Float64},
        )
        offline = model_view(table, columns, customers, state, default=engine.data.consent_default).row(
            0, named=True
        )
        online = engine.model_inputs(cid)
        for c in columns:
            if c == "cf_affinity":
                expected = (
                    0.5 if all(engine.consent(cid)[p] for p in ("personalisation", "profiling")) else None
                )
                assert offline[c] == expected, (case, c)
                continue
            assert offline[c] == online.get(c), (case, c, offline[c], online.get(c))
        if case == "no events yet":
            assert offline["age"] is not None  # the point of the fill: a new customer still has an age


# --- paths that only a failure or a rare input takes ---------------------------------------------------------------


def test_an_item_the_model_never_saw_gets_neighbours_by_shared_attributes(engine):
    """``/similar_items`` for an item without a learned vector: the items sharing most of its category, sport,
    brand and colour, most shared first, each with the attributes it shares as reasons."""
    from nextbest.serving.ranking import SIMILAR_ATTRIBUTES

    slot = engine.recommenders[CHAMPION]
    unseen = [i for i in engine.data.items["item_id"] if slot.from_base[engine.data.item_vocab.get(i)] < 0]
    assert unseen  # the generated world has items nobody interacted with before the cut
    attrs = engine.data.item_attributes
    for item in unseen:
        target = attrs.item(item)

        def shared(other: str, target: dict = target) -> list[str]:
            o = attrs.item(other)
            return [a for a in SIMILAR_ATTRIBUTES if target.get(a) is not None and o.get(a) == target[a]]

        r = engine.similar_items(api.SimilarItemsRequest(item_id=item, n=8))
        assert r.basis == "attributes" and len(r.items) == 8
        listed = [i.item_id for i in r.items]
        assert item not in listed
        counts = [len(shared(i)) for i in listed]
        assert counts == sorted(counts, reverse=True)
        # No item left out shares more than the last one listed.
        others = [i for i in engine.data.items["item_id"] if i != item and i not in listed]
        assert max(len(shared(i)) for i in others) <= counts[-1]
        for i in r.items:  # at most three reasons, in the attributes' order
            assert i.reasons == [f"same {a}: {target[a]}" for a in shared(i.item_id)][:3]


def test_a_failed_fold_in_falls_back_to_the_stored_customer_vector(engine, monkeypatch):
    """When folding a customer's live events into the model fails, the answer is the model's ranking from the
    customer's stored vector (as before the events), not an error."""
    from nextbest.training.recommenders import RecommenderError

    slot = engine.recommenders[CHAMPION]
    assert slot.folds_in
    c = consenting_known(engine, 3)[2]
    before = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
    original = slot.model.recommend
    calls: list[bool] = []

    def flaky(*args, recalculate_user=False, **kwargs):
        calls.append(recalculate_user)
        if recalculate_user:
            raise RecommenderError("fold-in failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(slot.model, "recommend", flaky)
    engine.events(views(c, [i for i in engine.data.items["item_id"][:3]]))
    after = engine.recommend(api.RecommendRequest(customer_id=c, n=10))
    assert calls == [True, False]
    assert after.basis == "model" and after.personalised
    assert [(i.item_id, i.score) for i in after.items] == [(i.item_id, i.score) for i in before.items]


def test_events_and_recommendations_at_once_lose_nothing(engine):
    """Threads posting events while others ask for recommendations for the same customers: no request fails and
    every event counts in the customers' profiles."""
    import threading

    customers = consenting_known(engine, 4)
    items = engine.data.items["item_id"].to_list()
    start = {c: engine.profile(api.CustomerRequest(customer_id=c)).profile["n_events"] for c in customers}
    errors: list[BaseException] = []
    rounds = 15

    def post(c: str) -> None:
        try:
            for k in range(rounds):
                engine.events(views(c, [items[(k * 7) % len(items)]]))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    def ask(c: str) -> None:
        try:
            for _ in range(rounds):
                assert engine.recommend(api.RecommendRequest(customer_id=c, n=5)).items
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=f, args=(c,)) for c in customers for f in (post, ask)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for c in customers:
        assert engine.profile(api.CustomerRequest(customer_id=c)).profile["n_events"] == start[c] + rounds


def test_the_data_clock_runs_on_from_the_datasets_last_event(trained, tmp_path):
    """``clock="data"``: the service's now is the dataset's time running on since start (a replay of the
    dataset behaves as if it were live), so an event stamped with today's wall-clock time lies in its future."""
    from datetime import UTC

    wall = datetime.now(UTC).replace(tzinfo=None)
    data = make_engine(trained, tmp_path / "data-clock", clock="data")
    live = make_engine(trained, tmp_path / "wall-clock")
    try:
        as_of = data.data.as_of
        assert wall - as_of > timedelta(days=2)  # otherwise the two clocks could not be told apart
        assert timedelta(0) <= data.now() - as_of < timedelta(minutes=5)
        assert abs(live.now() - wall) < timedelta(minutes=5)
        c = consenting_known(data, 1)[0]
        item = data.data.items["item_id"][0]
        today = api.EventsRequest(
            events=[api.EventIn(customer_id=c, item_id=item, event_type="view", timestamp=wall)]
        )
        with pytest.raises(BadRequest, match="ahead"):
            data.events(today)
        assert live.events(today).accepted == 1
        # An event without a time is stamped with the data clock and accepted.
        assert data.events(views(c, [item])).accepted == 1
    finally:
        data.close()
        live.close()
