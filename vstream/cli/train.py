"""`vstream train`: one training stage of `vstream.train`, configured by a YAML file (see `configs/`). The stages,
data and checkpoints are `vstream.train`; this module reads the config with the overrides and names the result."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra


def train(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML training config (see configs/).")],
    output_dir: Annotated[Optional[str], typer.Option(help="Override the config's output_dir.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Override the config's max_steps.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the newest checkpoint in output_dir.")] = False,
) -> None:
    """Train one stage (vision | projector | finetune); writes checkpoints and the final model under output_dir.

    Several processes: `torchrun --nproc_per_node N -m vstream train --config FILE`."""
    needs_extra("train", "train")
    from vstream.train.config import load_config
    from vstream.train.runner import run

    cfg = load_config(config, output_dir=output_dir, max_steps=max_steps, resume=resume or None)
    final = run(cfg)
    typer.echo(f"model written to {final}")
