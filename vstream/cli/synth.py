"""`vstream synth`: write a split of the procedural streaming world (`vstream.synth.world`) to a directory. The world
and its files are `vstream.synth.world`; this module checks the options before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vstream.errors import UserInputError


def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write videos/, timelines/, llava.json, test_qa.json.")],
    split: Annotated[str, typer.Option(help="train, val or test (disjoint seed ranges).")] = "test",
    streams: Annotated[int, typer.Option(help="Number of streams.")] = 10,
    start: Annotated[int, typer.Option(help="Index of the first stream within the split.")] = 0,
    fps: Annotated[float, typer.Option(help="Frame rate of the written videos.")] = 4.0,
    size: Annotated[int, typer.Option(help="Frame side in pixels (even).")] = 128,
) -> None:
    """Generate streams of a split with their ground-truth timelines and questions (LLaVA and VStream-QA JSON)."""
    from vstream.synth.world import SPLIT_SEEDS, split_seeds, write_dataset

    if split not in SPLIT_SEEDS:
        raise UserInputError(f"--split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    if streams < 1:
        raise UserInputError(f"--streams must be >= 1, got {streams}")
    split_seeds(split, streams, start)  # a range outside the split fails here, before anything is written
    if not fps > 0:
        raise UserInputError(f"--fps must be > 0, got {fps}")
    if size < 16 or size % 2:
        raise UserInputError(f"--size must be an even number of pixels >= 16, got {size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"OUT_DIR must be a directory, got the file {out_dir}")
    with typer.progressbar(length=streams, label=f"{split} streams", file=None) as bar:
        counts = write_dataset(out_dir, split, streams, fps=fps, size=size, start=start,
                               on_stream=lambda _seed: bar.update(1))
    by_type = ", ".join(f"{k} {v}" for k, v in counts["by_type"].items())
    typer.echo(f"wrote {counts['streams']} streams (seeds {counts['seeds'][0]}..{counts['seeds'][1]}, "
               f"{counts['seconds']} s) and {counts['questions']} questions ({by_type}) to {out_dir}")
