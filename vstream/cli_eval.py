"""`vstream extract-features` and `vstream eval`: the evaluation commands (the library is `vstream.eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli import DEFAULT_MODEL, ModelOpt, UserError, app

DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]


@app.command("extract-features")
def extract_features_command(
    videos_dir: Annotated[Path, typer.Argument(help="Folder of videos (searched recursively).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the .safetensors files (created if needed).")],
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(help="Frames per encoder call.")] = 32,
) -> None:
    """One feature file per video, {'feature': [T, grid^2, D]} at the model's sample rate; finished files are kept."""
    import vstream
    from vstream.eval.features import extract_features

    if not videos_dir.is_dir():
        raise UserError(f"VIDEOS_DIR must be an existing folder, got {videos_dir}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    m = vstream.load(model, device=device)
    done = extract_features(m, videos_dir, out_dir, batch_size=batch_size, show_progress=True)
    typer.echo(f"{len(done['written'])} written, {len(done['skipped'])} already there, in {out_dir}")
