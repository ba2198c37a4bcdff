"""The STAR memory's per-frame update at growing stream lengths (`memory_benchmark`, what `vstream bench memory`
runs), with the official algorithm's update and the copy of its growing feature buffer as anchors.

The memory is the model's (a preset with random weights); its frames are random features. Many streams' updates at
once are `vstream.bench.pages`, the update's kernels `vstream.bench.profile`.
"""

from __future__ import annotations

import time

import torch

from vstream.bench.harness import environment, gpu_memory, summary, time_ms


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

