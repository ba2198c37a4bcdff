"""Flash-VStream-Qwen costs for a preset with random weights: Flash Memory update per unit (flat from 10^2 to 10^4+
units, state bytes and device memory flat), ingest through the tower's two passes batched across streams, time to first
token over a full memory (fresh prefill, and from the memory's KV cached off the question's path: `MemoryPrefix`),
and decode ms/token at batch 1. Prints one JSON object.

    # the lent GPU (H100/H200), the issue's shapes:
    python benchmarks/flash_qwen.py --preset qwen2.5-vl-7b-flash --device cuda
    # the CPU, a tiny preset (seconds):
    python benchmarks/flash_qwen.py --preset tiny-qwen2.5-vl --device cpu --units 10,100,300 --streams 1,2

Features fed to the memory are random (a fresh unit each update), so every update clusters; the tower and the LLM
have transformers' random initialisation. Timing: CUDA events on CUDA (synchronised once per measured window, never
inside the memory's updates), perf_counter on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vstream.memory.flash import FlashMemory, FlashRead
from vstream.model.qwen.config import qwen_preset
from vstream.model.qwen.loading import build_random_qwen
from vstream.model.qwen.prefix import MemoryPrefix


def clock(device: torch.device):
    """A () -> seconds function that waits for the device's queued work."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def bench_memory(cfg, device, dtype, marks: list[int]) -> tuple[dict, FlashMemory]:
    small_n, full_n = cfg.unit_patches()
    mem = FlashMemory(cfg.memory, cfg.feature_dim, small_n, full_n, cfg.merge**2, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    now, out, done = clock(device), {}, 0
    times = torch.arange(marks[-1], dtype=torch.float64, device=device) * 2.0
    for mark in marks:
        t0 = now()
        for i in range(done, mark):
            small = torch.randn(1, small_n, cfg.feature_dim, device=device, dtype=dtype, generator=gen)
            full = torch.randn(1, full_n, cfg.feature_dim, device=device, dtype=dtype, generator=gen)
            mem.update(small, full, times[i : i + 1])
        per = (now() - t0) / (mark - done) * 1000
        out[mark] = {"update_ms": per, "state_bytes": mem.nbytes,
                     "device_allocated_bytes": torch.cuda.memory_allocated() if device.type == "cuda" else None}
        done = mark
    out["syncs_in_update"] = _sync_check(mem, cfg, device, dtype)
    return out, mem


def _sync_check(mem: FlashMemory, cfg, device, dtype) -> str:
    """Run one steady update under torch's sync debug mode "error" (CUDA only)."""
    if device.type != "cuda":
        return "not checked (CPU)"
    small_n, full_n = cfg.unit_patches()
    small = torch.randn(1, small_n, cfg.feature_dim, device=device, dtype=dtype)
    full = torch.randn(1, full_n, cfg.feature_dim, device=device, dtype=dtype)
    t = torch.full((1,), 1e6, dtype=torch.float64, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mem.update(small, full, t)
        return "none"
    except RuntimeError as error:
        return f"synchronises: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def bench_ingest(model, cfg, device, streams: list[int], repeats: int) -> dict:
    side = cfg.vision.image_size
    now, out = clock(device), {}
    for u in streams:
        full = torch.randn(2 * u, 3, side, side, device=device, dtype=model.dtype)
        small = torch.nn.functional.avg_pool2d(full, cfg.small_pool)
        model.tower.features(full, small)  # warm-up
        samples = []
        for _ in range(repeats):
            t0 = now()
            model.tower.features(full, small)
            samples.append(now() - t0)
        s = statistics.median(samples)
        out[u] = {"units": u, "frames": 2 * u, "median_s": s, "frames_per_s": 2 * u / s}
    return out


def full_read(mem: FlashMemory, cfg) -> FlashRead:
    import dataclasses

    p = cfg.patch * cfg.merge
    side = cfg.vision.image_size
    small_side = (side // cfg.small_pool) // p
    grids = {"full": (side // p, side // p), "small": (small_side, small_side)}
    return dataclasses.replace(mem.read(), frames_seen=2 * mem.units_seen, extra={"grids": grids})


def bench_answer(model, read: FlashRead, device, repeats: int, decode_tokens: int) -> dict:
    now, q = clock(device), "What happened in the video so far?"
    fresh = []
    for _ in range(repeats + 1):
        t0 = now()
        embeds, pos = model.prompt(read, q)
        next(model.iter_tokens(embeds, pos, max_new_tokens=1, stop=set()))
        fresh.append(now() - t0)
    prefix, refresh, cached = MemoryPrefix(model), [], []
    for _ in range(repeats + 1):
        t0 = now()
        prefix.refresh(read)
        refresh.append(now() - t0)
        t0 = now()
        next(prefix.iter_tokens(q, max_new_tokens=1, stop=set()))
        cached.append(now() - t0)
    embeds, pos = model.prompt(read, q)
    t0 = now()
    n = len(list(model.iter_tokens(embeds, pos, max_new_tokens=decode_tokens + 1, stop=set())))
    total = now() - t0
    t0 = now()
    list(model.iter_tokens(embeds, pos, max_new_tokens=1, stop=set()))
    first = now() - t0
    return {
        "memory_tokens": read.num_tokens, "prompt_positions": int(embeds.shape[1]),
        "ttft_fresh_prefill_ms": statistics.median(fresh[1:]) * 1000,
        "prefix_refresh_ms": statistics.median(refresh[1:]) * 1000,
        "ttft_cached_prefix_ms": statistics.median(cached[1:]) * 1000,
        "decode_ms_per_token": (total - first) / max(1, n - 1) * 1000,
        "decode_tokens": n - 1,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-vl-7b-flash")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: the preset's on CUDA, float32 on the CPU")
    ap.add_argument("--units", default="100,1000,10000", help="memory updates at which to report (increasing)")
    ap.add_argument("--streams", default="1,8,32,64", help="units encoded together (one per stream)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--skip-model", action="store_true", help="the memory section only (no tower, no LLM)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = qwen_preset(args.preset)
    dtype = getattr(torch, args.dtype or (cfg.dtype if device.type == "cuda" else "float32"))
    result = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "torch": torch.__version__, "max_tokens": cfg.max_tokens,
              "state_bytes_config": cfg.state_bytes(str(dtype).removeprefix("torch."))}
    marks = [int(x) for x in args.units.split(",")]
    result["memory"], mem = bench_memory(cfg, device, dtype, marks)
    if not args.skip_model:
        model = build_random_qwen(cfg, device=device, dtype=dtype)
        result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["ingest"] = bench_ingest(model, cfg, device, [int(x) for x in args.streams.split(",")], args.repeats)
        result["answer"] = bench_answer(model, full_read(mem, cfg), device, args.repeats, args.decode_tokens)
        if device.type == "cuda":
            result["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
