"""What every benchmark shares: the environment it reports (device, versions, dtype, model), the model it builds (a
preset with random weights, on the device), the clock (CUDA events or a synchronised host clock) and the summary of
its times (median, nearest-rank p95).

This module measures nothing itself.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from vstream import kernels
from vstream.stats import percentile


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(model) -> dict:
    return {
        "device": device_name(model.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "model": model.cfg.name, "memory_mode": model.cfg.memory.mode, "max_memory_tokens": model.cfg.memory.max_tokens,
        "date": time.strftime("%Y-%m-%d"),
        "triton": kernels.triton.__version__ if kernels.triton is not None else None,
        "fused_kernels": kernels.available(model.device),
    }


def load_bench_model(name: str, device: str | torch.device = "cpu", eager: bool = False, graph_sizes=None):
    """A preset with random weights built directly on `device` in the preset's dtype (float32 on the CPU), with the
    static-cache decoder and the fused tower unless `eager` (its CUDA graphs at the frame counts `graph_sizes`; None:
    1, 2, 4, ... 64 on CUDA). Returns (model, seconds to build, seconds of their warm-up)."""
    from vstream.config import preset
    from vstream.model.loading import build_random
    from vstream.model.tokenizers import build_tiny_tokenizer

    device = torch.device(device)
    cfg = preset(name)
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer(vocab_size=cfg.llm.vocab_size)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_random(cfg, tokenizer=tokenizer)
    finally:
        torch.set_default_dtype(default)
    model.cfg.dtype = str(dtype).removeprefix("torch.")
    model = model.to(device=device, dtype=dtype).eval()
    sync(device)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not eager:
        sizes = (graph_sizes if graph_sizes is not None
                 else ((1, 2, 4, 8, 16, 32, 64) if device.type == "cuda" else ()))
        model.vision.use_fused(tuple(sizes))
        model.use_static_decoder()
    sync(device)
    return model, built, time.perf_counter() - t0


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
            events: bool = True) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` calls: CUDA events around the call on a GPU (the call
    must not read the device), else a host clock (after a synchronisation on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda" and events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> dict:
    """Median, p95 (nearest rank), min and count of a list of milliseconds."""
    if not ms:
        return {"count": 0}
    ordered = sorted(ms)
    p95 = percentile(ordered, 0.95)
    return {"median_ms": round(statistics.median(ordered), 4), "p95_ms": round(p95, 4), "min_ms": round(ordered[0], 4),
            "count": len(ordered)}


def gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_GiB": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "peak_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "reserved_GiB": round(torch.cuda.memory_reserved(device) / 2**30, 3)}
