"""Answers batched across streams (`SlotCache`, `BatchDecoder`, `BatchAnswerer`): every answer in a batch gets the
tokens and text pieces the eager path gives it alone, whoever it shares the batch with, whenever it joins or leaves."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

import vstream
from vstream.config import preset
from vstream.model.batch_answer import BatchAnswerer
from vstream.model.batch_cache import SlotCache
from vstream.model.generate import default_stop_ids, iter_tokens, stream_generate
from vstream.model.prompts import stop_strings
from vstream.model.vlm import FlashVStream

from helpers import juggle_slots, no_host_sync, prefill_in_chunks

QUESTIONS = [
    "What is it?",
    "Where is the red ball going now?",
    "Why?",
    "How many shapes are on the screen at the start of the video, and which colours do they have?",
    "Colour?",
]


TINY_DEVICE = "cpu"  # the `model` fixture (conftest.py) on the CPU, also where CUDA is present


@pytest.fixture(scope="module")
def memories(model):
    torch.manual_seed(0)
    return [model.memory_from_features(torch.randn(t, 256, model.cfg.vision.hidden_size)) for t in (1, 2, 3, 5, 8)]


def eager_tokens(model, memory_tokens, question, n):
    with torch.inference_mode():
        embeds = model.prompt_embeds(memory_tokens, question)
    stops = default_stop_ids(model.llm, model.tokenizer)
    return list(iter_tokens(model.llm, embeds, max_new_tokens=n, stop_token_ids=stops))


def assert_like_eager(model, memory, request):
    """The request's tokens are the eager greedy tokens, and its pieces those of `model.stream_answer`."""
    pieces = list(request)
    assert request.tokens == eager_tokens(model, memory.tokens, request.question, request.max_new_tokens)
    assert pieces == list(model.stream_answer(memory, request.question, max_new_tokens=request.max_new_tokens))


def test_batched_greedy_answers_equal_one_at_a_time_eager_answers(model, memories):
    assert model.static_answerer is None  # on the CPU, stream_answer takes the eager path: the reference
    answerer = BatchAnswerer(model, max_batch=8, prefill_chunk=4096)
    requests = [answerer.submit(m.tokens, q, max_new_tokens=24) for m, q in zip(memories, QUESTIONS)]
    assert len({m.tokens.shape[0] for m in memories}) == 5
    answerer.run_once()
    assert [r.state for r in requests] == ["running"] * 5  # all five decode together from the first step
    assert sorted(r.slot for r in requests) == [0, 1, 2, 3, 4]
    answerer.run_until_idle()
    for memory, request in zip(memories, requests):
        assert_like_eager(model, memory, request)
    assert answerer.cache.free_slots == 8


def test_a_question_joining_mid_way_gets_its_own_answer_and_changes_no_other(model, memories):
    answerer = BatchAnswerer(model, max_batch=4, prefill_chunk=64)
    a = answerer.submit(memories[0].tokens, QUESTIONS[0], max_new_tokens=40)
    b = answerer.submit(memories[1].tokens, QUESTIONS[1], max_new_tokens=40)
    while b.state != "running":
        answerer.run_once()
    for _ in range(3):
        answerer.run_once()
    c = answerer.submit(memories[4].tokens, QUESTIONS[4], max_new_tokens=24)
    assert c.prompt_len > 4 * 64  # its prefill takes several iterations ...
    seen = []
    while c.state != "running":
        answerer.run_once()
        seen.append(len(a.tokens))
    assert len(seen) >= 5 and seen == sorted(seen) and seen[-1] - seen[0] == len(seen) - 1  # ... while a decodes on
    answerer.run_until_idle()
    for memory, request in zip((memories[0], memories[1], memories[4]), (a, b, c)):
        assert_like_eager(model, memory, request)


def test_cancel_frees_the_slot_at_once_and_leaves_the_others_alone(model, memories):
    answerer = BatchAnswerer(model, max_batch=2, prefill_chunk=4096)
    a = answerer.submit(memories[2].tokens, QUESTIONS[2], max_new_tokens=24)
    b = answerer.submit(memories[3].tokens, QUESTIONS[3], max_new_tokens=24)
    c = answerer.submit(memories[0].tokens, QUESTIONS[0], max_new_tokens=24)
    for _ in range(6):
        answerer.run_once()
    assert (a.state, b.state, c.state) == ("running", "running", "waiting")
    freed = a.slot
    a.cancel()
    answerer.run_once()
    assert a.state == "done" and a.finish_reason == "cancelled"
    assert c.slot == freed and c.state == "running"  # the freed slot went to the waiting request in the same iteration
    assert "".join(a) and list(a) == []  # its pieces end without an error; a second iteration ends at once
    assert 0 < len(a.tokens) < 24
    assert a.tokens == eager_tokens(model, memories[2].tokens, QUESTIONS[2], 24)[: len(a.tokens)]
    answerer.run_until_idle()
    assert_like_eager(model, memories[3], b)
    assert_like_eager(model, memories[0], c)


def test_a_full_batch_makes_requests_wait_and_a_full_queue_refuses(model, memories):
    answerer = BatchAnswerer(model, max_batch=2, prefill_chunk=4096, max_waiting=1)
    a = answerer.submit(memories[0].tokens, QUESTIONS[0], max_new_tokens=5)
    answerer.run_once()
    b = answerer.submit(memories[1].tokens, QUESTIONS[1], max_new_tokens=24)
    answerer.run_once()
    assert (a.state, b.state) == ("running", "running")
    c = answerer.submit(memories[2].tokens, QUESTIONS[2], max_new_tokens=24)
    with pytest.raises(RuntimeError, match="the queue is full: 1 of 1 requests waiting"):
        answerer.submit(memories[3].tokens, QUESTIONS[3])
    while a.state != "done":
        answerer.run_once()
        assert c.state == "waiting" and c.slot is None
    assert a.finish_reason == "length" and len(a.tokens) == 5
    answerer.run_once()
    assert c.state == "running" and c.slot == a.slot
    answerer.run_until_idle()
    for memory, request in zip(memories, (a, b, c)):
        assert_like_eager(model, memory, request)


def test_sampling_is_seeded_reproducible_and_not_greedy(model, memories):
    def answers(seed, temperatures):
        answerer = BatchAnswerer(model, max_batch=4, seed=seed)
        requests = [answerer.submit(m.tokens, q, max_new_tokens=24, temperature=t)
                    for m, q, t in zip(memories, QUESTIONS, temperatures)]
        answerer.run_until_idle()
        return [r.tokens for r in requests]

    temperatures = (1.0, 0.0, 0.7)
    first, again, other = answers(7, temperatures), answers(7, temperatures), answers(8, temperatures)
    assert first == again
    greedy = [eager_tokens(model, m.tokens, q, 24) for m, q in zip(memories[:3], QUESTIONS[:3])]
    assert first[1] == greedy[1] == other[1]  # temperature 0 is greedy, next to sampled slots, under any seed
    assert first[0] != greedy[0] and first[2] != greedy[2]
    assert first[0] != other[0]


def test_gumbel_max_samples_the_softmax_at_each_temperature(model):
    decoder = BatchAnswerer(model, max_batch=1).decoder
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).repeat(40000, 1)  # [R, V]
    for t in (0.5, 1.0, 2.0):
        picks = decoder._pick(logits, torch.full((40000,), t))
        freq = torch.bincount(picks, minlength=5).float() / 40000
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, dim=-1), atol=0.01, rtol=0)
    assert torch.equal(decoder._pick(logits[:3], torch.zeros(3)), torch.zeros(3, dtype=torch.long))


def test_the_prefix_is_computed_once_and_every_cached_key_is_the_one_transformers_computes(model, memories):
    answerer = BatchAnswerer(model, max_batch=3, prefill_chunk=4096)
    cache = answerer.cache
    p = cache.prefix_len
    assert p > 0 and cache.prefix == tuple(answerer.prompt_parts("anything")[0])
    before = cache.k[:, :, :, :p].clone(), cache.v[:, :, :, :p].clone()
    requests = [answerer.submit(m.tokens, q, max_new_tokens=6) for m, q in zip(memories[:3], QUESTIONS[:3])]
    answerer.run_once()  # the prefills, then one step
    for r in requests:
        assert cache.host_lengths[r.slot] == p + r.prompt_len + 1 == int(cache.lengths[r.slot])
    answerer.run_until_idle()
    assert torch.equal(cache.k[:, :, :, :p], before[0]) and torch.equal(cache.v[:, :, :, :p], before[1])
    # every key, of the prefix, the prompt and each decoded token but the last (which is never fed), is the one
    # transformers computes over the whole sequence at once
    for r, memory in zip(requests, memories):
        assert r.finish_reason == "length"
        with torch.inference_mode():
            fed = model.llm.get_input_embeddings()(torch.tensor(r.tokens[:-1]))[None]
            embeds = torch.cat([model.prompt_embeds(memory.tokens, r.question), fed], dim=1)
            hf = DynamicCache(config=model.llm.config)
            model.llm(inputs_embeds=embeds, past_key_values=hf, use_cache=True)
        n = embeds.shape[1]
        for i, layer in enumerate(hf.layers):
            torch.testing.assert_close(cache.k[i, r.slot, :, :n], layer.keys[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[i, r.slot, :, :n], layer.values[0], atol=1e-5, rtol=1e-5)


def test_requests_from_other_threads_are_served_by_a_scheduler_thread(model, memories):
    answerer = BatchAnswerer(model, max_batch=2, prefill_chunk=128)
    texts: dict[int, str] = {}
    requests = {}

    def ask(i):
        requests[i] = answerer.submit(memories[i].tokens, QUESTIONS[i], max_new_tokens=12)
        texts[i] = requests[i].text()

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in askers:
        t.start()
    while any(t.is_alive() for t in askers):
        answerer.run_once()
    for t in askers:
        t.join()
    for i in range(4):
        assert texts[i] == "".join(model.stream_answer(memories[i], QUESTIONS[i], max_new_tokens=12))


def test_errors_name_what_was_expected_and_what_came(model, memories):
    answerer = BatchAnswerer(model, max_batch=2)
    with pytest.raises(ValueError, match=r"memory tokens must be \[N, 32\], got \[5\]"):
        answerer.submit(torch.zeros(5), "?")
    with pytest.raises(ValueError, match=r"needs \d+ positions, a slot holds 961"):
        answerer.submit(memories[4].tokens, "?", max_new_tokens=900)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        answerer.submit(memories[0].tokens, "?", temperature=-1.0)
    cache = SlotCache(2, 2, 1, 8, 4, "cpu", torch.float32)
    assert (cache.acquire(), cache.acquire()) == (0, 1)
    with pytest.raises(RuntimeError, match="no free slot: 2 of 2 in use"):
        cache.acquire()
    cache.release(1)
    with pytest.raises(ValueError, match=r"slot 1 is not in use \(in use: \[0\]\)"):
        cache.release(1)
    assert cache.acquire() == 1


def test_smollm2_batch_of_three_equals_one_at_a_time_greedy(smollm2):
    llm, tokenizer = smollm2
    cfg = preset("tiny")
    cfg.template = "chatml"
    torch.manual_seed(0)
    model = FlashVStream(cfg, llm, tokenizer, None).eval()
    answerer = BatchAnswerer(model, max_batch=3, max_seq_len=256)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?"]
    memories = [torch.randn(n, cfg.vision.hidden_size) for n in (8, 30, 17)]
    requests = [answerer.submit(m, q, max_new_tokens=12) for m, q in zip(memories, questions)]
    answerer.run_until_idle()
    for memory, request in zip(memories, requests):
        with torch.inference_mode():
            embeds = model.prompt_embeds(memory, request.question)
        stops = default_stop_ids(llm, tokenizer)
        assert request.tokens == list(iter_tokens(llm, embeds, max_new_tokens=12, stop_token_ids=stops))
        assert list(request) == list(stream_generate(llm, embeds, tokenizer, max_new_tokens=12,
                                                     stop_strings=stop_strings("chatml")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")
def test_graph_replayed_batched_step_equals_eager_and_never_synchronises():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = vstream.load("tiny", device="cuda", dtype="float32", eager=True)
    torch.manual_seed(0)
    memories = [model.memory_from_features(torch.randn(t, 256, 32, device="cuda")) for t in (1, 3, 5)]
    answerer = BatchAnswerer(model, max_batch=4, prefill_chunk=96)
    assert answerer.decoder.graphs
    requests = [answerer.submit(m.tokens, q, max_new_tokens=24) for m, q in zip(memories, QUESTIONS)]
    answerer.run_until_idle()
    for memory, request in zip(memories, requests):
        assert_like_eager(model, memory, request)
    # sampled decoding under the graph: seeded, reproducible, a new draw at every replay
    runs = []
    for _ in range(2):
        sampler = BatchAnswerer(model, max_batch=4, seed=3)
        sampled = [sampler.submit(m.tokens, q, max_new_tokens=24, temperature=1.0) for m, q in zip(memories, QUESTIONS)]
        sampler.run_until_idle()
        runs.append([r.tokens for r in sampled])
    assert runs[0] == runs[1] and runs[0][0] != eager_tokens(model, memories[0].tokens, QUESTIONS[0], 24)
    # the step alone, every slot active: no host synchronisation
    decoder = answerer.decoder
    for slot in range(4):
        decoder.active[slot] = True
        decoder.host_active.add(slot)  # the step runs the slots the host knows to be active
    decoder.cache.lengths.fill_(decoder.cache.prefix_len)
    with no_host_sync():
        for _ in range(20):
            decoder.fetch()
            decoder.step()
    assert decoder.cache.lengths.tolist() == [decoder.cache.prefix_len + 20] * 4


@pytest.mark.parametrize("span_step", [128, 8])
def test_decoder_with_attention_that_matters_equals_eager_slot_by_slot(span_step):
    """The tiny preset's random attention barely moves its tokens; with larger weights every position counts, so a
    slot that saw a wrong key (another slot's, a stale one, one past its length) would change its tokens. With
    `span_step` 8 the steps read 8, 16, ... 64 key positions as the slots grow: a span that cut off a key a slot
    needs would change its tokens too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vstream.model.batch_decode import BatchDecoder

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**preset("tiny").llm.to_hf(), initializer_range=0.3)).eval()
    decoder = BatchDecoder(llm, max_batch=3, max_seq_len=128, span_step=span_step)
    prefix = torch.randn(1, 7, 64)
    decoder.set_prefix(tuple(range(7)), prefix)
    prompts = [torch.randn(1, n, 64) for n in (5, 40, 23, 11)]
    with torch.inference_mode():
        expected = [list(iter_tokens(llm, torch.cat([prefix, p], dim=1), max_new_tokens=12)) for p in prompts]
    spans: set[int] = set()  # key spans the steps read
    # each prompt joins mid-way, in chunks of 16; prompt 0 leaves early, prompt 3 takes its slot
    got = juggle_slots(decoder, [4, 12, 12, 12], lambda slot, i: prefill_in_chunks(decoder, slot, prompts[i]),
                       on_step=lambda: spans.add(decoder.span()))
    assert got[0] == expected[0][:4]
    assert [got[i] for i in (1, 2, 3)] == [expected[i] for i in (1, 2, 3)]
    assert len({tuple(e) for e in expected}) == 4
    # the longest slot: 7 + 40 + 12 = 59 positions at most
    assert spans == ({128} if span_step == 128 else {16, 32, 48, 56, 64})


def test_decoder_refuses_embeds_of_the_wrong_shape_or_dtype(model):
    decoder = BatchAnswerer(model, max_batch=1).decoder
    slot = decoder.cache.acquire()
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[1, S, 64\], got \[2, 3, 64\]"):
        decoder.prefill(slot, torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="must be torch.float32 on cpu like the LLM's embeddings, got torch.float16"):
        decoder.prefill(slot, torch.zeros(1, 3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"slot 0 needs 2000 positions, the KV cache holds 961 per slot"):
        decoder.prefill(slot, torch.zeros(1, 2000 - decoder.cache.prefix_len, 64))


@pytest.mark.parametrize("which", ["llama", "qwen2.5-vl"])
def test_the_fused_step_composes_its_kernels_as_the_unfused_step(model, monkeypatch, which):
    """The batched step through `FusedStep` (one q/k/v product with its biases, one gate/up product, residual +
    RMSNorm and SiLU-gate as kernels) against the unfused step, on the CPU, for the tiny LLaMA and the tiny Qwen2.5-VL
    text model: the Triton kernels are replaced by their torch definitions (`kernel_checks.py` checks the kernels
    against those on the GPU), so this checks the step's composition. Norms and biases of their own, so that a
    mixed-up or missing one shows; slots at different lengths decode the same tokens for 12 steps and write the
    same keys."""
    from vstream import kernels

    def rms_norm(x, weight, eps, residual=None):
        if residual is not None:
            x.add_(residual)
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    monkeypatch.setattr(kernels, "rms_norm", rms_norm)
    monkeypatch.setattr(kernels, "silu_mul", silu_mul)
    if which == "llama":
        llm = model.llm
    else:
        from vstream.model.qwen.config import qwen_preset
        from vstream.model.qwen.loading import build_random_qwen

        torch.manual_seed(0)
        llm = build_random_qwen(qwen_preset("tiny-qwen2.5-vl"), device="cpu", dtype=torch.float32).hf
    from vstream.model.text_decoder import TextDecoder

    parts = TextDecoder.of(llm)
    norms = [w for layer in parts.layers for w in (layer.input_layernorm.weight,
                                                   layer.post_attention_layernorm.weight)] + [parts.norm.weight]
    biases = [p.bias for layer in parts.layers for p in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                         layer.self_attn.v_proj) if p.bias is not None]
    assert len(biases) == (0 if which == "llama" else 3 * len(parts.layers))
    saved = [w.detach().clone() for w in norms + biases]
    with torch.no_grad():  # norms and q/k/v biases of their own (the random models' are ones and zeros)
        for i, w in enumerate(norms + biases):
            w.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
    try:
        runs = decode_both(llm, parts)
    finally:
        with torch.no_grad():
            for w, old in zip(norms + biases, saved):
                w.copy_(old)
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)


def decode_both(llm, parts) -> list:
    """(tokens of 12 steps, keys) of three slots, each prompt prefilled in two chunks (the second attends to the
    first), decoded unfused, then fused (a LLaMA prefill stays unfused here: its fused RoPE is a Triton kernel)."""
    from vstream.model.batch_decode import BatchDecoder
    from vstream.model.static_decode import FusedStep

    runs = []
    for fused in (False, True):
        decoder = BatchDecoder(llm, 3, 64, cuda_graph=False, fused=False)
        decoder.fused_step = FusedStep(parts) if fused else None  # a Qwen prefill goes through it too
        torch.manual_seed(1)
        for n in (5, 9, 7):
            slot = decoder.cache.acquire()
            positions = None if decoder.cos is not None else torch.arange(n, dtype=torch.float32) * 1.5
            embeds = torch.randn(1, n, parts.config.hidden_size)
            decoder.prefill(slot, embeds[:, :3], last=False, positions=None if positions is None else positions[:3])
            decoder.prefill(slot, embeds[:, 3:], positions=None if positions is None else positions[3:])
        tokens = [decoder.step().tolist() for _ in range(12)]
        runs.append((tokens, decoder.cache.k.clone()))
    return runs
