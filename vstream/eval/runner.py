"""Predictions for a benchmark, in one of two modes, written to a resumable JSON-lines file.

- `offline`: each question is answered from the memory of its video up to the question's time (the whole video when it
  has none), built the way an offline answer builds it (`FlashVStream.memory_snapshots`, or a `StreamProcessor` over feature
  files); one decoding pass per video serves all its questions.
- `streaming`: one pass per video through `StreamSession`, each question asked when the stream reaches its time. By
  default time is simulated: the source is held back at each question's time until it is answered, so the answer rests
  on exactly the frames up to that time. With `speed`, the file is replayed live at `speed` x real time and each
  question is asked at its wall-clock moment from whatever the engine has ingested by then (lag and drops recorded).
  From feature files, the streaming memory is updated frame by frame in simulated time.

Each prediction records the latency its answer took. Predictions are keyed by question id: a resumed run computes only
the missing ones, and seeds every video's random draws from its name, so a resumed run gives the same predictions.
This module does not judge (see `vstream.eval.judges`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from vstream.errors import DataError, UserInputError
from vstream.eval.datasets import Benchmark, Question
from vstream.eval.jsonl import read_jsonl_by_id, trim_partial_line

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"
_EPS = 1e-6


@dataclass(frozen=True)
class RunConfig:
    """What a run's predictions depend on; a resumed run must match it."""

    benchmark: str
    mode: str
    """`offline` or `streaming`."""
    model: str
    memory_mode: str | None = None
    """None: the model's own mode."""
    max_new_tokens: int | None = None
    batch_size: int = 8
    """Frames per encoder call."""
    speed: float | None = None
    """Streaming only: replay live at this multiple of real time (None: simulated time)."""
    source: str = "video"
    """`video` or `features`."""
    originals: bool = False
    """RVS questions asked on the original long videos (see `load_benchmark`)."""
    device: str = "auto"
    vision_tower: str | None = None
    """A local CLIP folder for a released checkpoint whose config names a hub id."""
    timeout: float = 600.0
    """Seconds any single wait on the engine may take."""

    def key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "vision_tower", "timeout")}


# ---------------------------------------------------------------- resumable files


def check_run_file(out_dir: Path, cfg: RunConfig) -> None:
    """Write `run.json`, or check that the existing one describes the same run (resuming a different run is an error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != cfg.key():
            diff = {k: (old.get(k), v) for k, v in cfg.key().items() if old.get(k) != v}
            raise UserInputError(f"{out_dir} holds predictions of another run (field: (theirs, this run's)) {diff}: "
                                 "use another --out folder")
    else:
        path.write_text(json.dumps(cfg.key(), indent=2))


# ---------------------------------------------------------------- driver


def run_predictions(
    bench: Benchmark, cfg: RunConfig, out_dir: str | Path, *, workers: int = 1, model=None,
    show_progress: bool = False,
) -> list[dict]:
    """Predict every question of `bench` not already in `out_dir/predictions.jsonl`; return all records in data order.

    `model`: an already loaded model (else `cfg.model` is loaded). `workers` > 1 runs videos in that many processes,
    each with its own model."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    check_run_file(out_dir, cfg)
    path = out_dir / PREDICTIONS
    done = read_jsonl_by_id(path)
    trim_partial_line(path)
    todo = _by_video([q for q in bench.questions if q.id not in done])
    bar = tqdm(total=len(bench.questions), initial=len(bench.questions) - sum(map(len, todo.values())),
               desc=f"{bench.name} {cfg.mode}", unit="q", disable=not show_progress)
    with path.open("a", encoding="utf-8") as sink:
        def write(records: list[dict]) -> None:
            for rec in records:
                sink.write(json.dumps(rec) + "\n")
                done[rec["id"]] = rec
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(records))

        if todo and (workers <= 1 or len(todo) == 1):  # (nothing to do: no model is loaded)
            model = model if model is not None else _load(cfg)
            for video, questions in todo.items():
                write(predict_video(model, bench, video, questions, cfg))
        elif todo:
            _run_pool(bench, cfg, todo, workers, write)
    bar.close()
    return [done[q.id] for q in bench.questions]


def _by_video(questions: list[Question]) -> dict[str, list[Question]]:
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.video, []).append(q)
    return groups


def _load(cfg: RunConfig):
    import vstream

    return vstream.load(cfg.model, device=cfg.device, memory_mode=cfg.memory_mode, vision_tower=cfg.vision_tower)


_WORKER: dict = {}


def _init_worker(cfg: RunConfig, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["model"] = _load(cfg)


def _worker_video(bench: Benchmark, video: str, questions: list[Question], cfg: RunConfig) -> list[dict]:
    return predict_video(_WORKER["model"], bench, video, questions, cfg)


def _run_pool(bench: Benchmark, cfg: RunConfig, todo: dict, workers: int, write: Callable[[list[dict]], None]) -> None:
    import multiprocessing

    light = dataclasses.replace(bench, questions=[])
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg, threads)) as pool:
        futures = [pool.submit(_worker_video, light, video, qs, cfg) for video, qs in todo.items()]
        for future in as_completed(futures):
            write(future.result())


# ---------------------------------------------------------------- one video


def predict_video(model, bench: Benchmark, video: str, questions: list[Question], cfg: RunConfig) -> list[dict]:
    """Answer `questions` (all about `video`) in `cfg.mode`; records in time order (None = the end, last)."""
    seed = int(hashlib.sha256(video.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)
    ordered = sorted(questions, key=lambda q: math.inf if q.time is None else q.time)
    if cfg.source == "features":
        from vstream.eval.features import load_features

        features, times = load_features(bench.feature_path(video))
        duration = times[-1]
        answers = _from_features(model, features, times, ordered, cfg)
    else:
        from vstream.video import probe

        path = bench.video_path(video)
        duration = probe(path).duration
        if cfg.mode == "offline":
            answers = _offline_video(model, path, ordered, cfg)
        else:
            answers = _streaming_video(model, path, ordered, cfg)
    return [_record(q, a, extra, duration, cfg) for q, (a, extra) in zip(ordered, answers)]


def _record(q: Question, answer, extra: dict, duration: float | None, cfg: RunConfig) -> dict:
    asked = q.time if q.time is not None else duration
    return {
        "id": q.id, "video": q.video, "question": q.question, "answer": q.answer, "kind": q.kind, "qtype": q.qtype,
        "options": list(q.options), "time": q.time, "pred": answer.text, "mode": cfg.mode,
        "memory_time": max(answer.spatial_times) if answer.spatial_times else None, "frames": answer.frames,
        "memory_tokens": answer.memory_tokens, "duration": duration,
        "position": None if not duration or asked is None else min(1.0, asked / duration),
        "latency": {k: round(v, 6) for k, v in answer.timings.items()}, **extra,
        **({"meta": q.meta} if q.meta else {}),
    }


def _offline_video(model, path: Path, questions: list[Question], cfg: RunConfig) -> list:
    snapshots = model.memory_snapshots(str(path), [q.time for q in questions], batch_size=cfg.batch_size)
    out = []
    try:
        t0 = time.perf_counter()
        for q, memory in zip(questions, snapshots):
            build = time.perf_counter() - t0
            answer = model.answer_from(memory, q.prompt(), max_new_tokens=cfg.max_new_tokens,
                                       timings={"memory_build_s": build})
            out.append((answer, {}))
            t0 = time.perf_counter()
    finally:
        snapshots.close()
    return out


def _from_features(model, features: torch.Tensor, times: list[float], questions: list[Question], cfg: RunConfig):
    """Each question from a `StreamProcessor` fed the frames up to its time: the offline memory (`--mode offline`) or
    the streaming one."""
    from vstream.engine.processor import StreamProcessor

    processor = StreamProcessor(model, offline=cfg.mode == "offline")
    out, next_frame = [], 0
    for q in questions:
        t0 = time.perf_counter()
        until = math.inf if q.time is None else q.time + _EPS
        end = next_frame
        while end < len(times) and times[end] <= until:
            end += 1
        if end > next_frame:
            processor.insert(times[next_frame:end], features=features[next_frame:end])
            next_frame = end
        if next_frame == 0:
            raise DataError(f"question {q.id!r} at {q.time} s comes before the first frame ({times[0]} s)")
        answer = model.answer_from(processor.snapshot().memory, q.prompt(), max_new_tokens=cfg.max_new_tokens,
                                   timings={"memory_build_s": time.perf_counter() - t0})
        out.append((answer, {}))
    return out


# ---------------------------------------------------------------- streaming through the engine


class HeldSource:
    """Frames of `frames`, held back once their time passes `until` (raised by `release`): simulated time."""

    def __init__(self, frames: Iterable):
        self._frames = frames
        self._cond = threading.Condition()
        self._until = -math.inf
        self._held: float | None = None
        self._closed = False
        self.ended = False
        self.yielded = 0

    def __iter__(self):
        try:
            for t, frame in self._frames:
                with self._cond:
                    if t > self._until + _EPS:
                        self._held = t
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: t <= self._until + _EPS or self._closed)
                        self._held = None
                    if self._closed:
                        return
                    self.yielded += 1
                yield t, frame
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def release(self, until: float) -> None:
        with self._cond:
            self._until = max(self._until, until)
            self._cond.notify_all()

    def settled(self, timeout: float) -> int:
        """Wait until the source holds a frame beyond `until` or has ended; the number of frames let through."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.ended or (self._held is not None and self._held > self._until + _EPS), timeout)
            if not ok:
                raise TimeoutError(f"the source did not reach {self._until} s within {timeout} s")
            return self.yielded

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _streaming_video(model, path: Path, questions: list[Question], cfg: RunConfig) -> list:
    from vstream.engine import StreamSession
    from vstream.sources import file_source, replay_source

    fps = model.cfg.sample_fps
    if cfg.speed is not None:
        source, live = replay_source(str(path), fps=fps, speed=cfg.speed), True
    else:
        source, live = HeldSource(file_source(str(path), fps=fps)), False
    session = StreamSession(model, batch_size=cfg.batch_size).start(source, live=live)
    start = time.monotonic()
    out = []
    try:
        for q in questions:
            until = math.inf if q.time is None else q.time
            if live:
                snap = _live_wait(session, start, until, cfg)
            else:
                source.release(until)
                count = source.settled(cfg.timeout)
                if count == 0:
                    raise DataError(f"question {q.id!r} at {q.time} s comes before the first frame of {path}")
                snap = session.wait_for_frames(count, cfg.timeout)
            if session.error is not None:
                raise session.error
            snap = session.snapshot() if live else snap
            asked_at = time.monotonic()
            answer = session.ask(q.prompt(), max_new_tokens=cfg.max_new_tokens)
            extra = {"stream": {"snapshot_time": snap.stream_time, "snapshot_frames": snap.frames,
                                "frames_dropped": session.counters.dropped, "lag_s": None if q.time is None
                                else round(q.time - snap.stream_time, 6),
                                "asked_wall_s": round(asked_at - start, 6)}}
            out.append((answer, extra))
    finally:
        if isinstance(source, HeldSource):
            source.close()
        session.close()
    return out


def _live_wait(session, start: float, until: float, cfg: RunConfig):
    """Live replay: wait for the question's wall-clock moment (or the end of the stream), then the current snapshot."""
    if math.isinf(until):
        if not session.wait(cfg.timeout):
            raise TimeoutError(f"the stream did not end within {cfg.timeout} s")
    else:
        delay = start + until / cfg.speed - time.monotonic()
        if delay > 0:
            session.wait(delay)  # returns at the question's moment, or earlier when the stream ends
    return session.wait_for_frames(1, cfg.timeout)
