"""Benchmarks of the streaming engine, printed with what they ran on. Figures are medians/p95 of measured values.

`stream_benchmark`: (1) offline ingestion of a file as fast as possible (frames/s, no drops by construction);
(2) the same file replayed live at `speed` x real time while questions arrive at even intervals: frames dropped,
time to first token and answer latency under ingestion.
"""

from __future__ import annotations

import platform
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers

from vstream.engine import StreamSession
from vstream.sources import file_source, replay_source
from vstream.synth.clips import write_test_video


def environment(model) -> dict:
    device = model.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(model.dtype).removeprefix("torch."),
        "model": model.cfg.name, "memory_mode": model.cfg.memory.mode, "max_memory_tokens": model.cfg.memory.max_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }


def stream_benchmark(model, source: str | None = None, seconds: int = 60, speed: float = 10.0, questions: int = 8,
                     max_new_tokens: int = 16, timeout: float = 600.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = source or str(write_test_video(Path(tmp) / "bench.mp4", seconds=seconds, fps=10, size=(320, 240), seed=0))
        fps = model.cfg.sample_fps
        t0 = time.perf_counter()
        with StreamSession(model).start(file_source(path, fps=fps), live=False) as offline:
            if not offline.wait(timeout):
                raise TimeoutError(f"offline ingestion did not finish within {timeout} s")
        offline_s = time.perf_counter() - t0
        live_session = StreamSession(model).start(replay_source(path, fps=fps, speed=speed), live=True)
        with live_session as live:
            live.wait_for_frames(1, timeout=timeout)
            interval = seconds / speed / (questions + 1)
            for _ in range(questions):
                time.sleep(interval)
                live.ask("What is happening now?", max_new_tokens=max_new_tokens)
            if not live.wait(timeout):
                raise TimeoutError(f"live ingestion did not finish within {timeout} s")
        stats = live.stats()
    received = stats["frames_received"]
    return {
        "environment": environment(model),
        "offline": {"frames": offline.counters.encoded, "seconds": offline_s,
                    "ingest_fps": offline.counters.encoded / offline_s, "dropped": offline.counters.dropped},
        "live": {"speed": speed, "source_fps": fps * speed, "frames_received": received,
                 "frames_encoded": stats["frames_encoded"], "frames_dropped": stats["frames_dropped"],
                 "drop_rate": stats["frames_dropped"] / received if received else 0.0,
                 "questions": questions, "latency": stats["latency"], "tokens_per_s": stats["tokens_per_s"]},
    }
