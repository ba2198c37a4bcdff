"""`vstream ask`: questions about a video, each answered from the memory as it stood at its `--at` time.

One offline pass over the source (`vstream.eval.play` with no clock: the loop `vstream eval` runs) takes the memory
snapshots, and the model's engine answers from them; the answers are printed as text (details on stderr) or as one
JSON document. Playing a source live and taking questions on stdin is `vstream run`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer

from vstream.cli.options import (DEFAULT_MODEL, DeviceOpt, JsonOpt, LoraOpt, MaxNewTokensOpt, MemoryModeOpt, ModelOpt,
                                 SourceArg)
from vstream.errors import UserInputError


def ask(
    source: SourceArg,
    questions: Annotated[list[str], typer.Argument(help="Questions, in the order of their --at times.")],
    at: Annotated[Optional[list[float]], typer.Option(help="Stream time of each question (one per question).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: MemoryModeOpt = None,
    lora: LoraOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """One pass over the source; each question is answered from the memory as it stood at its `--at` time (default:
    the end), so it sees only the frames up to that time."""
    import vstream
    from vstream.eval.play import play
    from vstream.model.loading import read_config, show_progress
    from vstream.sources import open_source

    times = _question_times(questions, at)
    frames, _ = open_source(source, fps=read_config(model).sample_fps)  # a bad source fails before the model loads
    show_progress()
    m = vstream.load(model, device=device, memory_mode=memory_mode, lora=lora)
    order = sorted(range(len(questions)), key=lambda i: math.inf if times[i] is None else times[i])
    answers: dict[int, dict] = {}
    plays = play(m, frames, [(times[i], questions[i]) for i in order], max_new_tokens=max_new_tokens, name=source)
    for i, played in zip(order, plays):
        answers[i] = played.answer.to_dict() | {"at": times[i]}
        if not as_json:
            _print_answer(answers[i])
    if as_json:
        out = {"source": source, "model": m.cfg.name, "memory_mode": m.cfg.memory.mode,
               "answers": [answers[i] for i in range(len(questions))]}
        typer.echo(json.dumps(out, indent=2))


def _question_times(questions: list[str], at: list[float] | None) -> list[float | None]:
    if any(not q.strip() for q in questions):
        raise UserInputError("a question is empty: expected non-empty text for every question")
    if at and len(at) != len(questions):
        raise UserInputError(f"give one --at per question: {len(questions)} questions, {len(at)} --at times")
    if at and any(t < 0 for t in at):
        raise UserInputError(f"--at must be a time in seconds >= 0, got {at}")
    return list(at) if at else [None] * len(questions)


def _print_answer(a: dict) -> None:
    when = "end" if a["at"] is None else f"{a['at']:g}s"
    typer.echo(f"[{when}] {a['question']}\n{a['text']}")
    typer.echo(
        f"  ({a['frames']} frames, {a['memory_tokens']} memory tokens; spatial frame at "
        f"{', '.join(f'{t:.1f}s' for t in a['spatial_times'])}; key frames at "
        f"{', '.join(f'{t:.1f}s' for t in a['retrieved_times']) or '-'}; first token "
        f"{a['timings']['first_token_s'] * 1000:.0f} ms)",
        err=True,
    )
