"""Opening a stream's source for the server: checks and probes before the stream exists, limits that bind before
frames are allocated.

File sources resolve inside the media root after links are resolved (403 otherwise, nothing read); a name with a NUL
byte, a component or path longer than the file system allows, or a symlink loop is a 400. URL sources pass
`vstream.server.netsafe`. Every open, the probe's and the reader's alike, goes through `vstream.video`'s whitelists: the
source's own protocol only, and containers that name no other input, so a playlist (HLS, DASH), a concat list or an SDP
file is refused (400) instead of being resolved; a manifest in the media root can therefore reach no file at all. Every
pulled source is probed (its header read) before the stream is created: a source that cannot be read gives 400, and the
frame size, the duration and the declared frame count are checked against the server's limits there, before any frame
is decoded. While the stream runs, stream time is capped at `max_source_seconds` and each frame's size is checked again.
Messages name the path the client sent, never the media root. Runs in the thread pool (it blocks on I/O).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from vstream.server.errors import ApiError
from vstream.server.netsafe import UnsafeUrl, check_url
from vstream.server.schemas import FileSpec, PushSpec, StreamCreate, UrlSpec, WebcamSpec
from vstream.server.state import Limits, ServerState
from vstream.sources import PushSource, file_source, network_source, replay_source, rtsp_options, webcam_source
from vstream.video import VideoError, open_input, probe

_NAME_MAX, _PATH_MAX = 255, 4096  # Linux's limits, in bytes (os.pathconf would ask the media root's file system)


def resolve_media(media_root: Path | None, rel: str) -> Path:
    """`rel` inside the media root, symlinks resolved: 403 outside it (nothing is read), 404 missing, 400 not a file
    or not a name the file system can hold."""
    if media_root is None:
        raise ApiError(403, "file sources are disabled: the server was started without a media root",
                       param="source.path")
    _check_name(rel)
    root = media_root.resolve(strict=True)
    try:
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise ApiError(403, f"path {rel!r} resolves outside the media root: expected a path inside it",
                           code="path_outside_media_root", param="source.path")
        if not path.exists():
            raise ApiError(404, f"no file {rel!r} under the media root", code="file_not_found", param="source.path")
        regular = path.is_file()
    except RuntimeError as exc:  # how Python 3.11's resolve() reports a symlink loop (later ones: OSError ELOOP)
        raise ApiError(400, f"path {rel!r} runs into a symlink loop: expected a path to a file",
                       param="source.path") from exc
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EACCES...: the message must not carry the server's path
        raise ApiError(400, f"path {rel!r} cannot be opened: {os.strerror(exc.errno or errno.EIO)}",
                       param="source.path") from exc
    if not regular:
        raise ApiError(400, f"{rel!r} is not a regular file", param="source.path")
    return path


def _check_name(rel: str) -> None:
    """400 for a name no file can have: a NUL byte, a component over NAME_MAX bytes, a path over PATH_MAX."""
    if "\0" in rel:
        raise ApiError(400, f"path {rel!r} contains a NUL byte: expected a file name", param="source.path")
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON can carry and no file name holds
        raise ApiError(400, f"path {rel!r} is not valid Unicode ({exc.reason}): expected a file name",
                       param="source.path") from None
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > _NAME_MAX:
        raise ApiError(400, f"path {rel[:80]!r}... has a name of {longest} bytes: expected at most {_NAME_MAX}",
                       param="source.path")
    if len(encoded) > _PATH_MAX:
        raise ApiError(400, f"path {rel[:80]!r}... is {len(encoded)} bytes long: expected at most {_PATH_MAX}",
                       param="source.path")


def check_size(limits: Limits, width: int, height: int, what: str, param: str = "source") -> None:
    if width * height > limits.max_frame_pixels:
        raise ApiError(400, f"{what} has {width}x{height} = {width * height} pixels per frame, over the limit "
                       f"max_frame_pixels={limits.max_frame_pixels}", code="limit_exceeded", param=param)


def probe_file(limits: Limits, path: Path, rel: str) -> None:
    try:
        info = probe(path)
    except VideoError as exc:
        raise ApiError(400, f"{rel!r} is not a readable video: {_without(exc, path, rel)}", code="invalid_video",
                       param="source.path") from None
    check_size(limits, info.width, info.height, repr(rel), "source.path")
    if info.duration is not None and info.duration > limits.max_source_seconds:
        raise ApiError(400, f"{rel!r} lasts {info.duration:.1f} s, over the limit max_source_seconds="
                       f"{limits.max_source_seconds}", code="limit_exceeded", param="source.path")
    if info.num_frames is not None and info.num_frames > limits.max_source_frames:
        raise ApiError(400, f"{rel!r} declares {info.num_frames} frames, over the limit max_source_frames="
                       f"{limits.max_source_frames}", code="limit_exceeded", param="source.path")


def probe_open(limits: Limits, connect: AbstractContextManager[str], what: str, param: str, fmt: str | None = None,
               options: dict | None = None, problem: Callable[[], str | None] = lambda: None) -> None:
    """Open a network stream or a device as its reader will (`connect`'s URL, `vstream.video.open_input`), read its
    header only, check the frame size, close it. `problem` says what a relay saw, for the message."""
    try:
        with connect as target, open_input(target, fmt, options, limits.url_timeout_s) as container:
            if not container.streams.video:
                raise ApiError(400, f"{what} has no video stream", code="invalid_video", param=param)
            ctx = container.streams.video[0].codec_context
            check_size(limits, ctx.width, ctx.height, what, param)
    except VideoError as exc:
        reason = problem() or str(exc).partition(": ")[2] or str(exc)
        raise ApiError(400, f"{what} could not be opened as a video source: {reason}", code="invalid_video",
                       param=param) from exc


def _without(exc: Exception, path: Path, rel: str) -> str:
    """The message of `exc` with the server's path of a file replaced by the path the client sent."""
    return str(exc).replace(str(path), rel)


def named(frames, path: Path, rel: str) -> Iterator:
    """A file source whose errors name `rel`, not the server's path."""
    try:
        yield from frames
    except VideoError as exc:
        raise VideoError(_without(exc, path, rel)) from None


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
            return bounded(named(file_source(str(path), fps=fps), path, spec.path), limits), False, None, fps
        frames = named(replay_source(str(path), fps=fps, speed=body.speed), path, spec.path)
        return bounded(frames, limits), True, None, fps
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
        timeout = limits.url_timeout_s
        relay = checked.connect(timeout)
        probe_open(limits, relay, repr(spec.url), "source.url", options=rtsp_options(checked.url) | checked.options,
                   problem=lambda: getattr(relay, "problem", None))
        frames = network_source(checked.url, fps=fps, timeout=timeout, options=checked.options,
                                connect=lambda: checked.connect(timeout))
        return bounded(frames, limits), True, None, fps
    if isinstance(spec, WebcamSpec):
        device = f"/dev/video{spec.device}"
        probe_open(limits, nullcontext(device), f"webcam {spec.device}", "source.device", fmt="v4l2")
        return bounded(webcam_source(spec.device, fps=fps), limits), True, None, fps
    assert isinstance(spec, PushSpec)
    push = PushSource()
    return push, True, push, fps
