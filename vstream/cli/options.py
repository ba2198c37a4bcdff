"""Option types and defaults that several commands of `vstream` share, and the check of `--device`.

This module declares options only: it registers no command and loads nothing (the commands import what they run).
"""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer

from vstream.devices import DEVICE_HELP, resolve_device
from vstream.errors import UserInputError

DEFAULT_MODEL = "demo"
"""The model of the user commands: the trained demo model shipped in the package (SmolLM2 from its wheel);
`--model tiny` is the random test preset."""
BENCH_DEFAULT_PRESET = "tiny"
"""The model shape of the benchmarks: the random preset, which runs on the CPU in seconds (`--preset
flash-vstream-7b` on a GPU)."""

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset name or local checkpoint directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
SourceArg = Annotated[str, typer.Argument(help="Video file, URL (http/https/rtsp) or webcam:N.")]
MemoryModeOpt = Annotated[Optional[str], typer.Option(help="paper or official (default: the model's).")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(help="Answer length limit in tokens.")]
LoraOpt = Annotated[Optional[str], typer.Option(
    "--lora", help="LoRA adapter folder (PEFT layout, as Flash-VStream-Qwen's training writes) merged into a Qwen2-VL "
                   "/ Qwen2.5-VL --model.")]
FramesPerCallOpt = Annotated[int, typer.Option("--frames-per-call", "--batch-size",
                                               help="Frames per call of the vision encoder (--batch-size: its old "
                                                    "name).")]


def resolve_device_option(name: str) -> torch.device:
    """The torch device `--device NAME` means here; UserInputError naming the option when there is none."""
    try:
        return resolve_device(name)
    except UserInputError as exc:
        raise UserInputError(f"--device: {exc}") from exc
