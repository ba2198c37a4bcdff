"""The HTTP server: streams as resources, OpenAI-compatible chat completions over a stream's memory, health, metrics.

Routes only translate between the wire and `StreamSession`. Model work never runs on the event loop: a non-streamed
answer runs in the thread pool, a streamed one in its own thread that hands text pieces to the loop. The server does
not push frames (no WebSocket yet), keeps no history between questions and persists nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vstream.engine import StreamSession
from vstream.model.prompts import build_prompt, tokenizer_image_token
from vstream.server.schemas import ChatRequest, FileSpec, PushSpec, StreamCreate, UrlSpec, error_body
from vstream.sources import PushSource, file_source, network_source, replay_source

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An error answered with the OpenAI error object and `status`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class Stream:
    id: str
    session: StreamSession
    source: dict
    created: float
    push: PushSource | None = None


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); thread-safe."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.sum, self.count, self._lock = 0.0, 0, threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        with self._lock:
            out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
            return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


@dataclass
class ServerState:
    model: object
    media_root: Path | None
    api_key: str | None
    max_streams: int
    streams: dict[str, Stream] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    ready: bool = False

    def get(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ApiError(404, f"no stream with id {stream_id!r}: expected one of the ids from GET /v1/streams",
                           code="stream_not_found", param="model")
        return stream


# ---------------------------------------------------------------------------------------------------------- sources


def resolve_media(media_root: Path | None, rel: str) -> Path:
    """`rel` inside the media root, symlinks resolved: 403 outside it (nothing is read), 404 missing, 400 not a file."""
    if media_root is None:
        raise ApiError(403, "file sources are disabled: the server was started without a media root",
                       param="source.path")
    root = media_root.resolve(strict=True)
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"path {rel!r} resolves outside the media root: expected a path inside it",
                       code="path_outside_media_root", param="source.path")
    if not path.exists():
        raise ApiError(404, f"no file {rel!r} under the media root", code="file_not_found", param="source.path")
    if not path.is_file():
        raise ApiError(400, f"{rel!r} is not a regular file", param="source.path")
    return path


def open_stream_source(state: ServerState, body: StreamCreate):
    """(frames, live, push source or None) for a validated request; raises ApiError on a bad source."""
    fps = state.model.cfg.sample_fps
    spec = body.source
    if isinstance(spec, FileSpec):
        path = resolve_media(state.media_root, spec.path)
        if body.speed is None:
            return file_source(str(path), fps=fps), False, None
        return replay_source(str(path), fps=fps, speed=body.speed), True, None
    if body.speed is not None:
        raise ApiError(400, f"speed applies to file sources only, got speed={body.speed} for a {spec.type} source",
                       param="speed")
    if isinstance(spec, UrlSpec):
        try:
            return network_source(spec.url, fps=fps), True, None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="source.url") from exc
    assert isinstance(spec, PushSpec)
    push = PushSource()
    return push, True, push


def stream_view(stream: Stream) -> dict:
    stats = stream.session.stats()
    if stats["error"] is not None:
        state = "failed"
    elif stats["finished"]:
        state = "finished"
    else:
        state = "running" if stream.session.snapshot() is not None else "starting"
    return {"id": stream.id, "object": "stream", "created": int(stream.created), "source": stream.source,
            "live": stream.session.live, "state": state, "stats": stats}


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
        content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    if not content or not content.strip():
        raise ApiError(400, "the last user message has no text: expected a non-empty question", param="messages")
    return content


def prompt_tokens(model, snapshot, question: str) -> int:
    """Tokens the LLM reads: the prompt's text tokens, with the one placeholder replaced by the memory tokens."""
    ids = tokenizer_image_token(build_prompt(model.cfg.template, question), model.tokenizer)
    return len(ids) - 1 + snapshot.memory.num_tokens


def completion_base(stream_id: str, obj: str) -> dict:
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": obj, "created": int(time.time()), "model": stream_id}


def vstream_extension(snapshot) -> dict:
    memory = snapshot.memory
    return {"stream_time": snapshot.stream_time, "frames": snapshot.frames,
            "spatial_times": memory.spatial_times.tolist(), "retrieved_times": memory.retrieved_times.tolist(),
            "temporal_spans": [[a, b] for a, b, _ in memory.temporal_spans.tolist()]}


def answer_whole(state: ServerState, session: StreamSession, question: str, max_tokens: int | None, t0: float):
    """Runs in a worker thread: the snapshot, the answer text and its completion token count."""
    snapshot, pieces = session.ask_stream(question, max_new_tokens=max_tokens)
    text = []
    for piece in pieces:
        if not text:
            state.ttft.observe(time.perf_counter() - t0)
        text.append(piece)
    return snapshot, "".join(text).strip(), len(text)


def sse_answer(state: ServerState, stream_id: str, session: StreamSession, question: str, max_tokens, t0: float):
    """An SSE body: role chunk, content chunks from a generation thread, the stop chunk, then `[DONE]`."""
    snapshot, pieces = session.ask_stream(question, max_new_tokens=max_tokens)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    end = object()

    def generate() -> None:  # its own thread: the event loop never runs model code
        try:
            for piece in pieces:
                if cancel.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            loop.call_soon_threadsafe(queue.put_nowait, end)
        except Exception as exc:
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            pieces.close()

    base = completion_base(stream_id, "chat.completion.chunk") | {"vstream": vstream_extension(snapshot)}

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    async def body():
        worker = threading.Thread(target=generate, name=f"vstream-answer-{stream_id}", daemon=True)
        state.running += 1
        try:
            yield chunk({"role": "assistant", "content": ""})
            worker.start()
            first = True
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(error_body(f'generation failed: {item}', 'server_error'))}\n\n"
                    break
                if first:
                    state.ttft.observe(time.perf_counter() - t0)
                    first = False
                yield chunk({"content": item})
            else:
                yield chunk({}, "stop")
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect: the generation thread stops after its current token
            cancel.set()
            state.running -= 1

    return body()


# ---------------------------------------------------------------------------------------------------------- app


def create_app(model, media_root: Path | None = None, api_key: str | None = None, max_streams: int = 8) -> FastAPI:
    """The FastAPI app over a loaded model. `media_root` bounds file sources (None: file sources refused)."""
    if media_root is not None and not Path(media_root).is_dir():
        raise ValueError(f"media_root must be an existing directory, got {media_root}")
    state = ServerState(model, None if media_root is None else Path(media_root), api_key, max_streams)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.ready = True
        yield
        state.ready = False
        for stream in list(state.streams.values()):
            await run_in_threadpool(close_stream, stream)

    app = FastAPI(title="vstream", lifespan=lifespan)
    app.state.vstream = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        kind = _ERROR_TYPES.get(exc.status, "server_error")
        return JSONResponse(error_body(exc.message, kind, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", where), status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
        return JSONResponse(body, status_code=500)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if state.api_key is not None and not request.url.path.startswith("/health/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                body = error_body("missing or wrong API key: expected 'Authorization: Bearer <key>'",
                                  "authentication_error", "invalid_api_key")
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.get("/health/live")
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        if not state.ready:
            raise ApiError(503, "not ready: the server is starting or shutting down", code="not_ready")
        return {"status": "ready", "model": state.model.cfg.name}

    @app.post("/v1/streams", status_code=201)
    async def create_stream(body: StreamCreate):
        with state.lock:
            if len(state.streams) >= state.max_streams:
                raise ApiError(429, f"too many streams: {len(state.streams)} open, at most {state.max_streams}; "
                               "DELETE one first", code="too_many_streams")
            stream_id = "str_" + secrets.token_hex(8)
            frames, is_live, push = open_stream_source(state, body)
            session = StreamSession(state.model).start(frames, live=is_live)
            state.streams[stream_id] = Stream(stream_id, session, body.source.model_dump(), time.time(), push)
        return stream_view(state.streams[stream_id])

    @app.get("/v1/streams")
    async def list_streams():
        return {"object": "list", "data": [stream_view(s) for s in list(state.streams.values())]}

    @app.get("/v1/streams/{stream_id}")
    async def get_stream(stream_id: str):
        return stream_view(state.get(stream_id))

    @app.delete("/v1/streams/{stream_id}")
    async def delete_stream(stream_id: str):
        with state.lock:
            stream = state.get(stream_id)
            del state.streams[stream_id]
        await run_in_threadpool(close_stream, stream)
        return {"id": stream_id, "object": "stream.deleted", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        t0 = time.perf_counter()
        stream_id = req.stream_id or req.model
        if not stream_id:
            raise ApiError(400, "no stream named: expected the stream id in 'model' or 'stream_id'", param="model")
        question = question_of(req)
        stream = state.get(stream_id)
        if stream.session.snapshot() is None:
            raise ApiError(409, f"stream {stream_id} has no frame yet: ask again once frames are ingested",
                           code="stream_not_ready")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.stream:
            body = sse_answer(state, stream_id, stream.session, question, max_tokens, t0)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        state.running += 1
        try:
            snapshot, text, completion = await run_in_threadpool(
                answer_whole, state, stream.session, question, max_tokens, t0)
            prompt = await run_in_threadpool(prompt_tokens, state.model, snapshot, question)
        finally:
            state.running -= 1
        return completion_base(stream_id, "chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "vstream": vstream_extension(snapshot),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    return app


def close_stream(stream: Stream) -> None:
    if stream.push is not None:
        stream.push.close()
    stream.session.close()


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition: per-stream counters and gauges labelled by stream id, server-wide TTFT."""
    per_stream = [("frames_ingested_total", "counter", "Frames encoded into the memory.", "frames_encoded"),
                  ("frames_received_total", "counter", "Frames read from the source.", "frames_received"),
                  ("frames_dropped_total", "counter", "Frames dropped: ingestion fell behind.", "frames_dropped"),
                  ("memory_tokens", "gauge", "Tokens in the stream's memory.", "memory_tokens")]
    stats = {sid: s.session.stats() for sid, s in list(state.streams.items())}
    lines = []
    for name, kind, help_text, key in per_stream:
        lines += [f"# HELP vstream:{name} {help_text}", f"# TYPE vstream:{name} {kind}"]
        lines += [f'vstream:{name}{{stream_id="{sid}"}} {st[key]}' for sid, st in stats.items()]
    lines += ["# HELP vstream:num_streams Open streams.", "# TYPE vstream:num_streams gauge",
              f"vstream:num_streams {len(stats)}",
              "# HELP vstream:num_requests_running Answers being generated.",
              "# TYPE vstream:num_requests_running gauge", f"vstream:num_requests_running {state.running}",
              "# HELP vstream:time_to_first_token_seconds Request received to first answer piece.",
              "# TYPE vstream:time_to_first_token_seconds histogram"]
    lines += state.ttft.lines("vstream:time_to_first_token_seconds")
    return "\n".join(lines) + "\n"


def serve(model_name_or_path: str, host: str = "127.0.0.1", port: int = 8000, media_root: Path | None = None,
          api_key: str | None = None, max_streams: int = 8, device: str = "cpu") -> None:
    """Load the model with `vstream.load` and serve the API with uvicorn until interrupted."""
    import uvicorn

    import vstream

    model = vstream.load(model_name_or_path, device=device)
    uvicorn.run(create_app(model, media_root, api_key, max_streams), host=host, port=port)
