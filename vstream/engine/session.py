"""A stream session: frames in, questions answered at any moment from the memory as it stands.

Two threads per session: a reader pulls `(t, frame)` from the source into a bounded queue, an ingest worker encodes
frames and updates the STAR memory, then publishes an immutable snapshot (one reference swap). Questions are answered
on the caller's thread from the latest snapshot: no lock is held while generating, and an update in progress is never
seen half done, because the snapshot's tensors are copies made by `memory.read()` between updates.

Drop policy: a live source never waits for the engine. When the queue is full, the OLDEST queued frame is dropped and
counted, so the memory keeps up with the present. A non-live source (a file read as fast as possible) waits instead:
no frame is dropped. Questions are never dropped.

The session knows nothing about transports (CLI, HTTP); sources know nothing about models.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from vstream.engine.processor import Snapshot, StreamProcessor, pick_snapshot, snapshot_at
from vstream.model.vlm import Answer, FlashVStream

Frame = tuple[float, np.ndarray]
_END = object()


class LatencyWindow:
    """The most recent `size` durations of one stage, summarised as p50/p95/max in milliseconds."""

    def __init__(self, size: int = 1024):
        self._values: collections.deque[float] = collections.deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def summary(self) -> dict[str, float | int]:
        values = sorted(self._values)
        if not values:
            return {"count": 0}
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
        return {"count": len(values), "p50_ms": pick(0.5), "p95_ms": pick(0.95), "max_ms": values[-1] * 1000}


class FrameQueue:
    """A bounded FIFO; `put(drop_oldest=True)` never blocks and returns how many frames it pushed out."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def put(self, item, drop_oldest: bool, timeout: float | None = None) -> int:
        with self._cond:
            dropped = 0
            if drop_oldest:
                while len(self._items) >= self.maxsize and item is not _END:
                    self._items.popleft()
                    dropped += 1
            elif not self._cond.wait_for(lambda: len(self._items) < self.maxsize, timeout=timeout):
                raise TimeoutError(f"the ingest queue stayed full for {timeout} s")
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get_batch(self, limit: int, timeout: float) -> list:
        """Up to `limit` items, waiting at most `timeout` s for the first; [] on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout=timeout):
                return []
            batch = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._cond.notify_all()
            return batch


@dataclass
class Counters:
    received: int = 0
    encoded: int = 0
    dropped: int = 0
    latency: dict[str, LatencyWindow] = field(
        default_factory=lambda: {k: LatencyWindow() for k in ("encode", "memory_update", "first_token", "answer")}
    )
    tokens_per_s: LatencyWindow = field(default_factory=LatencyWindow)


class StreamSession:
    """Ingest one source into one memory; answer questions concurrently. Use as a context manager or call `close()`."""

    def __init__(
        self, model: FlashVStream, *, queue_size: int = 8, batch_size: int = 4, history: int = 0,
        on_frames: Callable[[list[Frame]], None] | None = None,
    ):
        """`history`: past snapshots kept for questions asked "as of" an earlier time (0: none). `on_frames` is
        called by the ingest worker with each batch of frames once they are encoded (e.g. to keep thumbnails)."""
        self.model = model
        self.processor = StreamProcessor(model, history=history)  # driven by the ingest thread only
        self.on_frames = on_frames
        self.batch_size = batch_size
        self.queue = FrameQueue(queue_size)
        self.counters = Counters()
        self.error: BaseException | None = None
        self.live = False
        self._snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def memory(self):
        """The streaming memory the ingest thread updates (read its `nbytes`; answer from snapshots, not from it)."""
        return self.processor.memory

    # ---------------------------------------------------------------- ingestion

    def start(self, source: Iterable[Frame], live: bool) -> "StreamSession":
        """Start reading `source`; `live` sources get the drop-oldest policy, others back-pressure."""
        if self._threads:
            raise RuntimeError("this session already has a source")
        self.live = live
        self._threads = [
            threading.Thread(target=self._read, args=(source,), name="vstream-reader", daemon=True),
            threading.Thread(target=self._ingest, name="vstream-ingest", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _read(self, source: Iterable[Frame]) -> None:
        try:
            for item in source:
                if self._stop.is_set():
                    break
                self.counters.received += 1
                while not self._stop.is_set():
                    try:
                        self.counters.dropped += self.queue.put(item, drop_oldest=self.live, timeout=0.1)
                        break
                    except TimeoutError:
                        continue
        except Exception as exc:  # the source failed: keep what was ingested, end the stream with its error
            self.error = exc
        finally:
            close = getattr(source, "close", None)  # a generator's close runs its finally: decoders, relays, sockets
            if close is not None:
                try:
                    close()
                except Exception as exc:  # closing must not hide the stream's own error, nor raise from the thread
                    self.error = self.error or exc
            self.queue.put(_END, drop_oldest=True)

    def _ingest(self) -> None:
        try:
            while True:
                batch = self.queue.get_batch(self.batch_size, timeout=0.1)
                if self._stop.is_set():
                    return
                ended = any(item is _END for item in batch)
                frames = [item for item in batch if item is not _END]
                if frames:
                    self._ingest_frames(frames)
                if ended:
                    return
        except Exception as exc:
            self.error = self.error or exc
        finally:
            self._done.set()

    def _ingest_frames(self, frames: list[Frame]) -> None:
        t0 = time.perf_counter()
        features = self.model.encode([f for _, f in frames], batch_size=len(frames))
        t1 = time.perf_counter()
        self.processor.insert([t for t, _ in frames], features=features)
        snap = self.processor.snapshot()  # copies: the published snapshot never changes afterwards
        t2 = time.perf_counter()
        c = self.counters
        c.encoded += len(frames)
        c.latency["encode"].add((t1 - t0) / len(frames))
        c.latency["memory_update"].add((t2 - t1) / len(frames))
        self._snapshot = snap  # one reference swap publishes it
        if self.on_frames is not None:
            self.on_frames(frames)

    # ---------------------------------------------------------------- questions

    def snapshot(self) -> Snapshot | None:
        """The latest published snapshot (None before the first frame is ingested)."""
        return self._snapshot

    def wait_for_frames(self, count: int, timeout: float) -> Snapshot:
        """Block until at least `count` frames are encoded (or the stream ended); raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self._snapshot
            if (snap is not None and snap.frames >= count) or self._done.is_set():
                if snap is None:
                    raise RuntimeError(f"the stream ended before any frame was ingested: {self.error}")
                return snap
            time.sleep(0.005)
        raise TimeoutError(f"{count} frames were not ingested within {timeout} s ({self.counters.encoded} were)")

    def snapshot_at(self, t: float) -> Snapshot:
        """The memory as it stood at stream time `t`: the newest kept snapshot no later than `t` (the latest snapshot
        when `t` is at or after it). Raises LookupError when no kept snapshot is that old."""
        return snapshot_at(self._snapshot, self.processor.history, t)

    def ask_stream(
        self, question: str, max_new_tokens: int | None = None, as_of: float | None = None
    ) -> tuple[Snapshot, Iterator[str]]:
        """The snapshot the answer rests on and an iterator over the answer's text pieces; `as_of` answers from the
        memory as it stood at that stream time (see `snapshot_at`)."""
        snap = pick_snapshot(self._snapshot, self.processor.history, question, as_of)
        return snap, self._timed(self.model.stream_answer(snap.memory, question, max_new_tokens=max_new_tokens))

    def _timed(self, pieces: Iterator[str]) -> Iterator[str]:
        t0 = time.perf_counter()
        count = 0
        for piece in pieces:
            if count == 0:
                self.counters.latency["first_token"].add(time.perf_counter() - t0)
            count += 1
            yield piece
        self._record_answer(time.perf_counter() - t0, count)

    def _record_answer(self, seconds: float, pieces: int) -> None:
        self.counters.latency["answer"].add(seconds)
        if pieces and seconds > 0:
            self.counters.tokens_per_s.add(pieces / seconds)  # text pieces per second, about tokens

    def ask(self, question: str, max_new_tokens: int | None = None) -> Answer:
        """A whole answer from the latest snapshot, with the stream times it rests on."""
        snap = pick_snapshot(self._snapshot, self.processor.history, question, None)
        answer = self.model.answer_from(snap.memory, question, max_new_tokens=max_new_tokens)
        self.counters.latency["first_token"].add(answer.timings["first_token_s"])
        self._record_answer(answer.timings["answer_s"], len(self.model.tokenizer(answer.text).input_ids))
        return answer

    # ---------------------------------------------------------------- lifecycle and stats

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait for the source to end and every queued frame to be ingested; False on timeout."""
        return self._done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        c, snap = self.counters, self._snapshot
        return {
            "frames_received": c.received,
            "frames_encoded": c.encoded,
            "frames_dropped": c.dropped,
            "stream_time": None if snap is None else snap.stream_time,
            "memory_tokens": 0 if snap is None else snap.memory.num_tokens,
            "memory_bytes": self.processor.nbytes,
            "latency": {k: w.summary() for k, w in c.latency.items()},
            "tokens_per_s": c.tokens_per_s.summary(),
            "finished": self.finished,
            "error": None if self.error is None else str(self.error),
        }
