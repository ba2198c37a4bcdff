"""Decode-step time of the batched decoder (`vstream.model.batch_decode.BatchDecoder`) at several batch sizes
(`decode_benchmark`, what `vstream bench decode` runs), for a preset's LLM with random weights: CUDA events on a GPU,
where the step is one graph replay; the host clock on the CPU, where it runs eagerly.

Every slot holds a prompt of `prompt` positions (prefilled once), so each step attends over a full memory-sized
context, as answers in flight do. The single-answer fast path's step is `vstream.bench.answer` (BENCHMARKS.md's decode
figure); which answer gets a slot is the engine's, not measured here.
"""

from __future__ import annotations

import statistics

import torch

from vstream.bench.harness import environment, time_ms

WARMUP_STEPS = 3
"""Steps run before the timed ones; each advances every slot by one position, as a timed one does."""


def decode_benchmark(model, batches=(1, 8, 32, 64), prompt: int = 745, seq: int = 1024, repeats: int = 50) -> dict:
    """Median, min and per-answer milliseconds of one step of `b` full slots, for each `b` of `batches`, with a
    KV cache of `seq` positions per slot; and each median over the smallest batch's."""
    from vstream.model.batch_decode import BatchDecoder

    if prompt + WARMUP_STEPS + repeats > seq:
        raise ValueError(f"{prompt} prompt positions + {WARMUP_STEPS + repeats} steps do not fit in {seq} positions")
    llm, hidden, device = model.llm, model.llm.config.hidden_size, model.device
    result = {"env": environment(model), "prompt_tokens": prompt, "max_seq_len": seq, "batched": {}}
    for b in batches:
        dec = BatchDecoder(llm, max_batch=b, max_seq_len=seq)
        embeds = torch.randn(1, prompt, hidden, device=device, dtype=model.dtype) * 0.02
        for _ in range(b):
            dec.prefill(dec.cache.acquire(), embeds)
        ms = time_ms(dec.step, device, repeats, warmup=WARMUP_STEPS)
        result["batched"][b] = {"median_ms": statistics.median(ms), "min_ms": min(ms),
                                "per_answer_ms": statistics.median(ms) / b}
        del dec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["note"] = "the single-answer fast path (fused kernels) is BENCHMARKS.md's decode figure"
    base = result["batched"][min(result["batched"])]["median_ms"]
    result["ratio_to_smallest_batch"] = {b: r["median_ms"] / base for b, r in result["batched"].items()}
    return result
