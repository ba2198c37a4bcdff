"""Memory updates of many streams per round (`pages_benchmark`, what `vstream bench pages` runs): each stream's memory
replaying its own captured update, against memory pages (one batched update per page of streams, replayed from the
page's graph), which is what the engine's round runs.

Released memory shapes (D = 1024, a 16 x 16 grid, fp16), random features, every memory steady (its filling phase
done) before the timed rounds; then the same for fresh memories in their fill phase (`fill`: each frame appended as a
cluster, batched by pages since the fill phase has its batched form), rounds capped so that none leaves it. Times are
milliseconds of device time per round (every stream one frame), CUDA events around the whole round, median and p95
over the rounds. CUDA only: both sides replay CUDA graphs. The engine's own scheduling of pages is not measured here
(`vstream bench streams` and `serve` run the engine).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator

import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.paged import MemoryPage
from vstream.stats import percentile

D, GRID = 1024, 16
"""The released model's feature width and patch grid."""
CAPTURE_ROUNDS = 3
"""Rounds run before the timed ones: they capture the graphs."""


def pages_benchmark(streams=(64, 256), page: int = 64, rounds: int = 20, device: torch.device | str = "cuda",
                    kernels: bool = False) -> Iterator[tuple[dict, str | None]]:
    """For each count of `streams`, one (row, kernel table) as soon as it is measured: the row times a round of every
    stream's memory alone (`each_alone`) and by pages of `page` streams (`paged`); the table (with `kernels`) lists
    the device kernels of one eager page update, else None."""
    device = torch.device(device)
    torch.manual_seed(0)
    cfg = MemoryConfig()
    att = AbstractAttention(D, 32).to(device).half()
    template = PaperStarMemory(cfg, D, att, GRID, device=device, dtype=torch.float16)
    fill = torch.randn(cfg.temporal_length + cfg.abstract_length, GRID * GRID, D, device=device, dtype=torch.float16)
    template.update(fill, torch.arange(fill.shape[0], dtype=torch.float64, device=device))
    if not template.steady:
        raise RuntimeError(f"the template memory is not steady after {fill.shape[0]} frames")
    for n in streams:
        frames = torch.randn(n, GRID * GRID, D, device=device, dtype=torch.float16)
        times = torch.full((n,), 1e3, dtype=torch.float64, device=device)
        row = {"streams": n, "each_alone": _each_alone(cfg, att, template, frames, times, rounds)}
        row |= _by_pages(cfg, att, template, frames, times, page, rounds)
        row["fill"] = _fill_phase(cfg, att, frames, times, page, min(rounds, cfg.temporal_length - CAPTURE_ROUNDS - 1))
        table = _page_kernels(cfg, att, template, frames, times, min(n, page)) if kernels else None
        torch.cuda.empty_cache()
        yield row, table


def _each_alone(cfg, att, template, frames: torch.Tensor, times: torch.Tensor, rounds: int) -> dict:
    """A round of one memory per stream, each replaying its own captured update."""
    alone = _alone(cfg, att, frames)
    _copy_state(alone, template)
    return _timed_rounds(_round(alone, [], frames, times), rounds)


def _by_pages(cfg, att, template, frames: torch.Tensor, times: torch.Tensor, page: int, rounds: int) -> dict:
    """A round of the streams' memories by pages of `page`: each memory queues its frame, each page runs them in one
    batched update replayed from its graph."""
    pages, paged = _paged(cfg, att, frames, page)
    _copy_state(paged, template)
    return {"pages": len(pages), "page": page, "paged": _timed_rounds(_round(paged, pages, frames, times), rounds),
            "page_state_bytes": pages[0].nbytes, "gpu": torch.cuda.get_device_name(frames.device)}


def _fill_phase(cfg, att, frames: torch.Tensor, times: torch.Tensor, page: int, rounds: int) -> dict:
    """Rounds of fresh memories in their fill phase: each alone (its own fill graph) and by pages."""
    alone = _alone(cfg, att, frames)
    pages, paged = _paged(cfg, att, frames, page)
    out = {"each_alone": _timed_rounds(_round(alone, [], frames, times), rounds),
           "paged": _timed_rounds(_round(paged, pages, frames, times), rounds)}
    if not all(m.filling for m in paged):
        raise RuntimeError("a memory left its fill phase during the fill rounds")
    return out


def _alone(cfg, att, frames: torch.Tensor) -> list[PaperStarMemory]:
    """A memory per stream, each replaying its own captured update."""
    alone = [PaperStarMemory(cfg, D, att, GRID, device=frames.device, dtype=torch.float16) for _ in frames]
    for m in alone:
        m.enable_cuda_graph()
    return alone


def _paged(cfg, att, frames: torch.Tensor, page: int) -> tuple[list[MemoryPage], list[PaperStarMemory]]:
    """Pages of `page` streams, and a memory per stream in them."""
    pages = [MemoryPage(cfg, D, att, GRID, page, frames.device, torch.float16) for _ in range(-(-len(frames) // page))]
    return pages, [pages[i // page].new_memory() for i in range(len(frames))]


def _round(memories: list[PaperStarMemory], pages: list[MemoryPage], frames: torch.Tensor,
           times: torch.Tensor) -> Callable[[int], None]:
    """Round r: every memory takes its stream's frame at its time + r; then the pages run what was queued."""
    def run(r: int) -> None:
        for i, m in enumerate(memories):
            m.update(frames[i : i + 1], times[i : i + 1] + r)
        for p in pages:
            p.flush()

    return run


def _copy_state(memories: list[PaperStarMemory], template: PaperStarMemory) -> None:
    """Every memory in the template's (steady) state."""
    for m in memories:
        m.load_state_dict(template.state_dict())


def _timed_rounds(run_round: Callable[[int], None], rounds: int) -> dict:
    """Median and p95 milliseconds of `rounds` rounds (CUDA events around each), after CAPTURE_ROUNDS untimed ones."""
    times = []
    for r in range(rounds + CAPTURE_ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_round(r)
        end.record()
        end.synchronize()
        if r >= CAPTURE_ROUNDS:
            times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p95_ms": round(percentile(times, 0.95), 3)}


def _page_kernels(cfg, att, template, frames: torch.Tensor, times: torch.Tensor, n: int) -> str:
    """The device kernels of one batched update of `n` memories of a page, run eagerly (a page without graphs: the
    graph replays the same kernels), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    page = MemoryPage(cfg, D, att, GRID, n, frames.device, torch.float16, graph=False)
    members = [page.new_memory() for _ in range(n)]
    _copy_state(members, template)
    page.update(members, frames[:n], times[:n])  # the first run outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        page.update(members, frames[:n], times[:n] + 1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
