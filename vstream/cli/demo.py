"""`vstream demo`: a new stream of the procedural world played live, its questions asked at their moments and each
answer scored against the ground truth. The demo itself is `vstream.demo`; this module checks the options and
chooses between its console view and JSON."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from vstream.cli.options import JsonOpt
from vstream.errors import UserInputError


def demo(
    seed: Annotated[Optional[int], typer.Option(help="Seed of the generated stream (random if not given).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Preset or model directory (default: the "
                                                 "trained 'demo' model, else the untrained 'tiny').")] = None,
    speed: Annotated[float, typer.Option(help="Stream seconds played per second (1 = real time).")] = 1.0,
    questions: Annotated[Optional[int], typer.Option(help="How many of the stream's questions to ask (default: all).")]
    = None,
    watch: Annotated[bool, typer.Option("--watch", help="Also watch for the stream's first new object ('tell me "
                                        "when a red circle appears') and print each trigger with its delay.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Play a new stream of the procedural world live, ask its questions at their moments, score each answer."""
    from vstream.demo import ConsoleView, run_demo

    _check(seed, speed, questions)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading SmolLM2's weights takes a second: no bar among the demo's lines
    view = None if as_json else ConsoleView()
    result = run_demo(model, seed=seed, speed=speed, questions=questions, watch=watch,
                      **({} if view is None else view.callbacks()))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        view.summary(result)


def _check(seed: int | None, speed: float, questions: int | None) -> None:
    if seed is not None and seed < 0:
        raise UserInputError(f"--seed must be >= 0, got {seed}")
    if not speed > 0:
        raise UserInputError(f"--speed must be > 0, got {speed}")
    if questions is not None and questions < 1:
        raise UserInputError(f"--questions must be >= 1, got {questions}")
