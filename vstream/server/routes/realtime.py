"""`WS /v1/realtime`: the handshake. The socket must pass the same Host, Origin and key checks as HTTP (refused with
an HTTP error response otherwise); it then attaches to the stream named by `stream_id`, or creates a push stream of
its own, which is deleted when the socket closes. The session itself (events, frames, answers) is
`vstream.server.realtime`."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, WebSocket
from starlette.concurrency import run_in_threadpool

from vstream.server import access
from vstream.server.errors import ApiError
from vstream.server.realtime import RealtimeSession, deny
from vstream.server.routes import State
from vstream.server.state import ServerState, Stream
from vstream.sources import PushSource


def add_routes(app: FastAPI) -> None:
    app.add_api_websocket_route("/v1/realtime", realtime)


async def realtime(ws: WebSocket, state: State, stream_id: str | None = None):
    refused = _refusal(state, ws)
    if refused is not None:
        return await deny(ws, refused)
    owner = "ws_" + secrets.token_hex(8)
    try:
        stream = _attach(state, stream_id, owner)
    except ApiError as exc:
        return await deny(ws, exc)
    await ws.accept()
    session = RealtimeSession(ws, state, stream, owner, access.cookie_login(state, ws.headers))
    state.sockets.add(session)
    try:
        await session.run()
    finally:
        state.sockets.discard(session)
        if stream.owner == owner:
            await _drop(state, stream)


async def _drop(state: ServerState, stream: Stream) -> None:
    """Delete the stream its socket owned, with its saved files; when the server drains, save it instead (it comes
    back, owned by none, after the restart)."""
    keep = state.durable is not None and state.draining
    if keep:
        await run_in_threadpool(state.durable.save, state, stream, True)
    with state.lock:
        state.streams.pop(stream.id, None)
    await run_in_threadpool(stream.close)
    if state.durable is not None and not keep:
        await run_in_threadpool(state.durable.remove, stream.id)


def _refusal(state: ServerState, ws: WebSocket) -> ApiError | None:
    """Why the handshake is refused (Host, Origin, then the key or the page's cookie), or None."""
    refused = access.refusal(state, ws.headers, ws.url.path, "WEBSOCKET")
    if refused is None and not access.authorized(state, ws.headers):
        refused = ApiError(401, f"{access.NO_KEY.message} or the page's session cookie", code=access.NO_KEY.code)
    return refused


def _attach(state: ServerState, stream_id: str | None, owner: str) -> Stream:
    """The stream named by `stream_id`, or a new push stream owned by the socket `owner`."""
    if stream_id is not None:
        state.refuse_if_draining()
        return state.get(stream_id, "stream_id")
    state.reserve_slot()
    try:
        fps = state.model.cfg.sample_fps
        push = PushSource()
        return state.start_stream(push, True, push, {"type": "push"}, fps, owner)
    finally:
        state.release_slot()
