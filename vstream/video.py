"""Decoding video files into timestamped RGB frames, sampled by presentation time.

`iter_frames` decodes a file once, front to back (never seeking), and yields `(seconds, HxWx3 uint8 RGB)` at a fixed
sampling rate chosen by timestamp, so variable-frame-rate files are sampled at the right moments. `read_frames` collects
them; `probe` reads the container header only.

This module does not resize or normalise frames (see `vstream.encoder.preprocess`), does not apply rotation metadata or
the sample aspect ratio (frames come back at their stored size) and does not read audio. It opens URLs and devices only
as `vstream.sources` asks it to, and does not check where a URL leads (`vstream.server.netsafe` does).

What FFmpeg may open. Every open names its protocols and demuxers (`guarded`): a file is read through the `file`
protocol only, an http(s) URL through http(s) over tcp (and tls), an RTSP URL by the rtsp demuxer over tcp, a device by
its one demuxer. Files and http(s) URLs may be one of `CONTAINERS`, demuxers that never open another file or URL; a
playlist (HLS `.m3u8`, DASH), a concat list, an SDP file or an image sequence is refused at open, because each would
make FFmpeg open inputs that nobody checked. Nested playlists are not resolved: refusing is simpler and closes the
class.

Damaged input. Every failure raises `VideoError` (a `vstream.errors.SourceError`, so a `ValueError`) naming the path,
what was expected and what was found:
- a path that does not exist: `VideoNotFoundError` (also a `MissingPathError`, a `FileNotFoundError`);
- a file FFmpeg cannot open (not a video, random bytes, an mp4 cut before its index): at open;
- a container without a video stream, or whose video stream decodes to no frame (`read_frames`);
- an error FFmpeg reports while decoding (corrupt packets): raised after the frames decoded before it were yielded; the
  message names how many frames were decoded and the time of the last one;
- frames without timestamps (raw elementary streams), or timestamps that go backwards.
A file cut mid-stream that FFmpeg reads as a clean end of data (a truncated mkv, or an mp4 whose index is at the front)
yields the frames before the damage and then stops: at this level that is indistinguishable from a shorter video.
Compare the last timestamp with `probe(path).duration` if a complete file matters.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vstream.errors import MissingPathError, VideoError

# Demuxers that read their one input and never open another (no playlists, concat lists, SDP or image sequences)
CONTAINERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,mpeg"
_EPS = 1e-6  # seconds; absorbs the float rounding of pts * time_base when a frame is compared with a due time


class VideoNotFoundError(VideoError, MissingPathError):
    """The video path does not exist."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about the first video stream."""

    duration: float | None
    """Seconds, from the video stream, else from the container (all streams); None when the file does not say."""
    fps: float | None
    """Average frame rate; None when unknown."""
    width: int
    """Stored width in pixels."""
    height: int
    """Stored height in pixels."""
    codec: str
    """Decoder name, e.g. `h264`."""
    num_video_streams: int
    """Video streams in the container (only the first is decoded)."""
    num_frames: int | None
    """Frames declared by the container (mp4/mov sample tables); None when it does not say (mkv, webm)."""


def probe(path: str | Path) -> VideoInfo:
    """Header information of the first video stream; opens the container, decodes nothing."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        duration = None if stream.duration is None else float(stream.duration * stream.time_base)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        return VideoInfo(
            duration=duration,
            fps=float(stream.average_rate) if stream.average_rate else None,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            num_video_streams=len(container.streams.video),
            num_frames=stream.frames or None,
        )


def iter_frames(
    path: str | Path,
    fps: float = 1.0,
    start: float = 0.0,
    until: float | None = None,
    *,
    format: str | None = None,
    options: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield `(t, frame)` sampled by timestamp: t in seconds from the stream start, frame HxWx3 uint8 RGB.

    Sample k is due at `start + k / fps`; it takes the first decoded frame whose time is >= the due time. A frame serves
    one sample only, and due times that a gap in the video has passed are skipped (the next sample is the first due time
    after the frame taken), so variable-frame-rate video is sampled correctly. Frames after `until` seconds (inclusive
    bound, same clock as `start`) end the iteration. Grayscale, alpha and 4:4:4 sources all come back as RGB (alpha
    dropped). See the module docstring for how damaged files end.

    `path` may also be a URL (`rtsp://`, `http(s)://`) or a capture device with its FFmpeg `format` (e.g. `v4l2`);
    `options` are FFmpeg options (e.g. `{"rtsp_transport": "tcp"}`) and `timeout` bounds each network wait in seconds.
    """
    _check_sampling(fps, start, until)
    with _open(path, format=format, options=options, timeout=timeout) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        # Times count from the stream's start time; a container that states none counts from 0.
        origin = 0.0 if stream.start_time is None else float(stream.start_time * stream.time_base)
        live_input = format is not None or "://" in str(path)
        next_slot = 0  # index k of the earliest due time not yet served
        decoded, taken, last = 0, 0, -math.inf
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if frame.pts is None and live_input and last == -math.inf:
                        continue  # RTSP: frames decoded before the first RTCP sync carry no timestamp
                    decoded += 1
                    t = _frame_time(frame, origin, path, decoded, last)
                    last = t
                    if until is not None and t > until + _EPS:
                        return
                    slot = math.floor((t - start + _EPS) * fps)  # due times start + k/fps <= t, for k <= slot
                    if slot >= next_slot:
                        next_slot, taken = slot + 1, taken + 1
                        yield t, frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        except av.FFmpegError as e:
            where = f"the last at {last:.3f} s, {taken} of them sampled and yielded" if decoded else "none yielded"
            raise VideoError(
                f"{path}: decoding failed after {decoded} good frames ({where}): "
                f"expected a complete stream, FFmpeg reported {_describe(e)}"
            ) from e


def read_frames(
    path: str | Path, fps: float = 1.0, until: float | None = None, start: float = 0.0
) -> tuple[list[float], list[np.ndarray]]:
    """All samples of `iter_frames` as (timestamps, frames); holds every frame in memory (use `iter_frames` for long
    videos). Raises `VideoError` when no frame was sampled."""
    times: list[float] = []
    frames: list[np.ndarray] = []
    for t, frame in iter_frames(path, fps=fps, start=start, until=until):
        times.append(t)
        frames.append(frame)
    if not frames:
        span = f"from {start} s" + ("" if until is None else f" to {until} s")
        raise VideoError(f"{path} contains no decodable video frames {span}: expected at least one")
    return times, frames


def guarded(target: str, format: str | None = None, options: dict[str, str] | None = None
            ) -> tuple[str | None, dict[str, str]]:
    """(format, options) for opening `target` with FFmpeg kept to it: the caller's options plus the protocol and
    demuxer whitelists of its kind, which the caller cannot loosen. `target` is a URL, or a file or device path."""
    scheme = target.partition("://")[0].lower() if "://" in target else None
    options = dict(options or {})
    if format is not None:  # a device (v4l2) or a forced demuxer: that one only, reading nothing else
        return format, options | {"format_whitelist": format, "protocol_whitelist": "file"}
    if scheme in ("rtsp", "rtsps"):  # interleaved over the RTSP connection: no UDP, no second connection
        protocols = "rtsp,tcp" if scheme == "rtsp" else "rtsps,rtsp,tls,tcp"
        return "rtsp", options | {"rtsp_transport": "tcp", "format_whitelist": "rtsp", "protocol_whitelist": protocols}
    protocols = {None: "file", "http": "http,tcp", "https": "https,tls,tcp"}.get(scheme)
    if protocols is None:
        raise VideoError(f"{target}: unsupported scheme {scheme!r}: expected a file, http, https, rtsp or rtsps")
    return None, options | {"format_whitelist": CONTAINERS, "protocol_whitelist": protocols}


def open_input(target: str, format: str | None = None, options: dict[str, str] | None = None,
               timeout: float | None = None) -> av.container.InputContainer:
    """A URL or device opened under `guarded`'s whitelists; raises VideoError."""
    format, options = guarded(target, format, options)
    try:
        return av.open(target, format=format, options=options, timeout=timeout, metadata_errors="replace")
    except av.FFmpegError as e:
        raise VideoError(f"{target} could not be opened as a video source: FFmpeg reported {_describe(e)}"
                         f"{_refused_hint(e)}") from e


def _open(path: str | Path, format=None, options=None, timeout=None) -> av.container.InputContainer:
    if format is not None or "://" in str(path):  # a URL or a device: nothing to check on the file system
        return open_input(str(path), format, options, timeout)
    p = Path(path)
    if not p.exists():
        raise VideoNotFoundError(f"{p} does not exist: expected a video file")
    if not p.is_file():
        raise VideoError(f"{p} is not a file: expected a video file")
    _, options = guarded(str(p))
    try:
        # "file:" so that a name like "concat:a|b" is a file name, not a protocol; tags in odd encodings must not stop
        # decoding (metadata is not used here).
        return av.open(f"file:{p}", options=options, metadata_errors="replace")
    except av.FFmpegError as e:
        raise VideoError(f"{p} is not a readable video: FFmpeg could not open it ({_describe(e)})"
                         f"{_refused_hint(e)}") from e


def _refused_hint(error: av.FFmpegError) -> str:
    # FFmpeg answers EINVAL when the probed demuxer is not on the whitelist: say which ones are
    if error.errno != errno.EINVAL:
        return ""
    return (f"; expected one of the containers {CONTAINERS} (playlists such as HLS .m3u8, DASH, concat lists and other "
            "inputs that name further files or URLs are refused)")


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.VideoStream:
    if not container.streams.video:
        found = [s.type for s in container.streams] or "no streams at all"
        raise VideoError(f"{path} has no video stream: expected at least one, found {found}")
    return container.streams.video[0]


def _frame_time(frame: av.VideoFrame, origin: float, path: str | Path, index: int, previous: float) -> float:
    """Seconds from the stream start of decoded frame `index` (1-based); checks it exists and does not go back."""
    if frame.pts is None:
        raise VideoError(
            f"{path}: frame {index} has no timestamp: expected a container with timestamps (mp4, mkv, ...), "
            "found none (a raw elementary stream?)"
        )
    t = float(Fraction(frame.pts) * frame.time_base) - origin
    if t < previous - _EPS:
        raise VideoError(
            f"{path}: frame {index} is at {t:.3f} s, before the previous frame at {previous:.3f} s: "
            "expected increasing timestamps"
        )
    return t


def _check_sampling(fps: float, start: float, until: float | None) -> None:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if until is not None and not until >= start:
        raise ValueError(f"until must be >= start ({start} s), got {until}")


def _describe(error: av.FFmpegError) -> str:
    return f"{type(error).__name__}: {error.strerror}"
