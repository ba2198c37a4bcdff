"""`POST|DELETE /v1/auth/cookie`: the page's HttpOnly session cookie, set by a request that carries the key and good
for 12 h; `vstream.server.access` decides where a cookie is accepted. At most `MAX_COOKIES` live at once (the oldest
goes first)."""

from __future__ import annotations

import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vstream.server.access import COOKIE
from vstream.server.routes import State

COOKIE_TTL_S = 12 * 3600
MAX_COOKIES = 64


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/auth/cookie", login, methods=["POST"], status_code=204)
    app.add_api_route("/v1/auth/cookie", logout, methods=["DELETE"], status_code=204)


async def login(state: State):
    """Set the page's HttpOnly session cookie (the request itself carries the key); 12 h."""
    token = secrets.token_urlsafe(24)
    with state.lock:
        now = time.monotonic()
        for old in [k for k, v in state.cookies.items() if v < now]:
            del state.cookies[old]
        while len(state.cookies) >= MAX_COOKIES:
            del state.cookies[next(iter(state.cookies))]
        state.cookies[token] = now + COOKIE_TTL_S
    response = Response(status_code=204)
    response.set_cookie(COOKIE, token, max_age=COOKIE_TTL_S, httponly=True, samesite="strict", path="/")
    return response


async def logout(state: State, request: Request):
    state.cookies.pop(request.cookies.get(COOKIE, ""), None)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response
