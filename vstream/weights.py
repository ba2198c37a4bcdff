"""Reading a Hugging Face style weights folder (one file or shards with an index, safetensors or `.bin`) and putting
tensors into modules built on the meta device.

Files are memory-mapped: reading a folder costs nothing until a tensor is placed, and each tensor is then read once,
straight into its device and dtype. Naming, mapping and checking the tensors is the caller's business; so is choosing
random values (see `vstream.model.loading.build_random`).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vstream.errors import MissingPathError

LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def read_state_dict(directory: str | Path, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of the folder as memory-mapped CPU tensors (pages are read when a tensor is used), except keys
    starting with one of `skip_prefixes`. Raises MissingPathError (a FileNotFoundError) naming the files expected and
    those found, or a missing shard."""
    root = Path(directory)
    for single, index_name in LAYOUTS:
        if (root / single).is_file():
            return _read_file(root / single, skip_prefixes)
        if (root / index_name).is_file():
            shards = sorted(set(json.loads((root / index_name).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise MissingPathError(f"{root / index_name} names shards that are not in {root}: {missing}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(root / shard, skip_prefixes))
            return state
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise MissingPathError(
        f"no weights in {root}: expected model.safetensors, pytorch_model.bin or an index of their shards; "
        f"found {present}"
    )


def _read_file(file: Path, skip_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:  # get_tensor views the file's mapping
            return {key: f.get_tensor(key) for key in f.keys() if not key.startswith(skip_prefixes)}
    # only the zip format (torch >= 1.6) can be memory-mapped; older files are read whole
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    return {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}


def place(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`value` on `device`, in `dtype` if it is floating point (integer tensors keep theirs), as a tensor of its own:
    never a view of a memory-mapped file, which may be rewritten while the model lives (a truncated file would kill
    the process on the next read of a page). On a GPU the conversion runs after the copy, where it is cheap."""
    target = dtype if value.is_floating_point() else value.dtype
    if device.type == "cpu":
        return value.to(dtype=target, copy=True)
    return value.to(device=device).to(target)


def assign_(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make each named parameter or buffer of `module` the given tensor (no copy), keeping `requires_grad`; the names
    are `module.state_dict()`'s. Replaces the meta tensors of a module built on the meta device."""
    for name, value in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        old = getattr(owner, leaf)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        elif not isinstance(old, torch.Tensor):
            raise KeyError(f"{name} is neither a parameter nor a buffer of {type(module).__name__}")
        setattr(owner, leaf, value)  # a buffer stays a buffer, persistent or not


def meta_names(module: nn.Module) -> list[str]:
    """Parameters and buffers of `module` still on the meta device (a complete load leaves none)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if t.is_meta]


def nbytes(tensors: Mapping[str, torch.Tensor] | nn.Module) -> int:
    """Bytes held by the tensors (or by a module's parameters and buffers)."""
    values = [*tensors.parameters(), *tensors.buffers()] if isinstance(tensors, nn.Module) else tensors.values()
    return sum(t.numel() * t.element_size() for t in values)
