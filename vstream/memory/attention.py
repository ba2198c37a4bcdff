"""The abstract memory's semantic attention (paper eq. 4), with the released checkpoint's parameter layout.

The module holds q/k/v projections D -> h, an output projection h -> D and a LayerNorm, named as in the released
checkpoint (`model.attention_model.*`). Only q and k take part in either update rule; v/out/ln exist so that released
weights load with no unexpected keys.

Two update rules, both written for slots M [K, P, D] and new tokens X [n, P, D], one attention per token position p:
- `update_official`: M <- (1 - r) M + r softmax_n(q(M) k(X)^T / sqrt(h)) X. The softmax runs over the NEW tokens, so
  with a single new frame every slot gets the same update and q/k have no effect. It runs in the memory dtype, as
  released.
- `update_paper`: each new token distributes itself over the slots, A = softmax_K(q(M) k(X)^T / sqrt(h)); slot i moves
  towards the A-weighted mean of the new tokens with gate g_i = 1 - prod_j (1 - r A_ij). With one frame this is
  M_i <- (1 - r A_i) M_i + r A_i x: the slots that match the frame move most, the others keep what they hold. A chunk of
  n frames gives each slot the same total gate as n single-frame steps would with the same attention weights.
  It runs in float32 and rounds the slots to the memory dtype once.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AbstractAttention(nn.Module):
    def __init__(self, dim: int, attention_dim: int = 32):
        super().__init__()
        self.attention_dim = attention_dim
        self.q_proj = nn.Linear(dim, attention_dim)
        self.k_proj = nn.Linear(dim, attention_dim)
        self.v_proj = nn.Linear(dim, attention_dim)  # unused by both rules; part of the released layout
        self.out_proj = nn.Linear(attention_dim, dim)  # unused; released layout
        self.out_ln = nn.LayerNorm(dim, eps=1e-12)  # unused; released layout

    def scores(self, memory: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """memory [K, P, D], new [n, P, D] -> [P, K, n] scaled dot products of the q/k projections."""
        q = self.q_proj(memory.to(self.q_proj.weight.dtype))  # [K, P, h]
        k = self.k_proj(new.to(self.k_proj.weight.dtype))  # [n, P, h]
        return torch.einsum("kph,nph->pkn", q, k).float() / math.sqrt(self.attention_dim)

    def update_official(self, memory: torch.Tensor, new: torch.Tensor, ratio: float) -> torch.Tensor:
        """The released rule in the released arithmetic: scores, softmax, mixing and decay in the memory dtype (fp16
        for the released checkpoint), one token position at a time as 2-D products; returns the new slots [K, P, D].
        The projections run in the attention's dtype (the memory's, in a released model)."""
        wdtype, scale = self.q_proj.weight.dtype, math.sqrt(self.attention_dim)
        out = []
        for p in range(memory.shape[1]):  # P_abs^2 = 1 in the release
            m, x = memory[:, p], new[:, p]  # [K, D], [n, D]
            s = (self.q_proj(m.to(wdtype)) @ self.k_proj(x.to(wdtype)).T / scale).to(memory.dtype)  # [K, n]
            weight = ratio * torch.softmax(s, dim=-1)
            decay = weight.sum(dim=1, keepdim=True)  # equals r up to rounding
            out.append(m * (1 - decay) + weight @ x)
        return torch.stack(out, 1)

    def update_paper(self, memory: torch.Tensor, new: torch.Tensor, ratio: float) -> torch.Tensor:
        """The slot-competitive rule (module docstring); returns the new slots [K, P, D] in the memory dtype."""
        attn = torch.softmax(self.scores(memory, new), dim=1)  # [P, K, n], sums to 1 over slots
        mass = attn.sum(dim=-1)  # [P, K]
        target = torch.einsum("pkn,npd->kpd", attn, new.float()) / mass.clamp_min(1e-12).T[:, :, None]
        gate = 1 - torch.exp(torch.log1p(-ratio * attn).sum(dim=-1))  # [P, K]
        out = memory.float() + gate.T[:, :, None] * (target - memory.float())
        return out.to(memory.dtype)
