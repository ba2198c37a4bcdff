"""Watches (standing questions) as resources of a stream: `POST /v1/streams/{id}/watches`, list, get and delete
them, and the stream's event feed `GET /v1/streams/{id}/events` (server-sent events with `id:` lines, resumable with
`Last-Event-ID` while the ring still holds the events). The watches are evaluated by the server's `Watcher` thread
(started with the first watch), never on the event loop; this module only reads and edits the boards, checks a
watch's webhook URL (in the thread pool: it resolves the host) and applies the per-stream and per-server limits."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from vstream.engine.watches import Watch
from vstream.server import access
from vstream.server.errors import ApiError
from vstream.server.netsafe import UnsafeUrl
from vstream.server.openapi import errors
from vstream.server.routes import State
from vstream.server.schemas import WatchCreate
from vstream.server.state import ServerState, Stream
from vstream.server.webhooks import check_webhook

SSE = {200: {"content": {"text/event-stream": {}}, "description": "the stream's watch events, as server-sent events"}}
POLL_S = 0.1
HEARTBEAT_S = 15.0


def add_routes(app: FastAPI) -> None:
    base = "/v1/streams/{stream_id}"
    app.add_api_route(base + "/watches", create_watch, methods=["POST"], status_code=201,
                      responses=errors(400, 404, 429))
    app.add_api_route(base + "/watches", list_watches, methods=["GET"], responses=errors(404))
    app.add_api_route(base + "/watches/{watch_id}", get_watch, methods=["GET"], responses=errors(404))
    app.add_api_route(base + "/watches/{watch_id}", delete_watch, methods=["DELETE"], responses=errors(404))
    app.add_api_route(base + "/events", stream_events, methods=["GET"], response_class=StreamingResponse,
                      responses=SSE | errors(400, 404))


async def create_watch(state: State, stream_id: str, body: WatchCreate):
    stream = state.get(stream_id, "stream_id")
    board, limit = stream.board, state.limits.max_watches_per_stream
    webhook = None if body.webhook is None else await run_in_threadpool(_webhook, state, body.webhook)
    watch = Watch(body.condition, every_s=body.every_s, cooldown_s=body.cooldown_s, threshold=body.threshold,
                  hysteresis=body.hysteresis, webhook=webhook, escalate_margin=body.escalate_margin)
    with state.lock:
        total = sum(len(s.board.watches) for s in state.streams.values())
        if total >= state.limits.max_watches:
            raise ApiError(429, f"too many watches on this server: {total}, at most max_watches="
                           f"{state.limits.max_watches}; DELETE one first", code="too_many_watches")
        if len(board.watches) >= limit:
            raise ApiError(429, f"too many watches on stream {stream_id}: {len(board.watches)}, at most "
                           f"max_watches_per_stream={limit}; DELETE one first", code="too_many_watches")
        board.add(watch)
    state.start_watcher()
    return watch.view() | {"stream_id": stream_id}


def _webhook(state: ServerState, url: str) -> str:
    """The checked webhook URL (blocks: resolves its host); 400 naming the rule it breaks."""
    if state.webhooks is None:
        raise ApiError(400, "webhooks are off: the server was started without a webhook secret to sign them with "
                       "(vstream serve --webhook-secret, or VSTREAM_WEBHOOK_SECRET)", code="webhooks_disabled",
                       param="webhook")
    try:
        return check_webhook(url, state.allow_private_sources)
    except UnsafeUrl as exc:
        raise ApiError(400, f"webhook refused: {exc}", code=exc.code, param="webhook") from None


async def list_watches(state: State, stream_id: str):
    stream = state.get(stream_id, "stream_id")
    return {"object": "list", "data": [w.view() | {"stream_id": stream_id} for w in stream.board.list()]}


def _watch(state: ServerState, stream_id: str, watch_id: str) -> tuple[Stream, Watch]:
    stream = state.get(stream_id, "stream_id")
    watch = stream.board.watches.get(watch_id)
    if watch is None:
        raise ApiError(404, f"no watch with id {watch_id!r} on stream {stream_id}: expected one of the ids from "
                       f"GET /v1/streams/{stream_id}/watches", code="watch_not_found", param="watch_id")
    return stream, watch


async def get_watch(state: State, stream_id: str, watch_id: str):
    return _watch(state, stream_id, watch_id)[1].view() | {"stream_id": stream_id}


async def delete_watch(state: State, stream_id: str, watch_id: str):
    stream, _ = _watch(state, stream_id, watch_id)
    stream.board.remove(watch_id)
    return {"id": watch_id, "object": "watch.deleted", "deleted": True}


async def stream_events(state: State, request: Request, stream_id: str, last_event_id: str | None = Header(None)):
    """The stream's watch events from after `Last-Event-ID` (none given: from now on), as they come."""
    stream = state.get(stream_id, "stream_id")
    if last_event_id is None:
        after = stream.board.feed.last_id
    else:
        try:
            after = int(last_event_id)
        except ValueError:
            after = -1
        if after < 0:
            raise ApiError(400, f"Last-Event-ID must be an event id from this feed (an integer >= 0), got "
                           f"{last_event_id[:40]!r}", code="invalid_last_event_id", param="Last-Event-ID")
    login = access.cookie_login(state, request.headers)
    return StreamingResponse(_events(state, stream, after, login), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(state: ServerState, stream: Stream, after: int, login: str | None):
    """The feed, until the server drains, the stream goes or the page cookie it was opened with (`login`) is logged
    out or expires."""
    yield ": vstream watch events\n\n"
    quiet = 0.0
    while not state.draining and state.streams.get(stream.id) is stream and (
            login is None or state.cookies.valid(login)):
        events = stream.board.feed.since(after)
        for event in events:
            after = event["id"]
            yield f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
        quiet = 0.0 if events else quiet + POLL_S
        if quiet >= HEARTBEAT_S:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
