"""The Qwen2-VL / Qwen2.5-VL vision tower's attention with its packed sequences batched: one attention call per run of
equal-length sequences instead of one per sequence.

The tower packs every frame of a call into one sequence and attends within each frame (Qwen2-VL, and Qwen2.5-VL's
full-attention blocks) or within each window of 8 x 8 merged patches (Qwen2.5-VL's other blocks), the bounds given
as `cu_seqlens`. Without a varlen kernel, transformers' own forward splits the sequence at those bounds and calls the
attention once per frame or window, and reads the bounds from the device in every block: for 32 two-frame units
through the two passes that is about 1,300 attention calls in each windowed block, and the tower's time on an H100 was
launch-bound (69 frames/s at 32 units, BENCHMARKS.md). Here consecutive sequences of one length are one batch of the
same attention function (the model's configured one, sdpa or eager: same arithmetic per sequence), and the bounds are
read once per forward (they are the same tensor in every block of a kind). The q/k/v projection, the rotary embedding
(transformers' own function) and the output projection are the module's own.

`install(visual)` replaces the forward of each block's attention module of the tower (not with a flash attention
implementation, whose varlen kernel already runs one call per block). What this module does not do: change the
tower's arithmetic, its merger, or anything outside the attention.
"""

from __future__ import annotations

import importlib
import types

import torch


def install(visual) -> int:
    """Batch the packed attention of every block of `visual` (a transformers Qwen2-VL / Qwen2.5-VL vision model) ->
    how many attention modules now run batched (0 when the model attends with a flash implementation, or its
    modeling code lacks the parts this replaces: transformers' own forward then runs)."""
    implementation = str(getattr(visual.config, "_attn_implementation", None) or "eager")
    modeling = importlib.import_module(type(visual).__module__)
    rotary = getattr(modeling, "apply_rotary_pos_emb_vision", None)
    eager = getattr(modeling, "eager_attention_forward", None)
    known = all(hasattr(block.attn, name) for block in visual.blocks for name in ("qkv", "proj", "num_heads"))
    if "flash" in implementation or rotary is None or eager is None or not known:
        return 0  # a flash kernel, or a transformers whose tower this does not know: its own forward stays
    attention = _interface(implementation, eager)
    runs = _Runs()
    count = 0
    for block in visual.blocks:
        module = block.attn
        module.forward = types.MethodType(_batched_forward(rotary, attention, runs), module)
        count += 1
    return count


def _interface(implementation: str, eager):
    """The attention function the tower's own forward picks for `implementation` (sdpa, ...; `eager`, the modeling
    file's, for eager): (module, q, k, v, attention_mask, ...) -> (out [n, L, H, Dh], weights)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation] if implementation in ALL_ATTENTION_FUNCTIONS else eager


class _Runs:
    """The runs of equal-length sequences of the last `cu_seqlens` tensors seen, read from the device once each."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, list[tuple[int, int, int]]]] = {}

    def __call__(self, cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
        """[(start, length, count)]: `count` consecutive sequences of `length` from position `start`."""
        key = id(cu_seqlens)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is cu_seqlens:
            return hit[1]
        bounds = cu_seqlens.tolist()
        runs: list[tuple[int, int, int]] = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            length = end - start
            if length == 0:
                continue
            if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
                runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
            else:
                runs.append((start, length, 1))
        if len(self._cache) >= 4:  # a forward passes two (windows, frames); older ones are gone
            self._cache.clear()
        self._cache[key] = (cu_seqlens, runs)  # the tensor is held, so its id is not reused while cached
        return runs


def _batched_forward(rotary, attention, runs: _Runs):
    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb=None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        if position_embeddings is None:
            raise ValueError("the batched vision attention needs the tower's position_embeddings (cos, sin); this "
                             "transformers version passed none")
        s = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)  # [S, H, Dh]
        out = torch.empty_like(v)
        scaling = getattr(self, "scaling", q.shape[-1] ** -0.5)
        for start, length, count in runs(cu_seqlens):
            end = start + length * count
            batch = [t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]  # [n, H, L, D]
            o, _ = attention(self, *batch, attention_mask=None, scaling=scaling, dropout=0.0, is_causal=False)
            out[start:end] = o.reshape(length * count, *o.shape[2:])  # o: [n, L, H, Dh]
        return self.proj(out.reshape(s, -1))

    return forward
