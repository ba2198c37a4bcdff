"""The web page: `GET /` (index.html, sent with a CSP that allows only its own origin) and its static files under
`/static` (no build step). The page holds no data and no key, so neither needs the key."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parents[1] / "static"
# The page loads only its own script and style sheet, talks only to its own origin (fetch and WebSocket: CSP 3's
# 'self' covers ws/wss on the same host: Chrome 71, Safari 16), shows thumbnails from it and plays a local file
# through a blob: URL, and is never framed. The webcam's MediaStream goes through srcObject, which CSP does not
# govern.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def add_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)


async def page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"} | PAGE_HEADERS)
