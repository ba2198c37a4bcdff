"""Many live streams served by one model on one device: a single worker thread owns the device.

Frames from every stream are encoded together (one batched tower call per round), then each stream's memory takes its
frames. Questions and rounds alternate: a waiting question is answered, to its last token, then one round of the
frames that arrived meanwhile runs, then the next question. Below saturation a question waits at most for one round
and the answer in flight; above it, questions queue but the memories stay current (answering every waiting question
first would starve ingestion). Frames arrive as pinned host uint8 [S, S, 3] already at the tower's
input size and are normalised on the device.

What this module does not do: read sources, resize frames, or batch the decoding of several answers.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Question:
    stream: int
    text: str
    asked: float  # perf_counter seconds
    first_token: float | None = None
    done: float | None = None
    answer: str = ""


@dataclass
class WorkerStats:
    frames: int = 0
    rounds: int = 0
    ingest_lag_s: list[float] = field(default_factory=list)  # frame arrival -> memory updated
    round_done: list[float] = field(default_factory=list)  # perf_counter when each round's memories were updated
    answered: list[Question] = field(default_factory=list)


class MultiStreamWorker:
    """One thread that ingests frames of `num_streams` streams and answers their questions with `model`."""

    def __init__(self, model, num_streams: int, max_batch: int = 64, max_new_tokens: int = 32):
        self.model = model
        self.memories = [model.new_memory() for _ in range(num_streams)]
        if model.device.type == "cuda":
            for memory in self.memories:
                if hasattr(memory, "enable_cuda_graph"):
                    memory.enable_cuda_graph()
        v = model.cfg.vision
        self.mean = torch.tensor(v.image_mean, device=model.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(v.image_std, device=model.device).view(1, 3, 1, 1) * 255
        self.max_batch = max_batch
        self.max_new_tokens = max_new_tokens
        self.frames: queue.SimpleQueue = queue.SimpleQueue()  # (stream, t, pinned uint8 frame, arrival)
        self.questions: queue.SimpleQueue = queue.SimpleQueue()
        self.stats = WorkerStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vstream-multistream", daemon=True)

    def start(self) -> "MultiStreamWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError("the stream worker failed") from self.error

    def push_frame(self, stream: int, t: float, frame: torch.Tensor) -> None:
        self.frames.put((stream, t, frame, time.perf_counter()))

    def ask(self, stream: int, text: str) -> Question:
        q = Question(stream, text, time.perf_counter())
        self.questions.put(q)
        return q

    @torch.inference_mode()
    def ingest(self, items: list) -> None:
        """Encode the frames of several streams in one batch and update each stream's memory."""
        m = self.model
        pixels = torch.stack([frame for _, _, frame, _ in items]).to(m.device, non_blocking=True)  # [n, S, S, 3]
        pixels = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        features = m.vision.encode(pixels.to(m.dtype), batch_size=self.max_batch)  # [n, grid^2, D]
        times = torch.tensor([t for _, t, _, _ in items], dtype=torch.float64)
        times = times.pin_memory().to(m.device, non_blocking=True) if m.device.type == "cuda" else times
        for i, (stream, _, _, _) in enumerate(items):
            self.memories[stream].update(features[i : i + 1], times[i : i + 1])

    def answer(self, q: Question) -> None:
        pieces = []
        for piece in self.model.stream_answer(self.memories[q.stream].read(), q.text, max_new_tokens=self.max_new_tokens):
            if q.first_token is None:
                q.first_token = time.perf_counter()
            pieces.append(piece)
        q.done = time.perf_counter()
        q.first_token = q.first_token or q.done
        q.answer = "".join(pieces)
        self.stats.answered.append(q)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.answer(self.questions.get_nowait())  # one question, then one round of frames
                    answered = True
                except queue.Empty:
                    answered = False
                items = []
                while len(items) < self.max_batch:
                    try:  # wait briefly only when idle
                        items.append(self.frames.get(timeout=0.001 if not items and not answered else 0))
                    except queue.Empty:
                        break
                if items:
                    self.ingest(items)
                    if self.model.device.type == "cuda":
                        torch.cuda.current_stream(self.model.device).synchronize()  # the lag counts finished work
                    now = time.perf_counter()
                    self.stats.ingest_lag_s.extend(now - arrival for _, _, _, arrival in items)
                    self.stats.round_done.append(now)
                    self.stats.frames += len(items)
                    self.stats.rounds += 1
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
