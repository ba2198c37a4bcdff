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
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vstream.config import VisionConfig
from vstream.errors import ConfigError, MissingPathError
from vstream.weights import assign_, place, read_state_dict

_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.")
_NON_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # CLIPModel keys we never use
_MAX_LISTED = 20  # names shown per list in a load error
_QUICK = 1.702  # quick_gelu(z) = z * sigmoid(1.702 z) = silu(1.702 z) / 1.702


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
        self.fused = False  # `use_fused`: the fused forward below, same function up to rounding
        self.graphs: dict[int, _CapturedTower] = {}  # batch size -> captured fused forward (CUDA)
        self.warmup_s = 0.0

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
        self._checked(pixel_values)
        if self.graphs:
            return self._replay(pixel_values, self.graphs)
        if self.fused:
            return self._fused_forward(pixel_values)
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state  # [n, 1 + grid*grid, D]
        return hidden[:, 1:]

    # ---------------------------------------------------------------- fused path (same function, fewer passes)

    def use_fused(self, graph_sizes: tuple[int, ...] = ()) -> "VisionTower":
        """Run the blocks through `_fused_forward`; on CUDA also capture one graph per frame count in `graph_sizes`,
        and cut the frames of every call into those sizes (largest first). Returns the warm-up seconds in
        `self.warmup_s`. Call after moving the tower to its device and dtype."""
        self.fused = True
        t0 = time.perf_counter()
        self.graphs = self.capture(graph_sizes)
        self.warmup_s = time.perf_counter() - t0
        return self

    def capture(self, sizes: tuple[int, ...]) -> dict[int, "_CapturedTower"]:
        """The fused forward captured in one CUDA graph per frame count in `sizes` (sharing one memory pool). Their
        static inputs and outputs belong to whoever holds them: one thread passes them to `encode(graphs=...)`."""
        if not sizes:
            return {}
        weight = self.clip.embeddings.patch_embedding.weight
        if weight.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the tower on a CUDA device, it is on {weight.device}")
        pool = torch.cuda.graph_pool_handle()
        graphs = {n: _CapturedTower(self, n, pool) for n in sorted(set(sizes), reverse=True)}  # largest first
        torch.cuda.synchronize(weight.device)
        return graphs

    @torch.inference_mode()
    def _fused_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The truncated tower with fewer memory passes: SDPA attention, the MLP's quick-GELU computed as
        silu(1.702 z) / 1.702 with both scales folded into the two matrix products (one activation pass instead of
        three), biases in the matrix-product epilogues. The same function as `self.clip`, up to rounding."""
        clip = self.clip
        x = clip.pre_layrnorm(clip.embeddings(pixel_values))  # [n, T, D]
        n, t, d = x.shape
        heads = self.cfg.num_attention_heads
        quick = self.cfg.hidden_act == "quick_gelu"
        x = x.reshape(n * t, d)
        for layer in clip.encoder.layers:
            a, mlp = layer.self_attn, layer.mlp
            h = F.layer_norm(x, (d,), layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps)
            q, k, v = (F.linear(h, p.weight, p.bias).view(n, t, heads, -1).transpose(1, 2)
                       for p in (a.q_proj, a.k_proj, a.v_proj))  # [n, heads, T, Dh]
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).reshape(n * t, d)
            x = torch.addmm(a.out_proj.bias, o, a.out_proj.weight.t()).add_(x)
            h = F.layer_norm(x, (d,), layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps)
            if quick:
                z = F.silu(torch.addmm(mlp.fc1.bias * _QUICK, h, mlp.fc1.weight.t(), alpha=_QUICK), inplace=True)
                x = torch.addmm(mlp.fc2.bias, z, mlp.fc2.weight.t(), alpha=1.0 / _QUICK).add_(x)
            else:
                x = torch.addmm(mlp.fc2.bias, mlp.activation_fn(mlp.fc1(h)), mlp.fc2.weight.t()).add_(x)
        return x.view(n, t, d)[:, 1:]

    def _replay(self, pixel_values: torch.Tensor, graphs: dict[int, "_CapturedTower"]) -> torch.Tensor:
        """Cut the frames into captured sizes, largest first (37 = 32 + 4 + 1 with sizes 1, 2, 4, ..., 32)."""
        out = torch.empty(pixel_values.shape[0], self.num_tokens, self.cfg.hidden_size,
                          dtype=self.clip.embeddings.patch_embedding.weight.dtype, device=pixel_values.device)
        i, n = 0, pixel_values.shape[0]
        sizes = sorted(graphs, reverse=True)
        while i < n:
            size = next((s for s in sizes if s <= n - i), None)
            if size is None:  # smaller than every captured size: run eagerly
                out[i:] = self._fused_forward(pixel_values[i:])
                break
            out[i : i + size] = graphs[size].run(pixel_values[i : i + size])
            i += size
        return out

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, frames_per_call: int = 64,
               graphs: dict[int, "_CapturedTower"] | None = None) -> torch.Tensor:
        """Patch features [n, grid*grid, D] of pixel values [n, 3, S, S], `frames_per_call` frames a call of the tower,
        in the tower's dtype and device; through `graphs` (from `capture`) when given. The result is an inference
        tensor: `.clone()` it before using it where autograd records."""
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be >= 1, got {frames_per_call}")
        weight = self.clip.embeddings.patch_embedding.weight
        n = pixel_values.shape[0]
        out = torch.empty(n, self.num_tokens, self.cfg.hidden_size, dtype=weight.dtype, device=weight.device)
        for i in range(0, n, frames_per_call):
            chunk = pixel_values[i : i + frames_per_call].to(device=weight.device, dtype=weight.dtype)
            out[i : i + frames_per_call] = self(chunk) if not graphs else self._replay(self._checked(chunk), graphs)
        return out

    def _checked(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.cfg.image_size, self.cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"expected pixel values [n, {', '.join(map(str, expected))}], got {list(pixel_values.shape)}"
            )
        return pixel_values


class _CapturedTower:
    """The fused forward of one frame count captured in a CUDA graph: inputs and outputs are static tensors."""

    def __init__(self, tower: VisionTower, frames: int, pool):
        weight = tower.clip.embeddings.patch_embedding.weight
        size = tower.cfg.image_size
        self.pixels = torch.randn(frames, 3, size, size, device=weight.device).to(weight.dtype)  # [b, 3, S, S]
        side = torch.cuda.Stream(weight.device)
        side.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                tower._fused_forward(self.pixels)
        torch.cuda.current_stream(weight.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = tower._fused_forward(self.pixels)  # [b, grid^2, D]

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """Replay on `pixels`; the result is the static output: copy it before the next replay."""
        self.pixels.copy_(pixels, non_blocking=True)
        self.graph.replay()
        return self.out


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
