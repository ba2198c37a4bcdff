"""Opening a stream's source for the server: checks and probes before the stream exists, limits that bind before
frames are allocated.

File sources resolve inside the media root after links are resolved (403 otherwise, nothing read). URL sources pass
`vstream.server.netsafe`. Every pulled source is probed (its header read) before the stream is created: a source that
cannot be read gives 400, and the frame size, the duration and the declared frame count are checked against the
server's limits there, before any frame is decoded. While the stream runs, stream time is capped at
`max_source_seconds` and each frame's size is checked again. Runs in the thread pool (it blocks on I/O).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av

from vstream.server.netsafe import UnsafeUrl, check_url
from vstream.server.schemas import FileSpec, PushSpec, StreamCreate, UrlSpec, WebcamSpec
from vstream.server.state import ApiError, Limits, ServerState
from vstream.sources import PushSource, file_source, network_source, replay_source, webcam_source
from vstream.video import VideoError, probe


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


def check_size(limits: Limits, width: int, height: int, what: str, param: str = "source") -> None:
    if width * height > limits.max_frame_pixels:
        raise ApiError(400, f"{what} has {width}x{height} = {width * height} pixels per frame, over the limit "
                       f"max_frame_pixels={limits.max_frame_pixels}", code="limit_exceeded", param=param)


def probe_file(limits: Limits, path: Path, rel: str) -> None:
    try:
        info = probe(path)
    except VideoError as exc:
        raise ApiError(400, f"{rel!r} is not a readable video: {exc}", code="invalid_video", param="source.path")
    check_size(limits, info.width, info.height, repr(rel), "source.path")
    if info.duration is not None and info.duration > limits.max_source_seconds:
        raise ApiError(400, f"{rel!r} lasts {info.duration:.1f} s, over the limit max_source_seconds="
                       f"{limits.max_source_seconds}", code="limit_exceeded", param="source.path")
    if info.num_frames is not None and info.num_frames > limits.max_source_frames:
        raise ApiError(400, f"{rel!r} declares {info.num_frames} frames, over the limit max_source_frames="
                       f"{limits.max_source_frames}", code="limit_exceeded", param="source.path")


def probe_open(limits: Limits, target: str, what: str, param: str, fmt: str | None = None,
               options: dict | None = None) -> None:
    """Open a network stream or a device, read its header only, check the frame size, close it."""
    try:
        with av.open(target, format=fmt, options=options or {}, timeout=limits.url_timeout_s,
                     metadata_errors="replace") as container:
            if not container.streams.video:
                raise ApiError(400, f"{what} has no video stream", code="invalid_video", param=param)
            ctx = container.streams.video[0].codec_context
            check_size(limits, ctx.width, ctx.height, what, param)
    except av.FFmpegError as exc:
        raise ApiError(400, f"{what} could not be opened as a video source: {exc}", code="invalid_video",
                       param=param) from exc


def bounded(frames, limits: Limits) -> Iterator:
    """A pulled source capped at `max_source_seconds` of stream time, each frame's size checked."""
    for t, frame in frames:
        if t > limits.max_source_seconds:
            raise VideoError(f"the source reached max_source_seconds={limits.max_source_seconds} of stream time")
        height, width = frame.shape[:2]
        if width * height > limits.max_frame_pixels:
            raise VideoError(f"a frame at {t:.3f} s is {width}x{height}, over max_frame_pixels="
                             f"{limits.max_frame_pixels}")
        yield t, frame


def open_stream_source(state: ServerState, body: StreamCreate):
    """(frames, live, push source or None, fps) for a validated request; raises ApiError on a bad source."""
    limits = state.limits
    fps = body.fps if body.fps is not None else state.model.cfg.sample_fps
    if fps > limits.max_fps:
        raise ApiError(400, f"fps={fps} is over the limit max_fps={limits.max_fps}", code="limit_exceeded",
                       param="fps")
    spec = body.source
    if isinstance(spec, FileSpec):
        path = resolve_media(state.media_root, spec.path)
        probe_file(limits, path, spec.path)
        if body.speed is None:
            return bounded(file_source(str(path), fps=fps), limits), False, None, fps
        return bounded(replay_source(str(path), fps=fps, speed=body.speed), limits), True, None, fps
    if body.speed is not None:
        raise ApiError(400, f"speed applies to file sources only, got speed={body.speed} for a {spec.type} source",
                       param="speed")
    if isinstance(spec, UrlSpec):
        try:
            checked = check_url(spec.url, state.allow_private_sources, limits.url_timeout_s)
        except UnsafeUrl as exc:
            status = 403 if exc.code == "url_forbidden" else 400
            raise ApiError(status, str(exc), code=exc.code, param="source.url") from exc
        if checked.size is not None and checked.size > limits.max_source_bytes:
            raise ApiError(400, f"{spec.url!r} declares {checked.size} bytes, over the limit max_source_bytes="
                           f"{limits.max_source_bytes}", code="limit_exceeded", param="source.url")
        rtsp = {"rtsp_transport": "tcp"} if checked.url.startswith("rtsp") else {}
        probe_open(limits, checked.url, repr(spec.url), "source.url", options=rtsp | checked.options)
        frames = network_source(checked.url, fps=fps, timeout=limits.url_timeout_s, options=checked.options)
        return bounded(frames, limits), True, None, fps
    if isinstance(spec, WebcamSpec):
        probe_open(limits, f"/dev/video{spec.device}", f"webcam {spec.device}", "source.device", fmt="v4l2")
        return bounded(webcam_source(spec.device, fps=fps), limits), True, None, fps
    assert isinstance(spec, PushSpec)
    push = PushSource()
    return push, True, push, fps
