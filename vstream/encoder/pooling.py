"""Average pooling of square token grids: the pyramid grid -> P_spa -> P_tem and P_abs of the STAR memory.

Tokens are laid out row-major (token index = row * side + column, row = image y), as the vision tower emits them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_side(num_tokens: int) -> int:
    """Side of a square grid of `num_tokens` tokens; raises if the count is not a square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"expected a square grid of tokens, got {num_tokens} tokens")
    return side


def pool_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool `x` [B, g*g, D] to [B, size*size, D]; `size` must divide g. size == g returns `x` itself."""
    batch, tokens, dim = x.shape
    g = grid_side(tokens)
    if size == g:
        return x
    if size < 1 or g % size:
        raise ValueError(f"pool size {size} must divide the grid side {g}")
    if size == 1:
        return x.mean(dim=1, keepdim=True)
    k = g // size
    maps = x.transpose(1, 2).reshape(batch, dim, g, g)  # [B, D, g, g]
    pooled = F.avg_pool2d(maps, kernel_size=k, stride=k)  # [B, D, size, size]
    return pooled.flatten(2).transpose(1, 2)


def pyramid(x: torch.Tensor, spatial: int, temporal: int,
            abstract: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features [B, g*g, D] -> (spatial [B,P_spa^2,D], temporal [B,P_tem^2,D], abstract [B,P_abs^2,D]).

    The temporal and abstract levels are pooled from the spatial level (16 -> 8 -> 4 and 8 -> 1 for the paper's sizes).
    """
    spa = pool_grid(x, spatial)
    return spa, pool_grid(spa, temporal), pool_grid(spa, abstract)
