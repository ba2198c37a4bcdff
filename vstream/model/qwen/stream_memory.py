"""One stream's Flash Memory fed frame by frame: pairs frames into 2-frame units, runs the vision tower's two passes
on each unit (pre-merger features) and updates a `FlashMemory`. This is the `new_memory()` of the Qwen models, so the
stream processor, the engine and the offline path drive it like the STAR memories.

A frame arrives as the model's `encode` output for one frame: normalised pixels [1, 3 H, W] (the view of [3, H, W]).
The first frame fixes the stream's frame size and allocates the state (the memory and one pending frame); from then
on nothing is allocated and a frame of another size is an error. A unit's time is its first frame's. A frame that
waits for its pair is not yet in the memory (the read shows the units completed so far).

Many streams' units go through the tower together when their memories share a `UnitBatcher` (the engine gives one to
every Qwen stream's memory): a memory then queues each completed unit, and the batcher runs every queued unit of
every memory in one tower call (per frame size) when any of them is read next, then updates each memory with its own
units in order. The tower attends within each frame, so a unit's features do not depend on the others in its batch
(up to the rounding of the batch's matrix products).

What this module does not do: resize frames (the model's `crop`), apply the merger or build prompts.
"""

from __future__ import annotations

import dataclasses

import torch

from vstream.encoder.qwen_preprocess import patchify_units, small_pass
from vstream.memory.flash import FlashMemory, FlashRead
from vstream.model.qwen import vision_attention


class QwenTower:
    """Pre-merger features of 2-frame units through a Hugging Face Qwen2-VL / Qwen2.5-VL vision model."""

    def __init__(self, visual, backbone: str):
        self.visual, self.backbone = visual, backbone
        vision_attention.install(visual)  # one attention call per run of equal windows or frames, not per one
        cfg = visual.config
        self.patch, self.merge = cfg.patch_size, cfg.spatial_merge_size

    @torch.no_grad()
    def features(self, full: torch.Tensor, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """full [2u, 3, H, W], small [2u, 3, h, w] normalised pixels -> (small [u, N_s, C], full [u, N_f, C])."""
        u = full.shape[0] // 2
        grids = [[1, full.shape[2] // self.patch, full.shape[3] // self.patch]] * u + \
                [[1, small.shape[2] // self.patch, small.shape[3] // self.patch]] * u
        pixels = torch.cat([patchify_units(full, self.patch, self.merge),
                            patchify_units(small, self.patch, self.merge)])
        grid_thw = torch.tensor(grids, dtype=torch.long, device=pixels.device)
        weight = self.visual.patch_embed.proj.weight
        hidden = self._pre_merger(pixels.to(weight.dtype), grid_thw)  # [u (N_f + N_s), C]
        if self.backbone == "qwen2_5_vl":  # the blocks ran in window order: back to the patches' order
            hidden = self._unwindow(hidden, grid_thw)
        n_full = grids[0][1] * grids[0][2]
        return hidden[u * n_full :].view(u, -1, hidden.shape[-1]), hidden[: u * n_full].view(u, n_full, -1)

    def _pre_merger(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The merger's input during the tower's own forward: the same in every transformers version, whatever the
        forward returns (the merged tensor in 4.x, an output object in 5.x)."""
        captured: list[torch.Tensor] = []
        handle = self.visual.merger.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            self.visual(pixels, grid_thw=grid_thw)
        finally:
            handle.remove()
        return captured[0]

    def _unwindow(self, hidden: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if hasattr(self.visual, "get_window_index"):  # transformers 4.x and early 5.x
            window_index, _ = self.visual.get_window_index(grid_thw)
        else:
            from transformers.vision_utils import get_vision_window_index

            cfg = self.visual.config
            window_index, _ = get_vision_window_index(grid_thw, self.merge, cfg.window_size, self.patch)
        unit = self.merge**2
        groups = hidden.view(-1, unit, hidden.shape[-1])
        return groups[torch.argsort(window_index.to(hidden.device))].reshape(hidden.shape)


class UnitBatcher:
    """Units queued by many streams' memories, through the tower in one call per frame size (`flush`); see the module
    docstring. Used from one thread (the engine's)."""

    def __init__(self, tower: QwenTower, cfg):
        self.tower, self.cfg = tower, cfg
        self._queued: list[tuple[QwenStreamMemory, torch.Tensor, torch.Tensor]] = []  # (memory, pair, time [1])
        self.calls = 0  # tower calls made
        self.units = 0  # units they encoded

    def queue(self, memory: "QwenStreamMemory", pair: torch.Tensor, time: torch.Tensor) -> None:
        self._queued.append((memory, pair, time))

    def pending(self, memory: "QwenStreamMemory") -> bool:
        return any(m is memory for m, _, _ in self._queued)

    @torch.no_grad()
    def flush(self) -> None:
        """Encode every queued unit and update each memory with its own, in the order they were queued. When a batch
        fails, its memories' units run one memory at a time, and only a memory whose own units fail keeps the error
        (raised at its every read from then on)."""
        queued, self._queued = self._queued, []
        by_size: dict[tuple[int, int], list[tuple[QwenStreamMemory, torch.Tensor, torch.Tensor]]] = {}
        for item in queued:
            by_size.setdefault(tuple(item[1].shape[-2:]), []).append(item)
        for items in by_size.values():
            try:
                self._encode(items)
            except Exception:  # noqa: BLE001  the batch failed: memory by memory, so that only a failing one errs
                for memory in dict.fromkeys(m for m, _, _ in items):
                    try:
                        self._encode([item for item in items if item[0] is memory])
                    except Exception as error:  # noqa: BLE001  this stream's units failed: raised at its next read
                        memory.error = error

    def _encode(self, items: list) -> None:
        full = torch.cat([pair for _, pair, _ in items])  # [2u, 3, H, W]
        small, feats = self.tower.features(full, small_pass(full, self.cfg.small_pool, self.cfg.patch * self.cfg.merge))
        self.calls += 1
        self.units += len(items)
        for i, (memory, _, time) in enumerate(items):
            memory.flash.update(small[i : i + 1], feats[i : i + 1], time)


class QwenStreamMemory:
    """Frames -> units -> Flash Memory; see the module docstring."""

    page = None  # never a row of a memory page
    batcher: UnitBatcher | None = None  # set: units are queued on it and encoded with other streams' units
    error: BaseException | None = None  # an encoding of this memory's queued units failed (raised at every read)
    _graphs: tuple | None = None  # set by `enable_cuda_graph`: (the graph pool,)

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self.tower = model.tower
        self.device, self.dtype = model.device, model.dtype
        self.flash: FlashMemory | None = None
        self.pending: torch.Tensor | None = None  # [3, H, W] the frame waiting for its pair
        self.pending_time = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.has_pending = False
        self.frames_seen = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the stream's frames
        self.small_size: tuple[int, int] | None = None

    # ---------------------------------------------------------------- update

    @torch.no_grad()
    def update(self, features: torch.Tensor, times=None) -> None:
        """Frames in time order: features [n, 3 H, W] (the model's `encode`), times [n] seconds."""
        if features.dim() != 3 or features.shape[1] % 3:
            raise ValueError(f"expected encoded frames [n, 3*H, W], got {tuple(features.shape)}")
        n = features.shape[0]
        if times is None:
            times = torch.arange(self.frames_seen, self.frames_seen + n, dtype=torch.float64, device=self.device)
        times = torch.as_tensor(times, dtype=torch.float64, device=self.device).reshape(-1)
        if times.shape[0] != n:
            raise ValueError(f"expected {n} frame times, got {times.shape[0]}")
        frames = features.to(self.device, self.dtype).view(n, 3, features.shape[1] // 3, features.shape[2])
        self._allocate(frames.shape[2], frames.shape[3])
        for i in range(n):
            if self.has_pending:
                self._unit(torch.stack([self.pending, frames[i]]))
            else:
                self.pending.copy_(frames[i])
                self.pending_time.copy_(times[i : i + 1])
            self.has_pending = not self.has_pending
            self.frames_seen += 1

    def _allocate(self, h: int, w: int) -> None:
        if self.size is not None:
            if (h, w) != self.size:
                raise ValueError(f"a stream's frames must keep one size: expected {self.size[0]}x{self.size[1]}, "
                                 f"got {h}x{w}")
            return
        c = self.cfg
        factor = c.patch * c.merge
        probe = small_pass(torch.zeros(1, 3, h, w), c.small_pool, factor)
        self.size, self.small_size = (h, w), tuple(probe.shape[-2:])
        n_full = (h // c.patch) * (w // c.patch)
        n_small = (self.small_size[0] // c.patch) * (self.small_size[1] // c.patch)
        self.flash = FlashMemory(c.memory, c.feature_dim, n_small, n_full, c.merge**2, self.device, self.dtype)
        if self._graphs is not None:
            self.flash.enable_cuda_graph(self._graphs[0])
        self.pending = torch.zeros(3, h, w, dtype=self.dtype, device=self.device)

    def _unit(self, pair: torch.Tensor) -> None:
        if self.batcher is not None:
            self.batcher.queue(self, pair, self.pending_time.clone())
            return
        c = self.cfg
        small, full = self.tower.features(pair, small_pass(pair, c.small_pool, c.patch * c.merge))
        self.flash.update(small, full, self.pending_time)

    def enable_cuda_graph(self, pool=None) -> None:
        """Replay the memory's steady updates from a CUDA graph (`FlashMemory.enable_cuda_graph`; the memory is made
        at the first frame). `pool`: the engine's graph pool, or None."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the memory on a CUDA device, it is on {self.device}")
        self._graphs = (pool,)
        if self.flash is not None:
            self.flash.enable_cuda_graph(pool)

    def settle(self) -> None:
        """Run the units this memory has queued on its batcher (with every other queued unit); raise the error of a
        failed encoding of its units (at every read from then on)."""
        if self.batcher is not None and self.batcher.pending(self):
            self.batcher.flush()
        if self.error is not None:  # for good: the stream lost those units (the engine ends it with the error)
            raise RuntimeError(f"encoding this stream's frames failed: {self.error}") from self.error

    # ---------------------------------------------------------------- read and budgets

    def grids(self) -> dict[str, tuple[int, int]]:
        """Merged (LLM token) grids of the two passes."""
        p = self.cfg.patch * self.cfg.merge
        (h, w), (hs, ws) = self.size, self.small_size
        return {"full": (h // p, w // p), "small": (hs // p, ws // p)}

    def read(self) -> FlashRead:
        self.settle()
        if self.flash is None:
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return FlashRead(tokens=torch.zeros(0, self.cfg.feature_dim, dtype=self.dtype, device=self.device),
                             counts={"retrieved": 0, "temporal": 0}, spatial_times=empty, retrieved_times=empty,
                             temporal_spans=empty.view(0, 3), temporal_weights=empty.float(), frames_seen=0,
                             merge=self.cfg.merge**2)
        read = self.flash.read()
        return dataclasses.replace(read, frames_seen=self.frames_seen, extra={"grids": self.grids()})

    @property
    def nbytes(self) -> int:
        """Bytes of the state (the memory and the pending frame); 0 before the first frame fixes the frame size."""
        if self.flash is None:
            return 0
        return self.flash.nbytes + self.pending.numel() * self.pending.element_size() + 8

    @property
    def max_tokens(self) -> int:
        return self.flash.max_tokens if self.flash is not None else self.cfg.max_tokens

    @property
    def num_tokens(self) -> int:
        self.settle()
        return sum(self.flash.counts().values()) if self.flash is not None else 0

    def counts(self) -> dict[str, int]:
        self.settle()
        return self.flash.counts() if self.flash is not None else {"retrieved": 0, "temporal": 0}

    def state_dict(self) -> dict:
        self.settle()
        if self.flash is None:
            return {"size": None, "frames_seen": self.frames_seen}
        return {"size": self.size, "flash": self.flash.state_dict(), "pending": self.pending.clone(),
                "pending_time": self.pending_time.clone(), "has_pending": self.has_pending,
                "frames_seen": self.frames_seen}

    def load_state_dict(self, state: dict) -> None:
        self.settle()
        self.frames_seen = int(state["frames_seen"])
        if state["size"] is None:
            return
        self._allocate(*state["size"])
        self.flash.load_state_dict(state["flash"])
        self.pending.copy_(state["pending"])
        self.pending_time.copy_(state["pending_time"])
        self.has_pending = bool(state["has_pending"])
