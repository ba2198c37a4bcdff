"""The world's dataset splits and files: disjoint seed ranges per split, a stream's H.264 video, and `write_dataset`
(videos, timelines, LLaVA training records and VStream-QA test records of a split).

This module does not decide what a stream holds (`timeline`) or asks (`questions`); it only writes them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vstream.errors import UserInputError
from vstream.synth.clips import write_video
from vstream.synth.world.questions import make_questions
from vstream.synth.world.render import checked_frame_size
from vstream.synth.world.timeline import WorldTimeline, generate_stream

SPLIT_SEEDS = {"train": range(0, 1_000_000), "val": range(1_000_000, 1_100_000), "test": range(2_000_000, 2_100_000)}
"""Disjoint seed ranges of the dataset splits."""


def write_stream_video(stream: WorldTimeline, path: str | Path, fps: float = 4.0, size: int = 128) -> Path:
    """Encode the stream's frames at `fps` as H.264 (yuv420p, so `size` must be even). Returns the path."""
    if checked_frame_size(size) % 2:
        raise UserInputError(f"H.264 yuv420p needs an even frame size, got {size}")
    return write_video(path, (frame for _, frame in stream.frames(fps, size)), fps=fps)


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds `start` .. `start + n - 1` of a split's range in SPLIT_SEEDS."""
    if split not in SPLIT_SEEDS:
        raise UserInputError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    seeds = SPLIT_SEEDS[split]
    if n < 0 or start < 0 or start + n > len(seeds):
        raise UserInputError(f"split {split!r} has {len(seeds)} seeds: expected 0 <= start and "
                             f"start + n <= {len(seeds)}, got start {start}, n {n}")
    return list(seeds[start : start + n])


def write_dataset(
    out_dir: str | Path, split: str, n_streams: int, fps: float = 4.0, size: int = 128, start: int = 0,
    on_stream: Callable[[int], None] | None = None,
) -> dict:
    """Write streams `start` .. `start + n_streams - 1` of a split to `out_dir`: `videos/{seed}.mp4` (H.264 at `fps`),
    `timelines/{seed}.json` (`WorldTimeline.to_dict()` plus its questions), `llava.json` (LLaVA training records) and
    `test_qa.json` (VStream-QA records). Calls `on_stream(seed)` after each stream. Returns the counts."""
    seeds = split_seeds(split, n_streams, start)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "timelines").mkdir(parents=True, exist_ok=True)
    llava, test_qa, by_type, seconds = [], [], Counter(), 0
    for seed in seeds:
        stream = generate_stream(seed)
        questions = make_questions(stream)
        video = f"videos/{seed}.mp4"
        write_stream_video(stream, out / video, fps=fps, size=size)
        timeline = stream.to_dict() | {"questions": [asdict(qa) for qa in questions]}
        (out / "timelines" / f"{seed}.json").write_text(json.dumps(timeline))
        for i, qa in enumerate(questions):
            qid = f"{seed}-{i}"
            llava.append({"id": qid, "video": video, "time": qa.time, "question_type": qa.type, "conversations": [
                {"from": "human", "value": "<image>\n" + qa.question}, {"from": "gpt", "value": qa.answer}]})
            test_qa.append({"video_id": f"{seed}.mp4", "question": qa.question, "id": qid, "answer": qa.answer,
                            "answer_type": qa.type, "time": qa.time, "duration": stream.duration})
            by_type[qa.type] += 1
        seconds += stream.duration
        if on_stream is not None:
            on_stream(seed)
    (out / "llava.json").write_text(json.dumps(llava, indent=1))
    (out / "test_qa.json").write_text(json.dumps(test_qa, indent=1))
    return {"split": split, "streams": len(seeds), "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "seconds": seconds, "questions": len(llava), "by_type": dict(sorted(by_type.items()))}
