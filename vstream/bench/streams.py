# size streams_benchmark: one measured procedure read top to bottom (engine, warm streams, timed rounds)
"""Streams on the engine, in process: N simulated live streams asking questions (`streams_benchmark`, `vstream bench
streams`), and one video file ingested offline then replayed live with questions (`stream_benchmark`, `vstream bench
stream`).

No HTTP here: `vstream bench serve` (`vstream.loadgen`) measures through a server, `vstream bench cluster`
(`vstream.bench.cluster`) through a cluster's ingress.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vstream.bench.harness import environment, gpu_memory, summary


def streams_benchmark(model, counts=(8, 16, 32, 64), seconds: float = 20.0, warm_frames: int = 30,
                      question_interval: float = 20.0, max_new_tokens: int = 32) -> dict:
    """For each N in `counts`: N live streams each receiving one frame per second (staggered) and asking a question
    every `question_interval` s (staggered), served by the product's engine (`vstream.engine.Engine`, one for all
    runs) for `seconds` of wall time, in process (no HTTP: `vstream bench serve` measures through the server). Each
    memory is first filled with `warm_frames` frames (so updates are steady and their graphs captured before timing)."""
    import threading

    import numpy as np

    from vstream.engine import Engine

    engine = Engine(model)
    size = model.cfg.vision.image_size
    crops = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(8)]
    rows = []
    for n in counts:
        lanes = [engine.open(live=False) for _ in range(n)]
        t0 = time.perf_counter()
        for k in range(warm_frames + 1):  # warm-up, nothing dropped: memories filled, graphs captured
            for s, lane in enumerate(lanes):
                lane.put(float(k), crops[(s + k) % 8], timeout=600)
        for lane in lanes:
            while lane.snapshot is None or lane.snapshot.frames < warm_frames + 1:
                lane.done.wait(0.005)
            lane.live = True
        warm_s = time.perf_counter() - t0
        before = [lane.counters.encoded for lane in lanes]
        events = sorted([(k + s / n, "frame", s) for s in range(n) for k in range(int(seconds))]
                        + [(question_interval * (j + s / n), "question", s) for s in range(n)
                           for j in range(int(seconds / question_interval) + 1)
                           if question_interval * (j + s / n) < seconds])
        answered: list[tuple[float, float]] = []  # (first piece, done) seconds after asking
        readers = []

        def read(request, asked: float) -> None:
            first = None
            for _ in request:
                first = first if first is not None else time.perf_counter()
            done = time.perf_counter()
            answered.append(((first or done) - asked, done - asked))

        start = time.perf_counter()
        for at, kind, s in events:
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if kind == "frame":
                lanes[s].put(warm_frames + 1 + at, crops[int(at + s) % 8])
            else:
                _, request = engine.ask(lanes[s], "What is happening now?", max_new_tokens=max_new_tokens)
                readers.append(threading.Thread(target=read, args=(request, time.perf_counter()), daemon=True))
                readers[-1].start()
        for reader in readers:
            reader.join(120)
        deadline = time.perf_counter() + 30
        while (any(c.encoded + c.dropped < c.received for c in (lane.counters for lane in lanes))
               and time.perf_counter() < deadline):  # every frame sent is in a memory or counted as dropped
            time.sleep(0.01)
        frames = sum(lane.counters.encoded for lane in lanes) - sum(before)
        rows.append({"streams": n, "questions": len(readers), "answered": len(answered),
                     "first_token": summary([a * 1000 for a, _ in answered]),
                     "answer": summary([b * 1000 for _, b in answered]),
                     "frames": frames, "frames_dropped": sum(lane.counters.dropped for lane in lanes),
                     "frames_expected": n * int(seconds), "warmup_s": round(warm_s, 2),
                     "memory": gpu_memory(model.device)})
        for lane in lanes:
            engine.close(lane)
    engine.shutdown()
    return {"environment": environment(model) | {"seconds": seconds, "question_interval_s": question_interval,
                                                 "max_new_tokens": max_new_tokens, "engine": engine.stats()},
            "runs": rows}



def stream_benchmark(model, source: str | None = None, seconds: int = 60, speed: float = 10.0, questions: int = 8,
                     max_new_tokens: int = 16, timeout: float = 600.0) -> dict:
    from vstream.engine import StreamSession  # video decoding (PyAV) is needed by this benchmark only
    from vstream.sources import file_source, replay_source
    from vstream.synth.clips import write_test_video

    with tempfile.TemporaryDirectory() as tmp:
        path = source or str(write_test_video(Path(tmp) / "bench.mp4", seconds=seconds, fps=10,
                                              size=(320, 240), seed=0))
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

