"""The service as an outside tester tries it: keys, content types, strict inputs, erasure of linked ids, crashes.

A real ``bentoml serve`` on loopback with both keys set (``NEXTBEST_APP_TOKEN`` and ``NEXTBEST_ADMIN_TOKEN``), on
a copy of the session's trained world. Every bad input has its own test: the expected 4xx, and nothing stored.
The suites that kill or restart a server start their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import psutil
import pytest

from nextbest.features.dataset import Dataset
from nextbest.features.privacy import ERASURE_LOG, erasure_key, id_digest
from nextbest.serving.engine import EngineLoadError
from nextbest.serving.server import ServiceProcess, check_start, free_port, start
from tests.conftest import RunningService, stored_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
]

APP_KEY = "app-key-for-the-tests"
ADMIN_KEY = "admin-key-for-the-tests"
APP = {"Authorization": f"Bearer {APP_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NOW = {"now": "2026-04-30T12:00:00"}


def stored(s: RunningService) -> dict[str, str]:
    """What the service's state store holds, as text (what a refused request must leave as it was)."""
    return stored_state(s.state)


def _hardened(tmp_path_factory, trained_world, name: str, state_url: str | None = None) -> RunningService:
    root = tmp_path_factory.mktemp(name)
    return RunningService.on_copy(
        trained_world, root, admin_token=ADMIN_KEY, app_token=APP_KEY, headers=APP, state_url=state_url
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_world) -> RunningService:
    s = _hardened(tmp_path_factory, trained_world, "hardened").start()
    yield s
    s.stop()


def customers(s: RunningService, k: int, skip: int = 0) -> list[str]:
    """Customers with every consent and a profile."""
    consent = pl.read_parquet(s.ds.features_dir / "consent_state.parquet")
    ok = consent.filter(pl.col("personalisation") & pl.col("profiling") & pl.col("marketing"))
    profiled = set(pl.read_parquet(s.ds.features_dir / "profiles.parquet")["customer_id"].to_list())
    return [c for c in sorted(ok["customer_id"].to_list()) if c in profiled][skip : skip + k]


def an_item(s: RunningService, k: int = 0) -> str:
    return s.ds.read("items")["item_id"][k]


# --- credentials ------------------------------------------------------------------------------------------------

APP_ROUTES = {
    "/recommend": {"customer_id": "C0000001"},
    "/similar_items": {"item_id": "I00001"},
    "/propensity": {"customer_id": "C0000001"},
    "/next_best_action": {"customer_id": "C0000001", "channel": "web", "record_contact": False},
}


@pytest.mark.parametrize("route", sorted(APP_ROUTES))
def test_app_endpoints_need_the_app_or_the_admin_key(served, route):
    body = APP_ROUTES[route]
    assert served.post(route, body, headers={}).status_code == 401
    assert served.post(route, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert served.post(route, body, headers={"Authorization": APP_KEY}).status_code == 401  # no scheme
    assert served.post(route, body, headers=APP).status_code == 200
    assert served.post(route, body, headers=ADMIN).status_code == 200


def test_events_need_a_key_and_nothing_is_stored_without_one(served):
    before = stored(served)
    event = {"events": [{"customer_id": "C0000002", "item_id": an_item(served), "event_type": "view"}]}
    r = served.post("/events", event, headers={})
    assert r.status_code == 401 and "NEXTBEST_APP_TOKEN" in r.json()["error"]
    assert stored(served) == before


@pytest.mark.parametrize("route", ["/profile", "/forget", "/erasure", "/levers"])
def test_personal_data_and_admin_endpoints_need_the_admin_key(served, route):
    body = (
        {"erasure_id": "x"}
        if route == "/erasure"
        else {}
        if route == "/levers"
        else {"customer_id": "C0000001"}
    )
    for headers in ({}, APP, {"Authorization": "Bearer wrong"}):
        r = served.post(route, body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "customer_id" not in r.text and "C0000001" not in r.text
    if route != "/forget":
        assert served.post(route, body, headers=ADMIN).status_code in (200, 404)


def test_profiles_cannot_be_enumerated_without_the_admin_key(served):
    for k in range(1, 21):
        r = served.post("/profile", {"customer_id": f"C{k:07d}"}, headers=APP)
        assert r.status_code == 401 and set(r.json()) == {"error"}


# --- content types ----------------------------------------------------------------------------------------------

ALL_ROUTES = [
    "/recommend",
    "/similar_items",
    "/propensity",
    "/next_best_action",
    "/events",
    "/profile",
    "/forget",
    "/erasure",
    "/levers",
]
CONTENT_TYPES = [
    "text/plain",
    "multipart/form-data",
    "multipart/form-data; boundary=xyz",
    "application/x-www-form-urlencoded",
    "application/xml",
    None,
]


@pytest.mark.parametrize("route", ALL_ROUTES)
@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_every_content_type_but_json_is_refused_with_415(served, route, content_type):
    before = stored(served)
    headers = dict(ADMIN)
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps(
        {"events": [{"customer_id": "C0000003", "item_id": an_item(served), "event_type": "view"}]}
    )
    r = httpx.post(f"{served.url}{route}", content=body.encode(), headers=headers, timeout=30)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]
    assert stored(served) == before


def test_json_with_a_charset_or_a_json_suffix_is_taken(served):
    for content_type in ("application/json; charset=utf-8", "application/vnd.nextbest+json"):
        r = httpx.post(
            f"{served.url}/recommend",
            content=b'{"customer_id": "C0000004"}',
            headers={**APP, "Content-Type": content_type},
            timeout=30,
        )
        assert r.status_code == 200, (content_type, r.text)


# --- strict inputs: the outside tester's cases, one test each -------------------------------------------------------


def _refused(served: RunningService, path: str, body: object, status: int, *words: str) -> dict[str, Any]:
    before = stored(served)
    r = served.post(path, body, headers=ADMIN)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.text, (word, r.text)
    assert stored(served) == before, "a refused request stored something"
    return r.json()


def test_a_boolean_is_not_a_number(served):
    body = _refused(served, "/recommend", {"customer_id": "C0000005", "n": True}, 400, '"n"')
    assert body["detail"][0]["loc"] == ["n"]


def test_a_string_is_not_a_boolean(served):
    _refused(
        served,
        "/recommend",
        {"customer_id": "C0000005", "exclude_purchased": "yes"},
        400,
        "exclude_purchased",
    )


def test_a_string_is_not_a_whole_number(served):
    _refused(served, "/recommend", {"customer_id": "C0000005", "n": "5"}, 400, "whole number")
    assert served.post("/recommend", {"customer_id": "C0000005", "n": 5.0}).json()["items"].__len__() == 5


def test_an_unknown_channel_is_refused(served):
    _refused(served, "/next_best_action", {"customer_id": "C0000005", "channel": "fax"}, 400, "fax", "web")
    _refused(served, "/propensity", {"customer_id": "C0000005", "channel": "fax"}, 400, "fax")


@pytest.mark.parametrize("year", ["2099", "1900", "0001"])
def test_events_dated_far_from_now_are_refused(served, year):
    c = customers(served, 1, skip=3)[0]
    before = served.post("/profile", {"customer_id": c}, headers=ADMIN).json()["profile"]["recency_days"]
    event = {
        "customer_id": c,
        "item_id": an_item(served),
        "event_type": "purchase",
        "timestamp": f"{year}-06-01T10:00:00",
    }
    _refused(served, "/events", {"events": [event]}, 400, "events[0].timestamp")
    after = served.post("/profile", {"customer_id": c}, headers=ADMIN).json()["profile"]["recency_days"]
    assert after == before


def test_a_response_dated_in_the_future_is_refused(served):
    response = {
        "customer_id": "C0000006",
        "action_id": "newsletter",
        "accepted": True,
        "timestamp": "2099-01-01T00:00:00",
    }
    _refused(served, "/events", {"responses": [response]}, 400, "responses[0].timestamp")


def test_a_quantity_as_text_and_a_lever_as_text_are_refused(served):
    event = {"customer_id": "C0000006", "item_id": an_item(served), "event_type": "view", "quantity": "3"}
    _refused(served, "/events", {"events": [event]}, 400, "quantity")
    _refused(served, "/levers", {"action_id": "newsletter", "lever": "2"}, 400, "lever")


def test_invalid_json_and_a_body_that_is_not_an_object_are_400(served):
    for content in (b"{not json", b"[1, 2]", b'"text"', b""):
        r = httpx.post(
            f"{served.url}/recommend", content=content, headers={**APP, "Content-Type": "application/json"}
        )
        assert r.status_code == 400, (content, r.text)
        assert set(r.json()) <= {"error", "detail"}


def test_a_body_over_the_limit_is_413(served):
    huge = b'{"customer_id": "' + b"x" * (2 << 20) + b'"}'
    r = httpx.post(
        f"{served.url}/recommend", content=huge, headers={**APP, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]


def test_refused_requests_log_one_line_and_no_traceback(served):
    marker = "refusal-marker-field"
    for _ in range(3):
        served.post("/recommend", {"customer_id": "C0000007", marker: 1}, headers=APP)
    log = served.server.log()
    assert log.count(marker) == 3
    assert "Traceback" not in log


# --- idempotent retries ------------------------------------------------------------------------------------------


def test_a_retry_with_the_same_event_id_is_stored_once(served):
    c = customers(served, 1, skip=5)[0]
    events = [
        {"customer_id": c, "item_id": an_item(served, k), "event_type": "view", "event_id": f"retry-{k}"}
        for k in range(3)
    ]
    first = served.post("/events", {"events": events})
    assert first.status_code == 200 and first.json()["accepted"] == 3 and first.json()["duplicates"] == 0
    again = served.post("/events", {"events": events})
    assert again.status_code == 200 and again.json()["accepted"] == 0 and again.json()["duplicates"] == 3
    log = stored(served)["events"]
    assert all(log.count(f'"retry-{k}"') == 1 for k in range(3))
    response = {"customer_id": c, "action_id": "newsletter", "accepted": False, "event_id": "retry-response"}
    assert served.post("/events", {"responses": [response]}).json()["responses"] == 1
    repeated = served.post("/events", {"responses": [response]}).json()
    assert repeated["responses"] == 0 and repeated["duplicates"] == 1
    assert stored(served)["contacts"].count('"retry-response"') == 1


# --- the OpenAPI document describes every answer ----------------------------------------------------------------


def test_the_openapi_document_describes_every_answer(served):
    from jsonschema import Draft202012Validator

    spec = httpx.get(f"{served.url}/docs.json").json()
    assert spec["openapi"].startswith("3.1")

    def check(path: str, response: httpx.Response) -> None:
        documented = spec["paths"][path]["post"]["responses"]
        assert str(response.status_code) in documented, (path, response.status_code)
        schema = documented[str(response.status_code)]["content"]["application/json"]["schema"]
        validator = Draft202012Validator({**schema, "components": spec["components"]})
        errors = [e.message for e in validator.iter_errors(response.json())]
        assert not errors, (path, response.status_code, errors)

    c = customers(served, 1, skip=7)[0]
    item = an_item(served)
    calls: list[tuple[str, object, dict[str, str]]] = [
        ("/recommend", {"customer_id": c, "n": 3}, APP),
        ("/recommend", {"customer_id": c, "n": 0}, APP),
        ("/recommend", {"customer_id": c}, {}),
        ("/recommend", {"customer_id": c, "filters": {"include": {"item_id": "NO-SUCH"}}}, APP),
        ("/similar_items", {"item_id": item}, APP),
        ("/similar_items", {"item_id": "NO-SUCH-ITEM"}, APP),
        ("/propensity", {"customer_id": c, "channel": "web", "context": NOW}, APP),
        ("/next_best_action", {"customer_id": "new-customer", "record_contact": False}, APP),
        (
            "/next_best_action",
            {"customer_id": c, "channel": "web", "explain": True, "record_contact": False},
            APP,
        ),
        ("/events", {"events": [{"customer_id": c, "item_id": item, "event_type": "view"}]}, APP),
        ("/profile", {"customer_id": c}, ADMIN),
        ("/profile", {"customer_id": "nobody-at-all"}, ADMIN),
        ("/profile", {"customer_id": c}, APP),
        ("/erasure", {"erasure_id": "no-such-erasure"}, ADMIN),
        ("/levers", {}, ADMIN),
        ("/levers", {"action_id": "newsletter", "lever": 1.0, "actor": "tests"}, ADMIN),
    ]
    for path, body, headers in calls:
        check(path, served.post(path, body, headers=headers))
    check(
        "/recommend",
        httpx.post(f"{served.url}/recommend", content=b"x", headers={**APP, "Content-Type": "text/plain"}),
    )
    levers = served.post("/levers", {}, headers=ADMIN).json()
    assert all(h["at"].endswith("Z") for h in levers["history"])


def test_schemathesis_finds_no_5xx_and_no_schema_violation(served, tmp_path):
    """schemathesis over the served OpenAPI document, every check, well over 1,000 generated requests."""
    st = Path(sys.executable).with_name("st")
    report = tmp_path / "schemathesis.json"
    run = subprocess.run(
        [
            str(st),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{served.url}/docs.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--include-path-regex",
            "^/(recommend|similar_items|propensity|next_best_action|events|profile|forget|erasure|levers|reload)$",
            "--max-examples",
            "120",
            "--seed",
            "7",
            "--workers",
            "2",
            "--no-color",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    generated = int(re.search(r"(\d+) generated", output).group(1))
    assert generated >= 1000, output[-2000:]
    assert "Traceback" not in served.server.log()


# --- erasure --------------------------------------------------------------------------------------------------


def linked(ds: Dataset, minimum: int = 3) -> tuple[str, list[str], list[str]]:
    """A customer with at least ``minimum`` linked source ids: (customer, source ids, unlinked forms)."""
    identities = ds.read("identities")
    counts = identities.group_by("customer_id").len().filter(pl.col("len") >= minimum).sort("customer_id")
    customer = counts["customer_id"][0]
    rows = identities.filter(pl.col("customer_id") == customer)
    sources = sorted(set(rows["source_id"].to_list()) - {customer})
    unlinked = [f"{s}:{i}" for s, i in zip(rows["source_system"], rows["source_id"], strict=True)]
    return customer, sources, unlinked


def traces(roots: list[Path], ids: list[str]) -> list[str]:
    """Where any of ``ids`` appears: as a value (or inside one) in a Parquet file's text columns, or as a token in
    any other file."""
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(i)}(?![\w-])" for i in ids))
    found = []
    for root in roots:
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            if f.suffix == ".parquet":
                frame = pl.read_parquet(f)
                for column, dtype in frame.schema.items():
                    values = frame[column].drop_nulls().unique() if dtype == pl.String else ()
                    if any(pattern.search(v) for v in values):
                        found.append(f"{f}:{column}")
            else:
                if pattern.search(f.read_bytes().decode("utf-8", errors="replace")):
                    found.append(str(f))
    return found


def wait_done(s: RunningService, erasure_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = s.post("/erasure", {"erasure_id": erasure_id}, headers=ADMIN).json()
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"the erasure {erasure_id} was not done within {timeout:.0f} s")


def test_erasure_reaches_every_linked_id_the_logs_and_the_dataset(tmp_path_factory, trained_world):
    s = _hardened(tmp_path_factory, trained_world, "erasure").start()
    try:
        customer, sources, unlinked = linked(s.ds)
        cookie = sources[0]
        every = sorted({customer, *sources, *unlinked})
        item = an_item(s, 3)
        # Live state under the customer and under a linked cookie; decisions and a response under both.
        for who in (customer, cookie):
            r = s.post(
                "/events", {"events": [{"customer_id": who, "item_id": item, "event_type": "add_to_cart"}]}
            )
            assert r.status_code == 200, r.text
            assert (
                s.post(
                    "/next_best_action", {"customer_id": who, "channel": "web", "context": NOW}
                ).status_code
                == 200
            )
        s.post(
            "/events",
            {"responses": [{"customer_id": customer, "action_id": "newsletter", "accepted": False}]},
        )
        assert s.post("/recommend", {"customer_id": cookie}).json()["basis"] == "session"

        r = s.post("/forget", {"customer_id": customer}, headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ids_erased"] == len(every) and body["live_state"] and body["dataset"] == "queued"
        assert (
            body["events_removed"] == 2 and body["decisions_removed"] == 2 and body["contacts_removed"] >= 1
        )
        # At once: nothing is served about any id.
        assert not s.post("/recommend", {"customer_id": cookie}).json()["personalised"]
        assert not s.post("/profile", {"customer_id": customer}, headers=ADMIN).json()["known"]
        status = wait_done(s, body["erasure_id"])
        assert status["state"] == "done" and status["rows_removed"] > 0, status

        def refused_after_erasure() -> None:
            for who in (customer, cookie, unlinked[0]):
                before = stored(s)
                event = {"customer_id": who, "item_id": item, "event_type": "view"}
                r = s.post("/events", {"events": [event]})
                assert r.status_code == 410 and who not in r.text, r.text
                # Decisions for an erased id are answered, never stored.
                d = s.post("/next_best_action", {"customer_id": who, "channel": "web", "context": NOW})
                assert d.status_code == 200 and not d.json()["contact_recorded"]
                assert stored(s) == before

        refused_after_erasure()
        found = traces([s.state, s.ds.root], every)
        assert not found, found
        assert not traces([s.logs], every)
        # The erasure log holds keyed digests: not recoverable by hashing candidate ids without the key.
        erasures = (s.ds.root / ERASURE_LOG).read_text()
        for i in every:
            assert hashlib.sha256(i.encode()).hexdigest() not in erasures
            assert id_digest(i, b"a key that is not the erasure key") not in erasures
            assert id_digest(i, erasure_key()) in erasures
        # The same after a restart.
        s.stop()
        s.start()
        refused_after_erasure()
        assert not s.post("/profile", {"customer_id": customer}, headers=ADMIN).json()["known"]
        assert not traces([s.state, s.ds.root], every)
    finally:
        s.stop()


# --- crashes and stops ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_kill_9_during_a_stream_of_writes_loses_no_acknowledged_event(
    request, tmp_path_factory, trained_world, store
):
    url = request.getfixturevalue("postgres").database("kill9") if store == "postgresql" else None
    s = _hardened(tmp_path_factory, trained_world, f"kill9-{store}", state_url=url).start()
    try:
        who = customers(s, 4, skip=20)
        items = s.ds.read("items")["item_id"].to_list()
        sent: list[dict[str, Any]] = [
            {
                "customer_id": who[k % 4],
                "item_id": items[k % len(items)],
                "event_type": "view",
                "event_id": f"stream-{k}",
            }
            for k in range(400)
        ]
        acknowledged: set[str] = set()
        lock = threading.Lock()

        def stream(part: list[dict[str, Any]]) -> None:
            with httpx.Client(timeout=10) as client:
                for event in part:
                    try:
                        r = client.post(f"{s.url}/events", json={"events": [event]}, headers=APP)
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        with lock:
                            acknowledged.add(event["event_id"])

        threads = [threading.Thread(target=stream, args=(sent[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        while len(acknowledged) < 60:
            time.sleep(0.01)
        s.server.kill()
        for t in threads:
            t.join(60)
        assert 60 <= len(acknowledged) < len(sent)
        s.start()
        held = Counter(e["event_id"] for e in stored_events(s))
        assert acknowledged <= set(held), "an acknowledged event was lost"
        # The client retries everything it sent: each event ends up stored once.
        for k in range(0, len(sent), 50):
            r = s.post("/events", {"events": sent[k : k + 50]})
            assert r.status_code == 200, r.text
        held = Counter(e["event_id"] for e in stored_events(s))
        assert set(held) == {e["event_id"] for e in sent} and set(held.values()) == {1}
        live = s.post("/profile", {"customer_id": who[0]}, headers=ADMIN).json()["live_events"]
        assert len(live) == 100
    finally:
        s.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_whole_process_tree(tmp_path_factory, trained_world, sig):
    s = _hardened(tmp_path_factory, trained_world, f"signal-{sig.name.lower()}")
    port = free_port()
    env = {"NEXTBEST_APP_TOKEN": APP_KEY, "NEXTBEST_ADMIN_TOKEN": ADMIN_KEY}
    cli = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("nextbest")),
            "serve",
            "--data",
            str(s.ds.root),
            "--port",
            str(port),
            "--state-dir",
            str(s.state),
            "--tracking-uri",
            s.tracking_uri,
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ServiceProcess(cli, f"http://127.0.0.1:{port}", None).wait_ready(timeout=240)
        tree = [cli.pid, *(p.pid for p in psutil.Process(cli.pid).children(recursive=True))]
        assert len(tree) >= 3  # the CLI, bentoml serve and its worker
        cli.send_signal(sig)
        assert cli.wait(60) in (0, 128 + sig)
        _, alive = psutil.wait_procs([p for pid in tree if (p := _process(pid))], timeout=30)
        assert not alive, [p.pid for p in alive]
        with pytest.raises(httpx.HTTPError):
            httpx.post(
                f"http://127.0.0.1:{port}/recommend", json={"customer_id": "C0000001"}, headers=APP, timeout=2
            )
    finally:
        if cli.poll() is None:
            cli.kill()


def stored_events(s: RunningService) -> list[dict[str, Any]]:
    """The events in the service's state store (the embedded one, or ``s.state_url``)."""
    from nextbest.serving.state_store import StateStore, default_state_url

    store = StateStore(s.state_url or default_state_url(s.state), create=False)
    try:
        return store.events_after()
    finally:
        store.close()


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# --- refusals at start ----------------------------------------------------------------------------------------


def test_listening_beyond_loopback_needs_an_app_key(trained_world, tmp_path):
    with pytest.raises(EngineLoadError, match="NEXTBEST_APP_TOKEN"):
        start(
            trained_world.ds.root,
            host="0.0.0.0",
            state_dir=tmp_path / "state",
            tracking_uri=trained_world.tracking_uri,
        )
    assert check_start("0.0.0.0", "a-key") is None
    assert "open" in check_start("127.0.0.1", None)
    assert "open" in check_start("::1", None)
