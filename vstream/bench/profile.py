"""torch.profiler tables of the hot paths on CUDA: the model's fast path (`profile_tables`: one prefill, 20 decode
steps, one batch-64 encode; the profile part of `vstream bench all`), and the steady paper-mode memory update at the
released shapes (`memory_profile_tables`, what `vstream bench profile` prints): which kernels its time goes to.

Tables only: the times of these paths are `vstream bench memory`, `answer` and `encode`.
"""

from __future__ import annotations

import torch

from vstream.bench.pages import D, GRID


def profile_tables(model) -> str:
    """Kernel-time tables (CUDA) of one fast prefill, 20 decode steps and one batch-64 encode."""
    from torch.profiler import ProfilerActivity, profile

    dec = model.static_answerer.decoder
    mem = torch.randn(model.cfg.memory.max_tokens, model.cfg.vision.hidden_size, device=model.device, dtype=model.dtype)
    embeds, start = model.static_answerer.embeds(mem, "What is happening?")
    pixels = torch.randn(64, 3, 224, 224, device=model.device, dtype=model.dtype)
    tables = []
    for name, fn in {
        "prefill": lambda: dec.prefill(embeds, start),
        "decode_steps": lambda: [dec.step() for _ in range(20)],
        "encode64": lambda: model.vision.encode(pixels, 64),
    }.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        tables.append(f"== {name}\n" + p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return "\n\n".join(tables)


def memory_profile_tables(device: torch.device | str = "cuda", updates: int = 50) -> dict[str, str]:
    """Kernel-time tables (CPU and CUDA) of `updates` steady one-frame updates of a paper-mode memory in the released
    shapes (fp16, random features), replayed from its CUDA graph and then run eagerly: {what was run: table}."""
    from torch.profiler import ProfilerActivity, profile

    from vstream.config import MemoryConfig
    from vstream.memory import AbstractAttention, PaperStarMemory

    device = torch.device(device)
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).to(device).half()
    mem = PaperStarMemory(MemoryConfig(), D, att, GRID, device=device, dtype=torch.float16)
    mem.enable_cuda_graph()
    frames = torch.randn(64, GRID * GRID, D, device=device, dtype=torch.float16)
    times = torch.arange(100 + updates, dtype=torch.float64, device=device)
    for i in range(40):  # past the filling phase, both graphs captured
        mem.update(frames[i % 64 : i % 64 + 1], times[i : i + 1])
    torch.cuda.synchronize(device)
    tables = {}
    for name, graph in ((f"graph replays ({updates} updates)", mem.graph), (f"eager ({updates} updates)", None)):
        mem.graph = graph
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for i in range(updates):
                mem.update(frames[i % 64 : i % 64 + 1], times[100 + i : 101 + i])
            torch.cuda.synchronize(device)
        tables[name] = p.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    return tables
