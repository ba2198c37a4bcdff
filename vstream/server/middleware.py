"""What every HTTP request passes through, and how its errors are answered. `Gate` (ASGI middleware) applies `access`
(Host, Origin, the key or the page's cookie) and the body cap before any route reads the request; the error handlers
turn `ApiError`, validation errors and Starlette's own errors into the OpenAI error object. WebSocket handshakes pass
through untouched: the realtime route checks them itself. Nothing here knows about streams or models.

An exception no route turned into an `ApiError` is logged with its traceback and answered with a 500 that carries
only a reference to the log entry, on the same connection (Starlette's own handler sends the response and then
re-raises, and uvicorn then drops the connection).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from vstream.server.access import NO_KEY, authorized, public, refusal
from vstream.server.errors import ApiError, error_response, internal_error
from vstream.server.state import ServerState


class Gate:
    """ASGI middleware for HTTP: Host and Origin (403), the API key (401) and the body cap (413) before any route
    reads the request; then the app, with an error that no route handled answered as a logged 500."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refused = refusal(self.state, headers, scope["path"], scope["method"])
        if refused is None and not public(scope["path"]) and not authorized(self.state, headers):
            refused = NO_KEY
        if refused is None:
            body = await self._body(headers, receive)
            if body is None:
                return
            if isinstance(body, ApiError):
                refused = body
        if refused is not None:
            return await error_response(refused)(scope, receive, send)
        await self._run(scope, body, receive, send)

    async def _body(self, headers: Headers, receive) -> bytes | ApiError | None:
        """The whole body, a 413 when it is over the cap (by its Content-Length or as it arrives), or None when the
        client went away."""
        cap = self.state.limits.max_body_bytes
        length = headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        body, more = bytearray(), declared is None or declared <= cap
        while more and len(body) <= cap:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > cap or (declared is not None and declared > cap):
            size = declared if declared is not None else f"more than {cap}"
            return ApiError(413, f"the request body has {size} bytes, over the limit max_body_bytes={cap}",
                            code="body_too_large")
        return bytes(body)

    async def _run(self, scope, body: bytes, receive, send) -> None:
        replayed, started = False, False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, if it goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watched)
        except Exception as exc:  # any error of the app becomes a logged 500, never a dropped connection  # noqa: BLE001
            error = internal_error(exc, f"{scope['method']} {scope['path']}")
            if not started:  # once a response has begun, its connection can only end with it
                await error_response(error)(scope, replay, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as the OpenAI error object: ApiError with its status, validation errors as 400 naming each field
    and what came, Starlette's own (unknown route, unreadable body) with theirs."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, starlette_error)


async def api_error(request: Request, exc: ApiError):
    return error_response(exc)


async def invalid_request(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return error_response(ApiError(400, "; ".join(map(_describe, errors)), "invalid_request", where))


def _describe(e: dict) -> str:
    given = f", got {json.dumps(e['input'], default=str)[:80]}" if "input" in e else ""
    return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{given}"


async def starlette_error(request: Request, exc: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        message = "the body nests JSON deeper than the server parses: expected a flat request object"
    return error_response(ApiError(exc.status_code, message, code))
