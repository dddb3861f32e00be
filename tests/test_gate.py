"""The request gate in front of the service: keys, content types, sizes and bodies, on a stand-in app.

The endpoints' own logic is not involved: an ASGI app that echoes the body it receives stands behind the gate,
so each test shows what the gate lets through and what it answers itself. (The real service behind the gate is
tested in tests/test_service_hardening.py.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from nextbest.serving.api import ROUTES
from nextbest.serving.gate import ExposureError, RequestGate, authorise, bearer, check_exposure, is_loopback
from nextbest.serving.openapi import ERROR_STATUSES, complete_spec


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps({"echo": body.decode()}).encode()})


def call(gate: RequestGate, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://gate"
        ) as client:
            return await client.post(path, content=content, headers=headers)

    return asyncio.run(go())


def gate(**env: str) -> RequestGate:
    return RequestGate(echo, environ=env, spec=lambda app, admin: {"app": app, "admin": admin})


JSON = {"Content-Type": "application/json"}
BODY = b'{"customer_id": "C1"}'


@pytest.mark.parametrize(
    ("credential", "key", "app_token", "admin_token", "expected"),
    [
        ("app", None, None, None, None),  # no app key configured: open (loopback only)
        ("app", "x", None, None, None),
        ("app", None, "A", None, 401),
        ("app", "B", "A", "B", None),  # the admin key passes where an app key does
        ("app", "A", "A", "B", None),
        ("app", "Z", "A", "B", 401),
        ("admin", None, None, None, 403),  # no admin key configured: disabled
        ("admin", "A", "A", "B", 401),  # an app key is not an admin key
        ("admin", "B", "A", "B", None),
        ("admin", None, "A", "B", 401),
    ],
)
def test_who_may_call_what(credential, key, app_token, admin_token, expected):
    refused = authorise(credential, key, app_token, admin_token)
    assert (refused[0] if refused else None) == expected


def test_only_bearer_keys_count():
    assert bearer({"authorization": "Bearer k1"}) == "k1"
    assert bearer([(b"authorization", b"bearer  k2 ")]) == "k2"
    assert bearer({"authorization": "Basic abc"}) is None and bearer({}) is None
    assert bearer({"authorization": "Bearer "}) is None


def test_loopback_is_the_only_place_for_open_app_endpoints():
    for host in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        assert "open" in check_exposure(host, None)
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        assert not is_loopback(host), host
        with pytest.raises(ExposureError, match="NEXTBEST_APP_TOKEN"):
            check_exposure(host, None)
        assert check_exposure(host, "key") is None


def test_the_gate_lets_a_valid_request_through_with_its_body():
    r = call(gate(NEXTBEST_APP_TOKEN="A"), "/recommend", BODY, {**JSON, "Authorization": "Bearer A"})
    assert r.status_code == 200 and r.json() == {"echo": BODY.decode()}


def test_the_gate_answers_keys_content_types_sizes_and_bodies_itself():
    g = gate(NEXTBEST_APP_TOKEN="A", NEXTBEST_ADMIN_TOKEN="B", NEXTBEST_MAX_BODY_BYTES="64")
    auth = {"Authorization": "Bearer A"}
    assert call(g, "/recommend", BODY, JSON).status_code == 401
    assert call(g, "/profile", BODY, {**JSON, **auth}).status_code == 401
    assert call(g, "/recommend", BODY, {"Content-Type": "text/plain", **auth}).status_code == 415
    assert call(g, "/recommend", b"x" * 65, {**JSON, **auth}).status_code == 413
    bad = call(g, "/recommend", b'{"customer_id": "C1", "n": true, "colour": 1}', {**JSON, **auth})
    assert bad.status_code == 400
    assert [d["loc"] for d in bad.json()["detail"]] == [["n"], ["colour"]]
    assert "n: " in bad.json()["error"] and "colour: " in bad.json()["error"]
    assert call(g, "/recommend", b"[]", {**JSON, **auth}).status_code == 400
    # What is not an API route passes untouched.
    assert call(g, "/somewhere-else", b"anything", {}).status_code == 200


def test_the_gate_serves_the_document_for_its_keys():
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=gate(NEXTBEST_ADMIN_TOKEN="B"))
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            return await client.get("/docs.json")

    assert asyncio.run(go()).json() == {"app": False, "admin": True}


def test_the_document_lists_every_error_and_the_keys_in_force():
    paths = {route: {"post": {"responses": {"200": {}, "422": {}}}} for route in ROUTES}
    spec = complete_spec({"paths": paths}, app_token=False, admin_token=True)
    assert spec["openapi"] == "3.1.0"
    for route, endpoint in ROUTES.items():
        operation = spec["paths"][route]["post"]
        assert set(operation["responses"]) == {"200", *map(str, ERROR_STATUSES)}
        assert operation["requestBody"]["required"]
        assert ("security" in operation) == (endpoint.credential == "admin")
    channel = spec["components"]["schemas"]["NextBestActionResponse"]["properties"]["channel"]
    assert {"type": "null"} in channel["anyOf"]
