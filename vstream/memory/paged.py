"""Many streams' paper-mode memories updated as one: the state of up to `capacity` memories lives in the rows of
stacked tensors, and one steady one-frame update of any set of them is one batched computation (on CUDA, one graph).

    page = MemoryPage(cfg, dim, attention, grid, capacity=64, device="cuda", dtype=torch.float16)
    memory = page.new_memory()           # a PaperStarMemory whose tensors are views of one row
    page.update([m1, m2], features, times)  # one frame each, every memory steady: one replay for all of them
    m1.update(f, t); m2.update(g, u)     # the same, deferred: queued, run together when either is read next

A page's memory is an ordinary `PaperStarMemory` (its reads, snapshots, state dicts and non-steady updates work on
its row); only the steady one-frame update has a batched form here. That update runs for every row, and rows without
a frame this time keep their state (`torch.where` on an `active` mask), so its shapes never change and it is captured
once. Same arithmetic as `PaperStarMemory._step`, batched over rows: equal to it up to the rounding of batched matrix
products (the k-means labels, weights and retrieved frames are the same on the tested streams).

What this module does not do: decide which memories share a page or when to update (the engine does), or batch the
filling phase (a memory's first `temporal_length` frames), whose shapes change frame by frame.
"""

from __future__ import annotations

import torch

from vstream.config import MemoryConfig
from vstream.encoder.pooling import pyramid
from vstream.memory.attention import AbstractAttention
from vstream.memory.kmeans import squared_distances
from vstream.memory.star import (PaperStarMemory, cluster_spans, nearest_most_recent, paper_state_layout, seeded_kmeans,
                                 span_sources)


class MemoryPage:
    """Up to `capacity` paper-mode memories in the rows of stacked state tensors (see the module docstring)."""

    def __init__(self, cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, capacity: int,
                 device, dtype: torch.dtype, graph: bool | None = None, graph_pool=None):
        """`graph`: capture the batched update in a CUDA graph (None: on CUDA). `graph_pool`: the graph's memory pool
        (`torch.cuda.graph_pool_handle()`), shared by pages whose updates never run at the same time, so that their
        temporaries take the room of one page's, not of each."""
        if cfg.mode != "paper":
            raise ValueError(f"a memory page holds paper-mode memories, got mode {cfg.mode!r}")
        if capacity < 1:
            raise ValueError(f"a memory page needs a capacity of at least 1, got {capacity}")
        self.cfg, self.dim, self.attention, self.grid = cfg, dim, attention, grid
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self.layout = paper_state_layout(cfg, dim, dtype)
        self.state = {k: torch.full((capacity, *shape), fill, dtype=dt, device=self.device)
                      for k, (shape, dt, fill) in self.layout.items()}
        self.members: dict[int, PaperStarMemory] = {}  # row -> its memory
        self.features = torch.zeros(capacity, grid**2, dim, dtype=dtype, device=self.device)  # static inputs
        self.times = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        self.active = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_pool = graph_pool
        self._queued: dict[int, tuple[PaperStarMemory, torch.Tensor, torch.Tensor]] = {}  # row -> its queued frame
        self.updates = 0  # batched updates run (each one graph replay on CUDA)

    @property
    def free(self) -> int:
        return self.capacity - len(self.members)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

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
        index = torch.tensor(rows, dtype=torch.long)
        index = (index.pin_memory() if self.device.type == "cuda" else index).to(self.device, non_blocking=True)
        self.active.zero_()
        self.active.index_fill_(0, index, True)
        self.features.index_copy_(0, index, features.to(self.dtype))
        self.times.index_copy_(0, index, times.to(self.device, torch.float64))
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._step()
        self.updates += 1
        for memory in memories:
            memory.frames_seen += 1

    def _capture(self) -> None:
        saved = {k: v.clone() for k, v in self.state.items()}  # warm-up and capture leave no trace
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.graph_pool):
            self._step()
        for k, v in saved.items():
            self.state[k].copy_(v)

    def _step(self) -> None:
        """(1) -> (5) of `PaperStarMemory._step` for every row; rows not `active` keep their state."""
        c, s, on = self.cfg, self.state, self.active
        spa, tem, abs_ = pyramid(self.features, c.spatial_size, c.temporal_size, c.abstract_size)
        self._push_buffer(spa, tem, on)
        self._update_temporal(tem, on)
        self._update_abstract(abs_, on)
        self._retrieve(on)
        s["count"].add_(on.long())

    def _push_buffer(self, spa, tem, on) -> None:
        s, rows = self.state, torch.arange(self.capacity, device=self.device)
        slot = s["count"] % self.cfg.buffer_length  # [C]
        for name, new in (("buffer", spa), ("buffer_tem", tem), ("buffer_time", self.times)):
            old = s[name][rows, slot]
            s[name][rows, slot] = torch.where(on.view(-1, *[1] * (new.dim() - 1)), new, old)

    def _update_temporal(self, tem, on) -> None:
        s, c = self.state, self.cfg
        k, cap = c.temporal_length, self.capacity
        points = torch.cat([s["temporal"].flatten(2), tem.flatten(1)[:, None]], 1)  # [C, K + 1, F_tem]
        weight = torch.cat([s["tem_weight"], torch.ones(cap, 1, device=self.device)], 1)  # [C, K + 1]
        span = torch.cat([s["tem_span"], self.times[:, None, None].expand(cap, 1, 3)], 1)  # [C, K + 1, 3]
        result = seeded_kmeans(points, weight, k, c.kmeans_iters, c.kmeans_tol)
        new_span = cluster_spans(span, span_sources(result, weight))  # [C, K, 3]
        order = torch.sort(new_span[..., 2], dim=-1, stable=True).indices  # [C, K] time order
        centroids = result.centroids.gather(1, order[..., None].expand(-1, -1, points.shape[-1]))
        for name, new in (("temporal", centroids.view_as(s["temporal"])), ("tem_weight", result.weights.gather(1, order)),
                          ("tem_span", new_span.gather(1, order[..., None].expand(-1, -1, 3)))):
            s[name].copy_(torch.where(on.view(-1, *[1] * (new.dim() - 1)), new.to(s[name].dtype), s[name]))

    def _update_abstract(self, abs_, on) -> None:
        slots = self.state["abstract"]  # [C, N_abs, P, D]
        cap, n_abs, p, d = slots.shape
        moved = self.attention.update_paper(slots.transpose(0, 1).reshape(n_abs, cap * p, d),
                                            abs_.reshape(1, cap * p, d), self.cfg.update_ratio)  # rows as positions
        moved = moved.reshape(n_abs, cap, p, d).transpose(0, 1)
        slots.copy_(torch.where(on[:, None, None, None], moved, slots))

    def _retrieve(self, on) -> None:
        s, r = self.state, min(self.cfg.retrieved_length, self.cfg.temporal_length)
        top = torch.sort(s["tem_weight"], dim=-1, descending=True, stable=True).indices[:, :r]  # [C, r] heaviest
        cent = s["temporal"].flatten(2).gather(1, top[..., None].expand(-1, -1, s["temporal"][0, 0].numel()))
        dist = squared_distances(cent, s["buffer_tem"].flatten(2))  # [C, r, N_buff]
        dist.masked_fill_(s["buffer_time"].isnan()[:, None, :], float("inf"))  # slots not written yet
        slots = nearest_most_recent(dist, s["buffer_time"])  # [C, r]
        slots = slots.gather(1, torch.argsort(s["buffer_time"].gather(1, slots), dim=-1))  # time order
        s["retrieved"][:, :r] = torch.where(on[:, None], slots, s["retrieved"][:, :r])
