"""Accuracy on held-out streams of the procedural world, per question type, with memory parts switched off.

Each stream is played once through the model's streaming memory (`memory_snapshots`, as inference does) from its
rendered frames (`source="render"`) or from the H.264 video the world writes (`source="video"`, decoded like any
file); each question is answered greedily from the memory as of its time, decoded by the model's engine (`engine_of`,
the batched decoder that serves streams), `questions_per_call` questions (each under every ablation) handed to it
together. An
ablation drops the tokens of one memory part (`spatial`, `temporal`, `abstract`, `retrieved`) from every snapshot.
Scoring is exact match after `normalise_keep_word_breaks` (lower case, punctuation as spaces, no leading article).

This module does not train (see `vstream.train`), does not draw the world (see `vstream.synth.world`) and has no
decoder of its own.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path

from vstream.engine.scheduler import EngineConfig, engine_of
from vstream.errors import UserInputError
from vstream.eval.scoring import accuracy_by_type, normalise_keep_word_breaks
from vstream.memory import MemoryRead, without
from vstream.model.batch_answer import Request
from vstream.synth import world as w


def answer_batch(model, memories: Sequence[MemoryRead], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to (memory, question) pairs, in their order, decoded by the model's engine (`engine_of`) as every
    answer is. Never more are queued than the engine's waiting room holds: when it is full, the oldest answer is
    collected before the next question goes in."""
    if len(memories) != len(questions):
        raise ValueError(f"expected one memory per question, got {len(memories)} memories and {len(questions)} "
                         "questions")
    engine = engine_of(model, EngineConfig(answer_slots=max(1, min(len(questions), 32))))
    requests: deque[Request] = deque()
    answers: list[str] = []
    try:
        for memory, question in zip(memories, questions):
            while requests and engine.pending_answers >= engine.config.max_waiting:
                answers.append(requests.popleft().text().strip())
            requests.append(engine.submit(memory.tokens, question, max_new_tokens=max_new_tokens, memory=memory))
        while requests:
            answers.append(requests.popleft().text().strip())
    finally:
        for request in requests:  # left early (an error, an interrupt): free their slots
            request.cancel()
    return answers


def evaluate(
    model, split: str = "test", streams: int = 50, start: int = 0, ablations: Sequence[str | None] = (None,),
    source: str = "render", questions_per_call: int = 64, frame_size: int = 128, progress: bool = True,
) -> dict:
    """{"rows": [per question: seed, time, type, question, answer, and per ablation the prediction and whether it is
    right], "accuracy": {ablation: {type: acc, "overall": acc}}, "questions": n, ...}."""
    from tqdm import tqdm

    if source not in ("render", "video"):
        raise UserInputError(f"source must be 'render' or 'video', got {source!r}")
    names = ["full" if a is None else f"no_{a}" for a in ablations]
    rows = []
    pending: list[tuple[dict, MemoryRead]] = []
    t0 = time.perf_counter()

    def flush():  # every pending question under every ablation, in one call to the engine
        jobs = [(row, name, m if ablation is None else without(m, [ablation]))
                for name, ablation in zip(names, ablations) for row, m in pending]
        preds = answer_batch(model, [m for _, _, m in jobs], [row["question"] for row, _, _ in jobs])
        for (row, name, _), pred in zip(jobs, preds):
            row[name] = pred
            row[name + "_right"] = normalise_keep_word_breaks(pred) == normalise_keep_word_breaks(row["answer"])
        pending.clear()

    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(w.split_seeds(split, streams, start), desc=f"{split} streams", disable=not progress):
            stream = w.generate_stream(seed)
            qas = sorted(w.make_questions(stream, seed=seed), key=lambda q: q.time)
            if source == "render":
                frames = stream.frames(fps=model.cfg.sample_fps, size=frame_size)
            else:
                frames = str(w.write_stream_video(stream, Path(tmp) / f"{seed}.mp4", fps=4.0, size=frame_size))
            for qa, memory in zip(qas, model.memory_snapshots(frames, [q.time for q in qas])):
                row = {"seed": seed, "time": qa.time, "type": qa.type, "question": qa.question, "answer": qa.answer}
                rows.append(row)
                pending.append((row, memory))
                if len(pending) >= questions_per_call:
                    flush()
        if pending:
            flush()
    accuracy = {name: accuracy_by_type(rows, name + "_right") for name in names}
    counts = defaultdict(int)
    for r in rows:
        counts[r["type"]] += 1
    return {
        "split": split, "streams": streams, "start": start, "source": source, "questions": len(rows),
        "per_type": dict(counts), "accuracy": accuracy, "seconds": time.perf_counter() - t0, "rows": rows,
    }
