"""CLIP weights for the truncated `VisionTower`: a full-depth CLIP vision state dict mapped onto it
(`load_clip_weights`), a local Hugging Face CLIP directory read into one (`load_clip_directory`: CLIPVisionModel or
CLIPModel; safetensors, sharded or not, or pytorch_model.bin), its architecture read from config.json, and the
initial scales of a random tower built on the meta device.

This module builds no tower of its own design (see `tower`) and downloads nothing: paths are local directories.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from vstream.config import VisionConfig
from vstream.encoder.tower import VisionTower
from vstream.errors import ConfigError, MissingPathError
from vstream.weights import assign_, place, read_state_dict

_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.")
_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # CLIPModel keys we never use
_MAX_LISTED = 20  # names shown per list in a load error


def load_clip_weights(
    tower: VisionTower,
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Load a full-depth CLIP vision state dict (keys `prefix + "embeddings..."`, `prefix + "encoder.layers.{i}..."`,
    ...) into `tower`; returns the sorted keys that are expected but unused: blocks the truncated tower does not run,
    `post_layernorm.*` and `embeddings.position_ids`. Missing or unexpected keys, or a shape that differs, raise
    ValueError naming them. A tower with weights gets the values copied in its own dtype; a tower built on `meta`
    gets only the tensors it runs, each read once onto `device` (default the CPU) in `dtype` (default float32)."""
    wanted = tower.clip.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    unexpected: list[str] = []
    for key, value in state_dict.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name in wanted:
            mapped[name] = value
        elif name is not None and _is_unused(name, tower.cfg):
            unused.append(key)
        else:
            unexpected.append(key)
    missing = sorted(prefix + name for name in wanted.keys() - mapped.keys())
    if missing or unexpected:
        raise ConfigError(_mismatch_message(missing, sorted(unexpected), prefix, state_dict))
    for name, value in mapped.items():
        if value.shape != wanted[name].shape:
            raise ConfigError(
                f"{prefix + name}: checkpoint shape {list(value.shape)}, tower expects {list(wanted[name].shape)}"
            )
    if next(iter(wanted.values())).is_meta:
        device, dtype = torch.device(device or "cpu"), dtype or torch.float32
        assign_(tower.clip, {name: place(value, device, dtype) for name, value in mapped.items()})
    else:
        tower.clip.load_state_dict(mapped, strict=True)
    materialise_position_ids(tower)
    return sorted(unused)


def load_clip_directory(
    path: str | Path,
    cfg: VisionConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VisionTower:
    """A `VisionTower` on `device` in `dtype` from a local Hugging Face CLIP directory (config.json of a
    CLIPVisionModel or CLIPModel; weights in model.safetensors, sharded safetensors with an index, or
    pytorch_model.bin), built on the meta device and given the memory-mapped weights it runs. The architecture comes
    from the directory; `select_layer`, `image_mean` and `image_std` come from `cfg` when given (else -2 and CLIP's
    values). Text-model keys are ignored. Nothing is downloaded: the path must be a local directory."""
    root = Path(path)
    if not (root.is_dir() and (root / "config.json").is_file()):
        found = "has no config.json" if root.is_dir() else "is not a directory" if root.exists() else "does not exist"
        raise MissingPathError(
            f"{root} {found}: expected a local CLIP directory with config.json and weights (nothing is downloaded)"
        )
    vision_cfg = vision_config_from_dir(root, cfg)
    state = read_state_dict(root, skip_prefixes=_NON_VISION)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    tower = VisionTower(vision_cfg, device="meta")
    load_clip_weights(tower, state, prefix, device=device, dtype=dtype)
    return tower


def _is_unused(name: str, cfg: VisionConfig) -> bool:
    """A key of the full-depth checkpoint that the truncated tower does not need."""
    if name == "embeddings.position_ids" or name.startswith("post_layernorm."):
        return True
    block = _BLOCK.match(name)
    return block is not None and cfg.num_layers_used <= int(block[1]) < cfg.num_hidden_layers


def _mismatch_message(missing: list[str], unexpected: list[str], prefix: str, state_dict: Mapping) -> str:
    def listed(names: list[str]) -> str:
        more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
        return f"{names[:_MAX_LISTED]}{more}"

    message = (
        f"CLIP weights do not match the tower: missing {len(missing)} {listed(missing)}; "
        f"unexpected {len(unexpected)} {listed(unexpected)}"
    )
    if not any(key.startswith(prefix) for key in state_dict):
        message += f"; no key starts with prefix {prefix!r} (first keys: {list(state_dict)[:3]})"
    return message


def clip_init_std(cfg: VisionConfig) -> dict[str, float]:
    """Standard deviation of the normal values transformers draws for each weight of a fresh tower of `cfg`, by the
    name of the module (or parameter) holding it (CLIP's `_init_weights`, initializer_factor 1, the truncated depth);
    biases are zeros, LayerNorms ones and zeros. For random towers built on the meta device."""
    d, layers = cfg.hidden_size, max(cfg.num_layers_used, 1)
    deep = d**-0.5 * (2 * layers) ** -0.5  # q, k, v and the MLP's second product: shrink with depth
    return {
        "class_embedding": d**-0.5, "patch_embedding": 0.02, "position_embedding": 0.02,
        "q_proj": deep, "k_proj": deep, "v_proj": deep, "out_proj": d**-0.5, "fc1": (2 * d) ** -0.5, "fc2": deep,
    }


def materialise_position_ids(tower: VisionTower) -> None:
    """The position-id buffer is not in checkpoints; a tower built on `meta` gets a real one after loading."""
    embeddings = tower.clip.embeddings
    if embeddings.position_ids.is_meta:
        ids = torch.arange(embeddings.num_positions, device=embeddings.position_embedding.weight.device).expand((1, -1))
        embeddings.register_buffer("position_ids", ids, persistent=False)


def vision_config_from_dir(root: Path, cfg: VisionConfig | None = None) -> VisionConfig:
    """The architecture of a local CLIP directory (CLIPModel or CLIPVisionModel config.json); the remaining fields
    (selected layer, normalisation) come from `cfg` when given."""
    try:
        raw = json.loads((root / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root}/config.json is not JSON: {exc}") from None
    model_type = raw.get("model_type")
    if model_type == "clip":
        raw = raw.get("vision_config", {})
    elif model_type != "clip_vision_model":
        raise ConfigError(f"{root}/config.json: expected model_type 'clip' or 'clip_vision_model', got {model_type!r}")
    hf = CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    if hf.num_channels != 3:
        raise ConfigError(f"{root}: expected a 3-channel CLIP vision tower, got num_channels={hf.num_channels}")
    arch = dict(
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        hidden_act=hf.hidden_act,
        layer_norm_eps=hf.layer_norm_eps,
    )
    return dataclasses.replace(cfg, **arch) if cfg is not None else VisionConfig(**arch)
