"""The service's OpenAPI document: what BentoML generates, completed with every status and body it answers.

BentoML's document names the endpoints, but its schemas drop the ``null`` that optional fields take (a request
with ``"filters": null`` is valid; an answer's ``channel`` may be null) and it lists only BentoML's own errors.
:func:`complete_spec` puts in, for each endpoint of :data:`serving.api.ROUTES`, the request and answer schemas
exactly as pydantic validates and writes them, a required JSON body, the error body
(:class:`serving.api.ErrorResponse`) for 400, 401, 403, 404, 409, 410, 413, 415, 500 and 503, and the bearer
credential it takes; and declares OpenAPI 3.1, whose JSON Schema has ``null``. ``GET /docs.json`` serves it
(:class:`serving.gate.RequestGate`); the tests check real answers against it, and schemathesis fuzzes it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from nextbest.serving.api import ROUTES, ErrorResponse

ERROR_STATUSES: dict[int, str] = {
    400: "The body is not valid JSON, or a field is invalid (named in `error`, listed in `detail`)",
    401: "Missing or wrong key (`Authorization: Bearer <key>`)",
    403: "Admin endpoints are disabled (no NEXTBEST_ADMIN_TOKEN)",
    404: "Something the request names is unknown: an item, an erasure, or the decision a response names "
    "(`POST /events`: never logged, erased, or past the retention window)",
    409: "`POST /events`: a response of a kind the decision already has for that action (a retry with the "
    "same `event_id` is acknowledged instead); nothing of the request is stored",
    410: "The customer was erased: nothing more is stored about the id",
    413: "The body is larger than the service takes",
    415: "The body is not JSON (send Content-Type: application/json)",
    500: "An unexpected error (the server log has the traceback)",
    503: "Not ready: models and data are still loading, or could not load (the message says why)",
}
SECURITY_SCHEME = "bearer"


REF = "#/components/schemas/{model}"


def complete_spec(spec: dict[str, Any], *, app_token: bool, admin_token: bool) -> dict[str, Any]:
    """``spec`` (BentoML's document, as a dict) with the error answers and credentials of every endpoint.

    Args:
        spec: the generated document; changed in place and returned.
        app_token: the app endpoints take a key (``NEXTBEST_APP_TOKEN`` is set).
        admin_token: the admin endpoints are enabled (``NEXTBEST_ADMIN_TOKEN`` is set).
    """
    spec["openapi"] = "3.1.0"
    components = spec.setdefault("components", {})
    models = [(e.request, "validation") for e in ROUTES.values()]
    models += [(e.response, "serialization") for e in ROUTES.values()]
    models.append((ErrorResponse, "serialization"))
    refs, definitions = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    # Pydantic's schemas of the endpoints' models take the place of BentoML's (named ``…IODescriptor``).
    components["schemas"] = {**components.get("schemas", {}), **definitions["$defs"]}
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "NEXTBEST_APP_TOKEN for the app endpoints, NEXTBEST_ADMIN_TOKEN for the admin ones "
        "(which also passes where an app key does)",
    }
    error = {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}
    for route, endpoint in ROUTES.items():
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if operation is None:
            continue
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(endpoint.request, "validation")]}},
        }
        responses: dict[str, Any] = {
            "200": {
                "description": "Successful Response",
                "content": {"application/json": {"schema": refs[(endpoint.response, "serialization")]}},
            }
        }
        for status, description in ERROR_STATUSES.items():
            responses[str(status)] = {"description": description, "content": error}
        operation["responses"] = responses
        secured = admin_token if endpoint.credential == "admin" else app_token
        if secured:
            operation["security"] = [{SECURITY_SCHEME: []}]
    return spec
