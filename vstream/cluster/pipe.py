"""The cluster ingress's realtime socket: one client socket joined to its stream's owner (`Pipe`), messages passed both
ways as they came, and held in the ingress while the stream moves to another replica.

- **A move.** The owner announces it with `session.closing {reason: "moved"}` (`ReplicaServer.release`). The pipe
  forwards nothing more to it, tells the client `stream.moving {stream_id, held_frames}` (not the notice: its socket
  stays open) and sends the owner `session.end`: the owner answers every frame sent before (their acks reach the
  client), lets an answer in progress finish, closes, and saves the stream with all the frames it took. Meanwhile the
  client's frames are held here, in order (`Held`: at most `Limits.move_held_frames`; beyond it the oldest is dropped,
  answered with an `error` event `frame_dropped` and counted in `MoveCounts`); its other messages (a question) are
  answered at once with an `error` event `stream_moving`. Once the directory names the new owner, the pipe opens a
  socket to it with `?stream_id=` (its `session.created` is not passed on: the client keeps its session), tells the
  client `stream.moved {stream_id, replica}`, sends it the held frames and goes on. Each frame gets one answer: its
  ack (from the owner that took it) or its `frame_dropped` error.
- **A death.** An owner gone without a close (its process died) is reported to the fleet; the client gets
  `session.closing {reason: "replica_failed"}` and a close 1012, and may reconnect with `?stream_id=` once the stream
  is restored. A stream that does not come back from a move (its snapshot lost, or still moving after `SETTLE_S`)
  closes the client's socket with an `error` event `move_failed`.
- **A socket's own stream** (opened without `stream_id`) is registered from `session.created` and ends with the
  socket: its first owner deletes it when the socket closes; once it has moved, the pipe deletes it on its owner.

What it does not do: decode frames (a binary frame stays its JPEG bytes), choose owners or start moves (the fleet
does), or check the key (each owner checks the headers the client connected with).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import websockets
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from vstream.server.errors import ApiError
from vstream.server.realtime import error_event, server_event
from vstream.server.state import Limits

log = logging.getLogger("vstream.cluster")
SETTLE_S = 60.0  # how long a socket waits for its moving stream's new owner before it is closed
UNREACHABLE = (OSError, TimeoutError, websockets.InvalidHandshake, ConnectionClosed)  # opening an owner's socket


@dataclass
class MoveCounts:
    """Frames the ingress held for sockets whose stream was moving, and those it dropped over the cap."""

    held: int = 0
    dropped: int = 0


class Held:
    """One socket's frames held while its stream moves, oldest first, at most `cap` of them."""

    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError(f"move_held_frames must be >= 1, got {cap}")
        self.cap = cap
        self.frames: collections.deque[tuple[bytes | str, str | None]] = collections.deque()

    def hold(self, message: bytes | str, event_id: str | None) -> tuple[bytes | str, str | None] | None:
        """Hold a frame (the message as it came, its event id) -> the oldest (message, event id), dropped to make
        room, or None."""
        self.frames.append((message, event_id))
        return self.frames.popleft() if len(self.frames) > self.cap else None


def classify(message: bytes | str) -> tuple[bool, str | None]:
    """(whether a client message is a frame, its event id): a binary message or an `input_video_frame.append`."""
    if isinstance(message, bytes):
        return True, None
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        return False, None
    if not isinstance(event, dict):
        return False, None
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    return event.get("type") == "input_video_frame.append", event_id


async def open_upstream(url: str, headers: list[tuple[str, str]], limits: Limits):
    """A websockets client socket to an owner's `/v1/realtime` (`url`: ws://...), with the client's headers."""
    return await ws_connect(url, additional_headers=headers, max_size=limits.max_ws_message_bytes + 1024,
                            open_timeout=30, user_agent_header=None)


class Pipe:
    """One client socket joined to its stream's owner, owner after owner as the stream moves (see the module
    docstring). `proxy` gives the fleet, the limits, the HTTP client and the `MoveCounts`; `stream_id` is None for a
    socket that creates its stream; `headers` are the client's handshake headers to send on (the key among them)."""

    def __init__(self, client: WebSocket, upstream, proxy, target: dict, stream_id: str | None,
                 headers: list[tuple[str, str]]):
        self.client, self.upstream, self.proxy, self.target = client, upstream, proxy, target
        self.stream_id, self.created, self.headers = stream_id, stream_id is None, headers
        self.held = Held(proxy.limits.move_held_frames)
        self.moving = False  # its owner announced a move: client messages are held or refused, never forwarded
        self.moved = False  # it moved at least once while this socket was open

    async def run(self) -> None:
        up = asyncio.create_task(self._client_to_owner())
        down = asyncio.create_task(self._owners_to_client())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            down.cancel()
            await self.upstream.close()
            if self.created:
                await self._end_own_stream()

    # ------------------------------------------------------------------------------------------------ client -> owner

    async def _client_to_owner(self) -> None:
        try:
            while True:
                message = await self.client.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                data = data if data is not None else message.get("text") or ""
                if self.moving:
                    await self._hold(data)
                    continue
                try:
                    await self.upstream.send(data)
                except ConnectionClosed:  # the owner's socket ended under it: held as in a move (the owner side
                    await self._hold(data)  # tells whether it was one, or closes the client)
        except WebSocketDisconnect:
            return

    async def _hold(self, message: bytes | str) -> None:
        """A client message while the stream moves: a frame is held (the oldest dropped beyond the cap, answered with
        an error event), anything else is refused with an error event."""
        is_frame, event_id = classify(message)
        if not is_frame:
            await self._tell(error_event(ApiError(
                503, f"stream {self.stream_id} is moving to another replica: send this again once stream.moved comes",
                code="stream_moving"), event_id))
            return
        self.proxy.moves.held += 1
        dropped = self.held.hold(message, event_id)
        if dropped is not None:
            self.proxy.moves.dropped += 1
            await self._tell(error_event(ApiError(
                503, f"frame dropped: stream {self.stream_id} is moving and the ingress holds at most "
                f"move_held_frames={self.held.cap} frames of a socket meanwhile (the oldest go first)",
                code="frame_dropped"), dropped[1]))

    # ------------------------------------------------------------------------------------------------ owner -> client

    async def _owners_to_client(self) -> None:
        """The owner's messages to the client; once the stream has moved, its new owner's, and so on."""
        while await self._owner_to_client():
            if not await self._reattach():
                return

    async def _owner_to_client(self) -> bool:
        """Pass the owner's messages on until its socket ends -> whether the stream is moving (else the client has
        been told why the socket ends)."""
        try:
            async for message in self.upstream:
                if isinstance(message, str) and not await self._from_owner(message):
                    continue
                await (self.client.send_bytes(message) if isinstance(message, bytes)
                       else self.client.send_text(message))
        except ConnectionClosed:
            pass
        except WebSocketDisconnect:
            return False
        if self.moving:
            return True
        await self._close_client()
        return False

    async def _from_owner(self, message: str) -> bool:
        """Act on the owner's events the pipe follows (its stream's id, a move's notice) -> whether to pass it on."""
        if '"session.' not in message:  # only session events are parsed: deltas and acks pass untouched
            return True
        event = json.loads(message)
        kind = event.get("type")
        if kind == "session.created" and self.created and self.stream_id is None:
            self.stream_id = event["session"]["stream_id"]
            await self.proxy.fleet.placed.remote(self.target["replica"], self.stream_id)
        elif kind == "session.closing" and event.get("reason") == "moved":
            self.moving = True
            await self._tell(server_event("stream.moving", stream_id=self.stream_id, held_frames=self.held.cap))
            await self.upstream.send(json.dumps({"type": "session.end"}))
            return False
        return True

    async def _reattach(self) -> bool:
        """Open a socket to the stream's new owner once the directory names it, send it the held frames in order and
        go on -> whether it did (else the client has been told why and closed)."""
        route = await self._settled()
        if route is None:
            return await self._give_up(1011, f"stream {self.stream_id} was lost in its move: its snapshot could "
                                       "not be restored")
        if route["state"] != "owned":
            return await self._give_up(1012, f"stream {self.stream_id} was still moving after {SETTLE_S:g} s: "
                                       "reconnect with ?stream_id= later")
        url = route["url"].replace("http://", "ws://", 1) + f"/v1/realtime?stream_id={quote(self.stream_id)}"
        try:
            upstream = await open_upstream(url, self.headers, self.proxy.limits)
            await upstream.recv()  # its session.created: the client keeps the session it has
        except UNREACHABLE as exc:
            return await self._give_up(1012, f"the new owner {route['replica']} of stream {self.stream_id} could "
                                       f"not be reached ({exc!r}): reconnect with ?stream_id=")
        self.upstream, self.target, self.moved = upstream, route, True
        await self._tell(server_event("stream.moved", stream_id=self.stream_id, replica=route["replica"]))
        try:
            while self.held.frames:  # no await between the last check and `moving = False`: the order is kept
                await upstream.send(self.held.frames.popleft()[0])
        except ConnectionClosed:
            log.warning("the new owner of stream %s closed while taking its held frames", self.stream_id)
        self.moving = False
        return True

    async def _settled(self) -> dict | None:
        """The stream's route once it no longer moves (None: it was lost), or its moving route after `SETTLE_S`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while True:
            route = await self.proxy.fleet.route.remote(self.stream_id)
            if route is None or route["state"] == "owned" or loop.time() > deadline:
                return route
            await asyncio.sleep(0.05)

    async def _tell(self, event: dict) -> None:
        await self.client.send_text(json.dumps(event))

    async def _give_up(self, code: int, message: str) -> bool:
        log.warning("socket on stream %s closed: %s", self.stream_id, message)
        try:
            await self._tell(error_event(ApiError(503, message, code="move_failed")))
            await self.client.close(code, message[:120])
        except (RuntimeError, WebSocketDisconnect):
            log.debug("the client left before it was told")
        return False

    async def _close_client(self) -> None:
        """Pass the owner's close on; an owner gone without a close is reported, and the client told why."""
        received = self.upstream.protocol.close_rcvd
        if received is not None:
            await self.client.close(received.code, received.reason)
            return
        await self.proxy.fleet.suspect.remote(self.target["replica"])
        try:
            await self._tell(server_event("session.closing", reason="replica_failed", time_left_s=0.0))
            await self.client.close(1012, "replica failed: reconnect with ?stream_id=")
        except (RuntimeError, WebSocketDisconnect):
            log.debug("the client left before the replica's failure was told")

    # ------------------------------------------------------------------------------------------------ its own stream

    async def _end_own_stream(self) -> None:
        """The stream this socket created ends with it: its first owner deletes it itself as the socket closes; once
        it has moved (it belongs to no socket there), it is deleted here on its owner."""
        fleet = self.proxy.fleet
        if self.stream_id is None:
            await fleet.unplace.remote(self.target["replica"])
            return
        if self.moved or self.moving:
            await self._delete_moved()
        await fleet.forget.remote(self.stream_id)

    async def _delete_moved(self) -> None:
        route = await self._settled()
        if route is None or route["state"] != "owned":
            log.warning("stream %s, created by a socket now closed, could not be deleted: %s", self.stream_id,
                        "it was lost" if route is None else "it was still moving")
            return
        try:
            r = await self.proxy.client.delete(f"{route['url']}/v1/streams/{quote(self.stream_id)}",
                                               headers=self.headers)
        except httpx.TransportError as exc:
            log.warning("stream %s, created by a socket now closed, could not be deleted: %r", self.stream_id, exc)
            return
        if r.status_code != 200:
            log.warning("stream %s, created by a socket now closed, was not deleted: %s %s", self.stream_id,
                        r.status_code, r.text[:200])
