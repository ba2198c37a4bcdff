# size answer_benchmark: one measured procedure read top to bottom; pieces would pass its dozen timings around
"""Question -> first token and decode ms/token (`answer_benchmark`, what `vstream bench answer` runs): the fast path
(cached system prompt, graph-replayed decode steps) against the eager path and transformers `generate` (anchors),
with their greedy tokens compared.

Batched decoding across answers is `vstream.bench.decode`.
"""

from __future__ import annotations

import time

import torch

from vstream.bench.harness import environment, summary, sync, time_ms
from vstream.errors import UserInputError


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

    sync(device)
    t0 = time.perf_counter()
    first_token(False)  # the first answer after load: anything compiled or tuned lazily shows here
    sync(device)
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
                sync(device)
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
    sync(device)
    eager_s = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        llm.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
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

