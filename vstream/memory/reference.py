"""Slow, literal reference implementations of both memory modes, for testing the fast ones (and for costing the
released algorithm in benchmarks). Python loops, growing lists and host reads are deliberate here: each function follows
its specification line by line. Nothing in the package calls this module on a real path.
"""

from __future__ import annotations

import math
import random

import torch

from vstream.config import MemoryConfig
from vstream.encoder.pooling import pool_grid
from vstream.memory.attention import AbstractAttention


# -------------------------------------------------------------- official mode (released offline and streaming)


def ref_official_kmeans(x_in: torch.Tensor, k: int, max_iter: int = 10, tol: float = 1e-4):
    """[T, P, D] -> (centroids [K, P, D], weights [K], labels [T]); the released loop with a mask per cluster."""
    t = x_in.shape[0]
    w = torch.ones(t, dtype=x_in.dtype, device=x_in.device)
    if t <= k:
        return x_in, w, torch.arange(t)
    x = x_in.reshape(t, -1)
    perm = torch.randperm(t, device=x.device)[:k]
    c = x[perm]
    label = wsum = None
    for _ in range(max_iter):
        d = torch.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1))  # [T, K, F] materialised
        label = d.argmin(dim=1)
        new = torch.empty_like(c)
        wsum = torch.zeros(k, dtype=x.dtype, device=x.device)
        for j in range(k):
            mask = label == j
            wsum[j] = w[mask].sum()
            if wsum[j] > 0:
                new[j] = (w[mask][:, None] * x[mask]).sum(0) / wsum[j]
            else:
                new[j] = x[random.randint(0, t - 1)]
        diff = sum(torch.norm(c[j] - new[j]) for j in range(k))
        if diff < tol:
            break
        c = new
    return c.view(k, *x_in.shape[1:]), wsum, label


def ref_retrieve_as_coded(long: torch.Tensor, weights: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(weights, descending=True)
    keys = long[order][:k]
    out = []
    for key in keys:
        dists = [torch.norm(long[t] - key).item() for t in range(long.shape[0])]
        out.append(min(range(len(dists)), key=lambda i: (dists[i], i)))
    return out


def ref_turing_compress(a: torch.Tensor, length: int, ratio: float, attention: AbstractAttention) -> torch.Tensor:
    """[L, 1, D] -> [min(L, length), 1, D], the released chunked update written out for one token per frame."""
    if a.shape[0] <= length:
        return a
    d = a.shape[-1]
    m = a[:length].reshape(length, d)
    h, wdtype = attention.attention_dim, attention.q_proj.weight.dtype
    for i in range(length, a.shape[0], length):
        x = a[i : min(i + length, a.shape[0])].reshape(-1, d)
        # the projections in the attention's dtype, everything after them in the memory's (fp16 in the release)
        s = (attention.q_proj(m.to(wdtype)) @ attention.k_proj(x.to(wdtype)).T / math.sqrt(h)).to(a.dtype)
        wt = ratio * torch.softmax(s, dim=-1)
        decay = wt.sum(dim=1, keepdim=True)
        m = m * (1 - decay) + wt @ x
    return m.reshape(length, 1, d)


def ref_official_offline(features: torch.Tensor, cfg: MemoryConfig, attention: AbstractAttention) -> torch.Tensor:
    """`compress_temporal_features` on [T, P, D] features at the encoder grid -> tokens [N, D]."""
    f = pool_grid(features, cfg.spatial_size)
    t = f.shape[0]
    c = min(1, t)
    cur = f[t - c :]
    long_f = f[: t - c]
    if long_f.shape[0] == 0:
        return cur.flatten(0, 1)
    long = pool_grid(long_f, cfg.temporal_size)
    abs_in = pool_grid(long_f, cfg.abstract_size)
    tem, w, _ = ref_official_kmeans(long, cfg.temporal_length, cfg.kmeans_iters, cfg.kmeans_tol)
    idx = ref_retrieve_as_coded(long, w, cfg.retrieved_length)
    cur = torch.cat([f[idx], cur])
    abs_m = ref_turing_compress(abs_in, cfg.abstract_length, cfg.update_ratio, attention)
    return torch.cat([abs_m.flatten(0, 1), tem.flatten(0, 1), cur.flatten(0, 1)])


class RefOfficialStreaming:
    """`embed_video_streaming` with its list state [cur, long, abs, buffer] and the unbounded buffer."""

    def __init__(self, cfg: MemoryConfig, attention: AbstractAttention):
        self.cfg, self.attention, self.state = cfg, attention, None

    def update(self, features: torch.Tensor) -> None:
        c = self.cfg
        f = pool_grid(features, c.spatial_size)
        n = f.shape[0]
        cur = f[n - 1 :]
        long = pool_grid(f, c.temporal_size)
        a = pool_grid(f, c.abstract_size)
        if self.state is None:
            self.state = [cur, long, a, f.clone()]
            return
        _, long_old, a_old, buf_old = self.state
        buf = torch.cat([buf_old, f])
        lc = torch.cat([long_old, long])
        cen, w, _ = ref_official_kmeans(lc, c.temporal_length, c.kmeans_iters, c.kmeans_tol)
        idx = ref_retrieve_as_coded(lc, w, c.retrieved_length)
        cur = torch.cat([buf[idx], cur])
        m = ref_turing_compress(torch.cat([a_old, a]), c.abstract_length, c.update_ratio, self.attention)
        self.state = [cur, cen, m, buf]

    def read(self) -> torch.Tensor:
        cur, long, a, _ = self.state
        return torch.cat([a.flatten(0, 1), long.flatten(0, 1), cur.flatten(0, 1)])


# -------------------------------------------------------------- paper mode (equations 1-5, vstream's documented rules)


class RefPaperMemory:
    """Equations (1)-(5) with lists: buffer newest-first, clusters as [centroid, weight, first, last, mean-time]."""

    def __init__(self, cfg: MemoryConfig, attention: AbstractAttention):
        self.cfg, self.attention = cfg, attention
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (P_spa map, P_tem map, time), newest first
        self.clusters: list[list] = []
        self.abstract: list[torch.Tensor] = []
        self.retrieved: list[tuple[torch.Tensor, float]] = []

    def update(self, features: torch.Tensor, times: list[float]) -> None:
        c = self.cfg
        spa = pool_grid(features, c.spatial_size).double()
        tem = pool_grid(spa, c.temporal_size)
        abs_ = pool_grid(spa, c.abstract_size)
        for i in range(spa.shape[0]):  # (1) push, newest first, bounded
            self.buffer = [(spa[i], tem[i], times[i])] + self.buffer
            self.buffer = self.buffer[: c.buffer_length]
        points = [[x[0], x[1], x[2], x[3], x[4]] for x in self.clusters]
        points += [[tem[i], 1.0, times[i], times[i], times[i]] for i in range(tem.shape[0])]
        self.clusters = points if len(points) <= c.temporal_length else self._kmeans(points)  # (3)
        self._abstract(abs_)  # (4)
        self._retrieve()  # (5)

    def _kmeans(self, points: list[list]) -> list[list]:
        k, n = self.cfg.temporal_length, len(points)
        dist = lambda a, b: float(((a - b) ** 2).sum())  # noqa: E731
        def cost(i):  # weight x distance to the nearest other point; a point's own later copies do not count
            others = [dist(points[i][0], points[j][0]) for j in range(n)
                      if j < i or (j > i and not torch.equal(points[i][0], points[j][0]))]
            return 0.0 if points[i][1] == 0 else points[i][1] * min(others, default=math.inf)

        cost = [cost(i) for i in range(n)]
        seeds = sorted(range(n), key=lambda i: (-cost[i], i))[:k]
        cent = [points[i][0].clone() for i in seeds]
        source = [{i: 1.0} for i in seeds]  # what each centroid averages: {point: coefficient}
        labels = None
        for _ in range(self.cfg.kmeans_iters):
            labels = [min(range(k), key=lambda j: (dist(p[0], cent[j]), j)) for p in points]
            new, new_source = [], []
            for j in range(k):
                members = [i for i in range(n) if labels[i] == j]
                wsum = sum(points[i][1] for i in members)
                if wsum > 0:  # otherwise empty: the cluster keeps its centroid
                    new.append(sum(points[i][1] * points[i][0] for i in members) / wsum)
                    new_source.append({i: points[i][1] / wsum for i in members if points[i][1] > 0})
                else:
                    new.append(cent[j])
                    new_source.append(source[j])
            if sum(float(torch.norm(a - b)) for a, b in zip(cent, new)) < self.cfg.kmeans_tol:
                break
            cent, source = new, new_source
        out = []
        for j in range(k):
            members = [i for i in range(n) if labels[i] == j and points[i][1] > 0]
            wsum = sum(points[i][1] for i in members)
            # a cluster with weight spans its members; an empty one the points its kept centroid averages
            span = {i: points[i][1] / wsum for i in members} if wsum > 0 else source[j]
            first = min(points[i][2] for i in span)
            last = max(points[i][3] for i in span)
            out.append([cent[j], wsum, first, last, sum(c * points[i][4] for i, c in span.items())])
        return sorted(out, key=lambda x: x[4])

    @torch.no_grad()
    def _abstract(self, abs_: torch.Tensor) -> None:
        c = self.cfg
        rest = []
        for x in abs_:
            (self.abstract.append(x) if len(self.abstract) < c.abstract_length else rest.append(x))
        if not rest:
            return
        m = torch.stack(self.abstract)  # [K, P, D]
        x = torch.stack(rest)  # [n, P, D]
        att = self.attention
        h = att.attention_dim
        out = m.clone()
        for p in range(m.shape[1]):
            q = att.q_proj(m[:, p].to(att.q_proj.weight.dtype)).double()
            kx = att.k_proj(x[:, p].to(att.k_proj.weight.dtype)).double()
            a = torch.softmax(q @ kx.T / math.sqrt(h), dim=0)  # [K, n]: each new token over the slots
            for i in range(m.shape[0]):
                gate = 1.0
                for j in range(x.shape[0]):
                    gate *= 1 - c.update_ratio * float(a[i, j])
                gate = 1 - gate
                target = sum(float(a[i, j]) * x[j, p] for j in range(x.shape[0])) / float(a[i].sum())
                out[i, p] = m[i, p] + gate * (target - m[i, p])
        self.abstract = list(out)

    def _retrieve(self) -> None:
        r = min(self.cfg.retrieved_length, len(self.clusters))
        top = sorted(range(len(self.clusters)), key=lambda j: (-self.clusters[j][1], j))[:r]
        found = []
        for j in top:
            cen = self.clusters[j][0]
            dists = [float(((b[1] - cen) ** 2).sum()) for b in self.buffer]
            tied = [b for b, d in enumerate(dists) if d <= min(dists) * (1 + 1e-5) + 1e-12]
            best = max(tied, key=lambda b: self.buffer[b][2])  # near-ties: the most recent frame
            found.append((self.buffer[best][0], self.buffer[best][2]))
        self.retrieved = sorted(found, key=lambda x: x[1])

    def read(self) -> torch.Tensor:
        c = self.cfg
        spatial = list(reversed(self.buffer[: c.spatial_length]))
        parts = [x for x in self.abstract] + [cl[0] for cl in self.clusters]
        parts += [m for m, _ in self.retrieved] + [m for m, _, _ in spatial]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
