"""Reading a Hugging Face style weights folder: one file or shards with an index, safetensors or `.bin`.

Only reads tensors; naming, mapping and checking them is the caller's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def read_state_dict(directory: str | Path, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of the folder on the CPU, except keys starting with one of `skip_prefixes` (never loaded when the
    files are safetensors). Raises FileNotFoundError naming the files expected and those found, or a missing shard."""
    root = Path(directory)
    for single, index_name in LAYOUTS:
        if (root / single).is_file():
            return _read_file(root / single, skip_prefixes)
        if (root / index_name).is_file():
            shards = sorted(set(json.loads((root / index_name).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{root / index_name} names shards that are not in {root}: {missing}")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(root / shard, skip_prefixes))
            return state
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise FileNotFoundError(
        f"no weights in {root}: expected model.safetensors, pytorch_model.bin or an index of their shards; found {present}"
    )


def _read_file(file: Path, skip_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys() if not key.startswith(skip_prefixes)}
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
