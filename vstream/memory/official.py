"""STAR memory in `official` mode: the released code's behaviour, so that its checkpoint sees what it was trained on.

Reproduced on purpose, quirks included:
- k-means without carried weights (old centroids count as one frame), random init from
  `torch.randperm(T, device=...)[:K]` on the global generator, empty clusters refilled with Python's `random`,
  10 iterations, break on summed movement < 1e-4 keeping the old centroids; centroid order = init order.
- retrieval that indexes frames with cluster ids (`retrieve_as_coded`), so retrieved frames come from the stream's
  first frames; ties follow `torch.argsort` on the memory dtype, as in the released code.
- the abstract update with the softmax over the new tokens, in chunks of N_abs after the first N_abs frames (offline)
  or one chunk per update (streaming).
- offline (`official_offline_memory`): the temporal/abstract memories see all frames but the last N_spa;
  streaming (`OfficialStreamingMemory`): they include the current frame, and the first chunk is stored raw.
- the released arithmetic: everything in the memory dtype (fp16 for the released checkpoint), k-means distances from
  explicit differences, each cluster's mean a masked sum divided by its summed weight, the abstract update's scores,
  softmax and mixing in that dtype (`kmeans.weighted_kmeans(empty="python_random")`, `update_official`). With the same
  seeds the memory equals the literal references of `memory/reference.py` bit for bit, static and repetitive
  streams included, where last-bit ties decide the clusters.

Added, not released: stream times. A cluster's span covers the frames it stands for; one that ends the k-means empty
(weight 0) spans the frames its centroid (a random refill or a kept centroid) averages, so no time is ever NaN.

Not reproduced: the unbounded buffer. Streaming retrieval can only reach stream frames 0..len(old + new)-1, so only the
first 2 * N_tem frames are kept; chunks are limited to N_tem frames (the released CLI sends one frame per update; a
first chunk over N_tem frames made the released memory exceed its token budget).
Random draws and the per-cluster means make this mode synchronise with the host once per k-means iteration.
"""

from __future__ import annotations

import torch

from vstream.config import MemoryConfig
from vstream.encoder.pooling import pyramid
from vstream.memory.attention import AbstractAttention
from vstream.memory.kmeans import weighted_kmeans
from vstream.memory.star import MemoryRead, StarMemoryBase, cluster_spans, span_sources

def retrieve_as_coded(long: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """The released retrieval: long [L, P, D], cluster weights [K] -> frame indices [min(k, K)].

    The heaviest cluster ids index *frames* of `long`; for each such frame the first frame at the smallest Euclidean
    distance is returned (itself, unless an identical frame comes earlier). Distances are norms of explicit
    differences in the memory dtype, key by key, so an identical frame is at distance exactly 0.
    """
    order = torch.argsort(weights, descending=True)
    keys = long[order][:k]
    return torch.stack([(long - key).flatten(1).norm(dim=1).argmin() for key in keys])  # first nearest frame per key


def turing_compress(slots: torch.Tensor, length: int, ratio: float, attention: AbstractAttention) -> torch.Tensor:
    """The released abstract memory over a sequence [L, P, D]: the first `length` items, then chunks of `length`."""
    if slots.shape[0] <= length:
        return slots
    memory = slots[:length]
    for i in range(length, slots.shape[0], length):
        memory = attention.update_official(memory, slots[i : i + length], ratio)
    return memory


def _official_kmeans(points: torch.Tensor, spans: torch.Tensor, cfg: MemoryConfig):
    """Released k-means on [T, P, D] with the points' time spans [T, 3] -> (result, the weights in the memory dtype
    (for argsort ties), the clusters' spans [K, 3]). Every point counts once for the spans, as for the weights; a
    cluster that ends empty spans the frames its centroid (a refill or a kept centroid) averages."""
    result = weighted_kmeans(
        points.flatten(1), cfg.temporal_length, max_iter=cfg.kmeans_iters, tol=cfg.kmeans_tol, empty="python_random"
    )
    ones = torch.ones(points.shape[0], device=points.device)
    return result, result.weights.to(points.dtype), cluster_spans(spans, span_sources(result, ones))


def official_offline_memory(
    features: torch.Tensor, times, cfg: MemoryConfig, attention: AbstractAttention
) -> MemoryRead:
    """`compress_temporal_features` for one video: features [T, grid^2 or P_spa^2, D], times [T] -> the memory."""
    if features.dim() != 3 or features.shape[0] == 0:
        raise ValueError(f"expected frame features [T>0, tokens, D], got {tuple(features.shape)}")
    c = cfg
    spa, tem, abs_ = pyramid(features, c.spatial_size, c.temporal_size, c.abstract_size)
    t = spa.shape[0]
    times = torch.as_tensor(times if times is not None else range(t), dtype=torch.float64, device=spa.device)
    cur_n = min(c.spatial_length, t)
    long_n = t - cur_n
    parts = {"abstract": spa[:0, :0], "temporal": spa[:0, :0], "retrieved": spa[:0, :0], "spatial": spa[long_n:]}
    spans = torch.zeros(0, 3, dtype=torch.float64, device=spa.device)
    weights = torch.zeros(0, device=spa.device)
    ret_times = times[:0]
    if long_n:
        long = tem[:long_n]
        result, w, spans = _official_kmeans(long, times[:long_n, None].expand(long_n, 3), c)
        idx = retrieve_as_coded(long, w, c.retrieved_length)
        parts["temporal"] = result.centroids.view(-1, *long.shape[1:])
        parts["retrieved"] = spa[idx]
        parts["abstract"] = turing_compress(abs_[:long_n], c.abstract_length, c.update_ratio, attention)
        weights, ret_times = result.weights, times[idx]
    return MemoryRead(
        tokens=torch.cat([parts[p].flatten(0, 1) for p in ("abstract", "temporal", "retrieved", "spatial")]),
        counts={p: parts[p].shape[0] * parts[p].shape[1] for p in ("abstract", "temporal", "retrieved", "spatial")},
        spatial_times=times[long_n:].clone(),
        retrieved_times=ret_times,
        temporal_spans=spans,
        temporal_weights=weights,
        frames_seen=t,
    )


class OfficialStreamingMemory(StarMemoryBase):
    """`embed_video_streaming`: one update per chunk of at most N_tem frames."""

    def __init__(self, cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, device=None, dtype=None):
        super().__init__(cfg, dim, attention, grid, device, dtype)
        c, d = cfg, dim
        self.head = self._tensor(2 * c.temporal_length, c.spatial_size**2, d)  # [2 N_tem, P_spa^2, D] first frames
        self.head_time = self._tensor(2 * c.temporal_length, dtype=torch.float64, fill=float("nan"))
        self.current = self._tensor(1, c.spatial_size**2, d)  # [1, P_spa^2, D] last frame of the last chunk
        self.current_time = self._tensor(1, dtype=torch.float64, fill=float("nan"))
        self.temporal = self._tensor(c.temporal_length, c.temporal_size**2, d)  # [N_tem, P_tem^2, D]
        self.tem_weight = self._tensor(c.temporal_length, dtype=torch.float32)
        self.tem_span = self._tensor(c.temporal_length, 3, dtype=torch.float64, fill=float("nan"))
        self.abstract = self._tensor(c.abstract_length, c.abstract_size**2, d)  # [N_abs, P_abs^2, D]
        self.retrieved = torch.zeros(c.retrieved_length, dtype=torch.long, device=self.device)  # head positions
        self.n_tem = self.n_abs = self.n_ret = 0

    def counts(self) -> dict[str, int]:
        c = self.cfg
        return {
            "abstract": self.n_abs * c.abstract_size**2,
            "temporal": self.n_tem * c.temporal_size**2,
            "retrieved": self.n_ret * c.spatial_size**2,
            "spatial": min(self.frames_seen, 1) * c.spatial_size**2,
        }

    @torch.no_grad()
    def update(self, features: torch.Tensor, times=None) -> None:
        spa, tem, abs_, times = self._prepare(features, times)
        n, c = spa.shape[0], self.cfg
        if n > c.temporal_length:
            raise ValueError(
                f"official streaming memory takes chunks of at most {c.temporal_length} frames, got {n} "
                "(a larger first chunk overflows the released memory's budget)"
            )
        room = max(0, min(n, self.head.shape[0] - self.frames_seen))
        if room:
            self.head[self.frames_seen : self.frames_seen + room] = spa[:room]
            self.head_time[self.frames_seen : self.frames_seen + room] = times[:room]
        self.current.copy_(spa[n - 1 :])
        self.current_time.copy_(times[n - 1 :])
        span = times[:, None].expand(n, 3)
        if self.frames_seen == 0:  # the first chunk is stored raw: no clustering, no attention, no retrieval
            self.temporal[:n], self.tem_weight[:n], self.tem_span[:n] = tem, 1.0, span
            self.abstract[:n] = abs_
            self.n_tem = self.n_abs = n
        else:
            self._merge(tem, abs_, span)
        self.frames_seen += n

    def _merge(self, tem, abs_, span) -> None:
        c = self.cfg
        points = torch.cat([self.temporal[: self.n_tem], tem])  # old centroids first, as released
        spans = torch.cat([self.tem_span[: self.n_tem], span])
        result, w, new_spans = _official_kmeans(points, spans, c)
        idx = retrieve_as_coded(points, w, c.retrieved_length)  # positions in `points` = stream frame numbers
        m = result.centroids.shape[0]
        self.temporal[:m] = result.centroids.view(m, *points.shape[1:])
        self.tem_weight[:m] = result.weights
        self.tem_span[:m] = new_spans
        self.n_tem = m
        self.retrieved[: idx.shape[0]] = idx
        self.n_ret = idx.shape[0]
        merged = turing_compress(torch.cat([self.abstract[: self.n_abs], abs_]), c.abstract_length, c.update_ratio,
                                 self.attention)
        self.abstract[: merged.shape[0]] = merged
        self.n_abs = merged.shape[0]

    def read(self) -> MemoryRead:
        ret = self.retrieved[: self.n_ret]
        cur = self.current[: min(self.frames_seen, 1)]
        tokens = torch.cat(
            [
                self.abstract[: self.n_abs].flatten(0, 1),
                self.temporal[: self.n_tem].flatten(0, 1),
                self.head[ret].flatten(0, 1),
                cur.flatten(0, 1),
            ]
        )
        return MemoryRead(
            tokens=tokens,
            counts=self.counts(),
            spatial_times=self.current_time[: cur.shape[0]].clone(),
            retrieved_times=self.head_time[ret].clone(),
            temporal_spans=self.tem_span[: self.n_tem].clone(),
            temporal_weights=self.tem_weight[: self.n_tem].clone(),
            frames_seen=self.frames_seen,
        )
