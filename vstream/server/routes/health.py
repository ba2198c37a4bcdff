"""`GET /health/live` and `GET /health/ready`: the probes. Public (no key, any Host) and answered on the event loop
without waiting for any answer or model step."""

from __future__ import annotations

from fastapi import FastAPI

from vstream.server.errors import ApiError
from vstream.server.openapi import errors
from vstream.server.routes import State


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/health/live", live, methods=["GET"])
    app.add_api_route("/health/ready", ready, methods=["GET"], responses=errors(503))


async def live():
    return {"status": "ok"}


async def ready(state: State):
    if state.draining:
        raise ApiError(503, "not ready: the server is draining", code="draining", retry_after=5)
    if not state.ready:
        raise ApiError(503, "not ready: the server is starting or shutting down", code="not_ready")
    return {"status": "ready", "model": state.model.cfg.name, "auth_required": state.api_key is not None,
            "warmup_s": round(state.warmup_s, 3)}
