"""Memory updates of many streams per round: each memory replaying its own captured update, against memory pages
(one batched update per page of streams, replayed from the page's graph) — what the engine's round runs.

Usage: python benchmarks/memory_pages.py [--streams 64 256] [--page 64] [--rounds 20]
Prints one JSON line per stream count: milliseconds of device time per round (every stream one frame), measured with
CUDA events around the whole round, median and p95 over the rounds; released memory shapes (D=1024, fp16).
"""

import argparse
import json
import statistics

import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.paged import MemoryPage
from vstream.stats import percentile

D, GRID = 1024, 16


def steady(memories, template):
    for m in memories:
        m.load_state_dict(template.state_dict())


def timed_rounds(run_round, rounds):
    times = []
    for r in range(rounds + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_round(r)
        end.record()
        end.synchronize()
        if r >= 3:  # the first rounds capture graphs
            times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p95_ms": round(percentile(times, 0.95), 3)}


def profile(page: MemoryPage) -> None:
    """The kernels of one page update, run eagerly (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    page.active.fill_(True)
    with torch.no_grad():
        page._step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            page._step()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="also print the device kernels of one eager page update")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = MemoryConfig()
    att = AbstractAttention(D, 32).cuda().half()
    template = PaperStarMemory(cfg, D, att, GRID, device="cuda", dtype=torch.float16)
    fill = torch.randn(cfg.temporal_length + cfg.abstract_length, GRID * GRID, D, device="cuda", dtype=torch.float16)
    template.update(fill, torch.arange(fill.shape[0], dtype=torch.float64, device="cuda"))
    assert template.steady
    for n in args.streams:
        frames = torch.randn(n, GRID * GRID, D, device="cuda", dtype=torch.float16)
        times = torch.full((n,), 1e3, dtype=torch.float64, device="cuda")
        alone = [PaperStarMemory(cfg, D, att, GRID, device="cuda", dtype=torch.float16) for _ in range(n)]
        steady(alone, template)
        for m in alone:
            m.enable_cuda_graph()

        def each_alone(r):
            for i, m in enumerate(alone):  # called before the del below  # noqa: F821
                m.update(frames[i : i + 1], times[i : i + 1] + r)

        row = {"streams": n, "each_alone": timed_rounds(each_alone, args.rounds)}
        del alone
        pages = [MemoryPage(cfg, D, att, GRID, args.page, "cuda", torch.float16) for _ in range(-(-n // args.page))]
        paged = [pages[i // args.page].new_memory() for i in range(n)]
        steady(paged, template)

        def by_pages(r):
            for i, m in enumerate(paged):  # called before the del below  # noqa: F821
                m.update(frames[i : i + 1], times[i : i + 1] + r)
            for p in pages:  # noqa: F821
                p.flush()

        row |= {"pages": len(pages), "page": args.page, "paged": timed_rounds(by_pages, args.rounds),
                "page_state_bytes": pages[0].nbytes, "gpu": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        if args.profile:
            profile(pages[0])
        del paged, pages
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
