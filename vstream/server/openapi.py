"""The OpenAPI document made true to the server that serves it, so that generated clients and fuzzers see what it
does: FastAPI's 422 (never sent: validation errors are 400) gives way to the statuses that the gate and each route
send, all with the OpenAI error object, and the numeric bounds that the server enforces from its `Limits` replace
the wire schemas' static ones. This module only rewrites the document; it enforces nothing.
"""

from __future__ import annotations

from fastapi import FastAPI

from vstream.server.access import SAFE_METHODS, public
from vstream.server.schemas import ErrorResponse
from vstream.server.state import ServerState

DESCRIPTIONS = {
    400: "Invalid request: a field out of its bounds, an unreadable source or question (the message names it).",
    401: "Missing or wrong API key.",
    403: "Refused: a Host or Origin that the server does not allow, or a source it may not open.",
    404: "No such stream, file or kept frame.",
    409: "The stream cannot do this now (no frame ingested yet).",
    413: "The request body is over the server's max_body_bytes.",
    429: "Too many streams or answers at once; Retry-After says when to try again.",
    503: "The server is draining or not ready; Retry-After says when to try again.",
}
REF = "#/components/schemas/ErrorResponse"
# (schema, field) -> (JSON Schema keyword, the Limits field that the server checks it against)
BOUNDS = {("StreamCreate", "fps"): ("maximum", "max_fps"),
          ("ChatRequest", "max_tokens"): ("maximum", "max_answer_tokens"),
          ("ChatRequest", "max_completion_tokens"): ("maximum", "max_answer_tokens")}


def errors(*statuses: int) -> dict:
    """The `responses=` of a route that can answer with these error statuses (besides the gate's)."""
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


def gate_statuses(state: ServerState, path: str, method: str) -> set[int]:
    """What `middleware.Gate` may answer on this route before the route runs (see `access.refusal`)."""
    statuses = {413}
    if method not in SAFE_METHODS or (state.allowed_hosts is not None and not path.startswith("/health/")):
        statuses.add(403)
    if state.api_key is not None and not public(path):
        statuses.add(401)
    return statuses


def install(app: FastAPI, state: ServerState) -> None:
    """Serve the rewritten document as the app's `/openapi.json` (made once, on first request)."""
    fastapi_openapi = app.openapi

    def rewritten() -> dict:
        if app.openapi_schema is None:
            document(fastapi_openapi(), state)
        return app.openapi_schema

    app.openapi = rewritten


def document(schema: dict, state: ServerState) -> dict:
    """Rewrite FastAPI's document of this app in place (and return it)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components |= error.pop("$defs", {}) | {"ErrorResponse": error}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in gate_statuses(state, path, method.upper()):
                responses.setdefault(str(status), {"description": DESCRIPTIONS[status],
                                                   "content": {"application/json": {"schema": {"$ref": REF}}}})
            operation["responses"] = dict(sorted(responses.items()))
    for (model, field), (keyword, limit) in BOUNDS.items():
        _bound(components[model]["properties"][field], keyword, getattr(state.limits, limit))
    return schema


def _bound(prop: dict, keyword: str, value) -> None:
    """Set `keyword` on the numeric branch of a property (`anyOf: [number, null]` for an optional field)."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") in ("number", "integer")]
    if len(branches) != 1:
        raise TypeError(f"expected one numeric branch in the property {prop}, got {len(branches)}")
    branches[0][keyword] = value
