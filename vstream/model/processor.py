"""One stream's frames -> memory -> answers, with no threads, no clocks and no sources: the I/O-free core that offline
answers, evaluation, the stream session and the demo all drive, so that their results are equal by construction.

    processor = StreamProcessor(model)
    processor.insert([0.0, 1.0], frames=[rgb0, rgb1])       # or features=[n, grid^2, D]
    snap, pieces = processor.ask("What is on the table?")   # pieces: the answer's text, token by token

`insert` encodes the frames (when given frames) and updates the memory one frame at a time in time order. A snapshot
is the memory as it stood after a given frame: its tokens (copies: later inserts never touch them) and the stream
times they rest on as host lists, so that whoever serves a snapshot never reads the device. With `offline=True` an
`official`-mode memory is the released offline function over every frame so far (what the released evaluation
builds), recomputed when a snapshot is taken; in `paper` mode offline and streaming are the same memory.

What this module does not do: read sources, pace frames, drop frames, lock (one thread drives a processor; the
snapshots it hands out may be read from any thread).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vstream.encoder.pooling import pool_grid
from vstream.errors import UserInputError, VideoError
from vstream.memory import MemoryRead, official_offline_memory
from vstream.model.vlm import Answer


@dataclass(frozen=True)
class Snapshot:
    """The memory after `frames` frames, the newest at stream time `stream_time`, with its cited times on the host."""

    version: int
    memory: MemoryRead
    stream_time: float
    frames: int
    spatial_times: tuple[float, ...]
    retrieved_times: tuple[float, ...]
    temporal_spans: tuple[tuple[float, float, float], ...]  # (first, last, mean) stream time of each cluster's frames
    temporal_weights: tuple[float, ...]

    @classmethod
    def from_host(cls, reads: Sequence[tuple[int, MemoryRead, float, int]], host: list[float]) -> list["Snapshot"]:
        """The snapshots of `reads` from their times on the host, in the order `_times_of` lays them out."""
        parts = [_parts(m) for _, m, _, _ in reads]
        out, i = [], 0
        for (version, memory, stream_time, frames), group in zip(reads, parts):
            spa, ret, spans, weights = [], [], [], []
            for dest, p in zip((spa, ret, spans, weights), group):
                dest.extend(host[i : i + p.numel()])
                i += p.numel()
            out.append(cls(version, memory, stream_time, frames, tuple(spa), tuple(ret),
                           tuple(tuple(spans[j : j + 3]) for j in range(0, len(spans), 3)), tuple(weights)))
        return out


def _parts(m: MemoryRead) -> tuple[torch.Tensor, ...]:
    return m.spatial_times, m.retrieved_times, m.temporal_spans.flatten(), m.temporal_weights


def _times_of(reads) -> torch.Tensor | None:
    """Every time the reads cite, as one float64 tensor on their device (None for no read)."""
    flat = [p.detach().to(torch.float64).flatten() for _, m, _, _ in reads for p in _parts(m)]
    return torch.cat(flat) if flat else None


class PendingSnapshots:
    """Snapshots whose cited times are on their way to the host (a copy into pinned memory, queued behind the work
    that computes them): `ready()` says, without waiting, whether they have arrived; `finish()` waits for them and
    publishes the snapshots to their processors (latest snapshot and history)."""

    def __init__(self, reads: list[tuple["StreamProcessor", tuple]]):
        self.reads = reads
        flat = _times_of([r for _, r in reads])
        self.host, self.event = None, None
        if flat is not None and flat.is_cuda:
            self.host = torch.empty(flat.shape, dtype=torch.float64, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        elif flat is not None:
            self.host = flat

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def finish(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        host = self.host.tolist() if self.host is not None else []
        for (p, _), snap in zip(self.reads, Snapshot.from_host([r for _, r in self.reads], host)):
            p.history.add(snap)  # a no-op without history
            p._snapshot = snap


class SnapshotHistory:
    """At most `size` past snapshots, spread over the stream: when full, the interior snapshot whose removal leaves
    the smallest gap in stream time goes. The newest and the oldest are always kept. Thread-safe."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"history size must be >= 0, got {size}")
        self.size = size
        self._items: list[Snapshot] = []
        self._lock = threading.Lock()

    def add(self, snap: Snapshot) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items.append(snap)
            if len(self._items) > self.size:
                times = [s.stream_time for s in self._items]
                if len(times) <= 2:
                    self._items.pop(0)
                    return
                gaps = [times[i + 1] - times[i - 1] for i in range(1, len(times) - 1)]
                self._items.pop(1 + gaps.index(min(gaps)))

    def at(self, t: float) -> Snapshot | None:
        """The newest kept snapshot whose stream time is <= t (None when every kept one is later)."""
        with self._lock:
            older = [s for s in self._items if s.stream_time <= t]
        return older[-1] if older else None

    def earliest(self) -> float | None:
        with self._lock:
            return self._items[0].stream_time if self._items else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class StreamProcessor:
    """The memory of one stream as frames are inserted, its snapshots, and answers from them."""

    def __init__(self, model, *, offline: bool = False, history: int = 0, new_memory=None):
        """`history`: past snapshots kept for questions asked as of an earlier time (0: none; every inserted frame's
        memory is a candidate). `offline`: see the module docstring. `new_memory`: makes the streaming memory
        (default `model.new_memory`; the engine's gives memories of a shared `MemoryPage`)."""
        self.model = model
        self.new_memory = new_memory or model.new_memory
        self.offline_official = offline and model.cfg.memory.mode == "official"
        self.history = SnapshotHistory(history)
        self.reset()

    def reset(self) -> None:
        """Forget every frame: an empty memory, no snapshot, no history."""
        self.memory = None if self.offline_official else self.new_memory()
        self._pooled: list[torch.Tensor] = []  # offline official: the frames' P_spa features so far
        self._times: list[float] = []
        self._snapshot: Snapshot | None = None
        self._stale = False  # frames came after the latest snapshot's read
        self._reads: list[tuple[int, MemoryRead, float, int]] = []  # memory reads not yet made snapshots
        self._version = 0
        self.history.clear()

    @property
    def frames(self) -> int:
        return len(self._times)

    @property
    def stream_time(self) -> float | None:
        return self._times[-1] if self._times else None

    @property
    def nbytes(self) -> int:
        """Bytes of the memory's state (fixed for a streaming memory; the offline official memory keeps every frame)."""
        if self.memory is not None:
            return self.memory.nbytes
        return sum(f.numel() * f.element_size() for f in self._pooled)

    def state_dict(self) -> dict:
        """What `load_state_dict` needs to go on as if the stream had never stopped: the streaming memory's
        `state_dict()` (tensors and counters; a page's queued updates run first), the frames inserted, the last one's
        stream time and the snapshot version. The history of past snapshots is not part of it."""
        if self.memory is None:
            raise ValueError("an offline official-mode processor keeps every frame: it has no fixed-size state to save")
        return {"memory": self.memory.state_dict(), "frames": self.frames, "stream_time": self.stream_time,
                "version": self._version}

    def load_state_dict(self, state: dict) -> None:
        """Replace this processor's memory and counters with `state` (from `state_dict`); the history restarts empty
        and the next `snapshot()` is the restored memory's."""
        if self.memory is None:
            raise ValueError("an offline official-mode processor has no fixed-size state to load")
        frames, stream_time = int(state["frames"]), state["stream_time"]
        if (frames == 0) != (stream_time is None):
            raise ValueError(f"a processor state with {frames} frames must have a stream time iff frames > 0, got "
                             f"stream_time={stream_time}")
        self.memory.load_state_dict(state["memory"])
        self._times = [float(stream_time)] * frames if frames else []  # streaming mode reads their count, the last
        self._version, self._reads, self._snapshot = int(state["version"]), [], None
        self._stale = frames > 0
        self.history.clear()

    @torch.no_grad()
    def insert(self, times: Sequence[float], frames: Sequence[np.ndarray] | None = None,
               features: torch.Tensor | None = None, frames_per_call: int = 32, publish: bool = True) -> None:
        """Add frames in time order: RGB `frames` (encoded here, `frames_per_call` a call of the encoder) or their
        `features` [n, grid^2, D], one time each.
        `publish=False` leaves the latest snapshot for a later `publish_snapshots([...])`, which makes several
        streams' snapshots in one transfer from the device (and lets memories of one page update together first: the
        engine's round)."""
        times = [float(t) for t in times]
        if (frames is None) == (features is None):
            raise ValueError("insert takes frames or features, exactly one of them")
        if frames is not None:
            if len(frames) != len(times):
                raise ValueError(f"expected one time per frame: {len(frames)} frames, {len(times)} times")
            # positional: the models' encoders call it frames_per_call (FlashVStream) or batch_size (Qwen)
            features = self.model.encode(list(frames), frames_per_call) if frames else None
        elif features.dim() != 3 or features.shape[0] != len(times):
            raise ValueError(f"expected features [n={len(times)}, tokens, D] (one time per frame), "
                             f"got {tuple(features.shape)}")
        if not times:
            return
        self._check_times(times)
        m = self.model
        features = features.to(m.device, m.dtype)
        if self.offline_official:
            self._pooled.append(pool_grid(features, m.cfg.memory.spatial_size))
            self._times.extend(times)
        else:
            stamps = torch.tensor(times, dtype=torch.float64)  # one copy to the device, queued without a wait
            stamps = stamps.pin_memory() if m.device.type == "cuda" else stamps
            stamps = stamps.to(m.device, non_blocking=True)
            for i, t in enumerate(times):
                self.memory.update(features[i : i + 1], stamps[i : i + 1])
                self._times.append(t)
                if self.history.size and i < len(times) - 1:  # every frame's memory is kept for "as of" questions
                    self._reads.append(self._read())
        self._stale = True
        if publish and self.history.size:
            publish_snapshots([self])

    def _check_times(self, times: list[float]) -> None:
        previous = self._times[-1] if self._times else -math.inf
        for t in times:
            if not math.isfinite(t) or t < previous:
                raise ValueError(f"frame times must be finite and in time order: got {t} after {previous}")
            previous = t

    def _read(self) -> tuple[int, MemoryRead, float, int]:
        self._version += 1
        if self.offline_official:
            c = self.model.cfg.memory
            memory = official_offline_memory(torch.cat(self._pooled), self._times, c, self.model.attention_model)
        else:
            memory = self.memory.read()
        return self._version, memory, self._times[-1], len(self._times)

    def snapshot(self) -> Snapshot | None:
        """The memory after the last inserted frame (None before the first); taken once per insert (the previous one
        while a `publish_snapshots(wait=False)` of this processor is not finished)."""
        if self._reads or self._stale:
            publish_snapshots([self])
        return self._snapshot

    def snapshot_at(self, t: float) -> Snapshot:
        """The memory as it stood at stream time `t`: the latest snapshot when `t` is at or after it, else the newest
        kept one no later than `t`. Raises LookupError when no kept snapshot is that old."""
        return snapshot_at(self.snapshot(), self.history, t)

    def ask(self, question: str, as_of: float | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0) -> tuple[Snapshot, Iterator[str]]:
        """The snapshot an answer rests on (the latest, or as of `as_of`) and the answer's text pieces."""
        snap = pick_snapshot(self.snapshot(), self.history, question, as_of)
        return snap, self.model.stream_answer(snap.memory, question, max_new_tokens=max_new_tokens,
                                              temperature=temperature)


def publish_snapshots(processors: Iterable[StreamProcessor], wait: bool = True) -> PendingSnapshots | None:
    """Make the pending snapshots of several processors (each one's latest, and the past ones its history keeps) with
    every cited time read to the host in one transfer; each processor's `snapshot()` is then its latest. With
    `wait=False` the transfer is only queued: the caller finishes the returned `PendingSnapshots` later (until then
    each processor's `snapshot()` is its previous one)."""
    processors = list(processors)
    for p in processors:
        latest_read = p._reads and p._reads[-1][3] == len(p._times)
        if p._stale and not latest_read:
            p._reads.append(p._read())  # the first read of a page's memory runs the page's queued updates
        p._stale = False
    pending = PendingSnapshots([(p, r) for p in processors for r in p._reads])
    for p in processors:
        p._reads.clear()
    if not wait:
        return pending
    pending.finish()
    return None


def pick_snapshot(latest: Snapshot | None, history: SnapshotHistory, question: str, as_of: float | None) -> Snapshot:
    """The snapshot a question is answered from; raises ValueError (empty question), RuntimeError (no frame yet) or
    LookupError (nothing kept that old)."""
    if not isinstance(question, str) or not question.strip():
        raise UserInputError(f"the question is empty or not text: expected a non-empty string, got {question!r}")
    if latest is None:
        raise RuntimeError("no frame has been ingested yet: nothing to answer from")
    return latest if as_of is None else snapshot_at(latest, history, as_of)


def snapshot_at(latest: Snapshot | None, history: SnapshotHistory, t: float) -> Snapshot:
    if latest is not None and t >= latest.stream_time:
        return latest
    past = history.at(t)
    if past is None:
        earliest = history.earliest()
        kept = "none is kept" if earliest is None else f"the earliest kept is at {earliest} s"
        raise LookupError(f"no memory snapshot at or before {t} s: {kept}")
    return past


def collect_answer(snap: Snapshot, question: str, pieces: Iterable[str], timings: dict | None = None,
                   start: float | None = None) -> Answer:
    """The whole answer from the text `pieces` of an answer resting on `snap`, with the stream times it rests on and
    its latencies from `start` (a `time.perf_counter()`; default: now) to the first piece and to the last."""
    t0 = time.perf_counter() if start is None else start
    text, first = [], None
    for piece in pieces:
        first = first if first is not None else time.perf_counter()
        text.append(piece)
    t1 = time.perf_counter()
    return Answer(
        text="".join(text).strip(), question=question, frames=snap.frames, memory_tokens=snap.memory.num_tokens,
        spatial_times=list(snap.spatial_times), retrieved_times=list(snap.retrieved_times),
        temporal_spans=[(a, b) for a, b, _ in snap.temporal_spans],
        timings=(timings or {}) | {"first_token_s": (first or t1) - t0, "answer_s": t1 - t0},
    )


def snapshots_at(processor: StreamProcessor, source: Iterable[tuple[float, np.ndarray | torch.Tensor]],
                 at: Sequence[float | None], frames_per_call: int = 32, name: str = "the source") -> Iterator[Snapshot]:
    """Insert `(t, frame)`s of `source` `frames_per_call` at a time (one call of the encoder) and yield the snapshot
    as of each time in `at` (increasing, None = the end of the source): the memory of every frame with time <= that
    time. A frame is an RGB array, or a frame's pre-extracted features [grid^2, D] (a tensor). The host holds at most
    `frames_per_call` frames."""
    keys = [math.inf if t is None else t for t in at]
    if keys != sorted(keys):
        raise ValueError(f"snapshot times must increase (None last), got {list(at)}")
    pending, times, frames = list(keys), [], []

    def flush() -> None:
        if frames and isinstance(frames[0], torch.Tensor):
            processor.insert(times, features=torch.stack(frames))
        elif frames:
            processor.insert(times, frames=frames, frames_per_call=frames_per_call)
        times.clear()
        frames.clear()

    for t, frame in source:
        while pending and t > pending[0]:
            flush()
            yield _require(processor.snapshot(), pending[0], name)
            pending.pop(0)
        if not pending:
            return
        times.append(t)
        frames.append(frame)
        if len(frames) == frames_per_call:
            flush()
    flush()
    if processor.frames == 0:
        raise VideoError(f"{name} contains no decodable video frames")
    for t in pending:
        yield _require(processor.snapshot(), t, name)


def _require(snap: Snapshot | None, t: float, name: str) -> Snapshot:
    if snap is None:
        raise UserInputError(f"a snapshot at {t} s comes before the first frame of {name}")
    return snap
