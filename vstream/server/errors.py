"""Errors as the client sees them: `ApiError` (an OpenAI error object with its HTTP status), the response that carries
one, and `internal_error` for a failure that no check expected (logged with its traceback, answered by reference).

Nothing here decides what is an error: routes, the gate and the realtime session raise these.
"""

from __future__ import annotations

import json
import logging
import secrets

from fastapi.responses import JSONResponse

from vstream.server.schemas import error_body

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}
log = logging.getLogger("vstream.server")


class ApiError(Exception):
    """An error answered with the OpenAI error object and `status` (429 and 503 also carry `Retry-After`)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after


def internal_error(exc: BaseException, where: str) -> ApiError:
    """Log `exc` with its traceback under a new reference and return the 500 that the client gets: the reference
    only, since an exception's text may hold server paths or other internals."""
    ref = "err_" + secrets.token_hex(6)
    log.error("internal error %s in %s", ref, where, exc_info=exc)
    return ApiError(500, f"internal error {ref}: the server failed to handle this; its log has the details under "
                    "this reference", code="internal_error")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate that a client sent as `\\ud800` and that comes
    back in a message (or in a stream's source) renders instead of failing to encode as UTF-8."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    body = error_body(exc.message, ERROR_TYPES.get(exc.status, "server_error"), exc.code, exc.param)
    return AsciiJSONResponse(body, exc.status, headers=headers)
