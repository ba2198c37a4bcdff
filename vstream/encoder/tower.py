"""The frozen CLIP vision tower, truncated at the selected layer, and the loading of its weights.

`VisionTower` wraps a `transformers.CLIPVisionModel` built with only `cfg.num_layers_used` blocks, so hidden state
`cfg.select_layer` of the full tower is its last hidden state; it returns the patch tokens (CLS dropped, no
post-layernorm), [n, grid*grid, D], exactly like the official `hidden_states[-2][:, 1:]` without running block 24.
`load_clip_weights` maps a full-depth CLIP vision state dict onto it; `load_clip_directory` reads a local Hugging Face
CLIP directory (CLIPVisionModel or CLIPModel; safetensors, sharded or not, or pytorch_model.bin).

Our state-dict keys are `clip.embeddings.*`, `clip.pre_layrnorm.*`, `clip.encoder.layers.{i}.*`: transformers 5.x
CLIPVisionModel has no inner `vision_model` module.

This module does not preprocess pixels (see `preprocess`), pool tokens (see `pooling`), or download anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vstream.config import VisionConfig
from vstream.weights import read_state_dict

_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.")
_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # CLIPModel keys we never use
_MAX_LISTED = 20  # names shown per list in a load error


def clip_config(cfg: VisionConfig, num_layers: int | None = None) -> CLIPVisionConfig:
    """The transformers config of `cfg`'s tower with `num_layers` blocks (default: the full depth)."""
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers if num_layers is None else num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        attn_implementation="sdpa",
    )


class VisionTower(nn.Module):
    """Frozen CLIP vision encoder running blocks 1..cfg.num_layers_used; `device="meta"` builds it without memory (load
    weights with `load_clip_weights` before use)."""

    def __init__(self, cfg: VisionConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        hf_config = clip_config(cfg, num_layers=cfg.num_layers_used)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.clip = CLIPVisionModel(hf_config)
        # post_layernorm only touches the pooled CLS token, which is dropped: keep no parameters for it.
        self.clip.post_layernorm = nn.Identity()
        self.requires_grad_(False)
        self.eval()

    @property
    def num_tokens(self) -> int:
        """Patch tokens per frame (grid * grid)."""
        return self.cfg.grid**2

    @property
    def nbytes(self) -> int:
        """Bytes of parameters held."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [n, 3, S, S] -> [n, grid*grid, D]
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"expected pixel values [n, {', '.join(map(str, expected))}], got {list(pixel_values.shape)}"
            )
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state  # [n, 1 + grid*grid, D]
        return hidden[:, 1:]

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Patch features [n, grid*grid, D] of pixel values [n, 3, S, S], `batch_size` frames at a time, in the tower's
        dtype and device. The result is an inference tensor: `.clone()` it before using it where autograd records."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        weight = self.clip.embeddings.patch_embedding.weight
        n = pixel_values.shape[0]
        out = torch.empty(n, self.num_tokens, self.cfg.hidden_size, dtype=weight.dtype, device=weight.device)
        for i in range(0, n, batch_size):
            batch = pixel_values[i : i + batch_size].to(device=weight.device, dtype=weight.dtype)
            out[i : i + batch_size] = self(batch)
        return out


def load_clip_weights(tower: VisionTower, state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Load a full-depth CLIP vision state dict (keys `prefix + "embeddings..."`, `prefix + "encoder.layers.{i}..."`,
    ...) into `tower`; returns the sorted keys that are expected but unused: blocks the truncated tower does not run,
    `post_layernorm.*` and `embeddings.position_ids`. Missing or unexpected keys, or a shape that differs, raise
    ValueError naming them. Values are converted to the tower's dtype; a tower built on `meta` gets them on the CPU."""
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
        raise ValueError(_mismatch_message(missing, sorted(unexpected), prefix, state_dict))
    for name, value in mapped.items():
        if value.shape != wanted[name].shape:
            raise ValueError(
                f"{prefix + name}: checkpoint shape {list(value.shape)}, tower expects {list(wanted[name].shape)}"
            )
    like = next(iter(wanted.values()))
    on_meta = like.is_meta
    if on_meta:  # assign real tensors in place of the meta ones
        mapped = {name: value.to(device="cpu", dtype=like.dtype) for name, value in mapped.items()}
    tower.clip.load_state_dict(mapped, strict=True, assign=on_meta)
    _materialise_position_ids(tower)
    return sorted(unused)


def load_clip_directory(path: str | Path, cfg: VisionConfig | None = None) -> VisionTower:
    """A float32 `VisionTower` from a local Hugging Face CLIP directory (config.json of a CLIPVisionModel or CLIPModel;
    weights in model.safetensors, sharded safetensors with an index, or pytorch_model.bin). The architecture comes from
    the directory; `select_layer`, `image_mean` and `image_std` come from `cfg` when given (else -2 and CLIP's values).
    Text-model keys are ignored. Nothing is downloaded: the path must be a local directory."""
    root = Path(path)
    if not (root.is_dir() and (root / "config.json").is_file()):
        found = "has no config.json" if root.is_dir() else "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"{root} {found}: expected a local CLIP directory with config.json and weights (nothing is downloaded)"
        )
    vision_cfg = vision_config_from_dir(root, cfg)
    state = read_state_dict(root, skip_prefixes=_NON_VISION)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    tower = VisionTower(vision_cfg, device="meta")
    load_clip_weights(tower, state, prefix)
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


def _materialise_position_ids(tower: VisionTower) -> None:
    """The position-id buffer is not in checkpoints; a tower built on `meta` gets a real one after loading."""
    embeddings = tower.clip.embeddings
    if embeddings.position_ids.is_meta:
        ids = torch.arange(embeddings.num_positions, device=embeddings.position_embedding.weight.device).expand((1, -1))
        embeddings.register_buffer("position_ids", ids, persistent=False)


def vision_config_from_dir(root: Path, cfg: VisionConfig | None = None) -> VisionConfig:
    """The architecture of a local CLIP directory (CLIPModel or CLIPVisionModel config.json); the remaining fields
    (selected layer, normalisation) come from `cfg` when given."""
    raw = json.loads((root / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type == "clip":
        raw = raw.get("vision_config", {})
    elif model_type != "clip_vision_model":
        raise ValueError(f"{root}/config.json: expected model_type 'clip' or 'clip_vision_model', got {model_type!r}")
    hf = CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    if hf.num_channels != 3:
        raise ValueError(f"{root}: expected a 3-channel CLIP vision tower, got num_channels={hf.num_channels}")
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
