"""`POST|DELETE /v1/auth/cookie`: the page's HttpOnly session cookie, set by a request that carries the key and good
for 12 h, and its logout. The token is a signed, stateless one (`vstream.server.cookies`): nothing is kept per login;
a logout is kept until the token's expiry. `vstream.server.access` decides where a cookie is accepted."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vstream.server.access import COOKIE, page_token
from vstream.server.routes import State


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/auth/cookie", login, methods=["POST"], status_code=204)
    app.add_api_route("/v1/auth/cookie", logout, methods=["DELETE"], status_code=204)


async def login(state: State):
    """Set the page's HttpOnly session cookie (the request itself carries the key); 12 h."""
    cookies = state.cookies
    response = Response(status_code=204)
    response.set_cookie(COOKIE, cookies.mint(), max_age=int(cookies.ttl_s), httponly=True, samesite="strict",
                        path="/")
    return response


async def logout(state: State, request: Request):
    """Refuse the cookie's token from now on (until its expiry) and clear it in the browser; the realtime sockets and
    event feeds it let in close within a tenth of a second."""
    state.cookies.revoke(page_token(request.headers))
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response
