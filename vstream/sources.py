"""Frame sources: iterables of `(stream_time_seconds, HxWx3 uint8 RGB)`, knowing nothing about models.

- `file_source`: a video file decoded sequentially as fast as possible (not live: the engine may apply back-pressure).
- `replay_source`: the same file paced in simulated real time (`speed=1` is wall clock), i.e. a live source.
- `network_source`: RTSP / HTTP(S) through PyAV, with bounded reconnect attempts and exponential backoff. What FFmpeg
  may open is kept to the URL's own protocol and to containers that name no other input (`vstream.video.guarded`):
  HLS and DASH playlists are refused.
- `webcam_source`: a V4L2 capture device through PyAV (a live source).
- `PushSource`: frames pushed by the caller (a server, a browser), a live source; `close()` ends it.
- `open_source(spec)`: a file path, a URL or `webcam:N` -> (frames, live).
Sampling to the target rate is by timestamp (see `vstream.video.iter_frames`).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from vstream.errors import SourceError, UserInputError
from vstream.video import VideoError, iter_frames

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")


def file_source(path: str, fps: float = 1.0, until: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    return iter_frames(path, fps=fps, until=until)


def replay_source(
    path: str, fps: float = 1.0, speed: float = 1.0, until: float | None = None,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield each sampled frame no earlier than `t / speed` seconds after the first one (decoding runs ahead)."""
    if speed <= 0:
        raise UserInputError(f"replay speed must be > 0, got {speed}")
    yield from paced(iter_frames(path, fps=fps, until=until), speed, clock=clock, sleep=sleep)


def paced(frames: Iterable[tuple[float, np.ndarray]], speed: float, start: float | None = None,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
          ) -> Iterator[tuple[float, np.ndarray]]:
    """Yield each `(t, frame)` no earlier than `start + t / speed` (default start: the first frame's arrival)."""
    if not speed > 0:
        raise UserInputError(f"speed must be > 0, got {speed}")
    for t, frame in frames:
        if start is None:
            start = clock() - t / speed
        delay = start + t / speed - clock()
        if delay > 0:
            sleep(delay)
        yield t, frame


def network_source(
    url: str, fps: float = 1.0, *, retries: int = 3, backoff: float = 0.5, timeout: float = 5.0,
    live: bool | None = None, sleep: Callable[[float], None] = time.sleep, options: dict[str, str] | None = None,
    connect: Callable[[], AbstractContextManager[str]] | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Frames from a network URL. A failure to open or a decoding error is retried up to `retries` times in a row,
    waiting `backoff * 2**k` seconds; a live stream (RTSP by default) that ends is also reconnected, a file served over
    HTTP that ends is the end (and one that fails after frames were yielded is not restarted, which would repeat them).
    Stream time continues across reconnects. Raises VideoError once the attempts are spent. `options` are extra
    FFmpeg options (e.g. `max_redirects`), added to `rtsp_options(url)`; they cannot loosen the whitelists. `connect`,
    when given, is entered once per attempt and yields the URL that attempt opens (the server's RTSP relay).
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in NETWORK_SCHEMES:
        raise SourceError(f"unsupported URL scheme {scheme!r} in {url!r}: expected one of {NETWORK_SCHEMES}")
    live = scheme.startswith("rtsp") if live is None else live
    connect = connect or (lambda: nullcontext(url))
    return _reconnecting(url, fps, rtsp_options(url) | (options or {}), retries, backoff, timeout, live, sleep,
                         connect)


def rtsp_options(url: str) -> dict[str, str]:
    """FFmpeg options every open of `url` adds: for RTSP, probe 0.5 s instead of FFmpeg's default (~3 s at every
    connect and reconnect); nothing for other schemes."""
    return {"analyzeduration": "500000"} if url.lower().startswith("rtsp") else {}


def _reconnecting(url, fps, options, retries, backoff, timeout, live, sleep, connect
                  ) -> Iterator[tuple[float, np.ndarray]]:
    failures, offset, last = 0, 0.0, None
    while True:
        origin = None
        try:
            with connect() as target:
                for t, frame in iter_frames(target, fps=fps, options=options, timeout=timeout):
                    origin = t if origin is None else origin
                    failures = 0
                    last = offset + t - origin
                    yield last, frame
            if not live:
                return
            problem = "the stream ended"
        except VideoError as exc:
            if not live and last is not None:  # a file restarted would repeat its frames: end with the error
                raise
            problem = str(exc)
        failures += 1
        if failures > retries:
            raise VideoError(f"{url}: gave up after {retries} reconnect attempts; last problem: {problem}")
        sleep(backoff * 2 ** (failures - 1))
        if last is not None:
            offset = last + 1.0 / fps  # a reconnected live stream restarts its clock


def webcam_source(device: int | str = 0, fps: float = 1.0, timeout: float = 5.0) -> Iterator[tuple[float, np.ndarray]]:
    """Frames from a V4L2 device (`/dev/videoN` or its number)."""
    path = f"/dev/video{device}" if isinstance(device, int) or str(device).isdigit() else str(device)
    return iter_frames(path, fps=fps, format="v4l2", timeout=timeout)


def open_source(spec: str, fps: float = 1.0, speed: float | None = None) -> tuple[Iterator, bool]:
    """A source spec -> (frames, live). `webcam:N`, a URL, or a file path (replayed at `speed` when given: live)."""
    if spec.startswith("webcam:"):
        return webcam_source(spec.partition(":")[2] or 0, fps=fps), True
    if "://" in spec:
        scheme = spec.partition("://")[0].lower()
        if scheme == "file":
            spec = spec.partition("://")[2]
        else:
            source = network_source(spec, fps=fps)  # checks the scheme before any connection
            return source, scheme.startswith("rtsp")
    if speed is not None:
        return replay_source(spec, fps=fps, speed=speed), True
    return file_source(spec, fps=fps), False


class PushSource:
    """Frames handed in by `push`; iterating yields them in order until `close()`. Bounded: a full buffer drops the
    pushed frame and counts it (the caller is never blocked). The iterating thread sleeps until a frame or the close
    comes (no polling: a server holds one such thread per stream)."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.rejected = 0
        self._last_time = float("-inf")

    def push(self, t: float, frame: np.ndarray) -> bool:
        with self._cond:
            if self._closed:
                raise RuntimeError("this push source is closed")
            if not t > self._last_time:
                raise ValueError(f"frame times must increase: got {t} after {self._last_time}")
            self._last_time = t
            if len(self._items) >= self.maxsize:
                self.rejected += 1
                return False
            self._items.append((t, frame))
            self._cond.notify()
            return True

    def close(self) -> None:
        """End the stream after the frames already pushed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closed)
                if not self._items:
                    return
                item = self._items.popleft()
            yield item
