"""`WS /v1/realtime`: frames pushed into a stream and questions answered on one socket, as typed JSON events.

Client events: a binary message (one JPEG or PNG frame, timed by the server's clock from the stream's first binary
frame), `input_video_frame.append {image: base64 or data URI, timestamp?}`, `response.create {question, max_tokens?,
as_of?}`, `response.cancel`, `session.end` (the client is done: every message before it is answered, the answer in
progress finishes, then the server closes the socket with 1000). Server events: `session.created`,
`input_video_frame.ack` (one per frame: accepted or not, with the stream's running received/ingested/dropped counts),
`response.created`, `response.output_text.delta`, `response.output_text.done`, `response.done {status: completed |
cancelled | failed}`, `stream.ended {error}` when a pulled source ends or fails (the memory stays answerable),
`session.closing {reason, time_left_s}` before the server closes the session (idle, draining, its stream moved to
another server of a cluster), and `error {error: {type, code, message, param, event_id}}` (also when the stream
fails). Every server event has `type` and `event_id`.

Without `stream_id` the session creates a push stream of its own, deleted when the socket closes. Frames are sampled
by their time to the stream's `fps` before they are decoded (a frame fills the sampling slot nearest its time; one
whose slot is already filled is dropped and counted); a frame's pixel count is read from its header and checked
before its pixels are allocated. Decoding runs in the thread pool, generation on its own thread.

This module runs an accepted socket: events, frames, answers, the idle and drain clocks, and the close. The handshake
(who may connect, which stream) is `vstream.server.routes.realtime`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import secrets
import threading
import time

import numpy as np
from fastapi import WebSocket
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from vstream.server.answers import Generation, check_max_tokens, check_question, vstream_extension
from vstream.server.errors import ERROR_TYPES, ApiError, internal_error
from vstream.server.schemas import error_body
from vstream.server.state import ServerState, Stream

log = logging.getLogger("vstream.server")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """A JPEG or PNG -> HxWx3 uint8 RGB; the size is read from the header and checked before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own bound, far above ours, read from the header too
        raise ApiError(400, f"the frame is over the limit max_frame_pixels={max_pixels}: {exc}",
                       code="limit_exceeded") from exc
    except Exception as exc:
        raise ApiError(400, f"the frame is not a readable image ({len(data)} bytes): expected JPEG or PNG",
                       code="invalid_image") from exc
    if image.format not in ("JPEG", "PNG"):
        raise ApiError(400, f"the frame is {image.format}: expected JPEG or PNG", code="invalid_image")
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(400, f"the frame is {width}x{height} = {width * height} pixels, over the limit "
                       f"max_frame_pixels={max_pixels}", code="limit_exceeded")
    try:
        return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise ApiError(400, f"the {image.format} frame could not be decoded: {exc}", code="invalid_image") from exc


def server_event(type_: str, **fields) -> dict:
    return {"type": type_, "event_id": "evt_" + secrets.token_hex(8), **fields}


def error_event(exc: ApiError, event_id: str | None = None) -> dict:
    body = error_body(exc.message, ERROR_TYPES.get(exc.status, "server_error"), exc.code, exc.param)["error"]
    return server_event("error", error=body | {"event_id": event_id})


class RealtimeSession:
    """One socket: an outbox drained by one sender task, at most one answer at a time, the idle clock."""

    def __init__(self, ws: WebSocket, state: ServerState, stream: Stream, session_id: str,
                 login: str | None = None):
        self.ws, self.state, self.stream, self.id = ws, state, stream, session_id
        self.login = login  # the page cookie's token the socket was let in by (None: the key): it ends with it
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.last_message = time.monotonic()
        self.generation: Generation | None = None
        self.answer_task: asyncio.Task | None = None
        self.closing: str | None = None
        self.end_at: float | None = None  # set by `end`: the watcher closes the session at this monotonic time
        self.client_ended = False  # the client sent `session.end`
        self.closed = threading.Event()  # set once `run` has returned (any thread may wait for it)
        self.loop = asyncio.get_running_loop()
        self.events_after = stream.board.feed.last_id  # the stream's watch events after this id go to the socket

    async def run(self) -> None:
        """Send `session.created`, then handle the client's messages until either side ends the session; close the
        socket with a code that says why (unless the client left first)."""
        limits = self.state.limits
        self.send(server_event("session.created", session={
            "id": self.id, "stream_id": self.stream.id, "fps": self.stream.fps, "push": self.stream.push is not None,
            "owns_stream": self.stream.owner == self.id, "max_message_bytes": limits.max_ws_message_bytes,
            "idle_timeout_s": limits.ws_idle_s}))
        sender = asyncio.create_task(self.sender())
        watcher = asyncio.create_task(watch(self))
        close_code, reason = 1000, ""
        try:
            close_code, reason = await self._receive(watcher, sender)
        except WebSocketDisconnect:
            close_code = None
        except Exception as exc:  # not the client's doing (its messages' errors are events): logged, closed as such  # noqa: BLE001
            close_code, reason = 1011, internal_error(exc, f"the realtime session {self.id}").message[:120]
        finally:
            self.cancel_response()
            watcher.cancel()
            if close_code is not None:
                self.send(None)
                try:
                    await asyncio.wait_for(sender, 2.0)
                    await self.ws.close(close_code, reason)
                except Exception:  # the client is already gone: nothing left to tell it  # noqa: BLE001
                    log.debug("realtime session %s: the client left before the close", self.id, exc_info=True)
            sender.cancel()
            self.closed.set()

    async def _receive(self, watcher: asyncio.Task, sender: asyncio.Task) -> tuple[int | None, str]:
        """Handle messages until the client leaves (None) or ends the session (1000, once its answer in progress is
        done), the watcher closes the session (1001), sending fails (1011) or a message is over the limit (1009):
        the close code and its reason."""
        limit = self.state.limits.max_ws_message_bytes
        while True:
            receive = asyncio.create_task(self.ws.receive())
            done, _ = await asyncio.wait({receive, watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                return (1001, self.closing or "closing") if watcher in done else (1011, "send failed")
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return None, ""
            size = len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
            if size > limit:
                return 1009, f"message of {size} bytes over max_ws_message_bytes"
            self.last_message = time.monotonic()
            if self.closing == "idle":
                self.closing = None
            await self.handle(message)
            if self.client_ended:
                if self.answer_task is not None and not self.answer_task.done():
                    await asyncio.wait({self.answer_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                return 1000, "ended by the client"

    def send(self, event: dict) -> None:
        self.outbox.put_nowait(event)

    async def sender(self) -> None:
        while True:
            event = await self.outbox.get()
            if event is None:
                return
            await self.ws.send_text(json.dumps(event))

    def notify_closing(self, reason: str, time_left_s: float) -> None:
        if self.closing is None:
            self.closing = reason
            self.send(server_event("session.closing", reason=reason, time_left_s=round(time_left_s, 3)))

    def end(self, reason: str, grace_s: float = 0.0) -> None:
        """Send `session.closing {reason, time_left_s: grace_s}` now (whatever notice came before) and close the
        session `grace_s` later, or when the client leaves or sends `session.end` (its stream moves away, say: the
        client may end the session once its frames are sent); callable from any thread."""
        def ending():
            self.closing = reason
            self.send(server_event("session.closing", reason=reason, time_left_s=round(grace_s, 3)))
            self.end_at = time.monotonic() + grace_s

        self.loop.call_soon_threadsafe(ending)

    # ------------------------------------------------------------------------------------------------ frames

    def _check_time(self, t: float) -> None:
        if not t > self.stream.last_time:
            raise ApiError(400, f"frame times must increase: got {t} after {self.stream.last_time}",
                           code="invalid_timestamp", param="timestamp")

    def _frame_time(self, timestamp) -> float:
        stream = self.stream
        if timestamp is None:
            now = time.monotonic()
            if stream.clock0 is None:  # the clock starts one sampling interval after the last timed frame
                after = stream.last_time + 1.0 / stream.fps if math.isfinite(stream.last_time) else 0.0
                stream.clock0 = now - after
            return now - stream.clock0
        latest = self.state.limits.max_frame_time_s
        if not _is_number(timestamp) or not 0 <= timestamp <= latest:
            raise ApiError(400, f"timestamp must be a number of seconds from 0 to max_frame_time_s={latest:g}, got "
                           f"{str(timestamp)[:40]}", code="invalid_timestamp", param="timestamp")
        return float(timestamp)

    async def frame(self, data: bytes, timestamp=None, event_id: str | None = None) -> None:
        stream = self.stream
        if stream.push is None:
            raise ApiError(400, f"stream {stream.id} pulls its frames from a {stream.source['type']} source: "
                           "frames can only be pushed to a push stream", code="not_a_push_stream")
        t = self._frame_time(timestamp)
        self._check_time(t)
        slot = math.floor(t * stream.fps + 0.5)  # the nearest sampling slot: a jittery sender at the rate keeps all
        accepted = False
        if slot >= stream.next_slot:  # due: decode it (a frame that fails to decode leaves no trace)
            frame = await run_in_threadpool(decode_image, data, self.state.limits.max_frame_pixels)
            with stream.push_lock:
                self._check_time(t)
                try:
                    accepted = stream.push.push(t, frame)
                except RuntimeError as exc:
                    raise ApiError(409, f"stream {stream.id} takes no more frames: {exc}",
                                   code="stream_closed") from exc
                stream.last_time, stream.next_slot = t, slot + 1
                stream.pushed += 1
        else:  # over the stream's rate: counted as dropped, never decoded
            with stream.push_lock:
                stream.last_time = t
                stream.pushed += 1
                stream.sampled_out += 1
        self.send(server_event("input_video_frame.ack", item_event_id=event_id, timestamp=t, accepted=accepted,
                               **stream.counts()))

    # ------------------------------------------------------------------------------------------------ answers

    def create_response(self, event: dict) -> None:
        if self.answer_task is not None and not self.answer_task.done():
            raise ApiError(409, "an answer is already being generated on this session: wait for response.done or "
                           "send response.cancel", code="response_in_progress")
        question = check_question(self.state, event.get("question"), param="question")
        max_tokens = event.get("max_tokens")
        if max_tokens is not None and (not _is_number(max_tokens) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ApiError(400, f"max_tokens must be an integer >= 1, got {str(max_tokens)[:40]}", param="max_tokens")
        check_max_tokens(self.state, max_tokens)
        as_of = event.get("as_of")
        if as_of is not None and (not _is_number(as_of) or as_of < 0):
            raise ApiError(400, f"as_of must be a number of seconds >= 0, got {str(as_of)[:40]}", param="as_of")
        self.state.begin_answer()
        try:
            generation = Generation(self.state, self.stream, question, max_tokens, as_of, time.perf_counter())
        except BaseException:
            self.state.end_answer()
            raise
        self.generation = generation
        self.answer_task = asyncio.create_task(self._answer(generation))

    async def _answer(self, generation: Generation) -> None:
        response_id = "resp_" + secrets.token_hex(8)
        times = vstream_extension(generation.snapshot, generation.as_of)
        self.send(server_event("response.created",
                               response={"id": response_id, "status": "in_progress", "vstream": times}))
        text, status = [], "completed"
        try:
            async for piece in generation:
                if generation.cancelled.is_set():
                    break
                text.append(piece)
                self.send(server_event("response.output_text.delta", response_id=response_id, delta=piece))
            if generation.cancelled.is_set():
                status = "cancelled"
        except RuntimeError as exc:  # the model failed: its text may name server paths, the log keeps it
            status = "failed"
            error = internal_error(exc, f"the answer on stream {self.stream.id}")
            self.send(error_event(ApiError(500, error.message, code="generation_failed")))
        finally:
            generation.release()
        self.send(server_event("response.output_text.done", response_id=response_id, text="".join(text)))
        self.send(server_event("response.done", response={"id": response_id, "status": status, "vstream": times,
                                                          "usage": {"output_tokens": len(text)}}))

    def cancel_response(self) -> None:
        if self.generation is not None:
            self.generation.cancel()

    # ------------------------------------------------------------------------------------------------ dispatch

    async def handle(self, message: dict) -> None:
        """One client message (a dict from `websocket.receive`): frames and events. Every error becomes an `error`
        event and the session goes on; one that no check expected is logged and reported by reference only."""
        event_id = None
        try:
            if message.get("bytes") is not None:
                await self.frame(message["bytes"])
                return
            event = _parse(message.get("text") or "")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event["type"]
            if kind == "input_video_frame.append":
                await self.frame(_image_bytes(event.get("image")), event.get("timestamp"), event_id)
            elif kind == "response.create":
                self.create_response(event)
            elif kind == "response.cancel":
                self.cancel_response()
            elif kind == "session.end":
                self.client_ended = True
            else:
                raise ApiError(400, f"unknown event type {kind!r}: expected input_video_frame.append, "
                               "response.create, response.cancel or session.end", "unknown_event", "type")
        except ApiError as exc:
            self.send(error_event(exc, event_id))
        except Exception as exc:  # an unexpected error is logged and sent as an event; the session goes on  # noqa: BLE001
            where = f"the realtime session on stream {self.stream.id}"
            self.send(error_event(internal_error(exc, where), event_id))


def _parse(text: str) -> dict:
    """A text message as an event object with a string `type`."""
    try:
        event = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer longer than Python converts (4300 digits)
        raise ApiError(400, f"the message is not JSON that the server reads ({exc}): expected an event object",
                       "invalid_json") from exc
    except RecursionError as exc:  # deep nesting fits in a message; Python's parser stops near 1000 levels
        raise ApiError(400, "the message nests JSON deeper than the server parses: expected a flat event object",
                       "invalid_json") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ApiError(400, "expected an event object with a string 'type'", "invalid_event", "type")
    return event


def _is_number(value) -> bool:
    """A finite JSON number (JSON's true and false are Python ints, and are not numbers here)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _image_bytes(image) -> bytes:
    if not isinstance(image, str) or not image:
        raise ApiError(400, "input_video_frame.append needs 'image': a base64 JPEG/PNG or a data URI",
                       "invalid_event", "image")
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"'image' is not valid base64: {exc}", "invalid_image", "image") from exc


async def deny(ws: WebSocket, exc: ApiError) -> None:
    """Refuse the handshake with an HTTP error response (the OpenAI error object)."""
    kind = ERROR_TYPES.get(exc.status, "server_error")
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    await ws.send_denial_response(JSONResponse(error_body(exc.message, kind, exc.code, exc.param), exc.status,
                                               headers=headers))


async def watch(session: RealtimeSession) -> None:
    """Close the session when it is idle, when the server drains, when `end` was called or when the page cookie it
    was let in by is logged out or expires; report its stream's failure and end."""
    state, limits, stream = session.state, session.state.limits, session.stream
    reported = ended = False
    while True:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if session.end_at is not None and now >= session.end_at:
            return
        if session.login is not None and not state.cookies.valid(session.login):
            session.notify_closing("logged_out", 0.0)
            return
        if state.draining:
            left = state.time_left() or 0.0
            session.notify_closing("draining", left)
            if left <= 0 and (session.answer_task is None or session.answer_task.done()):
                return
            continue
        for event in stream.board.feed.since(session.events_after):  # watch.triggered / watch.cleared
            session.events_after = event["id"]
            session.send(server_event(event["type"], event=event))
        if stream.session.error is not None and not reported:
            reported = True
            error = state.public_text(str(stream.session.error))
            session.send(error_event(ApiError(500, f"stream {stream.id} failed: {error}", code="stream_failed")))
        if stream.session.finished and not ended:  # its memory stays answerable: the session stays open
            ended = True
            error = stream.session.stats()["error"]
            session.send(server_event("stream.ended", stream_id=stream.id,
                                      error=None if error is None else state.public_text(error)))
        idle = now - session.last_message
        if idle >= limits.ws_idle_s - limits.ws_notice_s:
            session.notify_closing("idle", max(0.0, limits.ws_idle_s - idle))
        if idle >= limits.ws_idle_s:
            return
