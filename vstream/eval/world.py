"""Accuracy on held-out streams of the procedural world, per question type, with memory parts switched off.

Each stream is played once through the model's streaming memory (`memory_snapshots`, as inference does) from its
rendered frames (`source="render"`) or from the H.264 video the world writes (`source="video"`, decoded like any
file); each question is answered from the memory as of its time by greedy decoding, several questions per batch. An
ablation drops the tokens of one memory part (`spatial`, `temporal`, `abstract`, `retrieved`) from every snapshot.
Scoring is exact match after `normalise_keep_word_breaks` (lower case, punctuation as spaces, no leading article).

This module does not train (see `vstream.train`) and does not draw the world (see `vstream.synth.world`).
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from vstream.errors import UserInputError
from vstream.eval.scoring import accuracy_by_type, normalise_keep_word_breaks
from vstream.memory import MemoryRead, without
from vstream.model.prompts import stop_strings
from vstream.synth import world as w


@torch.inference_mode()
def answer_batch(model, memories: Sequence[MemoryRead], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to several (memory, question) pairs at once (left-padded prompts)."""
    embeds = [model.prompt_embeds(m.tokens, q)[0] for m, q in zip(memories, questions)]
    longest = max(e.shape[0] for e in embeds)
    batch = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=batch.device)
    for i, e in enumerate(embeds):
        batch[i, longest - e.shape[0] :] = e
        mask[i, longest - e.shape[0] :] = 1
    tok = model.tokenizer
    stops = stop_strings(model.cfg.template)
    eos = [tok.convert_tokens_to_ids(s) for s in stops if tok.convert_tokens_to_ids(s) is not None]
    out = model.llm.generate(
        inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos or tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
    )
    texts = tok.batch_decode(out, skip_special_tokens=False)
    answers = []
    for text in texts:
        for s in stops:
            text = text.split(s)[0]
        answers.append(text.replace(tok.pad_token or "\0", "").strip())
    return answers


def evaluate(
    model, split: str = "test", streams: int = 50, start: int = 0, ablations: Sequence[str | None] = (None,),
    source: str = "render", batch_size: int = 64, frame_size: int = 128, progress: bool = True,
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

    def flush():
        for name, ablation in zip(names, ablations):
            mems = [m if ablation is None else without(m, [ablation]) for _, m in pending]
            preds = answer_batch(model, mems, [r["question"] for r, _ in pending])
            for (row, _), pred in zip(pending, preds):
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
                if len(pending) >= batch_size:
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
