"""vstream: real-time question answering over unbounded video streams (Flash-VStream, STAR memory).

The public names of the package: `load` (a model from a preset or a checkpoint), the configs (`ModelConfig`,
`preset`), the model and what it answers (`FlashVStream`, `Answer`, `MemoryRead`) and a stream fed into the engine
(`StreamSession`). `import vstream` stays light: it imports neither torch nor any submodule; each name is imported
from its module the first time it is used (module `__getattr__`), and `load` imports the loader when called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vstream.config import ModelConfig, preset
    from vstream.engine import StreamSession
    from vstream.memory import MemoryRead
    from vstream.model.vlm import Answer, FlashVStream

__version__ = "0.1.0"

_LAZY = {
    "Answer": "vstream.model.vlm",
    "FlashVStream": "vstream.model.vlm",
    "MemoryRead": "vstream.memory",
    "ModelConfig": "vstream.config",
    "StreamSession": "vstream.engine",
    "preset": "vstream.config",
}
"""Public name -> the module that defines it, imported on first use."""


def load(
    path_or_preset: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    memory_mode: str | None = None,
    vision_tower: str | Path | None = None,
    seed: int = 0,
    eager: bool | None = None,
    lora: str | Path | None = None,
) -> FlashVStream:
    """Load a model: a preset name (random weights from `seed`), a released Flash-VStream directory or a vstream
    directory.

    `device` is `auto` (CUDA when torch sees a device, else the CPU), `cpu`, `cuda` or `cuda:N`; `dtype` defaults to
    the config's on CUDA and float32 on the CPU; `memory_mode` (`paper` or `official`) overrides the config's;
    `vision_tower` names a local CLIP directory for a released config that names a hub id; `eager=True` keeps the
    reference forward passes, `eager=False` runs the static-cache decoder and the fused tower (None: those for a
    LLaMA decoder on CUDA, eager elsewhere); `lora` names a LoRA adapter directory (PEFT's layout, such as the one
    Flash-VStream-Qwen's training writes) merged into a Qwen2-VL / Qwen2.5-VL model's weights. See
    `vstream.model.loading.load`.
    """
    from vstream.model.loading import load as _load

    return _load(path_or_preset, device=device, dtype=dtype, memory_mode=memory_mode, vision_tower=vision_tower,
                 seed=seed, eager=eager, lora=lora)


def __getattr__(name: str):
    """The public names of `_LAZY`, imported from their modules on first use (then cached in this module)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'vstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Answer", "FlashVStream", "MemoryRead", "ModelConfig", "StreamSession", "__version__", "load", "preset"]
