"""The service's OpenAPI document: what BentoML generates, completed with every status and body it answers.

BentoML documents each endpoint's request and 200 answer. :func:`service_spec` adds the rest of what a client
sees — the error body (:class:`serving.api.ErrorResponse`) for 400, 401, 403, 404, 410, 413, 415, 500 and 503,
and the bearer credential each endpoint takes (:data:`serving.api.ROUTES`) — and declares OpenAPI 3.1, whose
JSON Schema allows the ``null`` that optional answer fields carry. ``GET /docs.json`` serves it
(:class:`serving.gate.RequestGate`); ``tests/test_service_contract.py`` checks real answers against it.
"""

from __future__ import annotations

from typing import Any

from serving.api import ROUTES, ErrorResponse

ERROR_STATUSES: dict[int, str] = {
    400: "The body is not valid JSON, or a field is invalid (named in `error`, listed in `detail`)",
    401: "Missing or wrong key (`Authorization: Bearer <key>`)",
    403: "Admin endpoints are disabled (no NEXTBEST_ADMIN_TOKEN)",
    404: "An item the request names is unknown",
    410: "The customer was erased: nothing more is stored about the id",
    413: "The body is larger than the service takes",
    415: "The body is not JSON (send Content-Type: application/json)",
    500: "An unexpected error (the server log has the traceback)",
    503: "Not ready: models and data are still loading, or could not load (the message says why)",
}
SECURITY_SCHEME = "bearer"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def complete_spec(spec: dict[str, Any], *, app_token: bool, admin_token: bool) -> dict[str, Any]:
    """``spec`` (BentoML's document, as a dict) with the error answers and credentials of every endpoint.

    Args:
        spec: the generated document; changed in place and returned.
        app_token: the app endpoints take a key (``NEXTBEST_APP_TOKEN`` is set).
        admin_token: the admin endpoints are enabled (``NEXTBEST_ADMIN_TOKEN`` is set).
    """
    spec["openapi"] = "3.1.0"
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in error_schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas["ErrorResponse"] = error_schema
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "NEXTBEST_APP_TOKEN for the app endpoints, NEXTBEST_ADMIN_TOKEN for the admin ones "
        "(which also passes where an app key does)",
    }
    error = {"application/json": {"schema": _ref("ErrorResponse")}}
    for route, (_, credential) in ROUTES.items():
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if operation is None:
            continue
        responses = {k: v for k, v in operation.get("responses", {}).items() if str(k).startswith("2")}
        for status, description in ERROR_STATUSES.items():
            responses[str(status)] = {"description": description, "content": error}
        operation["responses"] = responses
        secured = admin_token if credential == "admin" else app_token
        if secured:
            operation["security"] = [{SECURITY_SCHEME: []}]
    return spec
