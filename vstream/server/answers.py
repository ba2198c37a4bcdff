"""Answers as the routes need them: the question checked against the limits, generation on its own thread with its
pieces handed to the event loop, cancellation between tokens, and the stream times an answer rests on.

The event loop never runs model code: `Generation` starts a thread that iterates the model's pieces and posts them to
the loop; closing the consumer (a client gone, `response.cancel`) stops that thread after its current token.
"""

from __future__ import annotations

import asyncio
import threading
import time

from vstream.model.prompts import build_prompt, tokenizer_image_token
from vstream.server.errors import ApiError
from vstream.server.state import ServerState, Stream


JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


def check_question(state: ServerState, question, param: str = "messages") -> str:
    """`question` if it is non-empty text within the length limit; ApiError(400) naming what is wrong otherwise."""
    if question is not None and not isinstance(question, str):
        raise ApiError(400, f"the question must be a string, got {JSON_TYPES.get(type(question), 'a value')}: "
                       f"{str(question)[:40]!r}", param=param)
    if not question or not question.strip():
        raise ApiError(400, "the question is empty: expected a non-empty question", param=param)
    limit = state.limits.max_question_chars
    if len(question) > limit:
        raise ApiError(400, f"the question has {len(question)} characters, over the limit max_question_chars="
                       f"{limit}", code="limit_exceeded", param=param)
    try:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer (and no UTF-8) can take
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"the question has a lone UTF-16 surrogate {question[exc.start]!r} at character "
                       f"{exc.start}: expected Unicode text (a surrogate escape must pair a high with a low one)",
                       code="invalid_text", param=param) from exc
    return question


def check_max_tokens(state: ServerState, max_tokens: int | None, param: str = "max_tokens") -> int | None:
    limit = state.limits.max_answer_tokens
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(400, f"{param}={max_tokens} is over the limit max_answer_tokens={limit}",
                       code="limit_exceeded", param=param)
    return max_tokens


def prompt_tokens(model, snapshot, question: str) -> int:
    """Tokens the LLM reads: the prompt's text tokens, with the one placeholder replaced by the memory tokens."""
    ids = tokenizer_image_token(build_prompt(model.cfg.template, question), model.tokenizer)
    return len(ids) - 1 + snapshot.memory.num_tokens


def vstream_extension(snapshot, as_of: float | None = None) -> dict:
    """The stream times an answer rests on: the memory's time, its spatial frames, retrieved key frames, clusters."""
    return {"stream_time": snapshot.stream_time, "frames": snapshot.frames, "as_of": as_of,
            "spatial_times": list(snapshot.spatial_times), "retrieved_times": list(snapshot.retrieved_times),
            "temporal_spans": [[a, b] for a, b, _ in snapshot.temporal_spans]}  # host copies, no device read


class Generation:
    """One answer: the snapshot it rests on, and its text pieces generated on a thread and read with `async for`.

    Raises ApiError(409) when the stream has no frame yet, ApiError(400) when `as_of` is earlier than every kept
    snapshot. Leaving the `async for` early (or `cancel()`) stops the thread after its current token.
    """

    def __init__(self, state: ServerState, stream: Stream, question: str, max_tokens: int | None,
                 as_of: float | None, t0: float):
        self._released = True  # a construction that fails releases nothing: its caller ends the count itself
        self.cancelled = threading.Event()
        if stream.session.snapshot() is None:
            raise ApiError(409, f"stream {stream.id} has no frame yet: ask again once frames are ingested",
                           code="stream_not_ready")
        try:
            self.snapshot, self._pieces = stream.session.ask_stream(question, max_new_tokens=max_tokens, as_of=as_of)
        except LookupError as exc:
            raise ApiError(400, f"as_of={as_of}: {exc}", code="as_of_unavailable", param="as_of") from exc
        self.state, self.stream_id, self.t0, self.as_of = state, stream.id, t0, as_of
        self._released = False
        self.pieces = 0
        self.finished = False

    def cancel(self) -> None:
        self.cancelled.set()

    def release(self) -> None:
        """End this answer's count in `state.running` (once; the caller counted it with `begin_answer`)."""
        if not self._released:
            self._released = True
            self.state.end_answer()

    def __del__(self):  # a response body dropped before it started (its client left at once) still releases
        self.cancelled.set()
        self.release()

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, end: object) -> None:
        def post(item) -> bool:
            if loop.is_closed():  # the server stopped under this answer: nobody is left to read it
                self.cancelled.set()
                return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # closed between the check and the call
                self.cancelled.set()
                return False
            return True

        try:
            for piece in self._pieces:
                if self.cancelled.is_set() or not post(piece):
                    break
            post(end)
        except Exception as exc:  # reported to the consumer, which answers with an error  # noqa: BLE001
            post(exc)
        finally:
            self._pieces.close()

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()
        worker = threading.Thread(target=self._run, args=(loop, queue, end), daemon=True,
                                  name=f"vstream-answer-{self.stream_id}")
        worker.start()
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    raise RuntimeError(f"generation failed: {item}") from item
                if self.pieces == 0:
                    waited = time.perf_counter() - self.t0
                    self.state.ttft.observe(waited)
                    self.state.recent_ttft.add(waited)
                self.pieces += 1
                yield item
            self.finished = True
        finally:  # also when the consumer is cancelled or closed: the thread stops after its current token
            if not self.finished:
                self.cancelled.set()
                with self.state.lock:
                    self.state.answers_cancelled += 1
