"""Many streams' paper-mode memories updated as one: the state of up to `capacity` memories lives in the rows of
stacked tensors, and one steady one-frame update of any set of them is one batched computation (on CUDA, one graph
replay) whose cost grows with the memories updated, not with the page.

    page = MemoryPage(cfg, dim, attention, grid, capacity=64, device="cuda", dtype=torch.float16)
    memory = page.new_memory()           # a PaperStarMemory whose tensors are views of one row
    page.update([m1, m2], features, times)  # one frame each, every memory steady: one replay for all of them
    m1.update(f, t); m2.update(g, u)     # the same, deferred: queued, run together when either is read next

A page's memory is an ordinary `PaperStarMemory` (its reads, snapshots, state dicts and non-steady updates work on
its row); only the steady one-frame update has a batched form here. It gathers the rows being updated (their small
parts: clusters, slots, times; the ring buffer is written in place and read only for retrieval), updates them and
scatters them back. Its batch is padded to a power of two with a scratch row that no memory owns, so a page captures
at most log2(capacity) + 1 graphs. Same arithmetic as `PaperStarMemory._step`, batched over rows: equal to it up to
the rounding of batched matrix products (the k-means labels, weights and retrieved frames are the same on the tested
streams).

What this module does not do: decide which memories share a page or when to update (the engine does), or batch the
filling phase (a memory's first `temporal_length` frames), whose shapes change frame by frame.
"""

from __future__ import annotations

import torch

from vstream.config import MemoryConfig
from vstream.devices import capture, graph_sizes
from vstream.encoder.pooling import pyramid
from vstream.memory.attention import AbstractAttention
from vstream.memory.kmeans import squared_distances
from vstream.memory.state import tensor_bytes
from vstream.memory.star import (PaperStarMemory, cluster_spans, nearest_most_recent, paper_state_layout, seeded_kmeans,
                                 span_sources)


class MemoryPage:
    """Up to `capacity` paper-mode memories in the rows of stacked state tensors (see the module docstring)."""

    def __init__(self, cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, capacity: int,
                 device, dtype: torch.dtype, graph: bool | None = None, graph_pool=None):
        """`graph`: capture the batched update in CUDA graphs (None: on CUDA). `graph_pool`: their memory pool
        (`torch.cuda.graph_pool_handle()`), shared by pages whose updates never run at the same time, so that their
        temporaries take the room of one update's, not of each."""
        if cfg.mode != "paper":
            raise ValueError(f"a memory page holds paper-mode memories, got mode {cfg.mode!r}")
        if capacity < 1:
            raise ValueError(f"a memory page needs a capacity of at least 1, got {capacity}")
        self.cfg, self.dim, self.attention, self.grid = cfg, dim, attention, grid
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self.layout = paper_state_layout(cfg, dim, dtype)
        self.state = {k: torch.full((capacity + 1, *shape), fill, dtype=dt, device=self.device)  # + a scratch row
                      for k, (shape, dt, fill) in self.layout.items()}
        self.members: dict[int, PaperStarMemory] = {}  # row -> its memory
        self.sizes = graph_sizes(capacity)
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        self.graph_pool = graph_pool
        self._batches: dict[int, _Batch] = {}  # batch size -> its static inputs and captured update
        self._queued: dict[int, tuple[PaperStarMemory, torch.Tensor, torch.Tensor]] = {}  # row -> its queued frame
        self.updates = 0  # batched updates run (each one graph replay on CUDA)

    @property
    def captured(self) -> list[int]:
        """The batch sizes whose update is captured in a CUDA graph so far."""
        return sorted(size for size, batch in self._batches.items() if batch.graph is not None)

    @property
    def free(self) -> int:
        return self.capacity - len(self.members)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.state)

    def new_memory(self) -> PaperStarMemory:
        """A fresh memory in a free row (ValueError when none is free)."""
        row = next((r for r in range(self.capacity) if r not in self.members), None)
        if row is None:
            raise ValueError(f"the memory page is full: all {self.capacity} rows hold a memory")
        for name, (_, _, fill) in self.layout.items():
            self.state[name][row].fill_(fill)
        memory = PaperStarMemory(self.cfg, self.dim, self.attention, self.grid, self.device, self.dtype,
                                 state={k: v[row] for k, v in self.state.items()})
        memory.page, memory.page_row = self, row
        self.members[row] = memory
        return memory

    def release(self, memory: PaperStarMemory) -> None:
        """Free the row of `memory` (any thread) for a new memory: the released one can no longer be read or updated
        (snapshots taken before stay valid: they are copies); a frame it had queued is dropped."""
        row = getattr(memory, "page_row", None)
        if self.members.get(row) is not memory:
            return
        self._queued.pop(row, None)
        memory.released = True
        del self.members[row]

    def queue(self, memory: PaperStarMemory, features: torch.Tensor, times) -> None:
        """Queue a steady memory's one-frame update (features [1, grid^2, D], times [1]) for the next `flush`; a
        memory that has a frame queued already has it run first."""
        if self.members.get(memory.page_row) is not memory:
            raise ValueError("this memory is not in this page (it was released)")
        if memory.page_row in self._queued:
            self.flush()
        times = torch.as_tensor(times, dtype=torch.float64).reshape(1)
        self._queued[memory.page_row] = (memory, features, times)

    def flush(self) -> None:
        """Run every queued update, all in one batched update."""
        if not self._queued:
            return
        queued, self._queued = list(self._queued.values()), {}
        queued = [q for q in queued if self.members.get(q[0].page_row) is q[0]]  # not released meanwhile
        if not queued:
            return
        times = torch.cat([t.to(self.device, non_blocking=True) for _, _, t in queued])
        self.update([m for m, _, _ in queued], torch.cat([f for _, f, _ in queued]), times)

    @torch.no_grad()
    def update(self, memories: list[PaperStarMemory], features: torch.Tensor, times: torch.Tensor) -> None:
        """One frame for each of `memories` (all steady, all of this page, no two alike): features [n, grid^2, D],
        times [n] float64 (a device tensor keeps this free of synchronisation)."""
        n = len(memories)
        if features.shape != (n, self.grid**2, self.dim) or tuple(times.shape) != (n,):
            raise ValueError(f"expected features [{n}, {self.grid ** 2}, {self.dim}] and times [{n}] for {n} memories, "
                             f"got {tuple(features.shape)} and {tuple(times.shape)}")
        if self._queued:  # frames queued earlier come first
            self.flush()
        rows = [m.page_row for m in memories]
        if any(self.members.get(r) is not m or not m.steady for r, m in zip(rows, memories)) or len(set(rows)) < n:
            raise ValueError("a batched update takes distinct steady memories of this page")
        size = next(b for b in self.sizes if b >= n)
        if size not in self._batches:
            self._batches[size] = _Batch(self, size)
        batch = self._batches[size]
        batch.prepare()
        index = torch.tensor(rows + [self.capacity] * (size - n), dtype=torch.long)  # padded with the scratch row
        index = index.pin_memory() if self.device.type == "cuda" else index
        batch.index.copy_(index, non_blocking=True)
        batch.features[:n].copy_(features)
        batch.times[:n].copy_(times)
        batch.run()
        self.updates += 1
        for memory in memories:
            memory.frames_seen += 1

    def step(self, index: torch.Tensor, features: torch.Tensor, times: torch.Tensor) -> None:
        """(1) -> (5) of `PaperStarMemory._step` for the rows `index` [b] (distinct, but for repeats of the scratch
        row), one frame each: features [b, grid^2, D], times [b]."""
        c, s = self.cfg, self.state
        spa, tem, abs_ = pyramid(features, c.spatial_size, c.temporal_size, c.abstract_size)
        count = s["count"][index]  # [b]
        slot = count % c.buffer_length
        for name, new in (("buffer", spa), ("buffer_tem", tem), ("buffer_time", times)):
            s[name][index, slot] = new
        s["count"][index] = count + 1
        temporal, weight = self._update_temporal(index, tem, times)
        self._update_abstract(index, abs_)
        self._retrieve(index, temporal, weight)

    def _update_temporal(self, index, tem, times) -> tuple[torch.Tensor, torch.Tensor]:
        s, c = self.state, self.cfg
        k, b = c.temporal_length, index.shape[0]
        points = torch.cat([s["temporal"][index].flatten(2), tem.flatten(1)[:, None]], 1)  # [b, K + 1, F_tem]
        weight = torch.cat([s["tem_weight"][index], torch.ones(b, 1, device=self.device)], 1)  # [b, K + 1]
        span = torch.cat([s["tem_span"][index], times[:, None, None].expand(b, 1, 3)], 1)  # [b, K + 1, 3]
        result = seeded_kmeans(points, weight, k, c.kmeans_iters, c.kmeans_tol)
        new_span = cluster_spans(span, span_sources(result, weight))  # [b, K, 3]
        order = torch.sort(new_span[..., 2], dim=-1, stable=True).indices  # [b, K] time order
        centroids = result.centroids.gather(1, order[..., None].expand(-1, -1, points.shape[-1]))
        weights = result.weights.gather(1, order)
        s["temporal"][index] = centroids.view(b, *s["temporal"].shape[1:])
        s["tem_weight"][index] = weights
        s["tem_span"][index] = new_span.gather(1, order[..., None].expand(-1, -1, 3))
        return centroids, weights

    def _update_abstract(self, index, abs_) -> None:
        slots = self.state["abstract"][index]  # [b, N_abs, P, D]
        b, n_abs, p, d = slots.shape
        moved = self.attention.update_paper(slots.transpose(0, 1).reshape(n_abs, b * p, d),
                                            abs_.reshape(1, b * p, d), self.cfg.update_ratio)  # rows as positions
        self.state["abstract"][index] = moved.reshape(n_abs, b, p, d).transpose(0, 1)

    def _retrieve(self, index, temporal, weight) -> None:
        s, r = self.state, min(self.cfg.retrieved_length, self.cfg.temporal_length)
        top = torch.sort(weight, dim=-1, descending=True, stable=True).indices[:, :r]  # [b, r] heaviest
        cent = temporal.gather(1, top[..., None].expand(-1, -1, temporal.shape[-1]))  # [b, r, F_tem]
        buffer_time = s["buffer_time"][index]  # [b, N_buff]
        dist = squared_distances(cent, s["buffer_tem"][index].flatten(2))  # [b, r, N_buff]
        dist.masked_fill_(buffer_time.isnan()[:, None, :], float("inf"))  # slots not written yet
        slots = nearest_most_recent(dist, buffer_time)  # [b, r]
        s["retrieved"][index, :r] = slots.gather(1, torch.argsort(buffer_time.gather(1, slots), dim=-1))  # time order


class _Batch:
    """A page's batched update at one batch size: its static inputs (rows, frames, times) and, on CUDA, its graph."""

    def __init__(self, page: MemoryPage, size: int):
        self.page = page
        self.index = torch.full((size,), page.capacity, dtype=torch.long, device=page.device)
        self.features = torch.zeros(size, page.grid**2, page.dim, dtype=page.dtype, device=page.device)
        self.times = torch.zeros(size, dtype=torch.float64, device=page.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        if self.graph is None:
            self.page.step(self.index, self.features, self.times)
        else:
            self.graph.replay()

    def prepare(self) -> None:
        """Capture the update (on CUDA with graphs, once), while every input row is the scratch row: the warm-up and
        capture runs touch no memory's state."""
        page = self.page
        if self.graph is not None or not page.use_graph:
            return
        self.index.fill_(page.capacity)
        side = torch.cuda.Stream(page.device)
        side.wait_stream(torch.cuda.current_stream(page.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                page.step(self.index, self.features, self.times)
        torch.cuda.current_stream(page.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with capture(self.graph, page.graph_pool):
            page.step(self.index, self.features, self.times)
