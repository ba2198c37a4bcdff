"""torch.profiler tables of the hot paths on CUDA: the model's fast path (`profile_tables`: one prefill, 20 decode
steps, one batch-64 encode; the profile part of `vstream bench all`).
"""

from __future__ import annotations

import torch


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
