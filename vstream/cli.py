"""The `vstream` command line: typed subcommands over the library. Errors on bad input print one line and exit 2."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream import __version__

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Real-time question answering over video streams.",
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset name or local checkpoint directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
DEFAULT_MODEL = "tiny"


class UserError(Exception):
    """A problem with what the user asked for; shown as one line, no traceback."""


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
    video: Annotated[Path, typer.Argument(help="Video file.")],
    question: Annotated[str, typer.Argument(help="Question about the video.")],
    at: Annotated[Optional[float], typer.Option(help="Answer from the stream as of this many seconds.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: Annotated[Optional[str], typer.Option(help="paper or official (default: the model's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Answer length limit in tokens.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Answer a question about a video file, from the memory built up to `--at` seconds (default: the end)."""
    import vstream

    if at is not None and at < 0:
        raise UserError(f"--at must be a time in seconds >= 0, got {at}")
    m = vstream.load(model, device=device, memory_mode=memory_mode)
    result = m.answer(str(video), question, at=at, max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(json.dumps(result.to_dict() | {"model": m.cfg.name, "memory_mode": m.cfg.memory.mode}, indent=2))
        return
    typer.echo(result.text)
    typer.echo(
        f"[{result.frames} frames, {result.memory_tokens} memory tokens, spatial frame at "
        f"{', '.join(f'{t:.1f}s' for t in result.spatial_times)}, key frames at "
        f"{', '.join(f'{t:.1f}s' for t in result.retrieved_times) or '-'}]",
        err=True,
    )


@app.command()
def demo(
    seed: Annotated[Optional[int], typer.Option(help="Seed of the generated stream (random if not given).")] = None,
    seconds: Annotated[int, typer.Option(help="Length of the generated video.")] = 40,
    model: ModelOpt = DEFAULT_MODEL,
) -> None:
    """Generate a video, build the memory as the stream goes on and ask questions at several moments."""
    import random

    import vstream
    from vstream.synth.clips import write_test_video

    seed = random.randrange(1 << 30) if seed is None else seed
    m = vstream.load(model)
    if model == DEFAULT_MODEL:
        typer.echo("note: the 'tiny' model has random, untrained weights: its answers are meaningless text. "
                   "It shows the pipeline (decode -> encode -> STAR memory -> LLM) running end to end.")
    with tempfile.TemporaryDirectory() as tmp:
        video = write_test_video(Path(tmp) / "demo.mp4", seconds=seconds, seed=seed)
        typer.echo(f"stream: {seconds}s generated video (seed {seed}); model {m.cfg.name}, memory mode {m.cfg.memory.mode}, "
                   f"at most {m.cfg.memory.max_tokens} memory tokens")
        questions = [(seconds * 0.25, "What is on the screen now?"), (seconds * 0.6, "What happened so far?"),
                     (None, "Which colours appeared in the video?")]
        snapshots = m.memory_snapshots(str(video), [at for at, _ in questions])  # one pass over the stream
        for (at, q), memory in zip(questions, snapshots):
            result = m.answer_from(memory, q)
            when = f"{at:.0f}s" if at is not None else "end"
            typer.echo(f"\n[{when}] Q: {q}\n  A: {result.text!r}\n  ({result.frames} frames, {result.memory_tokens} "
                       f"memory tokens, key frames at {[round(t, 1) for t in result.retrieved_times]}, "
                       f"first token {result.timings['first_token_s'] * 1000:.0f} ms)")


def main() -> None:
    """Console entry point: known input errors become one line on stderr and exit code 2."""
    from vstream.video import VideoError

    try:
        app()
    except (UserError, VideoError, FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
