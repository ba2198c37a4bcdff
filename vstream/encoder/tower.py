"""The frozen CLIP vision tower, truncated at the selected layer (its weights are loaded by `clip_weights`).

`VisionTower` wraps a `transformers.CLIPVisionModel` built with only `cfg.num_layers_used` blocks, so hidden state
`cfg.select_layer` of the full tower is its last hidden state; it returns the patch tokens (CLS dropped, no
post-layernorm), [n, grid*grid, D], exactly like the official `hidden_states[-2][:, 1:]` without running block 24.
Our state-dict keys are `clip.embeddings.*`, `clip.pre_layrnorm.*`, `clip.encoder.layers.{i}.*`: transformers 5.x
CLIPVisionModel has no inner `vision_model` module.

This module does not preprocess pixels (see `preprocess`), pool tokens (see `pooling`), read checkpoints (see
`clip_weights`), or download anything.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vstream.config import VisionConfig

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
