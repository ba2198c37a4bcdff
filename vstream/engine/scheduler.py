# size: the engine thread and the state only it touches (lanes, queues, rounds, answers), kept in one module
"""One owner of the device: every stream's frames, memory updates and answers run on one engine thread.

    engine = Engine(model, EngineConfig())
    lane = engine.open(history=32)             # one per stream; feeders call lane.put(t, crop) from any thread
    snap, request = engine.ask(lane, "What is on the table?")
    for piece in request: ...                  # the answer's text, token by token, from any thread

Each iteration of the engine thread does up to two things:

1. **A round of frames**, when frames wait and (no answer is running, or `round_every_s` and twice the last round's
   duration (its device time on CUDA) have passed since the last round began, so answers get at least half of a
   loaded engine): up to `frames_per_round` frames from all streams, at most `lane.frames_per_round` from each, taken
   round-robin so that no stream waits behind the others. They go through the tower in one batch (captured CUDA
   graphs on CUDA); the memories take their frames (steady updates of the memories of one `MemoryPage` as one
   batched update, replayed from a captured graph); each stream publishes its new snapshot (one reference swap;
   snapshots carry their times on the host, copied there in one transfer that the next iteration collects, so a
   round never waits for the device).
2. **One answer iteration** (`BatchAnswerer.run_once`: admit, a chunk of prefill, one batched decode step for every
   running answer), when answers are pending. LLaMA and Qwen2-VL / Qwen2.5-VL models answer batched (a Qwen
   question's prompt at its AM-RoPE positions, or its snapshot's cached memory prefix and the question); another LLM,
   or an answer longer than a slot holds, goes one answer at a time through the model's own `stream_answer`.

So under load, frames and answers take turns: a round runs at most every `round_every_s` while answers decode, and an
answer advances by one token between rounds. Neither starves: questions beyond the answer slots wait (FIFO) and
beyond `max_waiting` are refused; a live stream's queue drops its oldest frame when full (counted), a file's queue
makes its reader wait.

An exception in one stream's work (its frames, its memory) ends that stream with the error; the others go on. An
answer that fails ends with its error. Other threads reach what the engine thread owns (a lane's memory, to save or
restore it: `Lane.state_dict`) through `Engine.call`, which runs a function between two iterations. What this module
does not do: read sources, decode images, or pace anything (feeders do: `vstream.engine.session`).
"""

from __future__ import annotations

import collections
import contextlib
import math
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from vstream import profiling
from vstream.devices import GraphPool
from vstream.model.processor import Snapshot, StreamProcessor, pick_snapshot, publish_snapshots, snapshot_at
from vstream.memory.paged import MemoryPage
from vstream.model.batch_answer import BatchAnswerer, Request, TooLong
from vstream.model.text_decoder import batchable
from vstream.stats import RecentValues, percentile

log = logging.getLogger("vstream.engine")
_END = object()


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the engine; the defaults suit one GPU (on the CPU `answer_slots` is capped at 4 and
    `prefill_chunk` at 256)."""

    frames_per_round: int = 64
    """Most frames encoded in one round, all streams together (the tower's batch)."""
    round_every_s: float = 0.05
    """While answers are decoding, a round of frames starts at most this often."""
    answer_slots: int = 32
    """Answers decoded together in one batched step (a KV-cache slot each); on CUDA fewer when their KV cache would
    take more than `kv_fraction` of the device memory free when the engine is made (`kv_slots`)."""
    kv_fraction: float = 0.5
    """The most of the free device memory the answer slots' KV cache may take (a Qwen 7B slot holds a full memory:
    about 690 MB at 12,032 positions)."""
    max_waiting: int = 256
    """Questions waiting for a slot; `ask` refuses one more."""
    prefill_chunk: int = 1024
    """Most prompt positions prefilled per iteration, so a long prompt never holds the decoding back for long (the
    7B preset's prompts, about 745 positions, take one). On the CPU at most 256: there a 700-position prefill of
    SmolLM2 takes about a second, which would hold the rounds of frames back long enough to drop live frames."""
    cuda_graphs: bool | None = None
    """Capture the tower, the memory updates and the decode step in CUDA graphs (None: on CUDA)."""
    tower_graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Frame counts the tower is captured at (a CUDA graph each); a round's frames are cut into them, largest
    first."""
    seed: int = 0
    """Seed of the sampled answers' noise."""
    memory_page: int | None = None
    """Paper-mode memories of this many streams share a `MemoryPage`, so that a round updates all of a page's steady
    memories that have a frame in one batched update (one graph replay on CUDA) instead of one update per stream; 0:
    each memory alone; None: 64 on CUDA, 0 on the CPU. On an H100 (2026-12-08, 7B shapes) a round of 256 streams took
    16.3 ms of device time in pages of 64 against 85.1 ms alone (`vstream bench pages`, BENCHMARKS.md)."""

    def __post_init__(self):
        if self.memory_page is not None and self.memory_page < 0:
            raise ValueError(f"EngineConfig.memory_page must be >= 0, got {self.memory_page}")
        for name in ("frames_per_round", "answer_slots", "max_waiting", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.kv_fraction <= 1:
            raise ValueError(f"EngineConfig.kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if not self.round_every_s >= 0:
            raise ValueError(f"EngineConfig.round_every_s must be >= 0, got {self.round_every_s}")


class LatencyWindow(RecentValues):
    """The most recent `size` durations of one stage (no time limit), summarised as p50/p95 (nearest rank) and max in
    milliseconds."""

    def __init__(self, size: int = 1024):
        super().__init__(window_s=math.inf, size=size)

    def summary(self) -> dict[str, float | int]:
        values = self.values()
        if not values:
            return {"count": 0}
        return {"count": len(values), "p50_ms": percentile(values, 0.5) * 1000,
                "p95_ms": percentile(values, 0.95) * 1000, "max_ms": values[-1] * 1000}


@dataclass
class Counters:
    received: int = 0
    encoded: int = 0
    dropped: int = 0
    latency: dict[str, LatencyWindow] = field(
        default_factory=lambda: {k: LatencyWindow() for k in ("encode", "memory_update", "first_token", "answer")}
    )
    tokens_per_s: LatencyWindow = field(default_factory=LatencyWindow)


class FrameQueue:
    """A bounded FIFO; `put(drop_oldest=True)` never blocks and returns how many frames it pushed out."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

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


class Lane:
    """One stream inside the engine: its queue of (time, uint8 crop) frames, its processor (engine thread only), its
    published snapshot and counters. Feeders call `put` and `end`; everything else is the engine's."""

    def __init__(self, engine: "Engine", history: int, queue_size: int, frames_per_round: int, live: bool):
        self.engine = engine
        self.processor = StreamProcessor(engine.model, history=history, new_memory=engine.new_memory)
        memory = self.processor.memory
        if engine.graphs and hasattr(memory, "enable_cuda_graph"):  # its own graphs: updates a page does not batch
            memory.enable_cuda_graph(engine.graph_pool())
        self.queue = FrameQueue(queue_size)
        self.frames_per_round, self.live = frames_per_round, live  # this stream's share of a round
        self.counters = Counters()
        self.inserted = 0  # frames in the memory that no published snapshot holds yet (then counted as encoded)
        self.error: BaseException | None = None
        self.snapshot: Snapshot | None = None
        self.done = threading.Event()  # the stream ended and every queued frame was ingested (or it failed)

    @property
    def history(self):
        return self.processor.history

    def put(self, t: float, crop: np.ndarray, timeout: float | None = None) -> None:
        """Queue a frame (a uint8 crop from `model.crop`): a live lane drops its oldest when full, another waits up to
        `timeout` s (TimeoutError). Any thread."""
        dropped = self.queue.put((t, crop), drop_oldest=self.live, timeout=timeout)
        self.counters.received += 1  # once queued: a put that timed out and is tried again counts once
        self.counters.dropped += dropped
        self.engine.wake()

    def end(self, error: BaseException | None = None) -> None:
        """No more frames: the lane is done once the queued ones are ingested. Any thread."""
        if error is not None and self.error is None:
            self.error = error
        self.queue.put(_END, drop_oldest=True)
        self.engine.wake()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()

    def snapshot_at(self, t: float) -> Snapshot:
        return snapshot_at(self.snapshot, self.processor.history, t)

    def state_dict(self, timeout: float | None = 60.0) -> dict:
        """Its processor's state (`StreamProcessor.state_dict`: memory tensors, counters, frames and times), taken on
        the engine thread between two iterations, so never half-way through an update. Any thread but the engine's."""
        return self.engine.call(self.processor.state_dict).result(timeout)

    def load_state_dict(self, state: dict, timeout: float | None = 60.0) -> None:
        """Restore its processor from `state_dict()`'s result on the engine thread and publish the restored memory's
        snapshot, so that questions are answered from it before any new frame. Any thread but the engine's."""
        def load() -> None:
            self.processor.load_state_dict(state)
            self.snapshot = self.processor.snapshot()

        self.engine.call(load).result(timeout)


class EagerAnswerer:
    """The fallback for an LLM that `BatchAnswerer` cannot batch, or an answer longer than its slots hold: one answer
    at a time through `model.stream_answer`, one text piece per iteration, in the order they came. Given the memory
    read a question rests on (`memory`), the model gets that read (a model whose answers need more than the tokens,
    such as the Qwen models' AM-RoPE times); else a stand-in holding its tokens."""

    def __init__(self, model, max_waiting: int):
        self.model, self.max_waiting = model, max_waiting
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Request, object]] = collections.deque()
        self._current: tuple[Request, Iterator[str]] | None = None

    @property
    def pending(self) -> int:
        return len(self._queue) + (self._current is not None)

    def submit(self, memory_tokens, question, max_new_tokens=None, temperature=0.0, memory=None) -> Request:
        n_new = self.model.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        request = Request(memory_tokens, question, n_new, temperature, 0)
        with self._lock:
            if len(self._queue) >= self.max_waiting:
                raise RuntimeError(f"the queue is full: {len(self._queue)} of {self.max_waiting} requests waiting")
            self._queue.append((request, memory))
        return request

    def run_once(self) -> int:
        if self._current is None:
            with self._lock:
                request, memory = self._queue.popleft() if self._queue else (None, None)
            if request is None:
                return 0
            memory = memory if memory is not None else _MemoryTokens(request.memory_tokens)
            pieces = self.model.stream_answer(memory, request.question,
                                              max_new_tokens=request.max_new_tokens, temperature=request.temperature)
            self._current = (request, pieces)
        request, pieces = self._current
        try:
            if request.cancelled:
                raise StopIteration("cancelled")
            request._pieces.put(next(pieces))
        except StopIteration as stop:
            self._end(request, pieces, "cancelled" if stop.args == ("cancelled",) else "stop")
        except Exception as error:  # this answer failed; the engine goes on  # noqa: BLE001
            request.error = error
            self._end(request, pieces, "error")
        return self.pending

    def _end(self, request: Request, pieces, reason: str) -> None:
        pieces.close()
        self._current = None
        BatchAnswerer._close(request, reason)


class Engine:
    """The engine thread and the streams it serves; see the module docstring. Starts its thread on first use and
    stops it after `idle_stop_s` with no stream and no answer (it starts again when needed)."""

    idle_stop_s = 2.0

    def __init__(self, model, config: EngineConfig | None = None, thread: bool = True):
        """`thread=False`: no engine thread ever starts; the caller drives `step` (tests)."""
        self.model, self.config = model, config or EngineConfig()
        profiling.start_from_env()  # VSTREAM_STACKS=FILE: sample every thread's stack (diagnosing a loaded server)
        self.threaded = thread
        c = self.config
        cuda = model.device.type == "cuda"
        self.graphs = cuda if c.cuda_graphs is None else c.cuda_graphs
        t0 = time.perf_counter()
        self.tower_graphs = (model.vision.capture(c.tower_graph_sizes) if self.graphs and model.vision is not None
                             else None)
        self.batched = batchable(model.llm)
        self.memory_page = c.memory_page if c.memory_page is not None else 64 if cuda else 0
        slots = c.answer_slots if cuda else min(c.answer_slots, 4)  # the CPU is compute-bound: more slots gain little
        if cuda and self.batched:
            per_slot = slot_kv_bytes(model)
            slots = kv_slots(slots, per_slot, torch.cuda.mem_get_info(model.device)[0], c.kv_fraction)
            if slots < c.answer_slots:
                log.warning("%d answer slots instead of %d: each holds %.0f MB of KV cache, and at most %.0f %% of the "
                            "free device memory goes to them (EngineConfig.kv_fraction)", slots, c.answer_slots,
                            per_slot / 1e6, 100 * c.kv_fraction)
        chunk = c.prefill_chunk if cuda else min(c.prefill_chunk, 256)
        self.answers = (BatchAnswerer(model, max_batch=slots, prefill_chunk=chunk, max_waiting=c.max_waiting,
                                      seed=c.seed, cuda_graph=self.graphs) if self.batched else None)
        self.eager = EagerAnswerer(model, c.max_waiting)
        self.unit_batcher = model.unit_batcher() if hasattr(model, "unit_batcher") else None
        self._prepare = getattr(model, "prepare_answers", None)  # the Qwen models' memory prefixes (off by default)
        self.warmup_s = time.perf_counter() - t0
        self.lanes: list[Lane] = []
        self.pages: list[MemoryPage] = []
        # one memory pool for every memory's and page's update graphs (`graph_pool`), made here, on the thread that
        # makes the engine, before the engine thread runs: its anchor's capture then meets no other thread's work
        self._graph_pool = GraphPool(model.device) if self.graphs and model.device.type == "cuda" else None
        self._pending = None  # (PendingSnapshots, lanes, device-time events) of the last round, not yet published
        self._staging: torch.Tensor | None = None  # pinned host buffer of a round's crops (CUDA)
        self._staged = None  # event: the copy from it has been queued up to here
        self.rounds = 0
        self.seconds = {"frames": 0.0, "answers": 0.0}  # the engine thread's wall time in each kind of work
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._next = 0  # the lane a round starts from (round-robin)
        self._last_round = 0.0  # monotonic start of the last round
        self._round_s = 0.0  # how long the last round took: answers get at least as long before the next one
        self._calls: list[tuple[Callable, Future]] = []  # functions `call` queued for the engine thread

    # ---------------------------------------------------------------- any thread

    def open(self, history: int = 0, queue_size: int = 8, frames_per_round: int = 8, live: bool = True) -> Lane:
        """A new stream's lane: `history` past snapshots kept for "as of" questions, `queue_size` frames waiting,
        at most `frames_per_round` of its frames per round, `live` (drop oldest) or not (the feeder waits)."""
        if frames_per_round < 1:
            raise ValueError(f"a lane's frames_per_round must be >= 1, got {frames_per_round}")
        lane = Lane(self, history, queue_size, frames_per_round, live)
        with self._lock:
            self.lanes.append(lane)
        self._ensure_thread()
        return lane

    def close(self, lane: Lane) -> None:
        """Stop serving `lane` (closed, ended or failed): its queued frames are dropped, its snapshot stays
        readable, its memory's page row is freed."""
        with self._lock:
            if lane in self.lanes:
                self.lanes.remove(lane)
            memory = lane.processor.memory
            if memory.page is not None:
                memory.page.release(memory)
        lane.done.set()

    def graph_pool(self):
        """The one CUDA memory pool of every memory's and page's captured update: the engine thread runs them one after
        another and each writes its results in place, so they can share it. It outlives the graphs of closed
        streams' memories (`GraphPool`). None on the CPU or with CUDA graphs off."""
        return None if self._graph_pool is None else self._graph_pool.handle

    def new_memory(self):
        """A lane's streaming memory: a row of a memory page (a new page when all are full) when pages are on and
        the memory is paper-mode, else the model's own (a Qwen model's sharing the engine's `UnitBatcher`, so that a
        round's units of all streams go through the tower in one call)."""
        model, size = self.model, self.memory_page
        if not (size and model.cfg.memory.mode == "paper"):
            memory = model.new_memory()
            if self.unit_batcher is not None:  # a Qwen stream: its units go through the tower with the others'
                memory.batcher = self.unit_batcher
            return memory
        with self._lock:
            page = next((p for p in self.pages if p.free), None)
            if page is None:
                c = model.cfg
                cuda = model.device.type == "cuda"
                page = MemoryPage(c.memory, c.vision.hidden_size, model.attention_model, c.vision.grid, size,
                                  model.device, model.dtype, graph=cuda, graph_pool=self.graph_pool() if cuda else None)
                self.pages.append(page)
            return page.new_memory()

    def ask(self, lane: Lane, question: str, as_of: float | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0) -> tuple[Snapshot, Request]:
        """The snapshot the answer rests on (the latest, or as of `as_of`) and the queued answer; raises ValueError
        (bad question), RuntimeError (no frame yet, or the queue is full), LookupError (nothing kept that old)."""
        snap = pick_snapshot(lane.snapshot, lane.history, question, as_of)
        return snap, self.submit(snap.memory.tokens, question, max_new_tokens, temperature, memory=snap.memory)

    def submit(self, memory_tokens: torch.Tensor, question: str, max_new_tokens: int | None = None,
               temperature: float = 0.0, memory=None) -> Request:
        """Queue a question on memory tokens [N, D] (batched when the LLM allows and the answer fits a slot);
        `memory`: the read they come from (a Qwen model's prompt needs its AM-RoPE times; see `EagerAnswerer`)."""
        request = None
        if self.answers is not None:
            with contextlib.suppress(TooLong):  # the eager path below
                request = self.answers.submit(memory_tokens, question, max_new_tokens, temperature, memory=memory)
        if request is None:
            request = self.eager.submit(memory_tokens, question, max_new_tokens, temperature, memory=memory)
        self._ensure_thread()
        self.wake()
        return request

    def wake(self) -> None:
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the engine thread between two iterations (never inside a round or an answer step) -> a Future
        of its result. The way for another thread to read or write what the engine thread owns (a lane's memory).
        Called on the engine thread itself, `fn` runs at once. With `thread=False`, it runs at the next `step`."""
        future: Future = Future()
        if self._thread is not None and threading.current_thread() is self._thread:
            self._run_call(fn, future)
            return future
        with self._lock:
            self._calls.append((fn, future))
        self._ensure_thread()
        self.wake()
        return future

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (queued answers are not served)."""
        self._stop = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending_answers(self) -> int:
        return (self.answers.pending if self.answers is not None else 0) + self.eager.pending

    def stats(self) -> dict:
        return {"streams": len(self.lanes), "rounds": self.rounds, "answers_pending": self.pending_answers,
                "answer_slots": self.answers.decoder.max_batch if self.answers is not None else 1,
                "cuda_graphs": self.graphs, "warmup_s": self.warmup_s,
                "busy_s": dict(self.seconds), "memory_pages": len(self.pages),
                "memory_page_updates": sum(p.updates for p in self.pages)} | (
                    {} if self.unit_batcher is None else
                    {"tower_calls": self.unit_batcher.calls, "tower_units": self.unit_batcher.units})

    def _ensure_thread(self) -> None:
        if not self.threaded:
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="vstream-engine", daemon=True)
                self._thread.start()

    # ---------------------------------------------------------------- the engine thread

    def step(self) -> bool:
        """One iteration of the engine thread (a round of frames when due, one answer iteration when answers are
        pending) -> whether it did any work. The thread calls it in a loop; a test may drive an engine made with
        `thread=False` by calling it."""
        called = self._run_calls()
        worked = self._finish_publish(block=False)
        answering = self.pending_answers > 0
        since = time.monotonic() - self._last_round
        if not answering or since >= max(self.config.round_every_s, 2 * self._round_s):
            t0 = time.perf_counter()
            worked = self._round() or worked
            self.seconds["frames"] += time.perf_counter() - t0
        if answering:
            t0 = time.perf_counter()
            if self.answers is not None and self.answers.pending:
                try:
                    self.answers.run_once()
                except Exception as error:  # not one request's inputs (those end alone): end them all, go on
                    log.exception("an answer iteration failed; its %d answers end with the error", self.answers.pending)
                    self.answers.fail_all(error)
            if self.eager.pending:
                self.eager.run_once()
            self.seconds["answers"] += time.perf_counter() - t0
            worked = True
        if not worked and self._pending is not None:  # nothing else to do: wait for the last round's snapshots
            worked = self._finish_publish(block=True)
        return worked or called

    def _run_calls(self) -> bool:
        """Run the functions queued by `call` -> whether there were some."""
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            self._run_call(fn, future)
        return bool(calls)

    @staticmethod
    def _run_call(fn: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as error:  # the caller's function failed: its Future carries the error  # noqa: BLE001
            future.set_exception(error)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while not self._stop:
            try:
                worked = self.step()
            except Exception as error:  # a bug outside any one stream's or answer's work: logged, the loop goes on
                self.error, worked = error, False
                log.exception("the engine's iteration failed")
            if worked:
                idle_since = time.monotonic()
                continue
            with self._lock:
                if (not self.lanes and time.monotonic() - idle_since > self.idle_stop_s and not self.pending_answers
                        and not self._calls):
                    self._thread = None
                    return
            self._wake.wait(0.02)
            self._wake.clear()

    def _take(self) -> list[tuple[Lane, list]]:
        """Frames for one round, round-robin over the lanes from `_next` -> [(lane, [(t, crop) or _END, ...])]."""
        with self._lock:
            lanes = list(self.lanes)
        if not lanes:
            return []
        start, budget, work = self._next % len(lanes), self.config.frames_per_round, []
        for k in range(len(lanes)):
            lane = lanes[(start + k) % len(lanes)]
            if budget <= 0:
                break
            if not len(lane.queue) or lane.done.is_set():
                continue
            items = lane.queue.get_batch(min(lane.frames_per_round, budget), timeout=0)
            budget -= sum(item is not _END for item in items)
            work.append((lane, items))
        self._next = start + 1
        return work

    @torch.inference_mode()
    def _round(self) -> bool:
        work = self._take()
        if not work:
            return False
        self._last_round = time.monotonic()
        frames = [(lane, [it for it in items if it is not _END]) for lane, items in work]
        frames = [(lane, items) for lane, items in frames if items]
        if frames:
            t0 = time.perf_counter()
            span = self._events() if self.model.device.type == "cuda" else None
            features = self._encode(frames)
            t1 = time.perf_counter()
            for (lane, items), feats in zip(frames, features):
                if feats is not None:
                    self._insert(lane, items, feats)
            self._publish([lane for lane, _ in frames], span)
            t2 = time.perf_counter()
            if span is None:  # on CUDA the round's device time, once known (`_finish_publish`)
                self._round_s = t2 - t0
            n = sum(len(items) for _, items in frames)
            for lane, items in frames:
                lane.counters.latency["encode"].add((t1 - t0) / n)
                lane.counters.latency["memory_update"].add((t2 - t1) / n)
            self.rounds += 1
        ending = [lane for lane, items in work if any(it is _END for it in items) or lane.done.is_set()]
        if ending:
            self._finish_publish(block=True)  # an ended lane's last snapshot is published before it is done
        for lane in ending:
            self.close(lane)
        return True

    def _encode(self, frames: list[tuple[Lane, list]]) -> list[torch.Tensor | None]:
        """Every lane's frames through the tower in one batch -> features per lane; when the batch fails, each lane
        alone, so that only the lane whose frames fail ends with the error."""
        crops = [crop for _, items in frames for _, crop in items]
        try:
            features = self._features(crops)
        except Exception:  # the round's batch failed: encode lane by lane to find the failing stream  # noqa: BLE001
            out = []
            for lane, items in frames:
                try:
                    out.append(self._features([crop for _, crop in items]))
                except Exception as error:  # this stream's frames failed: it ends, the others go on  # noqa: BLE001
                    lane.fail(error)
                    out.append(None)
            return out
        out, i = [], 0
        for _, items in frames:
            out.append(features[i : i + len(items)])
            i += len(items)
        return out

    def _features(self, crops: list[np.ndarray]) -> torch.Tensor:
        cuda = self.model.device.type == "cuda"
        host = self._stage(crops) if cuda else torch.from_numpy(np.stack(crops))  # [n, S, S, 3] uint8
        features = self.model.encode_crops(host, self.config.frames_per_round, graphs=self.tower_graphs)
        if cuda:
            self._staged.record()  # the copy from `host` is queued: the next round waits for it before writing there
        return features

    def _stage(self, crops: list[np.ndarray]) -> torch.Tensor:
        """The crops [n, S, S, 3] in pinned host memory allocated once (pinning a new buffer every round costs
        milliseconds of the engine thread), written after the previous round's copy from it has finished."""
        n, shape = len(crops), crops[0].shape
        if self._staging is None or self._staging.shape[0] < n or self._staging.shape[1:] != shape:
            self._staging = torch.empty((max(n, self.config.frames_per_round), *shape), dtype=torch.uint8,
                                        pin_memory=True)
            self._staged = torch.cuda.Event()
            self._staged.record()
        self._staged.synchronize()  # the previous round's copy (done long before, in all but an overloaded engine)
        host = self._staging[:n]
        np.stack(crops, out=host.numpy())
        return host

    def _insert(self, lane: Lane, items: list, features: torch.Tensor) -> None:
        try:
            lane.processor.insert([t for t, _ in items], features=features, publish=False)
            lane.inserted += len(items)
        except Exception as error:  # this stream's frames or memory failed: it ends, the others go on  # noqa: BLE001
            lane.fail(error)

    @staticmethod
    def _events() -> tuple:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def _publish(self, lanes: list[Lane], span: tuple | None = None) -> None:
        """Every lane's new snapshot, with all their times read in one transfer that is only queued here: the next
        iteration publishes them once they have arrived (`_finish_publish`), so a round never waits for the device.
        When making them fails, lane by lane, so that only the failing lane ends."""
        self._finish_publish(block=True)
        lanes = [lane for lane in lanes if not (lane.done.is_set() and lane.error is not None)]
        try:
            self._pending = (publish_snapshots([lane.processor for lane in lanes], wait=False), lanes, span)
            if span is not None:
                span[1].record()  # the round's device work ends here (its times' copy to the host queued)
            else:  # on the CPU the times are there already
                self._finish_publish(block=True)
        except Exception:  # the batched publish failed: publish lane by lane to find the failing stream  # noqa: BLE001
            for lane in lanes:
                try:
                    publish_snapshots([lane.processor])
                except Exception as error:  # this stream's memory failed: it ends, the others go on  # noqa: BLE001
                    lane.fail(error)
            self._swap(lanes)

    def _finish_publish(self, block: bool) -> bool:
        """Publish the snapshots of the last round once their times are on the host (`block`: wait for them) ->
        whether there were some."""
        if self._pending is None or not (block or self._pending[0].ready()):
            return False
        pending, lanes, span = self._pending
        self._pending = None
        pending.finish()
        if span is not None:
            span[1].synchronize()  # recorded right after the copy `finish` waited for
            self._round_s = span[0].elapsed_time(span[1]) / 1000  # the round's device time: answers get twice it
        self._swap(lanes)
        self._prepare_answers(lanes)
        return True

    def _prepare_answers(self, lanes: list[Lane]) -> None:
        """Let the model prepare answers from the lanes' new snapshots (a Qwen model's memory prefixes) now, off the
        path of the questions that come later; a failure there costs only the speed-up (logged)."""
        if self._prepare is None:
            return
        try:
            self._prepare([lane.snapshot.memory for lane in lanes if lane.snapshot is not None])
        except Exception:  # the answers prefill in full instead  # noqa: BLE001
            log.exception("preparing answers from the new snapshots failed; answers prefill their whole prompt")

    @staticmethod
    def _swap(lanes: list[Lane]) -> None:
        for lane in lanes:
            if not lane.done.is_set() or lane.error is None:
                lane.snapshot = lane.processor.snapshot()  # one reference swap publishes it
                lane.counters.encoded += lane.inserted  # counted once a published snapshot holds them
                lane.inserted = 0


def slot_kv_bytes(model) -> int:
    """Bytes of one answer slot's KV cache for `model` (keys and values of every layer at a slot's positions)."""
    from vstream.model.batch_answer import slot_prompts
    from vstream.model.text_decoder import TextDecoder

    cfg = TextDecoder.of(model.llm).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * slot_prompts(model).max_seq_len() * \
        model.dtype.itemsize


def kv_slots(wanted: int, per_slot: int, free: int, fraction: float) -> int:
    """How many answer slots of `per_slot` bytes fit in `fraction` of `free` bytes: `wanted` at most, 1 at least (a
    device that cannot hold one slot fails when the cache is made, saying how much it asked for)."""
    return max(1, min(wanted, int(fraction * free) // max(per_slot, 1)))


class _MemoryTokens:
    """Memory tokens as the eager path reads them (`model.stream_answer` takes a memory read; it uses `.tokens`)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens


def engine_of(model, config: EngineConfig | None = None) -> Engine:
    """The model's shared engine (made on first use, with `config` or the defaults): one owner of its device. Kept on
    the model, so that it goes with it."""
    with _engines_lock:
        engine = model.__dict__.get("_vstream_engine")
        if engine is None:
            engine = Engine(model, config)
            model.__dict__["_vstream_engine"] = engine
        return engine


_engines_lock = threading.Lock()
