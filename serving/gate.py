"""What every request passes before an endpoint sees it: credentials, content type, size and a valid body.

:class:`RequestGate` is an ASGI middleware in front of the BentoML service. For each ``POST`` to an endpoint
of :data:`serving.api.ROUTES`, in this order:

1. **Credentials** (``Authorization: Bearer <key>``, keys compared in constant time, never logged):

   * ``app`` endpoints (``/recommend``, ``/similar_items``, ``/propensity``, ``/next_best_action``, ``/events``)
     take ``NEXTBEST_APP_TOKEN`` or ``NEXTBEST_ADMIN_TOKEN``. Without ``NEXTBEST_APP_TOKEN`` they are open —
     which :func:`check_exposure` allows only while the service listens on loopback;
   * ``admin`` endpoints (``/profile``: personal data; ``/forget``, ``/erasure``, ``/levers``, ``/reload``) take
     ``NEXTBEST_ADMIN_TOKEN`` only, and are disabled (403) without it.

   A missing or wrong key is answered 401.
2. **Content type**: ``application/json`` (or ``application/*+json``); anything else 415, so a cross-site form
   (``text/plain``, ``multipart/form-data``) cannot post.
3. **Size**: bodies above ``max_bytes`` are refused with 413, by Content-Length or as they stream.
4. **Body**: valid JSON that the endpoint's request model accepts, else 400 with ``error`` (every invalid
   field named) and ``detail`` (one entry per field).

A refused request costs one log line (``nextbest.requests``: status, route, reason) and no traceback. ``GET
/docs.json`` answers :func:`serving.openapi.service_spec`, the OpenAPI document of what the service answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from nextbest.features.errors import NextbestError
from nextbest.serving.api import ROUTES, Credential

logger = logging.getLogger("nextbest.requests")

APP_TOKEN_ENV = "NEXTBEST_APP_TOKEN"
ADMIN_TOKEN_ENV = "NEXTBEST_ADMIN_TOKEN"
HOST_ENV = "NEXTBEST_HOST"
"""The address the service listens on, as ``nextbest serve --host`` set it (read at start)."""
MAX_BODY_ENV = "NEXTBEST_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 1 << 20
"""1 MiB: a thousand events with room to spare; larger bodies are refused with 413 before they are read."""


class ExposureError(NextbestError, RuntimeError):
    """The service would listen beyond loopback with its app endpoints open; says what to set."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, app_token: str | None) -> str | None:
    """Refuse to expose open app endpoints beyond loopback; return the warning to log when they are open.

    Raises:
        ExposureError: ``host`` is not loopback and there is no app token.
    """
    if app_token:
        return None
    if not is_loopback(host):
        raise ExposureError(
            f"refusing to listen on {host} without {APP_TOKEN_ENV}: the app endpoints would be open to anyone "
            f"who can reach it. Set {APP_TOKEN_ENV} (apps then send 'Authorization: Bearer <key>'), or listen "
            "on 127.0.0.1"
        )
    return (
        f"{APP_TOKEN_ENV} is not set: the app endpoints are open to every process on this machine "
        "(loopback only); set it before exposing the service"
    )


def bearer(headers: Mapping[str, str] | list[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None when absent or another scheme)."""
    if isinstance(headers, list):
        value = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
    else:
        value = headers.get("authorization")
    scheme, _, key = (value or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _same(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())  # type: ignore[union-attr]


def authorise(
    credential: Credential, key: str | None, app_token: str | None, admin_token: str | None
) -> tuple[int, str] | None:
    """Whether ``key`` may call an endpoint needing ``credential``: None, or the refusal's status and message."""
    if _same(key, admin_token):
        return None
    if credential == "admin":
        if not admin_token:
            return 403, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} to enable them"
        return 401, f"missing or wrong admin key: send 'Authorization: Bearer <{ADMIN_TOKEN_ENV}>'"
    if not app_token or _same(key, app_token):
        return None
    return 401, f"missing or wrong key: send 'Authorization: Bearer <{APP_TOKEN_ENV}>'"


def _json_content_type(value: str | None) -> bool:
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_error(e: ValidationError) -> dict[str, Any]:
    """A 400 body for a request model's errors: every invalid field named in ``error``, listed in ``detail``."""
    errors = e.errors(include_context=False, include_input=False, include_url=False)
    named = "; ".join(f"{_field(err['loc'])}: {err['msg']}" for err in errors)
    return {
        "error": f"{len(errors)} invalid field(s): {named}",
        "detail": [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in errors],
    }


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


class RequestGate:
    """ASGI middleware: credentials, content type, size and body of every API request (see the module doc).

    Args:
        app: the ASGI app behind the gate.
        max_bytes: the largest request body taken (default ``NEXTBEST_MAX_BODY_BYTES``, else 1 MiB).
        environ: where the tokens are read (default ``os.environ``), once, when the service starts.
        spec: returns the service's OpenAPI document (served on ``GET /docs.json``), given whether the app and
            the admin endpoints take keys; None leaves that route to the app.
    """

    def __init__(
        self,
        app: Any,
        max_bytes: int | None = None,
        environ: Mapping[str, str] | None = None,
        spec: Callable[[bool, bool], dict[str, Any]] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.app = app
        self.max_bytes = max_bytes or int(env.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES)
        self.app_token = env.get(APP_TOKEN_ENV) or None
        self.admin_token = env.get(ADMIN_TOKEN_ENV) or None
        self._spec = spec
        self._spec_body: bytes | None = None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == "/docs.json" and method == "GET" and self._spec is not None:
            if self._spec_body is None:
                self._spec_body = json.dumps(
                    self._spec(self.app_token is not None, self.admin_token is not None)
                ).encode()
            await self._send(send, 200, self._spec_body)
            return
        route = ROUTES.get(path)
        if route is None or method != "POST":
            await self.app(scope, receive, send)
            return
        model, _, credential = route
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        refused = authorise(credential, bearer(headers), self.app_token, self.admin_token)
        if refused is not None:
            await self._refuse(send, path, *refused)
            return
        content_type = next((v.decode("latin-1") for k, v in headers if k == b"content-type"), None)
        if not _json_content_type(content_type):
            await self._refuse(
                send,
                path,
                415,
                f"content type {content_type or '(none)'!r} is not taken: send application/json",
            )
            return
        try:
            body = await self._read(headers, receive)
        except _BodyTooLarge as e:
            await self._refuse(
                send,
                path,
                413,
                f"request body of {e.size} bytes is larger than the limit of {self.max_bytes} bytes",
            )
            return
        try:
            parsed = json.loads(body) if body.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            await self._refuse(send, path, 400, f"the body is not valid JSON ({e})")
            return
        if not isinstance(parsed, dict):
            await self._refuse(send, path, 400, "the body must be a JSON object")
            return
        try:
            model.model_validate(parsed)
        except ValidationError as e:
            content = validation_error(e)
            await self._refuse(send, path, 400, content["error"], content)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, headers: list[tuple[bytes, bytes]], receive: Callable) -> bytes:
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    raise _BodyTooLarge(declared)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _BodyTooLarge(seen)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(
        self, send: Callable, path: str, status: int, message: str, content: dict[str, Any] | None = None
    ) -> None:
        logger.info("refused POST %s: %d %s", path, status, message[:300])
        await self._send(send, status, json.dumps(content or {"error": message}).encode())

    @staticmethod
    async def _send(send: Callable, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands the app the body already read, then passes on the connection's own messages."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
