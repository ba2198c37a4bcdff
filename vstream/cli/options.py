"""Option types and defaults that several commands of `vstream` share, the checks of `--device` (any device, or a CUDA
one) and of integer options.

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


def cuda_device_option(name: str, command: str) -> torch.device:
    """The CUDA device `--device NAME` means for `command`, which runs on CUDA only; UserInputError saying so when
    torch sees no CUDA device or NAME is not one."""
    if not torch.cuda.is_available():
        raise UserInputError(f"`vstream {command}` needs a CUDA device, and torch sees none here")
    device = resolve_device_option(name)
    if device.type != "cuda":
        raise UserInputError(f"--device: `vstream {command}` runs on CUDA only: expected auto, cuda or cuda:N, got "
                             f"{name!r}")
    return device


def known_preset(name: str, presets) -> str:
    """`--preset NAME` when `presets` holds it, else UserInputError listing them."""
    if name not in presets:
        raise UserInputError(f"--preset must be one of {sorted(presets)}, got {name!r}")
    return name


def positive_ints(**values: int) -> None:
    """UserInputError naming the option (`decode_tokens` is `--decode-tokens`) of the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")


def comma_ints(text: str, name: str) -> tuple[int, ...]:
    """`--NAME 1,8,32` -> (1, 8, 32); UserInputError naming the option unless every value is an integer >= 1."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserInputError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserInputError(f"--{name} must hold integers >= 1, got {text!r}")
    return values
