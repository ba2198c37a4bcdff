"""`POST /v1/chat/completions`: the OpenAI chat completion API over a stream's memory (the stream named by `model` or
`stream_id`), whole or as server-sent events. The answer is generated on its own thread (`answers.Generation`); a
client that goes away cancels it. No history is kept between questions: only the last user message is read."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vstream.server.answers import Generation, check_max_tokens, check_question, prompt_tokens, vstream_extension
from vstream.server.errors import ApiError, internal_error
from vstream.server.openapi import errors
from vstream.server.routes import State
from vstream.server.schemas import ChatRequest, error_body


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"], responses=errors(400, 404, 409, 429, 503))


async def chat(state: State, req: ChatRequest, request: Request):
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
        body = sse_answer(stream_id, generation)
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


def sse_answer(stream_id: str, generation: Generation):
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
