# size: the paper-mode STAR memory: state, update (equations 1-5) and the batched helpers memory pages share
"""STAR memory in `paper` mode: equations (1)-(5) applied incrementally, one frame or one chunk of frames at a time.

State is a set of preallocated tensors written in place; its size never depends on the stream length. Host-side
counters (frames seen, filled slots) are plain Python integers known without reading the device, so an update never
synchronises with it. `read()` returns a snapshot: new tensors that later updates do not touch.

What the state means (D = feature width, F_tem = P_tem^2 * D):
- buffer: the newest N_buff frames at P_spa (eq. 1), a ring; `buffer_tem` holds the same frames at P_tem for the
  retrieval distances, `buffer_time` their stream times.
- spatial: the newest N_spa buffer frames (eq. 2), oldest first.
- temporal: N_tem centroids of a weighted k-means over [old centroids with their carried weights, new frames with
  weight 1] (eq. 3). Weights sum to the number of frames seen. Each centroid carries the first, last and weighted-mean
  stream time of the frames it stands for; centroids are kept in order of their mean time. Repeated frames (a static
  or cycling scene) leave clusters empty: an empty cluster keeps its centroid with weight 0, and its times are those
  of the frames that centroid averages (`span_sources`), so every time and weight stays finite and every cited span
  holds frames its token was made from. A weight-0 centroid is read like any other and is retrieved from only when
  fewer than N_ret clusters have weight.
- abstract: N_abs slots; the first N_abs frames fill them, later frames update them by semantic attention (eq. 4,
  `AbstractAttention.update_paper`).
- retrieved: for each of the N_ret heaviest clusters (ties: the earlier cluster), the buffer frame nearest its
  centroid (eq. 5; near-ties: the most recent frame), in time order.

Chunked vs frame-by-frame ingestion: the buffer, the spatial frames, the total temporal weight and the time coverage
are identical; the k-means partition and the abstract slots may differ (clustering and attention see the chunk at once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vstream import kernels
from vstream.config import MemoryConfig
from vstream.devices import warm_capture
from vstream.encoder.pooling import pyramid
from vstream.memory.attention import AbstractAttention
from vstream.memory.kmeans import KMeansResult, exact_copies, lloyd_frozen, squared_distances, weighted_kmeans
from vstream.memory.state import HeldState

log = logging.getLogger(__name__)

PARTS = ("abstract", "temporal", "retrieved", "spatial")


@dataclass
class MemoryRead:
    """A snapshot of the memory: tokens in the order [abstract | temporal | retrieved | spatial] and their times."""

    tokens: torch.Tensor  # [N, D]
    counts: dict[str, int]  # tokens per part, in PARTS order
    spatial_times: torch.Tensor  # [n_spa] float64, oldest first
    retrieved_times: torch.Tensor  # [n_ret] float64
    temporal_spans: torch.Tensor  # [n_tem, 3] float64: first, last, weighted-mean time of each cluster
    temporal_weights: torch.Tensor  # [n_tem] float32: frames each cluster stands for
    frames_seen: int
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


def without(memory: MemoryRead, parts: Sequence[str]) -> MemoryRead:
    """The snapshot with the tokens of `parts` removed (their counts become 0; the cited times are kept)."""
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"unknown memory parts {bad}; expected some of {list(PARTS)}")
    keep, start = [], 0
    counts = {}
    for part in PARTS:
        n = memory.counts[part]
        if part not in parts:
            keep.append(memory.tokens[start : start + n])
        counts[part] = 0 if part in parts else n
        start += n
    return MemoryRead(
        tokens=torch.cat(keep), counts=counts, spatial_times=memory.spatial_times,
        retrieved_times=memory.retrieved_times, temporal_spans=memory.temporal_spans,
        temporal_weights=memory.temporal_weights, frames_seen=memory.frames_seen,
    )


class StarMemoryBase(HeldState):
    """What both modes share: configuration, pooling of new frames, counters and budgets."""

    page = None  # the MemoryPage holding this memory's state, if any (paper mode only)

    def __init__(self, cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, device=None, dtype=None):
        cfg.validate(grid)
        self.cfg = cfg
        self.dim = dim
        self.grid = grid
        self.attention = attention
        self.device = torch.device(device) if device is not None else attention.q_proj.weight.device
        self.dtype = dtype if dtype is not None else attention.q_proj.weight.dtype
        self.frames_seen = 0

    def _tensor(self, *shape, dtype=None, fill=0.0) -> torch.Tensor:
        return torch.full(shape, fill, dtype=dtype or self.dtype, device=self.device)

    def _prepare(self, features: torch.Tensor, times) -> tuple[torch.Tensor, ...]:
        """Check and pool a chunk: features [n, grid^2, D] (or already at P_spa^2), times [n] -> pyramid + times."""
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"expected frame features [n, tokens, {self.dim}], got {tuple(features.shape)}")
        n = features.shape[0]
        if n == 0:
            raise ValueError("a memory update needs at least one frame, got 0")
        if features.shape[1] not in (self.grid**2, self.cfg.spatial_size**2):
            raise ValueError(
                f"expected {self.grid**2} tokens per frame (or {self.cfg.spatial_size**2} already pooled), "
                f"got {features.shape[1]}"
            )
        if times is None:  # frame numbers as times, made on the device (no host-to-device copy)
            times = torch.arange(self.frames_seen, self.frames_seen + n, dtype=torch.float64, device=self.device)
        # a list of floats is copied to the device; pass a device tensor to keep the update free of synchronisation
        times = torch.as_tensor(times, dtype=torch.float64, device=self.device).reshape(-1)
        if times.shape[0] != n:
            raise ValueError(f"expected {n} timestamps, one per frame, got {times.shape[0]}")
        features = features.to(device=self.device, dtype=self.dtype)
        c = self.cfg
        spa, tem, abs_ = pyramid(features, c.spatial_size, c.temporal_size, c.abstract_size)
        return spa, tem, abs_, times

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_tokens

    @property
    def num_tokens(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def _settle(self) -> None:
        if self.page is not None:  # the page's queued updates of this memory run first
            self.page.flush()

    def _counters(self) -> dict:
        return {k: v for k, v in vars(self).items() if k == "frames_seen" or k.startswith("n_")}


def paper_state_layout(cfg: MemoryConfig, dim: int, dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype, float]]:
    """The state tensors of a `PaperStarMemory`: name -> (shape, dtype, initial value)."""
    c, d, f64 = cfg, dim, torch.float64
    return {
        "buffer": ((c.buffer_length, c.spatial_size**2, d), dtype, 0.0),  # [N_buff, P_spa^2, D] a ring
        "buffer_tem": ((c.buffer_length, c.temporal_size**2, d), dtype, 0.0),  # [N_buff, P_tem^2, D]
        "buffer_time": ((c.buffer_length,), f64, float("nan")),  # [N_buff]; NaN: not written yet
        "temporal": ((c.temporal_length, c.temporal_size**2, d), dtype, 0.0),  # [N_tem, P_tem^2, D]
        "tem_weight": ((c.temporal_length,), torch.float32, 0.0),  # [N_tem]
        "tem_span": ((c.temporal_length, 3), f64, float("nan")),  # [N_tem, 3]
        "abstract": ((c.abstract_length, c.abstract_size**2, d), dtype, 0.0),  # [N_abs, P_abs^2, D]
        "retrieved": ((c.retrieved_length,), torch.long, 0),  # [N_ret] buffer slots
        "count": ((), torch.long, 0),  # frames seen, on the device (the ring position)
    }


class PaperStarMemory(StarMemoryBase):
    """The paper's STAR memory with carried cluster weights and a bounded ring buffer. A memory of a `MemoryPage`
    (`page` set) hands its one-frame updates (steady or filling) to the page, which runs them for all its memories at
    once when any of them is read next (or `page.flush()`)."""

    released = False  # its page gave its row to another memory

    def __init__(self, cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, device=None, dtype=None,
                 state: dict[str, torch.Tensor] | None = None):
        """`state`: tensors of `paper_state_layout`, in their initial values, to hold the state in (rows of a
        `MemoryPage`, say); by default the memory allocates its own."""
        super().__init__(cfg, dim, attention, grid, device, dtype)
        layout = paper_state_layout(cfg, dim, self.dtype)
        if state is None:
            state = {k: self._tensor(*shape, dtype=dt, fill=fill) for k, (shape, dt, fill) in layout.items()}
        for name, (shape, dt, _) in layout.items():
            given = state.get(name)
            if given is None or tuple(given.shape) != shape or given.dtype != dt or not _on(given, self.device):
                got = None if given is None else (tuple(given.shape), given.dtype, given.device)
                raise ValueError(f"memory state {name!r} must be {shape} {dt} on {self.device}, got {got}")
            setattr(self, name, given)
        self.n_tem = self.n_abs = self.n_ret = 0
        self.graph: CapturedUpdate | None = None

    def counts(self) -> dict[str, int]:
        c = self.cfg
        return {
            "abstract": self.n_abs * c.abstract_size**2,
            "temporal": self.n_tem * c.temporal_size**2,
            "retrieved": self.n_ret * c.spatial_size**2,
            "spatial": min(self.frames_seen, c.spatial_length) * c.spatial_size**2,
        }

    @property
    def steady(self) -> bool:
        """Clusters and abstract slots are full: from here on, a one-frame update has fixed shapes throughout."""
        return self.n_tem == self.cfg.temporal_length and self.n_abs == self.cfg.abstract_length

    @property
    def filling(self) -> bool:
        """Clusters and abstract slots both have room for one more frame: a one-frame update only appends (no k-means,
        no attention) and `_fill_step` runs it with fixed shapes, the counts given on the device."""
        return self.n_tem < self.cfg.temporal_length and self.n_abs < self.cfg.abstract_length

    def enable_cuda_graph(self, pool=None) -> None:
        """Replay one-frame updates, filling and steady, from CUDA graphs (each captured at its first use). `pool`: a
        memory pool (`torch.cuda.graph_pool_handle()`) shared with other graphs that never run at the same time
        (the engine's memories, say); None: one of the memory's own."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the memory on a CUDA device, it is on {self.device}")
        self.graph = CapturedUpdate(self, pool)

    @torch.no_grad()
    def update(self, features: torch.Tensor, times=None) -> None:
        """Add a chunk of frames: features [n, grid^2, D] (or [n, P_spa^2, D]), times [n] stream seconds."""
        self._check_held()
        if self.page is not None:
            self.page.settle(self)  # a frame of its own still queued runs first: its phase is read from its counts
            if (self.steady or self.filling) and features.shape[0] == 1 and features.shape[1] == self.grid**2 and \
                    times is not None:
                self.page.queue(self, features, times)
                return
            self.page.flush()
        if self.graph is not None and features.shape[0] == 1 and (self.steady or self.filling):
            filling = self.filling
            if self.graph.replay(features, times, fill=(self.n_tem, self.n_abs) if filling else None):
                if filling:
                    self._counted_fill()
                self.frames_seen += 1
                return
        self.update_differentiable(features, times)

    def _fill_step(self, spa, tem, abs_, times, n_tem: torch.Tensor, n_abs: torch.Tensor) -> None:
        """`_step` for one frame while `filling`, with fixed shapes: the frame is appended at the clusters' and
        abstract slots' counts `n_tem`, `n_abs` (device [1] int64), so one captured graph serves the whole fill
        phase. Same arithmetic and results as `_step`; the host counts change in `_counted_fill`."""
        self._push_buffer(spa, tem, times)  # (1)
        self.temporal.index_copy_(0, n_tem, tem)  # (3): a new cluster of one frame
        self.tem_weight.index_fill_(0, n_tem, 1.0)
        self.tem_span.index_copy_(0, n_tem, times[:, None].expand(1, 3))
        self.abstract.index_copy_(0, n_abs, abs_)  # (4): a new abstract slot
        self._retrieve_held(n_tem + 1)  # (5)

    def _counted_fill(self) -> None:
        self.n_tem += 1
        self.n_abs += 1
        self.n_ret = min(self.cfg.retrieved_length, self.n_tem)

    def _retrieve_held(self, held: torch.Tensor) -> None:
        """(5) with fixed shapes, `held` (device [1]) clusters held: for each of the min(N_ret, held) heaviest clusters
        (ties: the earlier; the clusters past `held` weigh -inf, sorted last) the buffer frame nearest its centroid,
        in time order; the rest of `retrieved` stays as it was."""
        k, r = self.cfg.temporal_length, min(self.cfg.retrieved_length, self.cfg.temporal_length)
        weight = torch.where(torch.arange(k, device=self.device) < held, self.tem_weight, -torch.inf)
        top = torch.sort(weight, descending=True, stable=True).indices[:r]
        dist = squared_distances(self.temporal[top].flatten(1), self.buffer_tem.flatten(1))  # [r, N_buff]
        dist.masked_fill_(self.buffer_time.isnan()[None, :], float("inf"))  # slots not written yet
        slots = nearest_most_recent(dist, self.buffer_time)
        kept = torch.arange(r, device=self.device) < held
        slots = slots[torch.argsort(torch.where(kept, self.buffer_time[slots], torch.inf), stable=True)]  # time order
        self.retrieved[:r].copy_(torch.where(kept, slots, self.retrieved[:r]))

    def update_differentiable(self, features: torch.Tensor, times=None) -> None:
        """`update` with autograd left as the caller set it: under grad mode the abstract slots keep their graph back to
        the attention's parameters (training). Same arithmetic as `update`."""
        if self.page is not None:
            self.page.flush()
        self._step(*self._prepare(features, times))
        self.frames_seen += features.shape[0]

    def _step(self, spa, tem, abs_, times) -> None:
        """(1) -> (5) on device tensors; the host counters n_* change only outside the steady state."""
        self._push_buffer(spa, tem, times)  # (1), and (2) is read from the ring
        self._update_temporal(tem, times)  # (3)
        self._update_abstract(abs_)  # (4)
        self._retrieve()  # (5)

    def _push_buffer(self, spa, tem, times) -> None:
        n, n_buff = spa.shape[0], self.cfg.buffer_length
        keep = min(n, n_buff)  # a chunk longer than the buffer leaves only its newest frames
        slots = (self.count + torch.arange(n - keep, n, device=self.device)) % n_buff
        self.buffer.index_copy_(0, slots, spa[-keep:])
        self.buffer_tem.index_copy_(0, slots, tem[-keep:])
        self.buffer_time.index_copy_(0, slots, times[-keep:])
        self.count += n

    def _update_temporal(self, tem, times) -> None:
        k, n = self.cfg.temporal_length, tem.shape[0]
        if self.n_tem + n <= k:
            sl = slice(self.n_tem, self.n_tem + n)
            self.temporal[sl] = tem
            self.tem_weight[sl] = 1.0
            self.tem_span[sl] = times[:, None].expand(n, 3)
            self.n_tem += n
            return
        points = torch.cat([self.temporal[: self.n_tem].flatten(1), tem.flatten(1)])  # [T, F_tem], T <= k + n
        weight = torch.cat([self.tem_weight[: self.n_tem], torch.ones(n, device=self.device)])
        span = torch.cat([self.tem_span[: self.n_tem], times[:, None].expand(n, 3)])
        result = seeded_kmeans(points, weight, k, self.cfg.kmeans_iters, self.cfg.kmeans_tol)
        new_span = cluster_spans(span, span_sources(result, weight))
        order = torch.sort(new_span[:, 2], stable=True).indices  # time order (an empty cluster by its kept centroid's)
        self.temporal.copy_(result.centroids[order].view_as(self.temporal))
        self.tem_weight.copy_(result.weights[order])
        self.tem_span.copy_(new_span[order])
        self.n_tem = k

    def _update_abstract(self, abs_) -> None:
        free = self.cfg.abstract_length - self.n_abs
        fill = min(free, abs_.shape[0])
        if fill:
            self.abstract[self.n_abs : self.n_abs + fill] = abs_[:fill]
            self.n_abs += fill
        if fill < abs_.shape[0]:
            slots = self.attention.update_paper(self.abstract, abs_[fill:], self.cfg.update_ratio)
            if slots.requires_grad:  # training: keep the graph (an in-place copy would break it at the next update)
                self.abstract = slots
            else:
                self.abstract.copy_(slots)

    def _retrieve(self) -> None:
        self._retrieve_held(torch.full((1,), self.n_tem, device=self.device))  # a fill kernel: no copy, no wait
        self.n_ret = min(self.cfg.retrieved_length, self.n_tem)

    def spatial_slots(self) -> torch.Tensor:
        """Ring slots of the newest N_spa frames, oldest first."""
        n = min(self.frames_seen, self.cfg.spatial_length)
        return torch.arange(self.frames_seen - n, self.frames_seen, device=self.device) % self.cfg.buffer_length

    def _check_held(self) -> None:
        if self.released:
            raise RuntimeError("this memory was released from its memory page (its stream was closed): it can no "
                               "longer be read or updated; read the snapshots taken before")

    def read(self) -> MemoryRead:
        self._check_held()
        if self.page is not None:
            self.page.flush()
        spa = self.spatial_slots()
        ret = self.retrieved[: self.n_ret]
        tokens = torch.cat(
            [
                self.abstract[: self.n_abs].flatten(0, 1),
                self.temporal[: self.n_tem].flatten(0, 1),
                self.buffer[ret].flatten(0, 1),
                self.buffer[spa].flatten(0, 1),
            ]
        )
        return MemoryRead(
            tokens=tokens,
            counts=self.counts(),
            spatial_times=self.buffer_time[spa].clone(),
            retrieved_times=self.buffer_time[ret].clone(),
            temporal_spans=self.tem_span[: self.n_tem].clone(),
            temporal_weights=self.tem_weight[: self.n_tem].clone(),
            frames_seen=self.frames_seen,
        )


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" meaning the current CUDA device)."""
    if device.type != tensor.device.type:
        return False
    return device.index is None and (device.type != "cuda" or tensor.device.index == torch.cuda.current_device()) \
        or device.index == tensor.device.index


def abstract_slots(
    attention: AbstractAttention, inputs: torch.Tensor, lengths: torch.Tensor | list[int], cfg: MemoryConfig
) -> torch.Tensor:
    """The abstract slots of several streams at once, as frame-by-frame `PaperStarMemory` updates leave them.

    inputs [B, T, P_abs^2, D]: each stream's frames pooled to P_abs (zero-padded past its length); lengths [B].
    Returns [B, N_abs, P_abs^2, D]; a stream with fewer than N_abs frames has its first `length` slots filled and the
    rest zero. The attention treats token positions independently, so the B streams run as B x P positions of one
    update: one call per frame for the whole batch, with autograd through the attention's q/k projections.
    """
    b, t, p, d = inputs.shape
    k = cfg.abstract_length
    lengths = torch.as_tensor(lengths, device=inputs.device)
    filled = torch.arange(k, device=inputs.device)[None, :] < lengths[:, None]  # [B, K]
    head = inputs[:, :k]
    if head.shape[1] < k:
        head = torch.cat([head, head.new_zeros(b, k - head.shape[1], p, d)], dim=1)
    slots = head * filled[:, :, None, None]  # [B, K, P, D]
    slots = slots.permute(1, 0, 2, 3).reshape(k, b * p, d)  # streams as token positions
    for i in range(k, t):
        new = inputs[:, i].reshape(1, b * p, d)
        moved = attention.update_paper(slots, new, cfg.update_ratio)
        active = (lengths > i).repeat_interleave(p)[None, :, None]  # streams that still have frame i
        slots = torch.where(active, moved, slots)
    return slots.reshape(k, b, p, d).permute(1, 0, 2, 3)


def seeded_kmeans(points: torch.Tensor, weight: torch.Tensor, k: int, max_iter: int, tol: float) -> KMeansResult:
    """Weighted k-means of points [..., T, F] (leading dimensions: independent problems) from `seed_indices` seeds,
    an empty cluster keeping its centroid. Where the fused kernels run and T is small (a steady update has T = k + 1),
    seeding and all iterations are one kernel on the Gram matrix, between two matrix products; elsewhere the batched
    PyTorch loop of `weighted_kmeans`."""
    if kernels.available(points.device) and k < points.shape[-2] <= kernels.MAX_KMEANS_POINTS:
        centroids, wsum, labels, sources = kernels.gram_kmeans(points, weight, k, max_iter, tol, exact_copies(points))
        return KMeansResult(centroids.to(points.dtype), wsum, labels, sources)
    if points.dim() > 2 and k < points.shape[-2]:
        return lloyd_frozen(points, k, weight.float(), seed_indices(points, weight, k), max_iter, tol)
    return weighted_kmeans(points, k, weights=weight, init_indices=seed_indices(points, weight, k),
                           max_iter=max_iter, tol=tol, empty="keep")


def seed_indices(points: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic k-means seeds for [old centroids, new frames]: the k points that would cost most to merge away.

    A point's cost is its weight times the squared distance to its nearest other point, so near-duplicates and light
    points are merged first and a novel frame keeps a cluster of its own. With one new frame this makes the k-means
    start from the best single merge (Ward's criterion up to the neighbour's own shift). Exact copies (a paused or
    static stream repeats its features bit for bit) are told apart exactly, not by the rounding of the expansion: a
    later copy costs nothing, and the first copy is measured against the other points only, so every distinct point
    seeds a cluster before any copy does and a chunk of repeated frames never merges two different scenes.
    """
    t = points.shape[-2]
    same = exact_copies(points)
    index = torch.arange(t, device=points.device)
    later_copy = same & (index[None, :] > index[:, None])  # [i, j]: j repeats i and comes after it
    d = squared_distances(points, points).masked_fill_(same, 0.0)
    d.masked_fill_(later_copy | (index[None, :] == index[:, None]), float("inf"))
    nearest = d.min(dim=-1).values  # inf for the first copy of a point repeated everywhere
    cost = torch.where(weight > 0, weight * nearest, 0.0)  # a weight-0 point (an emptied cluster) costs nothing
    return torch.sort(cost, descending=True, stable=True).indices[..., :k]  # ties: earlier point first


def nearest_most_recent(dist: torch.Tensor, times: torch.Tensor, rel_tol: float = 1e-5) -> torch.Tensor:
    """dist [..., r, B], times [..., B] -> [..., r]: per row the column at the smallest distance; columns within
    `rel_tol` of it count as tied (a two-frame centroid is equidistant from both frames) and the most recent of them
    wins."""
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist <= best * (1 + rel_tol) + 1e-12
    return times[..., None, :].expand_as(dist).masked_fill(~tied, float("-inf")).argmax(-1)


def span_sources(result: KMeansResult, weight: torch.Tensor) -> torch.Tensor:
    """[..., K, T] non-negative rows, none all zero: which points' times each cluster stands for. A cluster with weight
    stands for its members, each by its weight (a weight-0 member adds no frame); an empty cluster keeps its centroid,
    so it stands for what that centroid averages (`result.sources`): its frames stay finite and citable."""
    k = result.weights.shape[-1]
    member = ((result.labels[..., None, :] == torch.arange(k, device=weight.device)[:, None])
              * weight.float()[..., None, :])
    return torch.where((result.weights > 0)[..., None], member, result.sources.float())


def cluster_spans(span: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Per-cluster (first, last, weighted-mean) time [K, 3] float64 from the points' spans [T, 3] and `span_sources`
    [K, T]: first and last over the points a cluster stands for, the mean weighted by how much it stands for each."""
    pos = sources > 0  # [..., K, T]; span [..., T, 3]
    first = torch.where(pos, span[..., None, :, 0], torch.inf).amin(-1)
    last = torch.where(pos, span[..., None, :, 1], -torch.inf).amax(-1)
    s = sources.double()
    mean = (s @ span[..., 2:3])[..., 0] / s.sum(-1)
    return torch.stack([first, last, mean], -1)


class CapturedUpdate:
    """The one-frame updates of a `PaperStarMemory` captured in CUDA graphs and replayed: one launch instead of a few
    hundred. Two graphs, in one memory pool (they never run at once; their intermediates live only within a replay,
    every result is written in place into the state): the fill phase's (`_fill_step`, the counts as
    device inputs) and the steady state's (`_step`), each captured at its first use. Inputs are copied into static
    tensors; the state is updated in place by the replay."""

    fill_failures = 0
    """Memories of this process whose fill phase could not be captured (they update eagerly until steady)."""

    def __init__(self, memory: PaperStarMemory, pool=None):
        self.memory = memory
        self.graph: torch.cuda.CUDAGraph | None = None  # the steady update
        self.fill_graph: torch.cuda.CUDAGraph | None = None
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.features: torch.Tensor | None = None  # [1, tokens, D] static input
        self.times = torch.zeros(1, dtype=torch.float64, device=memory.device)  # [1] static input
        self.counts = torch.zeros(2, dtype=torch.long, device=memory.device)  # [2] static input: n_tem, n_abs
        self.fill_failed = False

    def replay(self, features: torch.Tensor, times, fill: tuple[int, int] | None = None) -> bool:
        """Replay the steady update, or with `fill` = (n_tem, n_abs) the fill phase's -> whether it ran (False: the
        fill phase could not be captured on this device, logged once; the caller updates eagerly)."""
        m = self.memory
        if times is None:
            times = m.count.to(torch.float64).reshape(1)
        if self.features is None or self.features.shape != features.shape:
            self.features = torch.zeros_like(features, dtype=m.dtype, device=m.device)
            self.graph = self.fill_graph = None
        if fill is None and self.graph is None:
            self.graph = self._capture(lambda: m._step(*m._prepare(self.features, self.times)))
        if fill is not None and self.fill_graph is None:
            if self.fill_failed:
                return False
            try:
                self.fill_graph = self._capture(self._fill)
            except RuntimeError:  # the memory stays correct: its fill phase runs eagerly, as before graphs
                CapturedUpdate.fill_failures += 1
                (log.warning if CapturedUpdate.fill_failures == 1 else log.debug)(
                    "the fill phase of a memory update could not be captured in a CUDA graph; it runs eagerly (%d "
                    "memories so far; logged once, then at debug level)", CapturedUpdate.fill_failures, exc_info=True)
                self.fill_failed = True
                return False
        self.features.copy_(features)
        self.times.copy_(torch.as_tensor(times, dtype=torch.float64, device=m.device).reshape(1))
        if fill is None:
            self.graph.replay()
        else:
            self.counts[0].fill_(fill[0])  # a scalar argument of a kernel: no copy from the host, no wait
            self.counts[1].fill_(fill[1])
            self.fill_graph.replay()
        return True

    def _fill(self) -> None:
        m = self.memory
        m._fill_step(*m._prepare(self.features, self.times), self.counts[0:1], self.counts[1:2])

    def _capture(self, run) -> torch.cuda.CUDAGraph:
        m = self.memory
        state = m.state_dict()  # the warm-up and capture runs must leave no trace: restore afterwards
        try:
            return warm_capture(run, self.pool)
        finally:
            m.load_state_dict(state)
