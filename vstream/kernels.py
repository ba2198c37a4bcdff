# size _gram_kmeans_kernel: a Triton kernel is one GPU program; its k-means loop keeps tiles in registers
"""Fused Triton kernels of the CUDA fast path: the decoder's element-wise work and the memory's k-means loop.

Each kernel replaces a run of small PyTorch kernels whose launches, not their bytes, cost the time:
- `rms_norm`: the residual add and transformers' RMSNorm (float32 statistics, rounding to the model dtype before the
  weight) in one pass over a row, instead of about eight kernels.
- `rope_to_cache`: rotary embedding of q and k read from the fused q/k/v product, q written in the layout attention
  reads, k and v written into the static cache at their positions, which the kernel reads from a device tensor (so a
  graph-captured decode step needs no host value).
- `silu_mul`: SiLU of the gate times the up projection, from the fused gate/up product.
- `gram_kmeans`: seeding and every Lloyd iteration of the memory's weighted k-means in one program, on the points' Gram
  matrix: centroids stay weighted means of points (A @ x with A [K, T]), so distances, movements and seeds need only
  G = x x^T [T, T] and which points are exact copies, and ten iterations run in one launch instead of a few hundred.
  A is handed back: it says what each centroid averages, an empty cluster's kept centroid too.

The arithmetic follows the PyTorch ops it replaces, rounding to the storage dtype where they round, so fused and unfused
paths agree to the last bit in most elements and to rounding elsewhere; tests compare them on the GPU and, through
Triton's interpreter, on the CPU. Nothing here runs without Triton: `available(device)` says whether the callers may use
these kernels, and they keep their PyTorch path otherwise.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the callers keep their PyTorch path
    triton = None

MAX_KMEANS_POINTS = 32  # gram_kmeans works on one [32, 32] tile: up to 32 points and 32 clusters


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on `device`: CUDA with Triton, or any device under Triton's interpreter.
    VSTREAM_KERNELS=0 in the environment turns them off (the PyTorch paths run instead), for comparisons."""
    if triton is None or os.environ.get("VSTREAM_KERNELS", "1") == "0":
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        if HAS_RES:  # x <- x + residual, rounded to the storage dtype as torch's add does, and kept in x
            r = tl.load(res_ptr + row + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row + cols, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / n_cols
        h = (h / tl.sqrt_rn(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row + cols, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)

    # Integer arguments that vary between calls are not specialised on (Triton would compile a variant for 1 and for
    # multiples of 16): a prompt of a new length must not compile anything while a person waits for the answer.
    @triton.jit(do_not_specialize=["seq"])
    def _rope_to_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
        seq, row_stride, cache_head_stride, cache_pos_stride,
        HQ: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)  # q heads first, then k/v heads
        pos = tl.load(pos_ptr) + s
        half = tl.arange(0, DH // 2)
        dtype = qkv_ptr.dtype.element_ty
        cos1 = tl.load(cos_ptr + pos * DH + half).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * DH + DH // 2 + half).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * DH + half).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * DH + DH // 2 + half).to(tl.float32)
        base = qkv_ptr + s.to(tl.int64) * row_stride + h * DH  # this head's slice of the q|k|v row
        x1 = tl.load(base + half).to(tl.float32)
        x2 = tl.load(base + DH // 2 + half).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the storage dtype as in the unfused ops
        y1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        y2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        if h < HQ:  # q: [HQ, seq, DH]
            q_out = q_ptr + (h * seq + s).to(tl.int64) * DH
            tl.store(q_out + half, y1)
            tl.store(q_out + DH // 2 + half, y2)
        else:  # k and v of head j at cache position pos: cache [HKV, S_max, DH] of this layer
            at = ((h - HQ) * cache_head_stride + pos * cache_pos_stride).to(tl.int64)
            tl.store(k_ptr + at + half, y1)
            tl.store(k_ptr + at + DH // 2 + half, y2)
            v = base + HKV * DH
            tl.store(v_ptr + at + half, tl.load(v + half))
            tl.store(v_ptr + at + DH // 2 + half, tl.load(v + DH // 2 + half))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (act * u).to(dtype), mask=mask)

    @triton.jit(do_not_specialize=["t", "k"])
    def _gram_kmeans_kernel(
        g_ptr, n_ptr, same_ptr, w_ptr, a_ptr, wsum_ptr, labels_ptr, t, k, tol,
        MAX_ITER: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    ):
        b = tl.program_id(0)  # one problem of the batch per program
        g_ptr += b * t * t
        same_ptr += b * t * t
        n_ptr += b * t
        w_ptr += b * t
        labels_ptr += b * t
        a_ptr += b * k * t
        wsum_ptr += b * k
        rows = tl.arange(0, BT)  # points
        cols = tl.arange(0, BT)
        ks = tl.arange(0, BK)  # clusters
        valid = rows < t
        valid_k = ks < k
        g = tl.load(g_ptr + rows[:, None] * t + cols[None, :], mask=valid[:, None] & (cols[None, :] < t), other=0.0)
        w = tl.load(w_ptr + rows, mask=valid, other=0.0)
        eye = rows[:, None] == cols[None, :]
        gd = tl.load(n_ptr + rows, mask=valid, other=0.0)  # [BT] squared norms
        gd_c = tl.load(n_ptr + cols, mask=cols < t, other=0.0)  # the same, along columns
        inf = float("inf")

        # seeds: the k points that cost most to merge into their nearest other point (weight x squared distance);
        # |a|^2 - 2 a.b + |b|^2 summed in the order `squared_distances` sums it, so exact ties resolve alike; exact
        # copies (`same`) are at 0, and a point's later copies are not its neighbours (`seed_indices`)
        same = tl.load(same_ptr + rows[:, None] * t + cols[None, :], mask=valid[:, None] & (cols[None, :] < t), other=0)
        same = same != 0
        d = tl.where(same, 0.0, tl.maximum((gd[:, None] - 2.0 * g) + gd_c[None, :], 0.0))
        d = tl.where(eye | (cols[None, :] >= t) | (same & (cols[None, :] > rows[:, None])), inf, d)
        nearest = tl.min(d, axis=1)
        cost = tl.where(valid, tl.where(w > 0, w * nearest, 0.0), -inf)  # [BT]
        cost_c = tl.sum(tl.where(eye, cost[:, None], 0.0), axis=0)  # cost along columns (-inf rows add 0 elsewhere)
        cost_c = tl.where(cols < t, cost_c, -inf)
        ahead = ((cost_c[None, :] > cost[:, None])
                 | ((cost_c[None, :] == cost[:, None]) & (cols[None, :] < rows[:, None])))
        rank = tl.sum(ahead.to(tl.int32), axis=1)  # [BT] position in a stable descending sort
        rank_c = tl.sum(tl.where(eye, rank[:, None], 0), axis=0)
        a = ((ks[:, None] == rank_c[None, :]) & valid_k[:, None] & (cols[None, :] < t)).to(tl.float32)  # [BK, BT]

        done = tl.full([], 0, tl.int32)
        labels_out = tl.zeros([BT], dtype=tl.int32)
        wsum_out = tl.zeros([BK], dtype=tl.float32)
        for _ in tl.static_range(MAX_ITER):
            ga = tl.dot(g, tl.trans(a), input_precision="ieee")  # [BT, BK] = x . c_k
            cn = tl.sum(tl.trans(ga) * a, axis=1)  # [BK] = |c_k|^2
            dist = tl.maximum((gd[:, None] - 2.0 * ga) + cn[None, :], 0.0)
            dist = tl.where(valid_k[None, :], dist, inf)
            labels = tl.argmin(dist, axis=1)  # first cluster wins ties
            onehot = tl.where((labels[:, None] == ks[None, :]) & valid[:, None], w[:, None], 0.0)  # [BT, BK]
            wsum = tl.sum(onehot, axis=0)  # [BK]
            means = tl.trans(onehot) / tl.maximum(wsum, 1.1754943508222875e-38)[:, None]  # [BK, BT]
            new = tl.where((wsum > 0)[:, None], means, a)
            delta = new - a
            moved = tl.sum(tl.trans(tl.dot(g, tl.trans(delta), input_precision="ieee")) * delta, axis=1)
            converged = tl.sum(tl.sqrt_rn(tl.maximum(moved, 0.0)), axis=0) < tol
            labels_out = tl.where(done != 0, labels_out, labels)
            wsum_out = tl.where(done != 0, wsum_out, wsum)
            keep = (done != 0) | converged
            a = tl.where(keep, a, new)
            done = keep.to(tl.int32)
        tl.store(a_ptr + ks[:, None] * t + cols[None, :], a, mask=valid_k[:, None] & (cols[None, :] < t))
        tl.store(wsum_ptr + ks, wsum_out, mask=valid_k)
        tl.store(labels_ptr + rows, labels_out.to(tl.int64), mask=valid)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x [..., H] (transformers' arithmetic). With `residual`, first x += residual in place (x then holds the
    sum the next layer adds to). Returns the normed rows, a new tensor."""
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        raise ValueError("rms_norm needs contiguous inputs")
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, n, eps,
                              HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return out


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [S, (heads + 2 kv_heads) head_dim] at positions start[0] + [0, S); cos/sin [S_max, head_dim];
    k_cache/v_cache [kv_heads, S_max, head_dim] of one layer. Writes rotated k and v into the caches at those positions
    and returns the rotated q as [1, heads, S, head_dim]."""
    s = qkv.shape[0]
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("rope_to_cache needs rows with unit stride and contiguous cos/sin tables")
    q = torch.empty(1, heads, s, head_dim, device=qkv.device, dtype=qkv.dtype)
    _rope_to_cache_kernel[(s, heads + kv_heads)](
        qkv, cos, sin, start, q, k_cache, v_cache, s, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        HQ=heads, HKV=kv_heads, DH=head_dim, num_warps=1,
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
    if not gate_up.is_contiguous():
        raise ValueError("silu_mul needs a contiguous input")
    n = gate_up.shape[-1] // 2
    rows = gate_up.numel() // gate_up.shape[-1]
    out = torch.empty(*gate_up.shape[:-1], n, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out


def gram_kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, max_iter: int, tol: float, same: torch.Tensor):
    """Seeded weighted k-means of points [..., T, F] with weights [..., T], on their Gram matrix: the result of
    `kmeans.weighted_kmeans` with `seed_indices` seeds and `empty="keep"`, up to float32 rounding. Leading dimensions
    are a batch of independent problems, one program each. `same` [..., T, T] bool says which points are exact copies of
    each other (`kmeans.exact_copies`), as `seed_indices` takes them.

    Returns (centroids [..., K, F] float32, cluster weights [..., K] float32, labels [..., T] int64, sources
    [..., K, T] float32: the coefficients of each centroid over the points, as `KMeansResult.sources`)."""
    t = points.shape[-2] if points.dim() >= 2 else 0
    if points.dim() < 2 or weights.shape != points.shape[:-1] or not 1 <= k < t <= MAX_KMEANS_POINTS:
        raise ValueError(f"gram_kmeans needs points [..., T, F], weights [..., T] and 1 <= k < T <= "
                         f"{MAX_KMEANS_POINTS}, got {tuple(points.shape)}, {tuple(weights.shape)}, k={k}")
    batch = points.shape[:-2]
    x = points.float().reshape(-1, t, points.shape[-1])  # [B, T, F]
    gram = x @ x.transpose(1, 2)  # [B, T, T]
    norms = (x * x).sum(-1)  # [B, T], as `squared_distances` takes them
    same = same.reshape(-1, t, t).to(torch.int8)  # [B, T, T]
    n = x.shape[0]
    coef = torch.empty(n, k, t, device=x.device, dtype=torch.float32)  # centroid k = sum_t coef[k, t] x_t
    wsum = torch.empty(n, k, device=x.device, dtype=torch.float32)
    labels = torch.empty(n, t, device=x.device, dtype=torch.long)
    _gram_kmeans_kernel[(n,)](gram, norms, same, weights.float().reshape(n, t).contiguous(), coef, wsum, labels, t, k,
                              tol, MAX_ITER=max_iter, BT=MAX_KMEANS_POINTS, BK=MAX_KMEANS_POINTS, num_warps=4)
    centroids = coef @ x
    return (centroids.reshape(*batch, k, -1), wsum.reshape(*batch, k), labels.reshape(*batch, t),
            coef.reshape(*batch, k, t))
