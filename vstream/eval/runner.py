"""Predictions for a benchmark, in one of two modes, written to a resumable JSON-lines file.

Every video is played once through `vstream.eval.play`, its questions answered along it in time order; the mode is
only the clock the play runs under:
- `offline`: no clock: each question is answered from the offline memory of its video up to the question's time (the
  whole video when it has none).
- `streaming`: by default in simulated time: the stream's memory, the source held back at each question's time until it
  is answered, so the answer rests on exactly the frames up to that time (in `paper` memory mode: the offline answer).
  With `speed`, the file is replayed live at `speed` x real time and each question is asked at its wall-clock moment
  from whatever the engine has ingested by then (lag and drops recorded).
Videos are read from their files, or from pre-extracted feature files (`source="features"`: offline and simulated time).

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
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from vstream.errors import UserInputError
from vstream.eval.datasets import Benchmark, Question
from vstream.eval.jsonl import read_jsonl_by_id, trim_partial_line

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"


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
    frames_per_call: int = 8
    """Frames per call of the vision encoder (`batch_size` in a run.json written before the rename)."""
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
    lora: str | None = None
    """A LoRA adapter folder merged into a Qwen model (`vstream.load`)."""

    def key(self) -> dict:
        """The fields that make two runs' predictions comparable (`lora` only when given, so that runs written before
        it existed still resume)."""
        skip = {"device", "vision_tower", "timeout"} | ({"lora"} if self.lora is None else set())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ---------------------------------------------------------------- resumable files


def check_run_file(out_dir: Path, cfg: RunConfig) -> None:
    """Write `run.json`, or check that the existing one describes the same run (resuming a different run is an
    error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if "batch_size" in old:  # a run from before frames_per_call had its name
            old["frames_per_call"] = old.pop("batch_size")
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

    return vstream.load(cfg.model, device=cfg.device, memory_mode=cfg.memory_mode, vision_tower=cfg.vision_tower,
                        lora=cfg.lora)


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
    from vstream.eval.play import SimulatedClock, WallClock, play

    seed = int(hashlib.sha256(video.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)
    ordered = sorted(questions, key=lambda q: math.inf if q.time is None else q.time)
    source, duration, name = _source(model, bench, video, cfg)
    if cfg.mode == "offline":
        clock = None
    else:
        clock = SimulatedClock() if cfg.speed is None else WallClock(cfg.speed, cfg.timeout)
    plays = play(model, source, [(q.time, q.prompt()) for q in ordered], clock, frames_per_call=cfg.frames_per_call,
                 max_new_tokens=cfg.max_new_tokens, name=name)
    records = []
    try:
        for q, played in zip(ordered, plays):
            snap = played.snapshot
            extra = {} if clock is None else {"stream": {
                "snapshot_time": snap.stream_time, "snapshot_frames": snap.frames,
                "frames_dropped": played.frames_dropped,
                "lag_s": None if q.time is None else round(q.time - snap.stream_time, 6),
                "asked_wall_s": round(played.asked_wall_s, 6)}}
            records.append(_record(q, played.answer, extra, duration, cfg))
    finally:
        plays.close()
    return records


def _source(model, bench: Benchmark, video: str, cfg: RunConfig) -> tuple[Iterable, float, str]:
    """The video's frames as `(t, frame)`s (features rows from a feature file), its duration and its name."""
    fps = model.cfg.sample_fps
    if cfg.source == "features":
        from vstream.eval.features import load_features

        if cfg.speed is not None:
            raise UserInputError(f"a live replay (speed={cfg.speed}) plays videos: feature files play offline or in "
                                 "simulated time")

        path = bench.feature_path(video)
        features, times = load_features(path)
        return zip(times, features), times[-1], str(path)
    from vstream.sources import file_source, replay_source
    from vstream.video import probe

    path = bench.video_path(video)
    frames = (file_source(str(path), fps=fps) if cfg.speed is None
              else replay_source(str(path), fps=fps, speed=cfg.speed))
    return frames, probe(path).duration, str(path)


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
