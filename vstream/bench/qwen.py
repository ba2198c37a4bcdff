"""Flash-VStream-Qwen costs for a preset with random weights (`qwen_benchmark`, what `vstream bench qwen` runs): the
Flash Memory update per unit (flat from 10^2 to 10^4+ units, state bytes and device memory flat), ingest through the
tower's two passes batched across streams, time to first token over a full memory (fresh prefill, and from the
memory's KV cached off the question's path: `MemoryPrefix`), and decode ms/token, both by the model's own generation
and through the engine's batched answers (`BatchAnswerer`, the path the product answers on).

Features fed to the memory are random (a fresh unit each update), so every update clusters; the tower and the LLM
have transformers' random initialisation. Timing: the host clock after a synchronisation on CUDA (once per measured
window, never inside the memory's updates), `perf_counter` on the CPU. The CLIP/LLaMA model's costs are
`vstream.bench.memory`, `encode` and `answer`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from vstream.memory.flash import FlashMemory, FlashRead

QUESTION = "What happened in the video so far?"


def qwen_benchmark(preset: str = "qwen2.5-vl-7b-flash", device: torch.device | str = "cuda", dtype: str | None = None,
                   units=(100, 1000, 10000), streams=(1, 8, 32, 64), repeats: int = 5, decode_tokens: int = 64,
                   skip_model: bool = False, batches=(1, 8)) -> dict:
    """The memory section at each count of `units` (increasing) and, unless `skip_model`, the tower's ingest of each
    count of `streams` units at once and the answer over the memory as the last count left it, by the model's own
    generation (`answer`) and by the engine's batched answers (`engine_answer`, what `serve`, `run` and `ask` use) at
    each of `batches` answers in flight. `dtype`: the preset's on CUDA, float32 on the CPU when None."""
    from vstream.model.qwen.config import qwen_preset
    from vstream.model.qwen.loading import build_random_qwen

    device = torch.device(device)
    cfg = qwen_preset(preset)
    dtype = getattr(torch, dtype or (cfg.dtype if device.type == "cuda" else "float32"))
    result = {"preset": preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "torch": torch.__version__, "max_tokens": cfg.max_tokens,
              "state_bytes_config": cfg.state_bytes(str(dtype).removeprefix("torch."))}
    result["memory"], mem = _memory(cfg, device, dtype, list(units))
    if not skip_model:
        model = build_random_qwen(cfg, device=device, dtype=dtype)
        result["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        result["ingest"] = _ingest(model, cfg, device, streams, repeats)
        read = full_read(mem, cfg)
        result["answer"] = _answer(model, read, device, repeats, decode_tokens)
        result["engine_answer"] = engine_answer(model, read, device, repeats, decode_tokens, batches)
        if device.type == "cuda":
            result["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def clock(device: torch.device) -> Callable[[], float]:
    """A () -> seconds function that waits for the device's queued work."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _memory(cfg, device: torch.device, dtype: torch.dtype, marks: list[int]) -> tuple[dict, FlashMemory]:
    """Milliseconds per update between marks, state bytes and allocated device memory at each; the sync check."""
    small_n, full_n = cfg.unit_patches()
    mem = FlashMemory(cfg.memory, cfg.feature_dim, small_n, full_n, cfg.merge**2, device, dtype)
    if device.type == "cuda":  # as the engine runs it: the steady update replayed from its graph
        mem.enable_cuda_graph()
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
                     "device_allocated_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None}
        done = mark
    out["syncs_in_update"] = _sync_check(mem, cfg, device, dtype)
    return out, mem


def _sync_check(mem: FlashMemory, cfg, device: torch.device, dtype: torch.dtype) -> str:
    """Run one steady update under torch's sync debug mode "error" (CUDA only)."""
    if device.type != "cuda":
        return "not checked (CPU)"
    small_n, full_n = cfg.unit_patches()
    small = torch.randn(1, small_n, cfg.feature_dim, device=device, dtype=dtype)
    full = torch.randn(1, full_n, cfg.feature_dim, device=device, dtype=dtype)
    t = torch.full((1,), 1e6, dtype=torch.float64, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        mem.update(small, full, t)
        return "none"
    except RuntimeError as error:
        return f"synchronises: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _ingest(model, cfg, device: torch.device, streams, repeats: int) -> dict:
    """Median seconds and frames/s of the tower's two passes over one unit (two frames) of each of `u` streams."""
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
    """The memory's read with the frame count and patch grids a prompt needs, as the model's own read gives them."""
    p = cfg.patch * cfg.merge
    side = cfg.vision.image_size
    small_side = (side // cfg.small_pool) // p
    grids = {"full": (side // p, side // p), "small": (small_side, small_side)}
    return dataclasses.replace(mem.read(), frames_seen=2 * mem.units_seen, extra={"grids": grids})


def _answer(model, read: FlashRead, device: torch.device, repeats: int, decode_tokens: int) -> dict:
    """Time to first token by a fresh prefill and from the cached memory prefix (medians past a first untimed run),
    the prefix's refresh, and decode ms/token over `decode_tokens`."""
    from vstream.model.qwen.prefix import MemoryPrefix

    now = clock(device)
    fresh = []
    for _ in range(repeats + 1):
        t0 = now()
        embeds, pos = model.prompt(read, QUESTION)
        next(model.iter_tokens(embeds, pos, max_new_tokens=1, stop=set()))
        fresh.append(now() - t0)
    prefix, refresh, cached = MemoryPrefix(model), [], []
    for _ in range(repeats + 1):
        t0 = now()
        prefix.refresh(read)
        refresh.append(now() - t0)
        t0 = now()
        next(prefix.iter_tokens(QUESTION, max_new_tokens=1, stop=set()))
        cached.append(now() - t0)
    embeds, pos = model.prompt(read, QUESTION)
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


def engine_answer(model, read: FlashRead, device: torch.device, repeats: int, decode_tokens: int,
                  batches=(1, 8)) -> dict:
    """The answer as the engine gives it (`BatchAnswerer`, CUDA graphs on CUDA): time to the first token of one
    question over the full memory, prefilled whole and from the memory's prefix cached off its path (what the engine
    prepares after each round), and the batched decode step with each of `batches` answers in flight (ms per step, so
    per token of each answer). Medians past a first untimed run."""
    from vstream.engine.scheduler import EngineConfig
    from vstream.model.batch_answer import BatchAnswerer

    cuda = device.type == "cuda"
    now = clock(device)
    chunk = EngineConfig().prefill_chunk  # the engine's: a long prompt is prefilled in chunks of it
    answerer = BatchAnswerer(model, max_batch=max(batches), prefill_chunk=chunk, cuda_graph=cuda)

    def first_token() -> float:
        t0 = now()
        request = answerer.submit(read.tokens, QUESTION, max_new_tokens=2, memory=read)
        while not request.tokens:
            answerer.run_once()
        elapsed = now() - t0
        answerer.run_until_idle()
        return elapsed

    out = {"memory_tokens": read.num_tokens, "max_seq_len": answerer.decoder.max_seq_len}
    out["ttft_fresh_prefill_ms"] = statistics.median([first_token() for _ in range(repeats + 1)][1:]) * 1000
    if hasattr(model, "enable_prefix_cache"):
        model.enable_prefix_cache(slots=1)
        model.prepare_answers([read])
        out["ttft_cached_prefix_ms"] = statistics.median([first_token() for _ in range(repeats + 1)][1:]) * 1000
        model.prefix_slots = 0  # off again: the decode steps below prefill in full
        model._prefixes.clear()
    steps = {}
    for b in batches:
        requests = [answerer.submit(read.tokens, QUESTION, max_new_tokens=decode_tokens + 2, memory=read)
                    for _ in range(b)]
        while not all(r.tokens for r in requests):
            answerer.run_once()
        answerer.run_once()  # every slot decoding
        t0 = now()
        n = 0
        while n < decode_tokens and all(r.finish_reason is None for r in requests):
            answerer.run_once()
            n += 1
        steps[str(b)] = {"ms_per_step": (now() - t0) / max(n, 1) * 1000, "steps": n}
        for r in requests:
            r.cancel()
        answerer.run_until_idle()
    out["decode"] = steps
    return out
