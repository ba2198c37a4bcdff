"""Which torch device a name means: `auto` (the default everywhere) is CUDA when torch sees one, else the CPU.

This module names devices, the batch sizes a captured graph is kept for, the CUDA memory pools that captured graphs
share, and how a graph is captured while other work runs (`capture`, `warm_capture`); it does not move tensors or
load models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vstream.errors import UserInputError

DEVICE_HELP = "auto (CUDA when torch sees a device, else the CPU), cpu, cuda or cuda:N."


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` (or a torch.device) -> a torch.device that exists here; raises
    UserInputError (a ValueError) naming the name given."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"device must be {DEVICE_HELP[:-1]}; got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"device must be {DEVICE_HELP[:-1]}; got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {name!r} was asked for, but torch sees no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise UserInputError(f"device {name!r} was asked for, but torch sees {count} CUDA device(s): "
                                 f"expected an index below {count}")
    return device


def graph_sizes(most: int) -> list[int]:
    """The batch sizes a fixed-shape step is captured at, for batches of 1..`most`: the powers of two below `most`,
    and `most` (a batch of n runs at the smallest size >= n, so at most half of a step's rows are padding)."""
    if most < 1:
        raise ValueError(f"graph sizes need a largest batch of at least 1, got {most}")
    return sorted({1 << i for i in range(most.bit_length()) if 1 << i < most} | {most})


class GraphPool:
    """A CUDA memory pool for graphs that never run at the same time, alive as long as this object.

    A pool named by a bare `torch.cuda.graph_pool_handle()` lives only while a graph captured into it lives: once the
    last such graph is freed (a stream closed, its memory's graphs with it), the allocator retires the pool, and the
    next capture into the same handle fails on an internal assertion. This object holds one small graph of its own in
    the pool (`anchor`), so the pool outlives every graph that comes and goes. Pass `handle` as `pool=` to
    `torch.cuda.graph`."""

    def __init__(self, device: torch.device | str | None = None):
        self.handle = torch.cuda.graph_pool_handle()
        self.anchor = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.anchor, pool=self.handle):
            self.anchor_output = torch.ones(1, device="cuda").add_(1)  # the graph's one block of the pool


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool=None, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
    """Capture into `graph` what the block queues (on a side stream), as `torch.cuda.graph` does but without what it
    does first: a synchronisation of the whole device and the emptying of the device's and the pinned host memory's
    caching allocators. Those cost little once at start-up, but a serving engine captures while it serves (a new
    stream's memory, a page's new batch size): each capture then stalled every stream, and the emptied caches sent the
    allocations that followed back to the driver (an H100 server with 256 streams spent most of its engine thread in
    captures, 2026-12-08). `pool`: a graph pool handle (`GraphPool.handle`) or None for the graph's own."""
    stream = stream if stream is not None else torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="global")
        try:
            yield
        finally:
            graph.capture_end()


def warm_capture(run, pool=None, device: torch.device | str | None = None) -> torch.cuda.CUDAGraph:
    """`run()` twice on a side stream (the warm-up capture requires: kernels chosen, workspaces allocated), then
    captured (`capture`) into a new graph, returned. What the runs write is the caller's to undo."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capture(graph, pool):
        run()
    return graph
