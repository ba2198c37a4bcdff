"""`vstream run`: play a source with a live status line and answer the questions typed on stdin meanwhile.

The console loop itself is `vstream.engine.console`; this module checks the options, loads the model and opens the
source.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from vstream.cli.options import (DEFAULT_MODEL, DeviceOpt, LoraOpt, MaxNewTokensOpt, MemoryModeOpt, ModelOpt,
                                 SourceArg)
from vstream.errors import UserInputError


def run(
    source: SourceArg,
    speed: Annotated[Optional[float], typer.Option(help="Replay a file in simulated real time at this speed.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: MemoryModeOpt = None,
    lora: LoraOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    device: DeviceOpt = "auto",
    watch: Annotated[Optional[list[str]], typer.Option(
        help="A condition to watch for (repeatable); each trigger is printed with its stream time.")] = None,
    watch_threshold: Annotated[float, typer.Option(
        help="Log-odds of yes against no above which a watch triggers (for testing and calibration).")] = 0.0,
) -> None:
    """Play a source, show a live status line, and answer questions typed on stdin while ingestion goes on."""
    import vstream
    from vstream.engine import StreamSession
    from vstream.engine.console import run_console
    from vstream.engine.watches import Watch
    from vstream.model.loading import show_progress
    from vstream.model.yesno import scorer, watch_question
    from vstream.sources import open_source

    if speed is not None and speed <= 0:
        raise UserInputError(f"--speed must be > 0, got {speed}")
    show_progress()
    m = vstream.load(model, device=device, memory_mode=memory_mode, lora=lora)
    frames, live = open_source(source, fps=m.cfg.sample_fps, speed=speed)
    watches = [Watch(c, threshold=watch_threshold) for c in watch or []]
    for w in watches:
        watch_question(w.condition)  # an empty or overlong condition is refused before the stream starts
    with StreamSession(m).start(frames, live=live) as session:
        code = run_console(session, sys.stdin, max_new_tokens=max_new_tokens, watches=watches, score=scorer(m))
    raise typer.Exit(code)
