"""Frame sources: iterables of `(stream_time_seconds, HxWx3 uint8 RGB)`, knowing nothing about models.

- `file_source`: a video file decoded sequentially as fast as possible (not live: the engine may apply back-pressure).
- `replay_source`: the same file paced in simulated real time (`speed=1` is wall clock), i.e. a live source.
- `PushSource`: frames pushed by the caller (a server, a browser), a live source; `close()` ends it.
Sampling to the target rate is by timestamp (see `vstream.video.iter_frames`).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator

import numpy as np

from vstream.video import iter_frames


def file_source(path: str, fps: float = 1.0, until: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    return iter_frames(path, fps=fps, until=until)


def replay_source(
    path: str, fps: float = 1.0, speed: float = 1.0, until: float | None = None,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield each sampled frame no earlier than `t / speed` seconds after the first one (decoding runs ahead)."""
    if speed <= 0:
        raise ValueError(f"replay speed must be > 0, got {speed}")
    start = None
    for t, frame in iter_frames(path, fps=fps, until=until):
        if start is None:
            start = clock() - t / speed
        delay = start + t / speed - clock()
        if delay > 0:
            sleep(delay)
        yield t, frame


class PushSource:
    """Frames handed in by `push`; iterating yields them in order until `close()`. Bounded: a full buffer drops the
    pushed frame and counts it (the caller is never blocked)."""

    def __init__(self, maxsize: int = 64):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._closed = False
        self.rejected = 0
        self._last_time = float("-inf")

    def push(self, t: float, frame: np.ndarray) -> bool:
        if self._closed:
            raise RuntimeError("this push source is closed")
        if not t > self._last_time:
            raise ValueError(f"frame times must increase: got {t} after {self._last_time}")
        self._last_time = t
        try:
            self._queue.put_nowait((t, frame))
            return True
        except queue.Full:
            self.rejected += 1
            return False

    def close(self) -> None:
        """End the stream after the frames already pushed."""
        self._closed = True

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        while True:
            try:
                yield self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._closed:
                    return
