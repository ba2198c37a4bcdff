"""Many streams' paper-mode memories updated as one: the state of up to `capacity` memories lives in the rows of
stacked tensors, and one one-frame update of any set of them is one batched computation (on CUDA, one graph replay
for the steady memories and one for those still filling) whose cost grows with the memories updated, not with the
page.

    page = MemoryPage(cfg, dim, attention, grid, capacity=64, device="cuda", dtype=torch.float16)
    memory = page.new_memory()           # a PaperStarMemory whose tensors are views of one row
    page.update([m1, m2], features, times)  # one frame each, every memory steady: one replay for all of them
    page.fill_update([m3], features, times)  # the same for memories in their fill phase
    m1.update(f, t); m2.update(g, u)     # deferred: queued, run together (by phase) when any of them is read next

A page's memory is an ordinary `PaperStarMemory` (its reads, snapshots, state dicts and multi-frame updates work on
its row); the one-frame updates of its two phases have a batched form here: the fill phase's (`fill_step`: a memory's
first `temporal_length` frames, each appended as a cluster and an abstract slot at the row's own counts, given on the
device, and retrieval among the clusters held so far) and the steady one's (`step`). A batched update gathers the
rows being updated (their small parts: clusters, slots, times; the ring buffer is written in place and read only for
retrieval), updates them and scatters them back. Its batch is padded to a power of two with a scratch row that no
memory owns, so a page captures at most 2 (log2(capacity) + 1) graphs in its life, whatever the streams that come and
go: a stream that joins costs no capture of its own. Same arithmetic as `PaperStarMemory._step` and `_fill_step`,
batched over rows: equal to them up to the rounding of batched matrix products (the k-means labels, weights and
retrieved frames are the same on the tested streams).

What this module does not do: decide which memories share a page or when to update (the engine does), or batch
updates of several frames of one memory (those run on the memory's row).
"""

from __future__ import annotations

import torch

from vstream.config import MemoryConfig
from vstream.devices import graph_sizes, warm_capture
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
        self._batches: dict[tuple[int, bool], _Batch] = {}  # (batch size, fill) -> its static inputs and graph
        self._queued: dict[int, tuple[PaperStarMemory, torch.Tensor, torch.Tensor]] = {}  # row -> its queued frame
        self.updates = 0  # batched updates run (each one graph replay on CUDA)

    @property
    def captured(self) -> list[int]:
        """The batch sizes whose steady update is captured in a CUDA graph so far."""
        return sorted(size for (size, fill), batch in self._batches.items() if batch.graph is not None and not fill)

    @property
    def captured_fill(self) -> list[int]:
        """The batch sizes whose fill-phase update is captured in a CUDA graph so far."""
        return sorted(size for (size, fill), batch in self._batches.items() if batch.graph is not None and fill)

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
        """Queue a steady or filling memory's one-frame update (features [1, grid^2, D], times [1]) for the next
        `flush`; a memory that has a frame queued already has it run first."""
        if self.members.get(memory.page_row) is not memory:
            raise ValueError("this memory is not in this page (it was released)")
        if memory.page_row in self._queued:
            self.flush()
        times = torch.as_tensor(times, dtype=torch.float64).reshape(1)
        self._queued[memory.page_row] = (memory, features, times)

    def settle(self, memory: PaperStarMemory) -> None:
        """Run the queued updates if `memory` has one among them (its counts then say its phase)."""
        if memory.page_row in self._queued:
            self.flush()

    def flush(self) -> None:
        """Run every queued update: the steady memories' in one batched update, the filling ones' in another."""
        if not self._queued:
            return
        queued, self._queued = list(self._queued.values()), {}
        queued = [q for q in queued if self.members.get(q[0].page_row) is q[0]]  # not released meanwhile
        for run, group in ((self.update, [q for q in queued if q[0].steady]),
                           (self.fill_update, [q for q in queued if not q[0].steady])):
            if group:
                times = torch.cat([t.to(self.device, non_blocking=True) for _, _, t in group])
                run([m for m, _, _ in group], torch.cat([f for _, f, _ in group]), times)

    @torch.no_grad()
    def update(self, memories: list[PaperStarMemory], features: torch.Tensor, times: torch.Tensor) -> None:
        """One frame for each of `memories` (all steady, all of this page, no two alike): features [n, grid^2, D],
        times [n] float64 (a device tensor keeps this free of synchronisation)."""
        self._run(memories, features, times, fill=False)
        for memory in memories:
            memory.frames_seen += 1

    @torch.no_grad()
    def fill_update(self, memories: list[PaperStarMemory], features: torch.Tensor, times: torch.Tensor) -> None:
        """`update` for memories in their fill phase (`PaperStarMemory.filling`): each frame becomes a new cluster and
        a new abstract slot of its memory, at that memory's counts."""
        self._run(memories, features, times, fill=True)
        for memory in memories:
            memory._counted_fill()
            memory.frames_seen += 1

    def _run(self, memories: list[PaperStarMemory], features: torch.Tensor, times: torch.Tensor, fill: bool) -> None:
        n = len(memories)
        if features.shape != (n, self.grid**2, self.dim) or tuple(times.shape) != (n,):
            raise ValueError(f"expected features [{n}, {self.grid ** 2}, {self.dim}] and times [{n}] for {n} memories, "
                             f"got {tuple(features.shape)} and {tuple(times.shape)}")
        if self._queued:  # frames queued earlier come first
            self.flush()
        rows = [m.page_row for m in memories]
        phase = "filling" if fill else "steady"
        if any(self.members.get(r) is not m or not getattr(m, phase) for r, m in zip(rows, memories)) or \
                len(set(rows)) < n:
            raise ValueError(f"a batched {'fill-phase ' if fill else ''}update takes distinct {phase} memories of "
                             f"this page")
        size = next(b for b in self.sizes if b >= n)
        batch = self._batches.get((size, fill))
        if batch is None:
            batch = self._batches[size, fill] = _Batch(self, size, fill)
        batch.prepare()
        pad = size - n
        index = torch.tensor(rows + [self.capacity] * pad, dtype=torch.long)  # padded with the scratch row
        if fill:  # the rows' counts of clusters and abstract slots: where each frame is appended
            index = torch.cat([index, torch.tensor([m.n_tem for m in memories] + [0] * pad),
                               torch.tensor([m.n_abs for m in memories] + [0] * pad)])
        index = index.pin_memory() if self.device.type == "cuda" else index
        batch.index.copy_(index, non_blocking=True)
        batch.features[:n].copy_(features)
        batch.times[:n].copy_(times)
        batch.run()
        self.updates += 1

    def step(self, index: torch.Tensor, features: torch.Tensor, times: torch.Tensor) -> None:
        """(1) -> (5) of `PaperStarMemory._step` for the rows `index` [b] (distinct, but for repeats of the scratch
        row), one frame each: features [b, grid^2, D], times [b]."""
        tem, abs_ = self._push(index, features, times)
        temporal, weight = self._update_temporal(index, tem, times)
        self._update_abstract(index, abs_)
        self._retrieve(index, temporal, weight)

    def fill_step(self, index: torch.Tensor, features: torch.Tensor, times: torch.Tensor, n_tem: torch.Tensor,
                  n_abs: torch.Tensor) -> None:
        """`PaperStarMemory._fill_step` for the rows `index` [b] at their counts `n_tem`, `n_abs` [b] (int64), one
        frame each: pushed to the ring (1), appended as a cluster of weight 1 (3) and an abstract slot (4), then
        retrieval among the n_tem + 1 clusters held (5)."""
        s, b = self.state, index.shape[0]
        tem, abs_ = self._push(index, features, times)
        s["temporal"][index, n_tem] = tem
        s["tem_weight"][index, n_tem] = 1.0
        s["tem_span"][index, n_tem] = times[:, None].expand(b, 3)
        s["abstract"][index, n_abs] = abs_
        self._retrieve_held(index, n_tem + 1)

    def _push(self, index, features, times) -> tuple[torch.Tensor, torch.Tensor]:
        """(1): the rows' frames into their rings -> their temporal and abstract poolings."""
        c, s = self.cfg, self.state
        spa, tem, abs_ = pyramid(features, c.spatial_size, c.temporal_size, c.abstract_size)
        count = s["count"][index]  # [b]
        slot = count % c.buffer_length
        for name, new in (("buffer", spa), ("buffer_tem", tem), ("buffer_time", times)):
            s[name][index, slot] = new
        s["count"][index] = count + 1
        return tem, abs_

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

    def _retrieve_held(self, index, held) -> None:
        """`PaperStarMemory._retrieve_held` for the rows `index`, `held` [b] clusters held in each: the min(N_ret,
        held) heaviest (ties: the earlier; the clusters past `held` weigh -inf) retrieve their nearest frames in time
        order; the rest of a row's `retrieved` stays as it was."""
        s, c = self.state, self.cfg
        k, r = c.temporal_length, min(c.retrieved_length, c.temporal_length)
        positions = torch.arange(k, device=self.device)
        weight = torch.where(positions[None] < held[:, None], s["tem_weight"][index], -torch.inf)  # [b, K]
        top = torch.sort(weight, dim=-1, descending=True, stable=True).indices[:, :r]  # [b, r]
        temporal = s["temporal"][index].flatten(2)  # [b, K, F_tem]
        cent = temporal.gather(1, top[..., None].expand(-1, -1, temporal.shape[-1]))
        buffer_time = s["buffer_time"][index]  # [b, N_buff]
        dist = squared_distances(cent, s["buffer_tem"][index].flatten(2))  # [b, r, N_buff]
        dist.masked_fill_(buffer_time.isnan()[:, None, :], float("inf"))
        slots = nearest_most_recent(dist, buffer_time)  # [b, r]
        kept = positions[None, :r] < held[:, None]  # [b, r]
        order = torch.argsort(torch.where(kept, buffer_time.gather(1, slots), torch.inf), dim=-1, stable=True)
        slots = slots.gather(1, order)
        s["retrieved"][index, :r] = torch.where(kept, slots, s["retrieved"][index, :r])


class _Batch:
    """A page's batched update at one batch size, steady or fill phase: its static inputs (rows, with a fill phase's
    counts after them; frames; times) and, on CUDA, its graph."""

    def __init__(self, page: MemoryPage, size: int, fill: bool = False):
        self.page, self.size, self.fill = page, size, fill
        self.index = torch.full((3 * size if fill else size,), page.capacity, dtype=torch.long, device=page.device)
        if fill:
            self.index[size:].zero_()
        self.features = torch.zeros(size, page.grid**2, page.dim, dtype=page.dtype, device=page.device)
        self.times = torch.zeros(size, dtype=torch.float64, device=page.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()

    def _step(self) -> None:
        if self.fill:
            rows, n_tem, n_abs = self.index.view(3, self.size)
            self.page.fill_step(rows, self.features, self.times, n_tem, n_abs)
        else:
            self.page.step(self.index, self.features, self.times)

    def prepare(self) -> None:
        """Capture the update (on CUDA with graphs, once), while every input row is the scratch row: the warm-up and
        capture runs touch no memory's state."""
        page = self.page
        if self.graph is not None or not page.use_graph:
            return
        self.index[: self.size].fill_(page.capacity)
        self.index[self.size :].zero_()  # a fill phase's counts: the scratch row's first cluster and slot
        self.graph = warm_capture(self._step, page.graph_pool, page.device)
