"""A stream session: one source fed into the model's engine, questions answered at any moment from its memory.

The session is a handle on one lane of the engine (`vstream.engine.scheduler`), which owns the device: it encodes the
frames of every stream in shared batches, updates their memories and decodes their answers together. The session
adds what is per source: a reader thread that pulls `(t, frame)` from the source, crops each frame to the tower's
input on the host (so the engine thread does no image work) and queues it.

Drop policy: a live source never waits for the engine. When its queue is full, the OLDEST queued frame is dropped and
counted, so the memory keeps up with the present. A non-live source (a file read as fast as possible) waits instead:
no frame is dropped. Questions are never dropped; beyond the engine's waiting room they are refused.

The session knows nothing about transports (CLI, HTTP); sources know nothing about models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from vstream.model.processor import Snapshot, collect_answer
from vstream.engine.scheduler import Counters, Engine, Lane, engine_of
from vstream.model.batch_answer import Request
from vstream.model.vlm import Answer, FlashVStream

Frame = tuple[float, np.ndarray]


class StreamSession:
    """Feed one source into the engine; answer questions concurrently. Use as a context manager or call `close()`."""

    def __init__(
        self, model: FlashVStream, *, queue_size: int = 8, frames_per_round: int = 4, history: int = 0,
        on_frames: Callable[[list[Frame]], None] | None = None, engine: Engine | None = None,
    ):
        """`history`: past snapshots kept for questions asked "as of" an earlier time (0: none). `frames_per_round`: the
        most of this stream's frames in one round of the engine. `on_frames` is called by the reader with each frame as
        it is queued (e.g. to keep thumbnails). `engine`: the model's shared engine by default."""
        self.model = model
        self.engine = engine if engine is not None else engine_of(model)
        self.lane: Lane = self.engine.open(history=history, queue_size=queue_size, frames_per_round=frames_per_round,
                                           live=True)
        self.on_frames = on_frames
        self.live = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def counters(self) -> Counters:
        return self.lane.counters

    @property
    def error(self) -> BaseException | None:
        return self.lane.error

    @property
    def processor(self):
        """The stream's processor (driven by the engine thread only; read its snapshots, not its memory)."""
        return self.lane.processor

    @property
    def memory(self):
        """The streaming memory the engine updates (read its `nbytes`; answer from snapshots, not from it)."""
        return self.lane.processor.memory

    # ---------------------------------------------------------------- ingestion

    def start(self, source: Iterable[Frame], live: bool) -> "StreamSession":
        """Start reading `source`; `live` sources get the drop-oldest policy, others back-pressure."""
        if self._thread is not None:
            raise RuntimeError("this session already has a source")
        self.live = self.lane.live = live
        self._thread = threading.Thread(target=self._read, args=(source,), name="vstream-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self, source: Iterable[Frame]) -> None:
        error = None
        try:
            for t, frame in source:
                if self._stop.is_set() or self.lane.done.is_set():
                    break
                crop = self.model.crop([frame])[0]
                if self.on_frames is not None:
                    self.on_frames([(t, frame)])
                self._queue(t, crop)
        except Exception as exc:  # the source failed: keep what was ingested, end the stream with its error  # noqa: BLE001
            error = exc
        finally:
            close = getattr(source, "close", None)  # a generator's close runs its finally: decoders, relays, sockets
            if close is not None:
                try:
                    close()
                except Exception as exc:  # closing must not hide the stream's own error, nor raise from the thread  # noqa: BLE001
                    error = error or exc
            self.lane.end(error)

    def _queue(self, t: float, crop: np.ndarray) -> None:
        while not self._stop.is_set() and not self.lane.done.is_set():
            try:
                self.lane.put(t, crop, timeout=0.1)
                return
            except TimeoutError:
                continue

    # ---------------------------------------------------------------- questions

    def snapshot(self) -> Snapshot | None:
        """The latest published snapshot (None before the first frame is ingested)."""
        return self.lane.snapshot

    def wait_for_frames(self, count: int, timeout: float) -> Snapshot:
        """Block until at least `count` frames are encoded (or the stream ended); raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.lane.snapshot
            if (snap is not None and snap.frames >= count) or self.lane.done.is_set():
                if snap is None:
                    raise RuntimeError(f"the stream ended before any frame was ingested: {self.error}")
                return snap
            time.sleep(0.005)
        raise TimeoutError(f"{count} frames were not ingested within {timeout} s ({self.counters.encoded} were)")

    def snapshot_at(self, t: float) -> Snapshot:
        """The memory as it stood at stream time `t`: the newest kept snapshot no later than `t` (the latest snapshot
        when `t` is at or after it). Raises LookupError when no kept snapshot is that old."""
        return self.lane.snapshot_at(t)

    def ask_stream(
        self, question: str, max_new_tokens: int | None = None, as_of: float | None = None, temperature: float = 0.0
    ) -> tuple[Snapshot, Iterator[str]]:
        """The snapshot the answer rests on and an iterator over the answer's text pieces; `as_of` answers from the
        memory as it stood at that stream time (see `snapshot_at`). Closing the iterator early cancels the answer."""
        snap, request = self.engine.ask(self.lane, question, as_of=as_of, max_new_tokens=max_new_tokens,
                                        temperature=temperature)
        return snap, self._timed(request)

    def _timed(self, request: Request) -> Iterator[str]:
        t0 = time.perf_counter()
        count = 0
        try:
            for piece in request:
                if count == 0:
                    self.counters.latency["first_token"].add(time.perf_counter() - t0)
                count += 1
                yield piece
        finally:
            if request.state != "done":  # the reader left early: free the answer's slot
                request.cancel()
        if count == 0:
            self.counters.latency["first_token"].add(time.perf_counter() - t0)
        self._record_answer(time.perf_counter() - t0, len(request.tokens) or count)

    def _record_answer(self, seconds: float, tokens: int) -> None:
        self.counters.latency["answer"].add(seconds)
        if tokens and seconds > 0:
            self.counters.tokens_per_s.add(tokens / seconds)

    def ask(self, question: str, max_new_tokens: int | None = None, as_of: float | None = None) -> Answer:
        """A whole answer from the latest snapshot (or as of `as_of`), with the stream times it rests on."""
        t0 = time.perf_counter()
        snap, pieces = self.ask_stream(question, max_new_tokens=max_new_tokens, as_of=as_of)
        return collect_answer(snap, question, pieces, start=t0)

    # ---------------------------------------------------------------- lifecycle and stats

    @property
    def finished(self) -> bool:
        return self.lane.done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait for the source to end and every queued frame to be ingested; False on timeout."""
        return self.lane.done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop reading and leave the engine; the last snapshot stays readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.close(self.lane)

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        c, snap = self.counters, self.lane.snapshot
        return {
            "frames_received": c.received,
            "frames_encoded": c.encoded,
            "frames_dropped": c.dropped,
            "stream_time": None if snap is None else snap.stream_time,
            "memory_tokens": 0 if snap is None else snap.memory.num_tokens,
            "memory_bytes": self.lane.processor.nbytes,
            "latency": {k: w.summary() for k, w in c.latency.items()},
            "tokens_per_s": c.tokens_per_s.summary(),
            "finished": self.finished,
            "error": None if self.error is None else str(self.error),
        }
