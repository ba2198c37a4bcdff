"""The cluster's ingress: one HTTP and WebSocket endpoint in front of the engine replicas, speaking the API of the
single-process server by forwarding each request, unchanged, to the replica that owns its stream.

- **Which replica.** A request that names a stream (`/v1/streams/{id}/...`, chat's `model`/`stream_id`, the realtime
  socket's `?stream_id=`) goes to its owner as the fleet's directory says, and to no other: a busy owner answers its
  own 429, a stream being moved (or restored after a failure) answers 503 `stream_moving` with `Retry-After`, naming
  the replica it moves to; no replica without its memory ever answers for it. A stream the directory does not
  know goes to any replica, which answers its own 404 (or 401). `POST /v1/streams` and a socket without `stream_id`
  create the stream on the least-loaded replica and register it. `GET /v1/streams` merges every replica's list,
  each stream from its owner only (once), and lists a stream being restored with state `restoring`. The page, its
  static files, the OpenAPI document and the rest go to any replica.
- **The cluster's own routes.** `GET /v1/cluster` (the directory) and `POST /v1/cluster/streams/{id}/move
  {"replica": id}` (drain -> snapshot -> restore on that replica; 404 for a stream the cluster does not hold, 400 for a
  replica that is not live or takes no streams, naming those that do, 409 for a stream moving already or already
  there) need the key like every route: a live replica checks it before anything is done.
- **Access.** Host and Origin are checked here (`access.refusal`, as the single-process gate does), then the request
  goes on with the replica's own Host and no Origin; the replica checks the key (the header is forwarded) or the
  page's cookie. The cookie is a token signed under the key and the cluster's salt (`vstream.server.cookies`), so a
  login (`POST /v1/auth/cookie`, forwarded to any replica) gives a cookie that every replica accepts; the Cookie
  header is not sent on when the request comes from another origin (as the single server ignores the cookie then) or
  carries a token logged out here (`DELETE /v1/auth/cookie`, kept in `Revoked` until its expiry).
- **Sockets** (`pipe`): a socket's messages pass through as they came (binary frames stay JPEG bytes, never decoded
  here). A socket stays open when its stream moves: the frames sent meanwhile are held here (`Limits.move_held_frames`,
  the oldest dropped and counted beyond it) and sent to the new owner after the restore. When the owner dies under a
  socket, the client gets `session.closing {reason: "replica_failed"}` and a close 1012.
- **Metrics.** `GET /metrics` merges every live replica's text (see `merge_metrics`) and adds the ingress's counts
  of frames held and dropped during moves.

What it does not do: run model code, keep stream state (the fleet's directory is the only record; a socket holds
its frames only while its stream moves), decide when a stream moves (the caller of the move route, or the fleet's
drain), or check keys and cookie signatures (it does not know the key).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import logging
import re

import httpx
import websockets
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from websockets.exceptions import InvalidStatus

from vstream.cluster.directory import MoveRefused
from vstream.cluster.metrics import merge_metrics, render
from vstream.cluster.pipe import MoveCounts, Pipe, open_upstream
from vstream.server import access
from vstream.server.cookies import Revoked
from vstream.server.errors import ApiError, error_response, internal_error
from vstream.server.metrics import sample
from vstream.server.state import Limits

log = logging.getLogger("vstream.cluster")
STREAM_PATH = re.compile(r"^/v1/streams/([^/]+)(?:/.*)?$")
HOP = frozenset({"host", "origin", "connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer",
                 "proxy-authorization", "proxy-connection", "content-length"})
WS_HOP = HOP | {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
REPLICA_HEADER = "X-Vstream-Replica"
MOVE_STATUS = {"unknown_stream": 404, "unknown_replica": 400, "already_there": 409, "moving": 409}


class _Gate:
    """What `access.refusal` reads of a server's state."""

    def __init__(self, allowed_hosts):
        self.allowed_hosts = allowed_hosts


def create_ingress(fleet, allowed_hosts, limits: Limits | None = None) -> FastAPI:
    """The ingress app over a fleet actor handle; `allowed_hosts` as `ServerState.allowed_hosts` (None: any)."""
    app = FastAPI(title="vstream (cluster ingress)", openapi_url=None, docs_url=None, redoc_url=None)
    proxy = Proxy(fleet, _Gate(allowed_hosts), limits or Limits())
    app.state.proxy = proxy
    app.add_api_route("/health/live", proxy.live, methods=["GET"])
    app.add_api_route("/health/ready", proxy.ready, methods=["GET"])
    app.add_api_route("/v1/cluster", proxy.cluster, methods=["GET"])
    app.add_api_route("/v1/cluster/streams/{stream_id}/move", proxy.move, methods=["POST"])
    app.add_api_route("/v1/streams", proxy.list_streams, methods=["GET"])
    app.add_api_route("/v1/streams", proxy.create_stream, methods=["POST"])
    app.add_api_route("/v1/chat/completions", proxy.chat, methods=["POST"])
    app.add_api_route("/metrics", proxy.metrics, methods=["GET"])
    app.add_api_route("/v1/auth/cookie", proxy.logout, methods=["DELETE"])
    app.add_api_websocket_route("/v1/realtime", proxy.realtime)
    app.add_api_route("/{path:path}", proxy.anything, methods=["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"])
    app.router.on_shutdown.append(proxy.close)
    return app


class Proxy:
    """The ingress's handlers: routing through the fleet, forwarding with one shared HTTP client."""

    def __init__(self, fleet, gate: _Gate, limits: Limits):
        self.fleet, self.gate, self.limits = fleet, gate, limits
        # replicas are reached directly: a proxy named in the environment (HTTP_PROXY, ALL_PROXY) is not for them
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), follow_redirects=False,
                                        cookies=no_cookies(), trust_env=False)
        self.moves = MoveCounts()
        self.revoked = Revoked()  # page cookies logged out through this ingress, refused until their expiry

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------------------------------------ own routes

    async def live(self):
        return {"status": "ok"}

    async def ready(self):
        listing = await self.fleet.listing.remote()
        live = [r["id"] for r in listing["replicas"] if r["alive"]]
        if not live:
            return error_response(ApiError(503, "not ready: no live replica", code="not_ready"))
        return {"status": "ready", "replicas": live}

    async def cluster(self, request: Request):
        """The directory: replicas (url, pid, streams, queue) and each stream's owner."""
        refused = await self._admin(request)
        if refused is not None:
            return refused
        return await self.fleet.listing.remote()

    async def move(self, request: Request, stream_id: str):
        """`POST /v1/cluster/streams/{id}/move {"replica": id}`: drain -> snapshot -> restore on that replica (the
        fleet's `move`) -> the new owner, the old one and what the restore took. 404 for a stream the cluster does not
        hold, 400 for a replica that is not live or takes no streams (naming those that do), 409 for a stream moving
        already or already there."""
        refused = await self._admin(request)
        if refused is not None:
            return refused
        replica = _move_target(await self._body(request))
        if isinstance(replica, ApiError):
            return error_response(replica)
        try:
            moved = await self.fleet.move.remote(stream_id, replica)
        except MoveRefused as exc:
            param = "replica" if exc.reason == "unknown_replica" else None
            return error_response(ApiError(MOVE_STATUS[exc.reason], exc.message, code=exc.reason, param=param))
        except RuntimeError as exc:
            return error_response(internal_error(exc, f"the move of stream {stream_id} to {replica}"))
        return {"object": "cluster.move", "stream_id": stream_id, **moved}

    async def list_streams(self, request: Request):
        refused = await self._refused(request)
        if refused is not None:
            return refused
        listing = await self.fleet.listing.remote()
        owners = listing["streams"]
        live = [r for r in listing["replicas"] if r["alive"]]
        replies = await asyncio.gather(*(self._get_json(request, r["url"]) for r in live))
        data, seen = [], set()
        for replica, (status, body) in zip(live, replies):
            if status != 200:
                return JSONResponse(body, status)
            for view in body["data"]:
                if owners.get(view["id"]) == replica["id"] and view["id"] not in seen:
                    seen.add(view["id"])
                    data.append(view | {"replica": replica["id"]})
        for stream_id, owner in owners.items():
            if stream_id not in seen:  # being restored (or registered a moment ago): listed, never lost
                data.append({"id": stream_id, "object": "stream", "state": "restoring", "replica": owner})
        return {"object": "list", "data": data}

    async def metrics(self, request: Request):
        """Every live replica's Prometheus text, server-wide samples labelled `replica="<id>"`; HELP and TYPE once."""
        refused = await self._refused(request)
        if refused is not None:
            return refused
        live = [r for r in (await self.fleet.listing.remote())["replicas"] if r["alive"]]
        headers = self._sent(request.headers)
        replies = await asyncio.gather(*(self.client.get(r["url"] + "/metrics", headers=headers) for r in live),
                                       return_exceptions=True)
        families: dict[str, tuple[dict, list]] = {}  # name -> (HELP/TYPE lines, samples): one group per metric
        for replica, reply in zip(live, replies):
            if isinstance(reply, httpx.TransportError):
                continue  # a replica dying now: its samples are missing from this scrape
            if isinstance(reply, BaseException):
                raise reply
            if reply.status_code != 200:
                return Response(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))
            merge_metrics(families, reply.text, replica["id"])
        text = render(families)
        own = [*sample("ingress_frames_held_total", "counter", "Frames the ingress held for sockets whose stream "
                       "was moving.", self.moves.held),
               *sample("ingress_frames_dropped_total", "counter", "Held frames the ingress dropped, over "
                       "move_held_frames.", self.moves.dropped)]
        return Response(text + "\n".join(own) + "\n", media_type="text/plain; version=0.0.4")

    async def create_stream(self, request: Request):
        refused = await self._refused(request)
        if refused is not None:
            return refused
        target = await self.fleet.place.remote()
        try:
            response = await self._forward(request, target, stream=False)
        except BaseException:
            await self.fleet.unplace.remote(target["replica"])
            raise
        if response.status_code == 201:
            await self.fleet.placed.remote(target["replica"], json.loads(response.body)["id"])
        else:
            await self.fleet.unplace.remote(target["replica"])
        return response

    async def chat(self, request: Request):
        refused = await self._refused(request)
        if refused is not None:
            return refused
        body = await self._body(request)
        if isinstance(body, ApiError):
            return error_response(body)
        try:
            parsed = json.loads(body)
            stream_id = parsed.get("stream_id") or parsed.get("model") if isinstance(parsed, dict) else None
        except (ValueError, UnicodeDecodeError):
            stream_id = None  # the replica answers the bad body with its own 400
        return await self._to_owner(request, stream_id if isinstance(stream_id, str) else None)

    async def logout(self, request: Request):
        """`DELETE /v1/auth/cookie`, answered by any replica (which checks the key or the cookie); once it has, the
        cookie's token is refused here until its expiry, whichever replica a later request goes to."""
        refused = await self._refused(request)
        if refused is not None:
            return refused
        response = await self._to_owner(request, None)
        token = access.page_token(request.headers)
        if response.status_code == 204 and token is not None:
            self.revoked.add(token)
        return response

    async def anything(self, request: Request, path: str):
        refused = await self._refused(request)
        if refused is not None:
            return refused
        match = STREAM_PATH.match(request.url.path)
        response = await self._to_owner(request, match.group(1) if match else None)
        if match and request.method == "DELETE" and response.status_code == 200:
            await self.fleet.forget.remote(match.group(1))
        return response

    # ------------------------------------------------------------------------------------------------ forwarding

    def _sent(self, headers: Headers, hop: frozenset[str] = HOP) -> list[tuple[str, str]]:
        """The client's headers to send on to a replica: without the hop-by-hop ones, and without the Cookie when the
        page cookie in it may not stand for the key (it came from another origin, and the replica sees no Origin) or
        was logged out through this ingress."""
        if not access.cookie_may_count(headers) or access.page_token(headers) in self.revoked:
            hop = hop | {"cookie"}
        return [(k, v) for k, v in headers.items() if k.lower() not in hop]

    async def _refused(self, request: Request) -> Response | None:
        refused = access.refusal(self.gate, request.headers, request.url.path, request.method)
        return None if refused is None else error_response(refused)

    async def _admin(self, request: Request) -> Response | None:
        """The refusal of a request to the cluster's own routes (they name the replicas' addresses, move streams):
        Host and Origin checked here, then the key, by a live replica (`GET /v1/streams` with the same headers)."""
        refused = await self._refused(request)
        if refused is not None:
            return refused
        replica = await self.fleet.any_replica.remote()
        try:
            checked = await self.client.get(replica["url"] + "/v1/streams", headers=self._sent(request.headers))
        except httpx.TransportError as exc:
            return error_response(ApiError(503, f"replica {replica['replica']} could not check the key ({exc!r}): "
                                           "retry shortly", code="replica_unavailable", retry_after=1))
        if checked.status_code == 200:
            return None
        return Response(checked.content, checked.status_code, media_type=checked.headers.get("content-type"))

    async def _target(self, stream_id: str | None) -> dict | ApiError:
        """The replica a request for `stream_id` goes to, or the 503 of a stream being moved or restored."""
        route = None if stream_id is None else await self.fleet.route.remote(stream_id)
        if route is None:
            return await self.fleet.any_replica.remote()
        if route["state"] == "moving":
            return ApiError(503, f"stream {stream_id} is moving to replica {route['to']} (its memory saved, then "
                            "restored there): retry shortly", code="stream_moving", retry_after=1)
        return route

    async def _to_owner(self, request: Request, stream_id: str | None) -> Response:
        target = await self._target(stream_id)
        if isinstance(target, ApiError):
            return error_response(target)
        return await self._forward(request, target)

    async def _forward(self, request: Request, target: dict, path: str | None = None, stream: bool = True):
        """The request sent on to `target`'s replica; its response streamed back (or read whole: `stream=False`).
        A replica that cannot be reached is reported to the fleet and answered 503."""
        body = await self._body(request)
        if isinstance(body, ApiError):
            return error_response(body)
        headers = self._sent(request.headers)
        url = target["url"] + (path or request.url.path)
        outgoing = self.client.build_request(request.method, url, params=request.url.query if path is None else None,
                                             headers=headers, content=body)
        try:
            upstream = await self.client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            await self.fleet.suspect.remote(target["replica"])
            return error_response(ApiError(503, f"replica {target['replica']} could not be reached ({exc!r}): "
                                           "its streams are being restored elsewhere, retry shortly",
                                           code="replica_unavailable", retry_after=1))
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP and k.lower() != "content-encoding"}
        kept[REPLICA_HEADER] = target["replica"]
        if not stream:
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, upstream.status_code, headers=kept)
        return StreamingResponse(upstream.aiter_bytes(), upstream.status_code, headers=kept,
                                 background=BackgroundTask(upstream.aclose))

    async def _body(self, request: Request) -> bytes | ApiError:
        """The request's body, or the 413 of one over `max_body_bytes` (read no further than the cap)."""
        cap = self.limits.max_body_bytes
        if getattr(request.state, "body", None) is None:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    break
                chunks.append(chunk)
            if size <= cap:
                request.state.body = b"".join(chunks)
            else:
                return ApiError(413, f"the request body has more than {cap} bytes, over the limit "
                                f"max_body_bytes={cap}", code="body_too_large")
        return request.state.body

    async def _get_json(self, request: Request, base: str) -> tuple[int, dict]:
        try:
            r = await self.client.get(base + "/v1/streams", headers=self._sent(request.headers))
        except httpx.TransportError:
            return 200, {"data": []}  # a replica dying now: its streams are listed as restoring
        return r.status_code, r.json()

    # ------------------------------------------------------------------------------------------------ realtime

    async def realtime(self, ws: WebSocket, stream_id: str | None = None):
        refused = access.refusal(self.gate, ws.headers, ws.url.path, "WEBSOCKET")
        if refused is None:
            target = await self._target(stream_id) if stream_id is not None else await self._place()
            refused = target if isinstance(target, ApiError) else None
        if refused is not None:
            return await ws.send_denial_response(error_response(refused))
        forwarded = self._sent(ws.headers, WS_HOP)
        try:
            upstream = await open_upstream(_ws_url(target["url"], ws), forwarded, self.limits)
        except InvalidStatus as exc:
            await self._unplace(target, stream_id)
            headers = {k: v for k, v in exc.response.headers.raw_items() if k.lower() == "retry-after"}
            return await ws.send_denial_response(Response(bytes(exc.response.body), exc.response.status_code,
                                                          headers=headers, media_type="application/json"))
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            await self._unplace(target, stream_id)
            await self.fleet.suspect.remote(target["replica"])
            return await ws.send_denial_response(error_response(ApiError(
                503, f"replica {target['replica']} could not be reached ({exc!r}): retry shortly",
                code="replica_unavailable", retry_after=1)))
        await ws.accept()
        await Pipe(ws, upstream, self, target, stream_id, forwarded).run()

    async def _place(self) -> dict:
        return await self.fleet.place.remote()

    async def _unplace(self, target: dict, stream_id: str | None) -> None:
        if stream_id is None:
            await self.fleet.unplace.remote(target["replica"])


def no_cookies() -> http.cookiejar.CookieJar:
    """A cookie jar that keeps none: the ingress's one HTTP client serves every client, so a cookie that a replica
    sets (the page's login) goes back to the client that asked and is never sent on with anyone else's request."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _ws_url(base: str, ws: WebSocket) -> str:
    query = f"?{ws.url.query}" if ws.url.query else ""
    return base.replace("http://", "ws://", 1) + ws.url.path + query


def _move_target(body: bytes | ApiError) -> str | ApiError:
    """The replica id a move's body names (`{"replica": "<id>"}`), or the 400 (413) of another body."""
    if isinstance(body, ApiError):
        return body
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        parsed = None
    replica = parsed.get("replica") if isinstance(parsed, dict) else None
    if not isinstance(replica, str) or not replica:
        shown = body[:80].decode("utf-8", "replace")
        return ApiError(400, f'expected a JSON body {{"replica": "<replica id>"}}, got {shown!r}', param="replica")
    return replica
