"""The HTTP server: streams as resources, OpenAI-compatible chat completions over a stream's memory, the realtime
WebSocket, the memory view, health, metrics and the web page.

Routes only translate between the wire and `StreamSession`. Model work never runs on the event loop: answers are
generated on their own threads (`vstream.server.answers`); opening and probing sources, decoding pushed frames and
closing streams run in the thread pool. The server keeps no history between questions and persists nothing.

Access (`vstream.server.gate`): requests must name an allowed Host (without a key: the names the server listens as)
and, from a browser page, come from the server's own origin to change state or open a realtime session. With an API
key, every route but `/health/*` and the page's static files needs `Authorization: Bearer KEY`, or the HttpOnly
cookie that `POST /v1/auth/cookie` (itself called with the key) sets for the page; a request carrying only the
cookie must come from the server's own origin. Every error is an OpenAI error object; one that no route expected is
logged and answered with a 500 naming only its log reference.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocketDisconnect

from vstream.engine import EngineConfig, StreamSession, engine_of
from vstream.errors import UserInputError
from vstream.server.answers import (Generation, check_max_tokens, check_question, prompt_tokens,
                                    vstream_extension)
from vstream.server import gate
from vstream.server.gate import COOKIE, NO_KEY, PAGE_HEADERS, AsciiJSONResponse, Gate, authorized, error_response
from vstream.server.inputs import open_stream_source
from vstream.server.openapi import document, errors
from vstream.server.realtime import RealtimeSession, deny, watch
from vstream.server.schemas import ChatRequest, StreamCreate, error_body
from vstream.server.state import ApiError, Limits, ServerState, Stream, Thumbnails, internal_error, log
from vstream.sources import PushSource

STATIC = Path(__file__).with_name("static")
COOKIE_TTL_S = 12 * 3600
MAX_COOKIES = 64


def start_stream(state: ServerState, frames, live: bool, push: PushSource | None, source: dict, fps: float,
                 owner: str | None = None) -> Stream:
    """Register a stream (the caller holds a reserved slot) and start its session."""
    thumbnails = Thumbnails(state.limits.thumbnails)
    session = StreamSession(state.model, history=state.limits.snapshot_history, on_frames=thumbnails.add,
                            engine=state.engine)
    stream_id = "str_" + secrets.token_hex(8)
    stream = Stream(stream_id, session, source, time.time(), fps, thumbnails, push, owner)
    session.start(frames, live=live)
    with state.lock:
        state.streams[stream_id] = stream
    return stream


def reserve_slot(state: ServerState) -> None:
    state.refuse_if_draining()
    with state.lock:
        if len(state.streams) + state.pending >= state.max_streams:
            raise ApiError(429, f"too many streams: {len(state.streams)} open, at most max_streams="
                           f"{state.max_streams}; DELETE one first", code="too_many_streams", retry_after=5)
        state.pending += 1


def release_slot(state: ServerState) -> None:
    with state.lock:
        state.pending -= 1


def stream_view(state: ServerState, stream: Stream) -> dict:
    stats = stream.session.stats()
    if stats["error"] is not None:
        stats["error"] = state.public_text(stats["error"])
    if stats["error"] is not None:
        status = "failed"
    elif stats["finished"]:
        status = "finished"
    else:
        status = "running" if stream.session.snapshot() is not None else "starting"
    counts = stream.counts()
    stats |= {"frames_dropped_total": counts["dropped"], "frames_pushed": stream.pushed if stream.push else None}
    return {"id": stream.id, "object": "stream", "created": int(stream.created), "source": stream.source,
            "live": stream.session.live, "fps": stream.fps, "state": status, "stats": stats}


def memory_view(stream: Stream, as_of: float | None) -> dict:
    """What the bounded memory holds (now, or as of an earlier stream time), with thumbnail links for its frames."""
    if stream.session.snapshot() is None:
        raise ApiError(409, f"stream {stream.id} has no frame yet: its memory is empty", code="stream_not_ready")
    try:
        snap = stream.session.snapshot() if as_of is None else stream.session.snapshot_at(as_of)
    except LookupError as exc:
        raise ApiError(400, f"as_of={as_of}: {exc}", code="as_of_unavailable", param="as_of") from exc
    memory = snap.memory

    def frame(t: float) -> dict:
        kept = stream.thumbnails.has(t)
        return {"time": t, "thumbnail": f"/v1/streams/{stream.id}/frames?t={t!r}" if kept else None}

    spans, weights = snap.temporal_spans, snap.temporal_weights  # host copies: the event loop reads no device
    return {
        "object": "stream.memory", "stream_id": stream.id, "version": snap.version, "as_of": as_of,
        "stream_time": snap.stream_time, "frames_seen": memory.frames_seen,
        "tokens": {"total": memory.num_tokens, **memory.counts},
        "bytes": stream.session.memory.nbytes,
        "temporal": [{"first": a, "last": b, "mean": m, "weight": w} for (a, b, m), w in zip(spans, weights)],
        "retrieved": [frame(t) for t in snap.retrieved_times],
        "spatial": [frame(t) for t in snap.spatial_times],
    }


def close_stream(stream: Stream) -> None:
    if stream.push is not None:
        stream.push.close()
    stream.session.close()


def warm_up(state: ServerState) -> float:
    """Make the model's engine with the server's limits (graph captures; an engine that already serves the model,
    made by an earlier app in this process, is kept as it is) and run one whole answer path through it on a blank
    frame (crop, encode, memory, projector, prefill, decode), so that the first real request pays no first-use costs;
    returns seconds."""
    import numpy as np

    t0 = time.perf_counter()
    model = state.model
    limits = state.limits
    state.engine = engine_of(model, EngineConfig(answer_slots=min(limits.max_running, 32),
                                                 max_waiting=limits.max_running))
    log.info("engine ready in %.1f s (%s)", state.engine.warmup_s, state.engine.stats())
    side = model.cfg.vision.image_size
    with StreamSession(model, engine=state.engine) as session:
        session.lane.put(0.0, model.crop([np.zeros((side, side, 3), np.uint8)])[0])
        session.wait_for_frames(1, timeout=600)
        session.ask("What is on the screen?", max_new_tokens=2)
    return time.perf_counter() - t0


def create_app(model, media_root: Path | None = None, api_key: str | None = None, max_streams: int = 8, *,
               allow_private_sources: bool = False, limits: Limits | None = None,
               allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The FastAPI app over a loaded model. `media_root` bounds file sources (None: file sources refused); URL sources
    on loopback, private or reserved addresses are refused unless `allow_private_sources`. `allowed_hosts`: the Host
    names requests may use ('*': any); None: the loopback names without a key, any with one (see `gate`)."""
    if media_root is not None and not Path(media_root).is_dir():
        raise UserInputError(f"media_root must be an existing directory, got {media_root}")
    if allowed_hosts is None and api_key is None:
        allowed_hosts = gate.default_allowed_hosts("127.0.0.1")
    state = ServerState(model, None if media_root is None else Path(media_root), api_key, max_streams,
                        limits or Limits(), allow_private_sources, gate.allowed_hosts(allowed_hosts))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.warmup_s = await run_in_threadpool(warm_up, state)  # before the first request is accepted
        state.ready = True
        yield
        state.ready = False
        for stream in list(state.streams.values()):
            await run_in_threadpool(close_stream, stream)

    app = FastAPI(title="vstream", lifespan=lifespan, version="0.1.0", default_response_class=AsciiJSONResponse,
                  description="Question answering over live video streams from a bounded STAR memory.")
    app.state.vstream = state
    app.add_middleware(Gate, state=state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_error_handlers(app)
    fastapi_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document(fastapi_openapi(), state)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"} | PAGE_HEADERS)

    @app.get("/health/live")
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready", responses=errors(503))
    async def ready():
        if state.draining:
            raise ApiError(503, "not ready: the server is draining", code="draining", retry_after=5)
        if not state.ready:
            raise ApiError(503, "not ready: the server is starting or shutting down", code="not_ready")
        return {"status": "ready", "model": state.model.cfg.name, "auth_required": state.api_key is not None,
                "warmup_s": round(state.warmup_s, 3)}

    @app.post("/v1/auth/cookie", status_code=204)
    async def login():
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

    @app.delete("/v1/auth/cookie", status_code=204)
    async def logout(request: Request):
        state.cookies.pop(request.cookies.get(COOKIE, ""), None)
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.post("/v1/streams", status_code=201, responses=errors(400, 403, 404, 429, 503))
    async def create_stream(body: StreamCreate):
        reserve_slot(state)
        try:
            frames, is_live, push, fps = await run_in_threadpool(open_stream_source, state, body)
            stream = start_stream(state, frames, is_live, push, body.source.model_dump(), fps)
        finally:
            release_slot(state)
        return stream_view(state, stream)

    @app.get("/v1/streams")
    async def list_streams():
        return {"object": "list", "data": [stream_view(state, s) for s in list(state.streams.values())]}

    @app.get("/v1/streams/{stream_id}", responses=errors(404))
    async def get_stream(stream_id: str):
        return stream_view(state, state.get(stream_id, "stream_id"))

    @app.delete("/v1/streams/{stream_id}", responses=errors(404))
    async def delete_stream(stream_id: str):
        with state.lock:
            stream = state.get(stream_id, "stream_id")
            del state.streams[stream_id]
        await run_in_threadpool(close_stream, stream)
        return {"id": stream_id, "object": "stream.deleted", "deleted": True}

    @app.get("/v1/streams/{stream_id}/memory", responses=errors(400, 404, 409))
    async def get_memory(stream_id: str, as_of: float | None = Query(None, ge=0, allow_inf_nan=False)):
        return memory_view(state.get(stream_id, "stream_id"), as_of)

    @app.get("/v1/streams/{stream_id}/frames", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"}} | errors(400, 404))
    async def get_frame(stream_id: str, t: float = Query(..., ge=0, allow_inf_nan=False)):
        """The thumbnail of the ingested frame at stream time `t` (within 1 ms), while the stream keeps it."""
        kept = state.get(stream_id, "stream_id").thumbnails.nearest(t)
        if kept is None:
            raise ApiError(404, f"no thumbnail kept for t={t} in stream {stream_id}: expected the time of a recent "
                           "ingested frame (see GET /v1/streams/{id}/memory)", code="frame_not_kept", param="t")
        return Response(kept[1], media_type="image/jpeg",
                        headers={"X-Frame-Time": repr(kept[0]), "Cache-Control": "private, max-age=3600"})

    @app.post("/v1/chat/completions", responses=errors(400, 404, 409, 429, 503))
    async def chat(req: ChatRequest, request: Request):
        t0 = time.perf_counter()
        stream_id = req.stream_id or req.model
        if not stream_id:
            raise ApiError(400, "no stream named: expected the stream id in 'model' or 'stream_id'", param="model")
        question = check_question(state, question_of(req))
        max_tokens = check_max_tokens(state, req.max_completion_tokens or req.max_tokens,
                                      "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        stream = state.get(stream_id)
        state.begin_answer()
        try:
            generation = Generation(state, stream, question, max_tokens, req.as_of, t0)
        except BaseException:
            state.end_answer()
            raise
        if req.stream:
            body = sse_answer(state, stream_id, generation)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text = await whole_answer(generation, request)
            prompt = await run_in_threadpool(prompt_tokens, state.model, generation.snapshot, question)
        except RuntimeError as exc:  # the model failed: its text may name server paths, the log keeps it
            raise internal_error(exc, f"the answer on stream {stream_id}") from exc
        finally:
            generation.release()
        if text is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        completion = generation.pieces
        return completion_base(stream_id, "chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "vstream": vstream_extension(generation.snapshot, req.as_of),
        }

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket, stream_id: str | None = None):
        await realtime_session(state, ws, stream_id)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as the OpenAI error object: ApiError with its status, validation errors as 400 naming each field
    and what came, Starlette's own (unknown route, unreadable body) with theirs."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None

        def describe(e: dict) -> str:
            given = f", got {json.dumps(e['input'], default=str)[:80]}" if "input" in e else ""
            return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}{given}"

        return error_response(ApiError(400, "; ".join(map(describe, errors)), "invalid_request", where))

    @app.exception_handler(HTTPException)
    async def starlette_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            message = "the body nests JSON deeper than the server parses: expected a flat request object"
        return error_response(ApiError(exc.status_code, message, code))


# ---------------------------------------------------------------------------------------------------------- chat


def question_of(req: ChatRequest) -> str:
    """The text of the last user message; 400 when there is none or it is empty."""
    if not req.messages:
        raise ApiError(400, "messages is missing or empty: expected at least one user message", param="messages")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        roles = [m.role for m in req.messages]
        raise ApiError(400, f"expected a message with role 'user', got roles {roles}", param="messages")
    content = users[-1].content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if part.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise ApiError(400, "a text part of the last user message has no string 'text': expected "
                           "{'type': 'text', 'text': '...'}", param="messages")
        content = "".join(texts)
    if not content or not content.strip():
        raise ApiError(400, "the last user message has no text: expected a non-empty question", param="messages")
    return content


def completion_base(stream_id: str, obj: str) -> dict:
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": obj, "created": int(time.time()), "model": stream_id}


async def whole_answer(generation: Generation, request: Request) -> str | None:
    """The whole answer text, or None if the client disconnected first (generation is then cancelled)."""
    pieces = []
    gone = asyncio.create_task(_disconnected(request))
    try:
        async for piece in generation:
            if gone.done():
                return None
            pieces.append(piece)
    finally:
        gone.cancel()
    return "".join(pieces).strip()


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def sse_answer(state: ServerState, stream_id: str, generation: Generation):
    """An SSE body: role chunk, content chunks, the stop chunk, then `[DONE]`. A client that goes away cancels the
    generation (the body is closed; the generation thread stops after its current token)."""
    base = completion_base(stream_id, "chat.completion.chunk") | {
        "vstream": vstream_extension(generation.snapshot, generation.as_of)}

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    async def body():
        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for piece in generation:
                    yield chunk({"content": piece})
                yield chunk({}, "stop")
            except RuntimeError as exc:  # the model failed: its text may name server paths, the log keeps it
                error = internal_error(exc, f"the answer on stream {stream_id}")
                yield f"data: {json.dumps(error_body(error.message, 'server_error', 'generation_failed'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
            generation.release()

    return body()


# ---------------------------------------------------------------------------------------------------------- realtime


async def realtime_session(state: ServerState, ws: WebSocket, stream_id: str | None) -> None:
    """Check Host, Origin and key, attach to (or create) the stream, then run the session until either side closes
    it."""
    refused = gate.refusal(state, ws.headers, ws.url.path, "WEBSOCKET")
    if refused is None and not authorized(state, ws.headers):
        refused = ApiError(401, f"{NO_KEY.message} or the page's session cookie", code=NO_KEY.code)
    if refused is not None:
        return await deny(ws, refused)
    owner = "ws_" + secrets.token_hex(8)
    try:
        if stream_id is not None:
            state.refuse_if_draining()
            stream = state.get(stream_id, "stream_id")
        else:
            reserve_slot(state)
            try:
                fps = state.model.cfg.sample_fps
                push = PushSource()
                stream = start_stream(state, push, True, push, {"type": "push"}, fps, owner)
            finally:
                release_slot(state)
    except ApiError as exc:
        return await deny(ws, exc)
    await ws.accept()
    session = RealtimeSession(ws, state, stream)
    state.sockets.add(session)
    limits = state.limits
    session.send({"type": "session.created", "event_id": "evt_" + secrets.token_hex(8),
                  "session": {"id": owner, "stream_id": stream.id, "fps": stream.fps, "push": stream.push is not None,
                              "owns_stream": stream.owner == owner,
                              "max_message_bytes": limits.max_ws_message_bytes, "idle_timeout_s": limits.ws_idle_s}})
    sender = asyncio.create_task(session.sender())
    watcher = asyncio.create_task(watch(session))
    close_code, reason = 1000, ""
    try:
        while True:
            receive = asyncio.create_task(ws.receive())
            done, _ = await asyncio.wait({receive, watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                close_code, reason = (1001, session.closing or "closing") if watcher in done else (1011, "send failed")
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                close_code = None
                break
            size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
            if size > limits.max_ws_message_bytes:
                close_code, reason = 1009, f"message of {size} bytes over max_ws_message_bytes"
                break
            session.last_message = time.monotonic()
            if session.closing == "idle":
                session.closing = None
            await session.handle(message)
    except WebSocketDisconnect:
        close_code = None
    except Exception as exc:  # not the client's doing (its messages' errors are events): logged, closed as such
        close_code, reason = 1011, internal_error(exc, f"the realtime session {owner}").message[:120]
    finally:
        session.cancel_response()
        watcher.cancel()
        if close_code is not None:
            session.send(None)
            try:
                await asyncio.wait_for(sender, 2.0)
                await ws.close(close_code, reason)
            except Exception:  # the client is already gone: nothing left to tell it
                pass
        sender.cancel()
        state.sockets.discard(session)
        if stream.owner == owner:
            with state.lock:
                state.streams.pop(stream.id, None)
            await run_in_threadpool(close_stream, stream)


# ---------------------------------------------------------------------------------------------------------- ops


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition: per-stream counters and gauges labelled by stream id, server-wide TTFT."""
    per_stream = [("frames_ingested_total", "counter", "Frames encoded into the memory.", "ingested"),
                  ("frames_received_total", "counter", "Frames read from the source or pushed.", "received"),
                  ("frames_dropped_total", "counter", "Frames not ingested: over the target rate or behind.",
                   "dropped"),
                  ("memory_tokens", "gauge", "Tokens in the stream's memory.", "memory_tokens")]
    stats = {}
    for sid, s in list(state.streams.items()):
        snap = s.session.snapshot()
        stats[sid] = s.counts() | {"memory_tokens": 0 if snap is None else snap.memory.num_tokens}
    lines = []
    for name, kind, help_text, key in per_stream:
        lines += [f"# HELP vstream:{name} {help_text}", f"# TYPE vstream:{name} {kind}"]
        lines += [f'vstream:{name}{{stream_id="{sid}"}} {st[key]}' for sid, st in stats.items()]
    lines += ["# HELP vstream:num_streams Open streams.", "# TYPE vstream:num_streams gauge",
              f"vstream:num_streams {len(stats)}",
              "# HELP vstream:num_requests_running Answers being generated.",
              "# TYPE vstream:num_requests_running gauge", f"vstream:num_requests_running {state.running}",
              "# HELP vstream:num_realtime_sessions Open WebSocket sessions.",
              "# TYPE vstream:num_realtime_sessions gauge", f"vstream:num_realtime_sessions {len(state.sockets)}",
              "# HELP vstream:requests_cancelled_total Answers stopped before their end (disconnect or cancel).",
              "# TYPE vstream:requests_cancelled_total counter",
              f"vstream:requests_cancelled_total {state.answers_cancelled}",
              "# HELP vstream:time_to_first_token_seconds Request received to first answer piece.",
              "# TYPE vstream:time_to_first_token_seconds histogram"]
    lines += state.ttft.lines("vstream:time_to_first_token_seconds")
    engine = state.engine
    if engine is not None:
        lines += ["# HELP vstream:engine_answers_pending Answers waiting for a slot, prefilling or decoding.",
                  "# TYPE vstream:engine_answers_pending gauge",
                  f"vstream:engine_answers_pending {engine.pending_answers}",
                  "# HELP vstream:engine_rounds_total Rounds of frames the engine ran (all streams together).",
                  "# TYPE vstream:engine_rounds_total counter", f"vstream:engine_rounds_total {engine.rounds}"]
    device = state.model.device
    if device.type == "cuda":  # the allocator's own counters: no device synchronisation
        import torch

        lines += ["# HELP vstream:gpu_memory_allocated_bytes GPU memory held by tensors.",
                  "# TYPE vstream:gpu_memory_allocated_bytes gauge",
                  f"vstream:gpu_memory_allocated_bytes {torch.cuda.memory_allocated(device)}",
                  "# HELP vstream:gpu_memory_reserved_bytes GPU memory reserved by the caching allocator.",
                  "# TYPE vstream:gpu_memory_reserved_bytes gauge",
                  f"vstream:gpu_memory_reserved_bytes {torch.cuda.memory_reserved(device)}"]
    return "\n".join(lines) + "\n"


def begin_drain(state: ServerState, grace_s: float) -> None:
    """Stop taking work: readiness turns 503, new streams, sessions and questions get 503, and open sessions get a
    `session.closing` notice and are closed after `grace_s` seconds. Thread-safe."""
    state.drain_deadline = time.monotonic() + grace_s
    state.draining = True


def serve(model_name_or_path: str, host: str = "127.0.0.1", port: int = 8000, media_root: Path | None = None,
          api_key: str | None = None, max_streams: int = 8, device: str = "auto", *,
          allow_private_sources: bool = False, drain_s: float = 10.0, limits: Limits | None = None,
          allowed_hosts: Iterable[str] = ()) -> None:
    """Load the model with `vstream.load` and serve until interrupted. The first SIGINT/SIGTERM drains (see
    `begin_drain`) for up to `drain_s` seconds, then stops; a second one stops at once. Requests may name the
    Host names `host` is bound as (`gate.default_allowed_hosts`) and `allowed_hosts` ('*': any); with an API key and
    no `allowed_hosts`, any Host (see `gate`)."""
    import threading

    import uvicorn

    import vstream

    extra = list(allowed_hosts)
    hosts = None if api_key is not None and not extra else [*gate.default_allowed_hosts(host), *extra]
    gate.allowed_hosts(hosts)  # a malformed name is an error before the model loads
    model = vstream.load(model_name_or_path, device=device)
    limits = limits or Limits()
    app = create_app(model, media_root, api_key, max_streams, allow_private_sources=allow_private_sources,
                     limits=limits, allowed_hosts=hosts or ["*"])
    state: ServerState = app.state.vstream

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining or drain_s <= 0:
                return super().handle_exit(sig, frame)
            begin_drain(state, drain_s)

            def stop_when_done():
                while time.monotonic() < state.drain_deadline + 0.5 and (state.sockets or state.running):
                    time.sleep(0.05)
                self.should_exit = True

            threading.Thread(target=stop_when_done, daemon=True).start()

    config = uvicorn.Config(app, host=host, port=port, ws_max_size=limits.max_ws_message_bytes + 1024,
                            timeout_graceful_shutdown=5)
    DrainingServer(config).run()
