"""Flash Memory (Flash-VStream v2) over pre-merger vision features of 2-frame units, bounded and updated in place.

A unit is what the vision tower sees at once: two consecutive frames (temporal patch 2). Each unit comes with two
feature sets from two passes of the tower: `small` [N_s, C] (pixels average-pooled 2x2) and `full` [N_f, C] (full
resolution), both before the tower's patch merger; the merger runs on the finished memory, in the model.

- CSM (Context Synopsis Memory): K_csm centroids of a weighted k-means over the small features of every unit so far.
  Each update clusters [old centroids with their carried weights, the new unit with weight 1] (at most `kmeans_iters`
  Lloyd iterations, Euclidean, the deterministic seeds of `star.seed_indices`; seeding and iterations run on the
  points' Gram matrix: `gram_seeds`, `gram_lloyd`), so the weights sum to the units seen. Each
  centroid carries the first, last and weighted-mean time of the units it stands for; centroids are kept sorted by
  their mean time (an empty cluster keeps its centroid, weight 0, and the times of what that centroid averages).
- DAM (Detail Augmentation Memory): for each cluster, its representative: the unit nearest its centroid (on the small
  features) among the candidates still held: the previous representatives and the new unit (near-ties: the most
  recent). Only those units' full-resolution features are kept: a pool of K_csm + 1 slots (the +1 takes the incoming
  unit; at least one slot is always unreferenced after an update, so the next unit never evicts a representative).
  The read takes the representatives of the K_dam heaviest clusters (ties: the earlier cluster), in time order; two
  heavy clusters that share a representative cite it twice (a fixed token count, known without reading the device).
- AM-RoPE: a CSM centroid's time is its members' weighted-mean time, a DAM unit's its own time (its first frame's).

Bounded: every state tensor is allocated at construction and written in place; nothing grows with the stream, no
update reads the device from the host (host counters only). The unbounded released behaviour (every unit's features
kept) is not reproduced: a unit that stops being any cluster's representative is gone for good.

On CUDA (`enable_cuda_graph`) the steady update (every cluster filled: write the unit, cluster, choose
representatives, all in fixed shapes) is captured once in a CUDA graph and replayed: one launch per unit instead of
about a hundred small kernels, which made the eager update launch-bound (6-9 ms per unit on an H100, BENCHMARKS.md).

What this module does not do: run the tower, pair frames into units, apply the merger or build M-RoPE position ids
(see `vstream.model.qwen`). A slow literal version of the same algorithm is `vstream.memory.flash_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vstream.devices import warm_capture
from vstream.memory.kmeans import KMeansResult, exact_copies
from vstream.memory.star import MemoryRead, cluster_spans, nearest_most_recent, span_sources
from vstream.memory.state import HeldState


@dataclass
class FlashMemoryConfig:
    """Flash Memory sizes, counted in 2-frame units (the release counts frames: 120 and 60)."""

    mode: ClassVar[str] = "flash"  # what the engine and the CLI read to tell it from the STAR modes

    csm_length: int = 60
    """K_csm: CSM clusters (the release's temporal_length 120 frames)."""
    dam_length: int = 30
    """K_dam: heaviest clusters whose representative unit is read at full resolution (spatial_length 60 frames)."""
    kmeans_iters: int = 10
    """Most Lloyd iterations per update."""
    kmeans_tol: float = 1e-4
    """Stop when the summed centroid movement falls below this (the previous centroids are kept)."""

    def validate(self) -> None:
        if self.csm_length < 1:
            raise ValueError(f"csm_length must be at least 1, got {self.csm_length}")
        if not 0 <= self.dam_length <= self.csm_length:
            raise ValueError(f"dam_length must be in [0, csm_length={self.csm_length}], got {self.dam_length}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be at least 1, got {self.kmeans_iters}")


@dataclass
class FlashRead(MemoryRead):
    """A Flash Memory snapshot. `tokens` are pre-merger features [DAM units x N_f | CSM centroids x N_s, C] in that
    order; `retrieved_times` are the DAM units' times (time order), `temporal_spans` the CSM centroids' (first, last,
    mean) times (time order). `counts` and `num_tokens` count LLM tokens (after the merger)."""

    merge: int = 4  # pre-merger features per LLM token (spatial merge 2x2)
    n_small: int = 0  # pre-merger features per unit, small pass
    n_full: int = 0  # pre-merger features per unit, full resolution
    dam_units: int = 0
    csm_units: int = 0

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0] // self.merge


def am_rope_positions(read: FlashRead, small_grid: tuple[int, int], full_grid: tuple[int, int], seconds_scale: float,
                      start: float = 0.0) -> torch.Tensor:
    """AM-RoPE (temporal, height, width) positions [3, num_tokens] float64 of a read's LLM tokens, in its order.

    A token of a unit read with merged grid (h, w) at row i, column j has positions (start + s * time, start + i,
    start + j), where time is the unit's AM-RoPE time (DAM: its own; CSM: the centroid's weighted-mean time) and s =
    `seconds_scale` (Qwen2.5-VL: tokens_per_second; Qwen2-VL: units per second, so that a unit's position is its
    index in the stream). `small_grid` / `full_grid` are the merged grids of the two passes (for 448 x 448: 8 x 8 and
    16 x 16). Text after the memory continues from the largest position + 1 (see the model)."""
    parts = []
    for times, (h, w) in ((read.retrieved_times, full_grid), (read.temporal_spans[:, 2], small_grid)):
        if times.numel() and h * w * read.merge != (read.n_full if (h, w) == full_grid else read.n_small):
            raise ValueError(f"a merged grid of {h}x{w} does not hold the read's units of "
                             f"{read.n_full if (h, w) == full_grid else read.n_small} pre-merger features")
        rows = torch.arange(h, dtype=torch.float64, device=times.device).repeat_interleave(w)  # [h w]
        cols = torch.arange(w, dtype=torch.float64, device=times.device).repeat(h)
        t = (times.double() * seconds_scale)[:, None].expand(-1, h * w)
        parts.append(torch.stack([t.reshape(-1), rows.repeat(times.numel()), cols.repeat(times.numel())]))
    return torch.cat(parts, dim=1) + start


def flash_state_layout(cfg: FlashMemoryConfig, dim: int, n_small: int, n_full: int,
                       dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype, float]]:
    """The state tensors of a `FlashMemory`: name -> (shape, dtype, initial value)."""
    k, f64 = cfg.csm_length, torch.float64
    return {
        "csm": ((k, n_small, dim), dtype, 0.0),  # [K, N_s, C] centroids, time order
        "csm_weight": ((k,), torch.float32, 0.0),  # [K] units each centroid stands for
        "csm_span": ((k, 3), f64, float("nan")),  # [K, 3] first, last, mean time
        "pool_small": ((k + 1, n_small, dim), dtype, 0.0),  # [K+1, N_s, C] candidate units, small pass
        "pool_full": ((k + 1, n_full, dim), dtype, 0.0),  # [K+1, N_f, C] the same units, full resolution
        "pool_time": ((k + 1,), f64, float("nan")),  # [K+1] their times; NaN: never written
        "rep_slot": ((k,), torch.long, 0),  # [K] pool slot of each cluster's representative
        "free_slot": ((), torch.long, 0),  # pool slot the next unit is written to
    }


def flash_state_bytes(cfg: FlashMemoryConfig, dim: int, n_small: int, n_full: int, dtype: torch.dtype) -> int:
    """Bytes of a `FlashMemory`'s state, without building it."""
    total = 0
    for shape, dt, _ in flash_state_layout(cfg, dim, n_small, n_full, dtype).values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dt).element_size()
    return total


def _squared_distances64(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[T, F], [K, F] -> [T, K] squared Euclidean distances in float64, via the expansion (one matrix product)."""
    x, c = x.double(), c.double()
    return ((x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(-1)[None, :]).clamp_min_(0.0)


def gram_seeds(points: torch.Tensor, weight: torch.Tensor, k: int, gram: torch.Tensor) -> torch.Tensor:
    """`seed_indices`' rule (the k points that cost most to merge away; exact copies told apart by their bits) with
    distances from the Gram matrix [T, T] (float64) and exact copies from `kmeans.fingerprints`: no pass of [T, T, F].
    Distances below the expansion's rounding (about 1e-16 |x|^2) are noise here, as they are for the float32 rule."""
    t = points.shape[0]
    same = exact_copies(points)  # [T, T] equal bit for bit
    index = torch.arange(t, device=points.device)
    later_copy = same & (index[None, :] > index[:, None])
    sq = gram.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0.0).masked_fill(same, 0.0)
    d = d.masked_fill(later_copy | (index[None, :] == index[:, None]), float("inf"))
    nearest = d.min(dim=-1).values
    w = weight.double()
    cost = torch.where(w > 0, w * nearest, 0.0)
    return torch.sort(cost, descending=True, stable=True).indices[:k]


def gram_lloyd(points: torch.Tensor, weight: torch.Tensor, k: int, init: torch.Tensor, max_iter: int,
               tol: float, gram: torch.Tensor | None = None) -> KMeansResult:
    """The weighted Lloyd loop of `lloyd_frozen` (same seeds, same empty-cluster, tie and convergence rules) run on
    the points' Gram matrix: each centroid is a combination `sources @ points`, so every distance and every centroid
    movement is a small [K, T] x [T, T] product, in float64. The wide features are read twice (the Gram matrix, the
    final centroids) instead of a few times per iteration: with T = K + 1 = 61 points of 256 x 1,280 values this is
    the difference between a bandwidth-bound and a launch-bound update. points [T, F], weight [T], init [K]."""
    x = points.double()
    t = x.shape[0]
    gram = x @ x.T if gram is None else gram  # [T, T]
    sq = gram.diagonal()  # [T] |x_t|^2
    w = weight.double()
    slots = torch.arange(t, device=x.device)
    src = (init[:, None] == slots[None, :]).double()  # [K, T] centroid j = src[j] @ x
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    labels_out = torch.zeros(t, dtype=torch.long, device=x.device)
    wsum_out = torch.zeros(k, dtype=torch.float64, device=x.device)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(max_iter):
        cross = src @ gram  # [K, T] c_j . x_t
        cc = (cross * src).sum(-1)  # [K] |c_j|^2
        dist = (sq[:, None] - 2 * cross.T + cc[None, :]).clamp_min(0.0)  # [T, K]
        labels = dist.argmin(dim=-1)  # the first cluster wins ties
        member = (labels[None, :] == torch.arange(k, device=x.device)[:, None]).double() * w[None, :]  # [K, T]
        wsum = member.sum(-1)
        live = (wsum > 0)[:, None]
        new_src = torch.where(live, member / wsum.clamp_min(tiny)[:, None], src)
        delta = new_src - src
        moved = ((delta @ gram) * delta).sum(-1).clamp_min(0.0).sqrt().sum()  # sum of |new_j - c_j|
        labels_out = torch.where(done, labels_out, labels)
        wsum_out = torch.where(done, wsum_out, wsum)
        keep = done | (moved < tol)
        src = torch.where(keep, src, new_src)
        done = keep
    centroids = (src.to(torch.float32) @ points.float()).to(points.dtype)
    return KMeansResult(centroids, wsum_out.float(), labels_out, src.float())


class FlashMemory(HeldState):
    """CSM + DAM over units of pre-merger features; see the module docstring."""

    state_name = "flash memory state"

    def __init__(self, cfg: FlashMemoryConfig, dim: int, n_small: int, n_full: int, merge: int = 4,
                 device=None, dtype=torch.float32):
        cfg.validate()
        for name, n in (("n_small", n_small), ("n_full", n_full)):
            if n < 1 or n % merge:
                raise ValueError(f"{name} must be a positive multiple of the merge group {merge}, got {n}")
        self.cfg, self.dim, self.n_small, self.n_full, self.merge = cfg, dim, n_small, n_full, merge
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        for name, (shape, dt, fill) in flash_state_layout(cfg, dim, n_small, n_full, dtype).items():
            setattr(self, name, torch.full(shape, fill, dtype=dt, device=self.device))
        self.units_seen = 0  # host counter: units inserted
        self.n_csm = 0  # host counter: filled clusters
        self.graph: torch.cuda.CUDAGraph | None = None  # the steady update, once captured
        self._graph_pool = self._static = None  # set by `enable_cuda_graph`: its pool, its inputs (small, full, time)

    def enable_cuda_graph(self, pool=None) -> None:
        """Replay the steady update from a CUDA graph, captured at its first use. `pool`: a graph pool handle shared
        with graphs that never run at the same time (the engine's), or None for the graph's own."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the memory on a CUDA device, it is on {self.device}")
        c = self.dim
        self._graph_pool = pool
        self._static = (torch.zeros(self.n_small, c, dtype=self.dtype, device=self.device),
                        torch.zeros(self.n_full, c, dtype=self.dtype, device=self.device),
                        torch.zeros((), dtype=torch.float64, device=self.device))

    # ---------------------------------------------------------------- budgets

    @property
    def max_tokens(self) -> int:
        """LLM tokens of a full memory: K_csm N_s / merge + K_dam N_f / merge (11,520 at the spec's defaults)."""
        return (self.cfg.csm_length * self.n_small + self.cfg.dam_length * self.n_full) // self.merge

    def counts(self) -> dict[str, int]:
        """LLM tokens per part of the current read."""
        n_dam = min(self.cfg.dam_length, self.n_csm)
        return {"retrieved": n_dam * self.n_full // self.merge, "temporal": self.n_csm * self.n_small // self.merge}

    # ---------------------------------------------------------------- update

    @torch.no_grad()
    def update(self, small: torch.Tensor, full: torch.Tensor, times) -> None:
        """Add units in time order: small [n, N_s, C], full [n, N_f, C], times [n] seconds (a device tensor keeps the
        update free of host synchronisation). Units are added one at a time."""
        small, full, times = self._check(small, full, times)
        for i in range(small.shape[0]):
            if self.n_csm < self.cfg.csm_length:
                self._write_unit(small[i], full[i], times[i])
                self._fill(small[i], times[i])
                self._choose_representatives()
            elif self._static is not None:
                for static, value in zip(self._static, (small[i], full[i], times[i])):
                    static.copy_(value)
                if self.graph is None:
                    self.graph = self._capture()
                self.graph.replay()
            else:
                self._steady(small[i], full[i], times[i])
            self.units_seen += 1

    def _steady(self, small, full, t) -> None:
        """One unit once every cluster is filled: fixed shapes throughout."""
        self._write_unit(small, full, t)
        self._cluster(small, t)
        self._choose_representatives()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """The steady update on the static inputs, captured; the warm-up and capture leave the state as it was."""
        state = self.state_dict()
        try:
            return warm_capture(lambda: self._steady(*self._static), self._graph_pool, self.device)
        finally:
            self.load_state_dict(state)

    def _check(self, small, full, times) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        want = {"small": (self.n_small, small), "full": (self.n_full, full)}
        for name, (n, x) in want.items():
            if x.dim() != 3 or x.shape[1:] != (n, self.dim):
                raise ValueError(f"expected {name} features [units, {n}, {self.dim}], got {tuple(x.shape)}")
        if small.shape[0] != full.shape[0] or small.shape[0] == 0:
            raise ValueError(f"expected the same positive number of units in small and full features, got "
                             f"{small.shape[0]} and {full.shape[0]}")
        times = torch.as_tensor(times, dtype=torch.float64, device=self.device).reshape(-1)
        if times.shape[0] != small.shape[0]:
            raise ValueError(f"expected {small.shape[0]} unit times, got {times.shape[0]}")
        return small.to(self.device, self.dtype), full.to(self.device, self.dtype), times

    def _write_unit(self, small, full, t) -> None:
        slot = self.free_slot.view(1)
        self.pool_small.index_copy_(0, slot, small[None])
        self.pool_full.index_copy_(0, slot, full[None])
        self.pool_time.index_copy_(0, slot, t.view(1))

    def _fill(self, small, t) -> None:
        """One of the first K_csm units: a cluster of its own (times arrive in order, so the time order holds)."""
        n = self.n_csm
        self.csm[n] = small
        self.csm_weight[n] = 1.0
        self.csm_span[n] = t.expand(3)
        self.rep_slot[n] = self.free_slot
        self.n_csm += 1

    def _cluster(self, small, t) -> None:
        """Weighted k-means over [K centroids, the new unit] -> K centroids in time order."""
        k = self.cfg.csm_length
        points = torch.cat([self.csm.flatten(1), small.reshape(1, -1)])  # [K+1, N_s C]
        weight = torch.cat([self.csm_weight, torch.ones(1, device=self.device)])
        span = torch.cat([self.csm_span, t.view(1, 1).expand(1, 3)])
        x = points.double()
        gram = x @ x.T  # [K+1, K+1]: the one pass over the wide features before the final centroids
        seeds = gram_seeds(points, weight, k, gram)
        result = gram_lloyd(points, weight, k, seeds, self.cfg.kmeans_iters, self.cfg.kmeans_tol, gram=gram)
        new_span = cluster_spans(span, span_sources(result, weight))
        order = torch.sort(new_span[:, 2], stable=True).indices
        self.csm.copy_(result.centroids[order].view_as(self.csm))
        self.csm_weight.copy_(result.weights[order])
        self.csm_span.copy_(new_span[order])

    def _choose_representatives(self) -> None:
        """Each filled cluster's representative: the nearest candidate (previous representatives and the new unit)."""
        n, k = self.n_csm, self.cfg.csm_length
        slots = torch.arange(k + 1, device=self.device)
        candidate = (slots[:, None] == self.rep_slot[None, :n]).any(1) | (slots == self.free_slot)  # [K+1]
        # float64: a two-unit cluster is equidistant from both units, and float32 rounding of the expansion would
        # break that tie at random instead of by recency
        dist = _squared_distances64(self.csm[:n].flatten(1), self.pool_small.flatten(1))  # [n, K+1]
        dist.masked_fill_(~candidate[None, :], float("inf"))
        times = torch.where(candidate, self.pool_time, float("-inf"))
        self.rep_slot[:n] = nearest_most_recent(dist, times)
        used = (slots[:, None] == self.rep_slot[None, :n]).any(1)
        self.free_slot.copy_((~used).to(torch.uint8).argmax())  # the first unreferenced slot (one always is)

    # ---------------------------------------------------------------- read

    def dam_slots(self) -> torch.Tensor:
        """Pool slots of the K_dam heaviest clusters' representatives, in time order."""
        r = min(self.cfg.dam_length, self.n_csm)
        top = torch.sort(self.csm_weight[: self.n_csm], descending=True, stable=True).indices[:r]
        slots = self.rep_slot[top]
        return slots[torch.sort(self.pool_time[slots], stable=True).indices]

    def read(self) -> FlashRead:
        """A snapshot: new tensors that later updates do not touch."""
        slots = self.dam_slots()
        n = self.n_csm
        tokens = torch.cat([self.pool_full[slots].flatten(0, 1), self.csm[:n].flatten(0, 1)])
        return FlashRead(
            tokens=tokens,
            counts=self.counts(),
            spatial_times=torch.zeros(0, dtype=torch.float64, device=self.device),
            retrieved_times=self.pool_time[slots].clone(),
            temporal_spans=self.csm_span[:n].clone(),
            temporal_weights=self.csm_weight[:n].clone(),
            frames_seen=0,
            merge=self.merge, n_small=self.n_small, n_full=self.n_full, dam_units=slots.shape[0], csm_units=n,
        )

    # ---------------------------------------------------------------- state

    def _counters(self) -> dict:
        return {"units_seen": self.units_seen, "n_csm": self.n_csm}

    def _restore_counters(self, counters: dict) -> None:
        self.units_seen, self.n_csm = int(counters["units_seen"]), int(counters["n_csm"])


__all__ = ["am_rope_positions", "gram_lloyd", "gram_seeds", "FlashMemory", "FlashMemoryConfig",
           "FlashRead", "flash_state_bytes", "flash_state_layout"]
