"""Streams as resources: `POST /v1/streams` (open a source and start its session), list, get and delete them, the
memory view (`/memory`, now or as of an earlier stream time) and the thumbnails it links (`/frames`). Opening and
probing a source and closing a stream run in the thread pool; the views read host copies only."""

from __future__ import annotations

from fastapi import FastAPI, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from vstream.server.errors import ApiError
from vstream.server.inputs import open_stream_source
from vstream.server.openapi import errors
from vstream.server.routes import State
from vstream.server.schemas import StreamCreate
from vstream.server.state import ServerState, Stream

JPEG = {200: {"content": {"image/jpeg": {}}, "description": "a JPEG thumbnail"}}


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/streams", create_stream, methods=["POST"], status_code=201,
                      responses=errors(400, 403, 404, 429, 503))
    app.add_api_route("/v1/streams", list_streams, methods=["GET"])
    app.add_api_route("/v1/streams/{stream_id}", get_stream, methods=["GET"], responses=errors(404))
    app.add_api_route("/v1/streams/{stream_id}", delete_stream, methods=["DELETE"], responses=errors(404))
    app.add_api_route("/v1/streams/{stream_id}/memory", get_memory, methods=["GET"], responses=errors(400, 404, 409))
    app.add_api_route("/v1/streams/{stream_id}/frames", get_frame, methods=["GET"], response_class=Response,
                      responses=JPEG | errors(400, 404))


async def create_stream(state: State, body: StreamCreate):
    state.reserve_slot()
    try:
        frames, is_live, push, fps = await run_in_threadpool(open_stream_source, state, body)
        stream = state.start_stream(frames, is_live, push, body.source.model_dump(), fps, speed=body.speed)
    finally:
        state.release_slot()
    return stream_view(state, stream)


async def list_streams(state: State):
    return {"object": "list", "data": [stream_view(state, s) for s in list(state.streams.values())]}


async def get_stream(state: State, stream_id: str):
    return stream_view(state, state.get(stream_id, "stream_id"))


async def delete_stream(state: State, stream_id: str):
    with state.lock:
        stream = state.get(stream_id, "stream_id")
        del state.streams[stream_id]
    await run_in_threadpool(stream.close)
    if state.durable is not None:
        await run_in_threadpool(state.durable.remove, stream_id)
    return {"id": stream_id, "object": "stream.deleted", "deleted": True}


async def get_memory(state: State, stream_id: str, as_of: float | None = Query(None, ge=0, allow_inf_nan=False)):
    return memory_view(state.get(stream_id, "stream_id"), as_of)


async def get_frame(state: State, stream_id: str, t: float = Query(..., ge=0, allow_inf_nan=False)):
    """The thumbnail of the ingested frame at stream time `t` (within 1 ms), while the stream keeps it."""
    kept = state.get(stream_id, "stream_id").thumbnails.nearest(t)
    if kept is None:
        raise ApiError(404, f"no thumbnail kept for t={t} in stream {stream_id}: expected the time of a recent "
                       "ingested frame (see GET /v1/streams/{id}/memory)", code="frame_not_kept", param="t")
    return Response(kept[1], media_type="image/jpeg",
                    headers={"X-Frame-Time": repr(kept[0]), "Cache-Control": "private, max-age=3600"})


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
