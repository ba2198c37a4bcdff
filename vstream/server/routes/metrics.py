"""`GET /metrics`: the Prometheus scrape; the text itself is made by `vstream.server.metrics`. Unlike the health
probes, it needs the key when the server has one."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from vstream.server.metrics import render_metrics
from vstream.server.routes import State


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)


async def metrics(state: State):
    return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")
