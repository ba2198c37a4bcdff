"""Weighted k-means (Lloyd) as batched tensor work.

One function serves both memory modes:
- `empty="keep"` (paper mode): a cluster left empty keeps its previous centroid with weight 0. The loop always runs
  `max_iter` iterations and freezes once converged, so there is no host synchronisation at all.
- `empty="python_random"` (official mode): an empty cluster is refilled with `data[random.randint(0, T-1)]`, one draw
  of Python's `random` per empty cluster in increasing cluster order, and the loop breaks on convergence, as the
  released code does. Both need the host, so this policy synchronises once per iteration. Distances are taken from
  explicit differences, as released, so that identical frames (a paused stream) tie exactly as they did there.

Convergence rule (both policies): when the summed centroid movement of an iteration is below `tol`, the centroids of
that iteration's *input* are kept, and the labels/weights of that iteration's assignment are returned. If the loop runs
out of iterations, the last update is returned with the labels/weights of the assignment before it.

Distances are computed in float32 whatever the data dtype; the centroids come back in the data dtype.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

EmptyPolicy = Literal["keep", "python_random"]


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, F] in the data dtype
    weights: torch.Tensor  # [K] float32, summed point weights of each cluster (last assignment)
    labels: torch.Tensor  # [T] int64, cluster of each point (last assignment)


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[T, F], [K, F] -> [T, K] squared Euclidean distances, float32, via |x|^2 - 2 x.c + |c|^2 (clamped at 0)."""
    x = x.float()
    c = c.float()
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def direct_distances(x: torch.Tensor, c: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """[T, F], [K, F] -> [T, K] Euclidean distances from explicit differences (identical points at exactly 0),
    float32, in blocks of rows so that no block holds more than `max_elements` differences."""
    c = c.float()
    rows = max(1, max_elements // max(1, c.numel()))
    return torch.cat([(x[i : i + rows].float()[:, None] - c[None]).square().sum(-1).sqrt() for i in range(0, x.shape[0], rows)])


def weighted_kmeans(
    data: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    init_indices: torch.Tensor | None = None,
    max_iter: int = 10,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    empty: EmptyPolicy = "keep",
) -> KMeansResult:
    """Cluster `data` [T, F] (point weights `weights` [T], default 1) into `k` clusters.

    With T <= k nothing is clustered: the points are returned as centroids with their own weights and labels 0..T-1.
    `init_indices` [k] picks the initial centroids; otherwise `torch.randperm(T, device=data.device,
    generator=generator)[:k]`, which, with no generator, draws from the same global generator as the released code.
    """
    if data.dim() != 2:
        raise ValueError(f"weighted_kmeans expects data of shape [T, F], got {tuple(data.shape)}")
    t = data.shape[0]
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    w = torch.ones(t, device=data.device) if weights is None else weights.float()
    if w.shape != (t,):
        raise ValueError(f"weights must have shape [{t}], got {tuple(w.shape)}")
    if t <= k:
        return KMeansResult(data, w, torch.arange(t, device=data.device))
    if init_indices is None:
        init_indices = torch.randperm(t, device=data.device, generator=generator)[:k]
    elif init_indices.shape != (k,):
        raise ValueError(f"init_indices must have shape [{k}], got {tuple(init_indices.shape)}")
    if empty == "keep":
        return _lloyd_frozen(data, k, w, init_indices, max_iter, tol)
    if empty == "python_random":
        return _lloyd_python_random(data, k, w, init_indices, max_iter, tol)
    raise ValueError(f"empty must be 'keep' or 'python_random', got {empty!r}")


def _assign(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor, k: int, exact: bool = False):
    """One assignment + update step: (labels [T], cluster weights [K], weighted means [K, F] (0 where empty)).

    `exact` measures distances from explicit differences, as the released code does, so that ties between identical
    points resolve the same way (first cluster wins); otherwise by the cheaper expansion."""
    dist = direct_distances(x, c) if exact else squared_distances(x, c)
    labels = dist.argmin(dim=1)  # first index wins ties
    # a comparison, not F.one_hot: one_hot validates its input on the host, which would synchronise
    onehot = (labels[:, None] == torch.arange(k, device=x.device)[None, :]).to(torch.float32) * w[:, None]  # [T, K]
    wsum = onehot.sum(0)
    means = (onehot.T @ x) / wsum.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return labels, wsum, means


def _lloyd_frozen(x_in, k, w, init, max_iter, tol) -> KMeansResult:
    x = x_in.float()
    c = x[init]
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    labels_out = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    wsum_out = torch.zeros(k, device=x.device)
    for _ in range(max_iter):
        labels, wsum, means = _assign(x, c, w, k)
        new = torch.where((wsum > 0)[:, None], means, c)
        converged = (new - c).norm(dim=1).sum() < tol
        labels_out = torch.where(done, labels_out, labels)
        wsum_out = torch.where(done, wsum_out, wsum)
        c = torch.where(done | converged, c, new)
        done = done | converged
    return KMeansResult(c.to(x_in.dtype), wsum_out, labels_out)


def _lloyd_python_random(x_in, k, w, init, max_iter, tol) -> KMeansResult:
    x = x_in.float()
    t = x.shape[0]
    c = x[init]
    labels = wsum = None
    for _ in range(max_iter):
        labels, wsum, new = _assign(x, c, w, k, exact=True)
        for j in (wsum == 0).nonzero().flatten().tolist():
            new[j] = x[random.randint(0, t - 1)]
        if float((new - c).norm(dim=1).sum()) < tol:
            break
        c = new
    return KMeansResult(c.to(x_in.dtype), wsum, labels)
