# size: the benchmarks of `vstream bench`: one measured procedure per part, sharing the timing helpers
# size answer_benchmark: one measured procedure read top to bottom; pieces would pass its dozen timings around
# size streams_benchmark: one measured procedure read top to bottom (engine, warm streams, timed rounds)
"""Benchmarks, each returning a dict with what it ran on (device, versions, dtype, config) and medians/p95 of measured
times (CUDA events or a synchronised host clock on a GPU, `perf_counter` on the CPU).

- `memory_benchmark`: per-frame STAR memory update at growing stream lengths (paper mode, a CUDA graph on a GPU
  unless turned off), the official algorithm's update and its growing-buffer copy as anchors, and the device memory
  of the whole model (answering at each length) from 10^2 to 10^5 frames.
- `encode_benchmark`: vision tower frames/s at several batch sizes: the full transformers tower reading hidden state
  -2 (anchor), the truncated tower, and the fast path (fused forward, CUDA graphs).
- `answer_benchmark`: question -> first token for a prompt of a given length, and decode ms/token: the fast path,
  the eager path and transformers `generate` (anchors), with the greedy tokens compared.
- `streams_benchmark`: N simulated live 1-fps streams on one model, questions at intervals: p95 time to first token.
- `stream_benchmark`: one file ingested offline, then replayed live with questions (the streaming engine).
- `ceilings` and `profile_tables`: the device's measured matrix-product rate and copy bandwidth, and torch.profiler
  tables of the fast path's hot calls (CUDA only), for `vstream bench all`.

`load_bench_model` builds a preset with random weights directly on the target device (no CPU initialisation).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from vstream import kernels
from vstream.errors import UserInputError
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
    1, 2, 4, ... 64 on CUDA). Returns (model, seconds to build, seconds of their
    warm-up)."""
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
    _sync(device)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not eager:
        sizes = (graph_sizes if graph_sizes is not None
                 else ((1, 2, 4, 8, 16, 32, 64) if device.type == "cuda" else ()))
        model.vision.use_fused(tuple(sizes))
        model.use_static_decoder()
    _sync(device)
    return model, built, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
            events: bool = True) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` calls: CUDA events around the call on a GPU (the call
    must not read the device), else a host clock (after a synchronisation on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
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
            _sync(device)
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


def stream_benchmark(model, source: str | None = None, seconds: int = 60, speed: float = 10.0, questions: int = 8,
                     max_new_tokens: int = 16, timeout: float = 600.0) -> dict:
    from vstream.engine import StreamSession  # video decoding (PyAV) is needed by this benchmark only
    from vstream.sources import file_source, replay_source
    from vstream.synth.clips import write_test_video

    with tempfile.TemporaryDirectory() as tmp:
        path = source or str(write_test_video(Path(tmp) / "bench.mp4", seconds=seconds, fps=10,
                                              size=(320, 240), seed=0))
        fps = model.cfg.sample_fps
        t0 = time.perf_counter()
        with StreamSession(model).start(file_source(path, fps=fps), live=False) as offline:
            if not offline.wait(timeout):
                raise TimeoutError(f"offline ingestion did not finish within {timeout} s")
        offline_s = time.perf_counter() - t0
        live_session = StreamSession(model).start(replay_source(path, fps=fps, speed=speed), live=True)
        with live_session as live:
            live.wait_for_frames(1, timeout=timeout)
            interval = seconds / speed / (questions + 1)
            for _ in range(questions):
                time.sleep(interval)
                live.ask("What is happening now?", max_new_tokens=max_new_tokens)
            if not live.wait(timeout):
                raise TimeoutError(f"live ingestion did not finish within {timeout} s")
        stats = live.stats()
    received = stats["frames_received"]
    return {
        "environment": environment(model),
        "offline": {"frames": offline.counters.encoded, "seconds": offline_s,
                    "ingest_fps": offline.counters.encoded / offline_s, "dropped": offline.counters.dropped},
        "live": {"speed": speed, "source_fps": fps * speed, "frames_received": received,
                 "frames_encoded": stats["frames_encoded"], "frames_dropped": stats["frames_dropped"],
                 "drop_rate": stats["frames_dropped"] / received if received else 0.0,
                 "questions": questions, "latency": stats["latency"], "tokens_per_s": stats["tokens_per_s"]},
    }


# ---------------------------------------------------------------- memory


def memory_benchmark(model, lengths=(100, 1000, 10000, 100000), repeats: int = 200, official: bool = True,
                     answer_tokens: int = 8, ff_chunk: int = 250, cuda_graph: bool = True) -> dict:
    """Per-frame paper-mode update (the CUDA graph on a GPU) at each stream length, with the device memory of the whole
    model after answering a question there. Stream lengths are reached by fast-forwarding in chunks of `ff_chunk`
    frames (the state has fixed size, so how it got there does not change the cost). Anchors: the official algorithm's
    update, and the copy of a buffer that grows by one frame per update (what the released streaming loop does).
    `cuda_graph=False` times the eager update on a GPU (the graph's reference)."""
    device, dtype, dim = model.device, model.dtype, model.cfg.vision.hidden_size
    grid = model.cfg.vision.grid
    mem = model.new_memory()
    graph = cuda_graph and device.type == "cuda" and hasattr(mem, "enable_cuda_graph")
    if graph:
        mem.enable_cuda_graph()
    torch.manual_seed(0)
    pool = torch.randn(64 + ff_chunk, grid * grid, dim, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, seen = [], 0
    for length in lengths:
        while seen < length:
            n = min(ff_chunk, length - seen)
            mem.update(pool[:n], torch.arange(seen, seen + n, dtype=torch.float64, device=device))
            seen += n
        times = torch.arange(seen, seen + repeats + 2, dtype=torch.float64, device=device)
        state = {"i": 0}

        def one() -> None:
            i = state["i"]
            mem.update(pool[i % 64 : i % 64 + 1], times[i : i + 1])
            state["i"] = i + 1

        ms = time_ms(one, device, repeats, warmup=2)
        seen += repeats + 2
        answer_ms = None
        if answer_tokens:
            t0 = time.perf_counter()
            "".join(model.stream_answer(mem.read(), "What happened so far?", max_new_tokens=answer_tokens))
            answer_ms = round((time.perf_counter() - t0) * 1000, 2)
        rows.append({"frames_seen": seen, "update": summary(ms), "state_bytes": mem.nbytes, "tokens": mem.num_tokens,
                     "answer_ms": answer_ms, "memory": gpu_memory(device)})
    out = {"environment": environment(model) | {"cuda_graph": graph, "fast_answer": model.static_answerer is not None},
           "paper": rows}
    if official:
        out["official"] = official_anchor(model, repeats=max(20, repeats // 4))
    return out


def official_anchor(model, repeats: int = 50, buffer_lengths=(100, 1000, 3600)) -> dict:
    """The official algorithm's streaming update (`official` mode, synchronising once per k-means iteration) and the
    copy of a feature buffer of T frames [T, 256, D] grown by one frame, on the device and in host memory."""
    import dataclasses

    from vstream.memory import build_memory

    device, dtype, dim = model.device, model.dtype, model.cfg.vision.hidden_size
    grid = model.cfg.vision.grid
    cfg = dataclasses.replace(model.cfg.memory, mode="official")
    mem = build_memory(cfg, dim, model.attention_model, grid, device=device, dtype=dtype)
    torch.manual_seed(0)
    frames = torch.randn(64, grid * grid, dim, device=device, dtype=dtype)
    for i in range(30):
        mem.update(frames[i : i + 1], torch.tensor([float(i)], dtype=torch.float64, device=device))
    state = {"i": 30}

    def one() -> None:
        i = state["i"]
        mem.update(frames[i % 64 : i % 64 + 1], torch.tensor([float(i)], dtype=torch.float64, device=device))
        state["i"] = i + 1

    update = summary(time_ms(one, device, repeats, events=False))
    copies = {}
    for where in ([device, torch.device("cpu")] if device.type == "cuda" else [device]):
        for t in buffer_lengths:
            buf = torch.empty(t, grid * grid, dim, dtype=dtype, device=where).fill_(0.5)  # a copy's cost ignores values
            new = torch.empty(1, grid * grid, dim, dtype=dtype, device=where).fill_(0.25)
            ms = time_ms(lambda: torch.cat([buf, new]), where, repeats=10, warmup=1)  # runs before the del  # noqa: F821
            copies[f"{where.type}_T{t}"] = summary(ms)
            del buf
    return {"update": update, "buffer_copy": copies}


# ---------------------------------------------------------------- encode


def tower_gflop(cfg) -> float:
    """Forward GFLOP per frame of the truncated tower (matrix products and attention; 2 per multiply-add)."""
    t, d, i = cfg.grid**2 + 1, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * t * (4 * d * d + 2 * d * i) + 4 * t * t * d
    patch = 2 * cfg.grid**2 * 3 * cfg.patch_size**2 * d
    return (per_layer * cfg.num_layers_used + patch) / 1e9


def encode_benchmark(model, frame_counts=(1, 8, 64, 256), repeats: int = 20, anchor: bool = True) -> dict:
    """Frames/s of the vision tower at each of `frame_counts` frames a call (a row's "batch"): the fast path as
    enabled on `model.vision`, the truncated tower through transformers' modules, and (anchor) the full-depth
    transformers tower read at hidden state -2."""
    from transformers import CLIPVisionModel

    from vstream.encoder.tower import clip_config

    tower, device = model.vision, model.device
    dtype = tower.clip.embeddings.patch_embedding.weight.dtype
    cfg = tower.cfg
    variants = {"fast": lambda x: tower.encode(x, max(frame_counts))}
    saved = (tower.fused, tower.graphs)

    def truncated(x):
        tower.fused, tower.graphs = False, {}
        try:
            return tower.encode(x, max(frame_counts))
        finally:
            tower.fused, tower.graphs = saved

    variants["truncated_eager"] = truncated
    full = None
    if anchor:
        with torch.device(device):
            full = CLIPVisionModel(clip_config(cfg)).to(dtype).eval()
        full.load_state_dict(tower.clip.state_dict(), strict=False)  # the blocks it shares with the tower
        variants["hf_full_hidden_states"] = lambda x: full(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # noqa: F821 (called before the del below)
    torch.manual_seed(0)
    rows = []
    for b in frame_counts:
        inputs = [torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype) for _ in range(2)]
        row = {"batch": b}
        for name, fn in variants.items():
            state = {"i": 0}

            def call(fn=fn):
                state["i"] += 1
                with torch.inference_mode():
                    fn(inputs[state["i"] % 2])

            s = summary(time_ms(call, device, repeats if b <= 64 else max(5, repeats // 4)))
            row[name] = s | {"fps": round(b / s["median_ms"] * 1000, 1)}
        rows.append(row)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        ref = truncated(x) if not anchor else full(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        saved_graphs = tower.graphs
        got = tower.encode(x)
        rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    del full
    return {"environment": environment(model) | {"tower_gflop_per_frame": round(tower_gflop(cfg), 2),
                                                 "graph_batch_sizes": sorted(saved_graphs),
                                                 "tower_warmup_s": round(tower.warmup_s, 3)},
            "relative_error_fast_vs_reference": rel, "batches": rows}


# ---------------------------------------------------------------- answer


def answer_benchmark(model, prompt_tokens: int = 745, new_tokens: int = 64, repeats: int = 20, anchor_tokens: int = 16,
                     anchor: bool = True, prefix_tokens: int = 40, compile_anchor: bool = False) -> dict:
    """Question -> first token for a prompt of `prompt_tokens` positions: a system prefix of `prefix_tokens` (about
    what LLaMA's tokenizer makes of the Vicuna system prompt), the memory's tokens, then the question and the
    assistant tag; and decode ms/token. Fast path: the system prompt's keys cached, prefill of the
    rest, decode steps replayed from a graph. Anchors in the same run: transformers prefill (SDPA, dynamic cache),
    the eager path (`generate.iter_tokens`) and `llm.generate`; the greedy tokens of fast and eager are compared.
    `compile_anchor` adds `llm.generate` with transformers' static cache, which compiles its forward at the first call:
    that call's seconds and the ms/token of a second call."""
    from vstream.model.generate import iter_tokens

    if model.static_answerer is None:
        raise ValueError("answer_benchmark needs the static-cache decoder: call model.use_static_decoder() first")
    answerer, device = model.static_answerer, model.device
    dec = answerer.decoder
    n_mem = model.cfg.memory.max_tokens
    prefix, rest = answerer.prompt_parts("What is happening in the video right now?")
    n_rest = prompt_tokens - prefix_tokens - n_mem
    if prefix_tokens < 1 or n_rest < 1:
        raise UserInputError(f"prompt_tokens must exceed prefix_tokens + {n_mem} memory tokens, got {prompt_tokens} "
                             f"with prefix_tokens {prefix_tokens}")
    # The lengths, not the ids, set the cost: the template's ids cycled to the asked lengths.
    prefix = (prefix * (prefix_tokens // len(prefix) + 1))[:prefix_tokens]
    rest = (rest * (n_rest // len(rest) + 1))[-n_rest:]
    torch.manual_seed(0)
    memory = torch.randn(n_mem, model.cfg.vision.hidden_size, device=device, dtype=model.dtype)

    def build(cached_prefix: bool):
        with torch.inference_mode():
            vision = model.mm_projector(memory)
            head = [] if cached_prefix else [answerer._ids_embeds(prefix)]
            return torch.cat(head + [vision, answerer._ids_embeds(rest)])[None]

    def first_token(cached_prefix: bool) -> int:
        embeds = build(cached_prefix)
        tokens = dec.iter_tokens(embeds, len(prefix) if cached_prefix else 0, max_new_tokens=1)
        return next(tokens)

    _sync(device)
    t0 = time.perf_counter()
    first_token(False)  # the first answer after load: anything compiled or tuned lazily shows here
    _sync(device)
    cold_ms = (time.perf_counter() - t0) * 1000
    with torch.inference_mode():
        dec.prefill(answerer._ids_embeds(prefix)[None], 0)
    dec.prefix = tuple(prefix)

    ttft = summary(time_ms(lambda: first_token(True), device, repeats, events=False))
    ttft_full = summary(time_ms(lambda: first_token(False), device, repeats, events=False))
    full = build(False)
    prefill_only = summary(time_ms(lambda: dec.prefill(full, 0), device, repeats))
    with torch.inference_mode():
        dec.prefill(full, 0)
        dec.pos.fill_(full.shape[1])
    step = summary(time_ms(dec.step, device, repeats * 5))

    stamps, fast_tokens = [], []
    for token in dec.iter_tokens(full, 0, max_new_tokens=new_tokens):
        stamps.append(time.perf_counter())
        fast_tokens.append(token)
    per_token = (stamps[-1] - stamps[0]) * 1000 / max(1, len(stamps) - 1)
    out = {"environment": environment(model) | {"prompt_tokens": full.shape[1], "kv_cache_positions": dec.max_seq_len,
                                                "kv_cache_GiB": round(dec.nbytes / 2**30, 3),
                                                "decode_graph": dec.graph is not None,
                                                "answer_warmup_s": round(dec.warmup_s, 3)},
           "fast": {"first_answer_after_load_ms": round(cold_ms, 2),
                    "first_token": ttft, "first_token_no_prefix_cache": ttft_full, "prefill": prefill_only,
                    "decode_step": step,
                    "generate_ms_per_token": round(per_token, 3),
                    "new_tokens": new_tokens}}
    if anchor:
        out["anchors"] = _answer_anchors(model, full, anchor_tokens, repeats, fast_tokens, iter_tokens)
    if anchor and compile_anchor:
        out["anchors"]["hf_static_compile"] = _static_compile_anchor(model.llm, full, anchor_tokens, device)
    return out


def _static_compile_anchor(llm, embeds: torch.Tensor, n: int, device: torch.device) -> dict:
    """transformers `generate` with its static cache (compiled forward): first call (compile included), then a
    second."""
    calls = []
    try:
        for _ in range(2):
            with torch.inference_mode():
                t0 = time.perf_counter()
                llm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             cache_implementation="static")
                _sync(device)
                calls.append(time.perf_counter() - t0)
    except Exception as exc:  # an anchor that cannot run here is reported, not fatal to the fast path's figures  # noqa: BLE001
        return {"error": repr(exc)[:500], "calls_s": calls}
    return {"first_call_s": round(calls[0], 2), "second_call_s": round(calls[1], 3), "tokens": n,
            "ms_per_token_second_call": round(calls[1] * 1000 / n, 2)}


def _answer_anchors(model, embeds, n: int, repeats: int, fast_tokens: list[int], iter_tokens) -> dict:
    from transformers import DynamicCache

    llm, device = model.llm, model.device

    def hf_prefill():
        with torch.inference_mode():
            llm(inputs_embeds=embeds, past_key_values=DynamicCache(config=llm.config), use_cache=True, logits_to_keep=1)

    prefill = summary(time_ms(hf_prefill, device, max(3, repeats // 2)))
    t0 = time.perf_counter()
    eager_tokens = list(iter_tokens(llm, embeds, max_new_tokens=n))
    _sync(device)
    eager_s = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        llm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        hf_s = time.perf_counter() - t0
    same = 0
    for a, b in zip(eager_tokens, fast_tokens):
        if a != b:
            break
        same += 1
    return {
        "hf_prefill_sdpa": prefill,
        "eager_ms_per_token": round((eager_s * 1000 - prefill["median_ms"]) / max(1, n - 1), 2),
        "hf_generate_ms_per_token": round((hf_s * 1000 - prefill["median_ms"]) / max(1, n - 1), 2),
        "hf_generate_s": round(hf_s, 3), "tokens": n,
        "greedy_tokens_equal_prefix": same, "eager_tokens": eager_tokens, "fast_tokens": fast_tokens[:n],
    }


# ---------------------------------------------------------------- many streams


def streams_benchmark(model, counts=(8, 16, 32, 64), seconds: float = 20.0, warm_frames: int = 30,
                      question_interval: float = 20.0, max_new_tokens: int = 32) -> dict:
    """For each N in `counts`: N live streams each receiving one frame per second (staggered) and asking a question
    every `question_interval` s (staggered), served by the product's engine (`vstream.engine.Engine`, one for all
    runs) for `seconds` of wall time, in process (no HTTP: `vstream bench serve` measures through the server). Each
    memory is first filled with `warm_frames` frames (so updates are steady and their graphs captured before timing)."""
    import threading

    import numpy as np

    from vstream.engine import Engine

    engine = Engine(model)
    size = model.cfg.vision.image_size
    crops = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(8)]
    rows = []
    for n in counts:
        lanes = [engine.open(live=False) for _ in range(n)]
        t0 = time.perf_counter()
        for k in range(warm_frames + 1):  # warm-up, nothing dropped: memories filled, graphs captured
            for s, lane in enumerate(lanes):
                lane.put(float(k), crops[(s + k) % 8], timeout=600)
        for lane in lanes:
            while lane.snapshot is None or lane.snapshot.frames < warm_frames + 1:
                lane.done.wait(0.005)
            lane.live = True
        warm_s = time.perf_counter() - t0
        before = [lane.counters.encoded for lane in lanes]
        events = sorted([(k + s / n, "frame", s) for s in range(n) for k in range(int(seconds))]
                        + [(question_interval * (j + s / n), "question", s) for s in range(n)
                           for j in range(int(seconds / question_interval) + 1)
                           if question_interval * (j + s / n) < seconds])
        answered: list[tuple[float, float]] = []  # (first piece, done) seconds after asking
        readers = []

        def read(request, asked: float) -> None:
            first = None
            for _ in request:
                first = first if first is not None else time.perf_counter()
            done = time.perf_counter()
            answered.append(((first or done) - asked, done - asked))

        start = time.perf_counter()
        for at, kind, s in events:
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if kind == "frame":
                lanes[s].put(warm_frames + 1 + at, crops[int(at + s) % 8])
            else:
                _, request = engine.ask(lanes[s], "What is happening now?", max_new_tokens=max_new_tokens)
                readers.append(threading.Thread(target=read, args=(request, time.perf_counter()), daemon=True))
                readers[-1].start()
        for reader in readers:
            reader.join(120)
        deadline = time.perf_counter() + 30
        while (any(c.encoded + c.dropped < c.received for c in (lane.counters for lane in lanes))
               and time.perf_counter() < deadline):  # every frame sent is in a memory or counted as dropped
            time.sleep(0.01)
        frames = sum(lane.counters.encoded for lane in lanes) - sum(before)
        rows.append({"streams": n, "questions": len(readers), "answered": len(answered),
                     "first_token": summary([a * 1000 for a, _ in answered]),
                     "answer": summary([b * 1000 for _, b in answered]),
                     "frames": frames, "frames_dropped": sum(lane.counters.dropped for lane in lanes),
                     "frames_expected": n * int(seconds), "warmup_s": round(warm_s, 2),
                     "memory": gpu_memory(model.device)})
        for lane in lanes:
            engine.close(lane)
    engine.shutdown()
    return {"environment": environment(model) | {"seconds": seconds, "question_interval_s": question_interval,
                                                 "max_new_tokens": max_new_tokens, "engine": engine.stats()},
            "runs": rows}


def ceilings(device: torch.device) -> dict:
    """Measured matrix-product rate (fp16, 8192^3) and device copy bandwidth (bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    ms = summary(time_ms(lambda: a @ b, device, 10, warmup=3))
    x = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    cp = summary(time_ms(lambda: y.copy_(x), device, 10, warmup=3))
    return {"fp16_matmul_tflops": round(2 * 8192**3 / ms["median_ms"] / 1e9, 1),
            "copy_TBps": round(2 * x.numel() / cp["median_ms"] / 1e9, 3)}


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
