"""Weighted k-means (Lloyd) for both memory modes, each in its own arithmetic.

- `empty="keep"` (paper mode): float32 throughout, distances by the expansion |x|^2 - 2 x.c + |c|^2 (one matrix
  product) and means as one matrix product, the centroids rounded to the data dtype once at the end: the most accurate
  and the fastest of the two. A cluster left empty keeps its previous centroid with weight 0. The loop always runs
  `max_iter` iterations and freezes once converged, so there is no host synchronisation at all.
- `empty="python_random"` (official mode): the released arithmetic, in the data dtype (fp16 for the released
  checkpoint): distances from explicit differences, squared and summed, then square-rooted; each cluster's mean a
  masked sum over its members divided by their summed weight, cluster by cluster; the movement a sum of per-cluster
  norms added one after another. So ties at the last bit of a static or repetitive stream resolve as they did there. An
  empty cluster is refilled with `data[random.randint(0, T-1)]`, one draw of Python's `random` per empty cluster in
  increasing cluster order, and the loop breaks on convergence. This needs the host once per iteration.

Convergence rule (both): when the summed centroid movement of an iteration is below `tol`, the centroids of that
iteration's *input* are kept, and the labels/weights of that iteration's assignment are returned. If the loop runs out
of iterations, the last update is returned with the labels/weights of the assignment before it.

Every result also says what each centroid is an average of (`sources`), so that a cluster that ends empty (weight 0)
can still say which frames its kept centroid shows: the memories take their time spans from it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Literal

import torch

EmptyPolicy = Literal["keep", "python_random"]
log = logging.getLogger(__name__)

_BASES: dict[tuple, torch.Tensor] = {}  # fingerprint bases by (row length, device): constants, not memory state
_MAX_PRINT_VALUES = 1 << 20  # int16 values per row for which every fingerprint sum stays below 2^53


def fingerprints(points: torch.Tensor) -> torch.Tensor:
    """[..., T, F] -> [..., T, 4] float64: four integer fingerprints of each row's bits, equal for rows equal bit for
    bit.

    A row's bytes are read as int16 values (|v| <= 2^15) and multiplied by a fixed table of random integers below 2^17
    (drawn once per row length from a seeded generator, so that no linear pattern of the values, such as a second
    difference, is invisible to it): every product and partial sum is an integer below 2^52 for rows of up to 2^20
    values, so the float64 matrix product is exact whatever its summation order, and bit-equal rows get equal
    fingerprints. Two different rows agree on one fingerprint with probability at most 2^-17, on all four at most
    2^-68. One pass over the points, where comparing rows pairwise reads them T times."""
    bits = points.contiguous().view(torch.int16)
    n = bits.shape[-1]
    if n > _MAX_PRINT_VALUES:
        raise ValueError(f"fingerprints take rows of at most {_MAX_PRINT_VALUES} int16 values, got {n}")
    return bits.double() @ _fingerprint_base(n, bits.device)


def _fingerprint_base(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _BASES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fingerprint table is made on the first call, which must not be inside a CUDA graph "
                               "capture (run the function once before capturing it)")
        table = torch.randint(0, 1 << 17, (n, 4), generator=torch.Generator().manual_seed(0x5F3759DF))
        _BASES[key] = table.double().to(device)
    return _BASES[key]


def exact_copies(points: torch.Tensor) -> torch.Tensor:
    """[..., T, F] -> [..., T, T] bool: which points are equal bit for bit (by their `fingerprints`)."""
    prints = fingerprints(points)
    return (prints[..., :, None, :] == prints[..., None, :, :]).all(-1)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, F] in the data dtype
    weights: torch.Tensor  # [K] float32, summed point weights of each cluster (last assignment)
    labels: torch.Tensor  # [T] int64, cluster of each point (last assignment)
    sources: torch.Tensor  # [K, T] float32: centroid k = sum_t sources[k, t] x_t (up to rounding); rows sum to 1


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[..., T, F], [..., K, F] -> [..., T, K] squared Euclidean distances, float32, via |x|^2 - 2 x.c + |c|^2 (clamped
    at 0); leading dimensions are a batch of independent problems."""
    if x.dtype in (torch.float16, torch.bfloat16) and c.dtype == x.dtype and x.dim() <= 3 and _half_products(x.device):
        return _half_squared_distances(x, c)
    x = x.float()
    c = c.float()
    d = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.transpose(-1, -2)) + (c * c).sum(-1)[..., None, :]
    return d.clamp_min_(0.0)


_HALF_PRODUCTS: dict[torch.device, bool] = {}  # whether a device's matrix products take out_dtype=float32


def _half_products(device: torch.device) -> bool:
    """Whether half-precision matrix products on `device` can return float32 (`out_dtype`): CUDA builds that have it,
    asked once per device, outside any graph capture (inside one, the float32 path runs)."""
    if device.type != "cuda":
        return False
    if device not in _HALF_PRODUCTS:
        if torch.cuda.is_current_stream_capturing():
            return False
        one = torch.ones(1, 1, dtype=torch.float16, device=device)
        try:
            _HALF_PRODUCTS[device] = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            log.warning("this build's matrix products take no out_dtype: half-precision distances copy to float32")
            _HALF_PRODUCTS[device] = False
    return _HALF_PRODUCTS[device]


def _half_squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`squared_distances` of half-precision operands on CUDA, read as they are: a product of two fp16 or bf16 values
    is exact in float32, so a matrix product that accumulates in float32 gives the float32 distances (up to summation
    order) with no float32 copy of either operand (a memory's ring of frames is read once, not copied twice)."""
    if x.dim() == 2:
        cross = torch.mm(x, c.T, out_dtype=torch.float32)
    else:
        cross = torch.bmm(x, c.transpose(1, 2), out_dtype=torch.float32)
    xx = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
    cc = torch.linalg.vector_norm(c, dim=-1, dtype=torch.float32).square()
    return (xx[..., :, None] - 2.0 * cross + cc[..., None, :]).clamp_min_(0.0)


def released_distances(x: torch.Tensor, c: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """[T, F], [K, F] -> [T, K] Euclidean distances in the data dtype, as released: sqrt(sum((x - c)^2)) from explicit
    differences (identical points at exactly 0), in blocks of rows so that no block holds more than `max_elements`
    differences (each distance is reduced alone, so blocks do not change a bit)."""
    rows = max(1, max_elements // max(1, c.numel()))
    return torch.cat([(x[i : i + rows, None] - c[None]).square().sum(-1).sqrt() for i in range(0, x.shape[0], rows)])


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
    if empty not in ("keep", "python_random"):
        raise ValueError(f"empty must be 'keep' or 'python_random', got {empty!r}")
    if empty == "python_random" and weights is not None and not bool((w > 0).all()):  # released callers pass none
        raise ValueError(f"empty='python_random' needs positive weights, got a minimum of {float(w.min())}")
    if t <= k:
        return KMeansResult(data, w, torch.arange(t, device=data.device), torch.eye(t, device=data.device))
    if init_indices is None:
        init_indices = torch.randperm(t, device=data.device, generator=generator)[:k]
    elif init_indices.shape != (k,):
        raise ValueError(f"init_indices must have shape [{k}], got {tuple(init_indices.shape)}")
    if empty == "keep":
        return lloyd_frozen(data, k, w, init_indices, max_iter, tol)
    return _lloyd_released(data, k, w, init_indices, max_iter, tol)


def _onehot(index: torch.Tensor, n: int) -> torch.Tensor:
    """[..., m] -> [..., m, n] float32; a comparison, not F.one_hot, which validates its input on the host (a
    synchronisation)."""
    return (index[..., None] == torch.arange(n, device=index.device)).to(torch.float32)


def lloyd_frozen(x_in: torch.Tensor, k: int, w: torch.Tensor, init: torch.Tensor, max_iter: int,
                 tol: float) -> KMeansResult:
    """The `empty="keep"` loop of `weighted_kmeans` for points [..., T, F], weights [..., T] and seeds [..., K]:
    leading dimensions are a batch of independent problems, each frozen once it has converged."""
    x = x_in.float()
    t = x.shape[-2]
    c = x.gather(-2, init[..., None].expand(*init.shape, x.shape[-1]))  # [..., K, F]
    src = _onehot(init, t)  # [..., K, T]
    done = torch.zeros(x.shape[:-2], dtype=torch.bool, device=x.device)[..., None, None]
    labels_out = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    wsum_out = torch.zeros(*x.shape[:-2], k, device=x.device)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(max_iter):
        labels = squared_distances(x, c).argmin(dim=-1)  # first index wins ties
        member = (_onehot(labels, k) * w[..., None]).transpose(-1, -2)  # [..., K, T]
        wsum = member.sum(-1)
        live = (wsum > 0)[..., None]
        new = torch.where(live, (member @ x) / wsum.clamp_min(tiny)[..., None], c)
        new_src = torch.where(live, member / wsum.clamp_min(tiny)[..., None], src)
        converged = ((new - c).norm(dim=-1).sum(-1) < tol)[..., None, None]
        labels_out = torch.where(done[..., 0], labels_out, labels)
        wsum_out = torch.where(done[..., 0], wsum_out, wsum)
        keep = done | converged
        c = torch.where(keep, c, new)
        src = torch.where(keep, src, new_src)
        done = keep
    return KMeansResult(c.to(x_in.dtype), wsum_out, labels_out, src)


def _lloyd_released(x, k, w_in, init, max_iter, tol) -> KMeansResult:
    """The released loop in the data dtype (module docstring). Member lists come to the host once per iteration
    (the released code reads each cluster's mask there too); `x[index]` gathers the same rows `x[mask]` does."""
    t = x.shape[0]
    w = w_in.to(x.dtype)
    c = x[init]
    src = _onehot(init, t)
    labels = wsum = None
    for _ in range(max_iter):
        labels = released_distances(x, c).argmin(dim=1)  # first index wins ties
        members = [[] for _ in range(k)]
        for i, j in enumerate(labels.tolist()):
            members[j].append(i)
        flat = torch.tensor([i for idx in members for i in idx], device=x.device)  # one copy to the device
        new = torch.empty_like(c)
        wsum = torch.zeros(k, dtype=x.dtype, device=x.device)
        member = _onehot(labels, k).T * w_in.float()[None, :]  # [K, T]
        new_src = member / member.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        start, refill = 0, []
        for j, idx in enumerate(members):
            if idx:
                index = flat[start : start + len(idx)]
                start += len(idx)
                wsum[j] = w[index].sum()
                new[j] = (w[index][:, None] * x[index]).sum(0) / wsum[j]
            else:
                refill.append((j, random.randint(0, t - 1)))  # drawn in cluster order, as released
        if refill:  # copies, so one batched write is the same as one per cluster (a static scene empties most)
            js, rs = torch.tensor(refill, device=x.device).T
            new[js] = x[rs]
            new_src[js, rs] = 1.0
        diff = sum((c - new).norm(dim=1).cpu().unbind())  # one norm per cluster, added in cluster order
        if diff < tol:
            break
        c, src = new, new_src
    return KMeansResult(c, wsum.float(), labels, src)
