"""Qwen2-VL / Qwen2.5-VL answers batched across streams, on the CPU with the tiny random presets: why a text token's
M-RoPE is a plain 1-D RoPE (so a decoded token's position is one number per slot), and that every batched answer gets
the tokens the model's own eager path gives it alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vstream
from vstream.model.processor import StreamProcessor
from vstream.model.batch_answer import BatchAnswerer
from vstream.model.generate import default_stop_ids

from helpers import juggle_slots, no_host_sync, prefill_in_chunks

PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
QUESTIONS = ["What is there?", "Where did the square go after it left the middle of the screen at the start?",
             "Why?", "How many things move, and which colours are they?", "Colour?"]


@pytest.fixture(scope="module", params=PRESETS)
def qwen(request):
    return vstream.load(request.param, device="cpu")


def plain_rope(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE as LLaMA computes it: angle p * f for each frequency f, the halves repeated -> cos, sin [S, Dh]."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def test_a_text_tokens_m_rope_is_plain_rope_at_its_position(qwen):
    """Text tokens have equal temporal, height and width positions; M-RoPE takes each section of the head's
    frequencies from one of the three, so with all three equal it is 1-D RoPE at that position, to the bit. AM-RoPE
    text positions may be fractional (they follow the memory's largest time), so fractional ones are checked too."""
    rotary = qwen.hf.model.language_model.rotary_emb
    assert sum(rotary.mrope_section) == rotary.inv_freq.numel()  # every frequency belongs to one section
    p = torch.tensor([0.0, 1.0, 7.0, 17.5, 130.25, 1000.0 / 3, 4095.0])
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, p.expand(3, 1, -1))  # [1, S, Dh]
    want_cos, want_sin = plain_rope(p, rotary.inv_freq)
    assert torch.equal(cos[0], want_cos) and torch.equal(sin[0], want_sin)
    # a visual token's axes differ: then it is not 1-D RoPE at any one of them
    mixed = torch.stack([p, p + 3, p + 5])[:, None]  # [3, 1, S]
    cos, _ = rotary(x, mixed)
    for axis in range(3):
        assert not torch.allclose(cos[0], plain_rope(mixed[axis, 0], rotary.inv_freq)[0])


# ---------------------------------------------------------------- the batched decoder on a Qwen text model


def sharpened(cfg):
    """A model of `cfg` with larger q/k/v weights: the presets' random attention is nearly uniform, so a key at a
    wrong place or a wrong rotation would barely move its tokens; with these every position counts."""
    from vstream.model.qwen.loading import build_random_qwen

    model = build_random_qwen(cfg, seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.hf.model.language_model.layers:
            a = layer.self_attn
            for p in (a.q_proj.weight, a.k_proj.weight, a.q_proj.bias, a.k_proj.bias):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def sharp(qwen):
    return sharpened(qwen.cfg)


def m_rope_prompt(head: int, times: list[float], tail: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [1, S, H=64], positions [3, S] float32) shaped like a Qwen prompt: `head` text tokens at 0..head-1,
    a 2 x 2 grid of visual tokens per time (temporal head + time, height head + row, width head + column), then
    `tail` text tokens from the largest position + 1."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.arange(head, dtype=torch.float64).expand(3, -1)
    grid = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float64).T  # [2, 4] rows, columns
    visual = [torch.cat([torch.full((1, 4), head + t, dtype=torch.float64), head + grid]) for t in times]
    memory = torch.cat(visual, dim=1) if visual else torch.zeros(3, 0, dtype=torch.float64)
    start = float(memory.max()) + 1 if visual else float(head)
    after = (start + torch.arange(tail, dtype=torch.float64)).expand(3, -1)
    positions = torch.cat([text, memory, after], dim=1).float()
    return torch.randn(1, positions.shape[1], 64, generator=gen), positions


def transformers_tokens(model, embeds, positions, n, kv=None):
    """Greedy tokens of transformers' own Qwen forward, prompt at `positions` [3, S] (the model's eager decode)."""
    from transformers import DynamicCache

    from vstream.model.qwen.prefix import decode

    cache = DynamicCache(config=model.hf.config.get_text_config())
    with torch.inference_mode():
        return list(decode(model.hf, {"inputs_embeds": embeds}, positions[:, None], cache, n, 0.0, set()))


def test_decoder_runs_qwen_prompts_at_their_m_rope_positions_like_transformers(sharp):
    """Four prompts join a 3-slot batch mid-way, their prompts in chunks of 16 (one prompt's first 20 positions as
    keys and values that transformers computed, as a cached memory prefix comes): each gets transformers' tokens, and
    the answers share steps. The same prompts at their cache positions give other tokens (positions matter here)."""
    from transformers import DynamicCache

    from vstream.model.batch_decode import BatchDecoder

    prompts = [m_rope_prompt(5, [0.0, 2.5], 7, 0), m_rope_prompt(9, [1.0, 3.25, 6.0, 6.5, 10.0], 12, 1),
               m_rope_prompt(3, [], 4, 2), m_rope_prompt(14, [0.5, 40.0 / 3], 9, 3)]
    expected = [transformers_tokens(sharp, e, p, 10) for e, p in prompts]
    assert len({tuple(t) for t in expected}) == 4
    decoder = BatchDecoder(sharp.hf, max_batch=3, max_seq_len=96, span_step=16)

    def admit(slot, i):
        embeds, positions = prompts[i]
        skip = 0
        if i == 1:  # its first 20 positions come as transformers' keys and values
            skip = 20
            cache = DynamicCache(config=sharp.hf.config.get_text_config())
            with torch.inference_mode():
                sharp.hf.model.language_model(inputs_embeds=embeds[:, :skip], position_ids=positions[:, None, :skip],
                                              past_key_values=cache, use_cache=True)
            decoder.append_kv(slot, [(layer.keys, layer.values) for layer in cache.layers])
        prefill_in_chunks(decoder, slot, embeds[:, skip:], positions[:, skip:])

    got = juggle_slots(decoder, [3, 10, 10, 10], admit)  # prompt 0 leaves early, prompt 3 takes its slot
    assert got[0] == expected[0][:3]
    assert [got[i] for i in (1, 2, 3)] == [expected[i] for i in (1, 2, 3)]
    assert decoder.widest_step == 3 and decoder.slot_steps > 2 * decoder.steps
    at_cache_positions = [transformers_tokens(sharp, e, torch.arange(p.shape[1]).float().expand(3, -1), 10)
                          for e, p in prompts]
    assert at_cache_positions != expected


def test_decoder_errors_name_what_was_expected_and_what_came(qwen):
    from transformers import GPT2Config, GPT2LMHeadModel

    from vstream.model.batch_decode import BatchDecoder
    from vstream.model.text_decoder import batchable

    decoder = BatchDecoder(qwen.hf, max_batch=1, max_seq_len=32)
    slot = decoder.cache.acquire()
    embeds = torch.zeros(1, 3, 64)
    needs = r"M-RoPE model's prompt chunk needs its positions \(\[S\] or \[3, S\]\), got None"
    with pytest.raises(ValueError, match=needs):
        decoder.prefill(slot, embeds)
    with pytest.raises(ValueError, match=r"positions must be \[3\] or \[3, 3\] float32 on cpu for a chunk of 3, "
                                         r"got \[3, 4\] torch.float32 on cpu"):
        decoder.prefill(slot, embeds, positions=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"got \[3\] torch.int64"):
        decoder.prefill(slot, embeds, positions=torch.arange(3))
    k = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="keys and values of 2 layers expected, got 1"):
        decoder.append_kv(slot, [(k, k)])
    with pytest.raises(ValueError, match=r"layer 1's keys and values must be \[1, 2, 5, 16\] torch.float32 on cpu, "
                                         r"got \[1, 2, 5, 8\] torch.float32 on cpu"):
        decoder.append_kv(slot, [(k, k), (k, k[..., :8])])
    with pytest.raises(ValueError, match="slot 0 needs 40 positions, the KV cache holds 32 per slot"):
        decoder.append_kv(slot, [(torch.zeros(1, 2, 40, 16),) * 2] * 2)
    with pytest.raises(ValueError, match="fused layers run LLaMA decoders only"):
        BatchDecoder(qwen.hf, max_batch=1, max_seq_len=32, fused=True)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    assert batchable(qwen.hf) and not batchable(gpt2)
    with pytest.raises(ValueError, match="needs a LLaMA or a Qwen2-VL / Qwen2.5-VL model, got model_type 'gpt2'"):
        BatchDecoder(gpt2, max_batch=1, max_seq_len=8)
    text = qwen.hf.config.get_text_config()
    kinds = text.layer_types
    text.layer_types = ["sliding_attention", "full_attention"]
    try:
        with pytest.raises(ValueError, match=r"full attention only, the model's layers are \['full_attention', "
                                             r"'sliding_attention'\]"):
            BatchDecoder(qwen.hf, max_batch=1, max_seq_len=32)
    finally:
        text.layer_types = kinds


# ---------------------------------------------------------------- batched answers of a Qwen model


def frames(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def reads(qwen):
    """Snapshots of three streams, each memory a different size; frames 0.7 s apart, so that the AM-RoPE times (and
    the text positions after them) are fractional."""
    out = []
    for n, seed in ((4, 1), (9, 2), (20, 3)):
        p = StreamProcessor(qwen)
        p.insert([0.7 * t for t in range(n)], frames=frames(n, seed))
        out.append(p.snapshot().memory)
    assert len({r.num_tokens for r in out}) == 3
    return out


def eager_tokens(model, read, question, n):
    """The model's own greedy tokens from a fresh prefill of the whole prompt (transformers' forward)."""
    with torch.inference_mode():
        embeds, positions = model.prompt(read, question)
    return list(model.iter_tokens(embeds, positions, n, set(default_stop_ids(model.hf, model.tokenizer))))


def assert_like_eager(model, read, request):
    pieces = list(request)
    assert request.tokens == eager_tokens(model, read, request.question, request.max_new_tokens)
    assert pieces == list(model.stream_answer(read, request.question, max_new_tokens=request.max_new_tokens))


def test_batched_answers_equal_the_models_eager_answers(sharp, reads):
    """Five questions of different lengths on three memories of different sizes, four slots (the fifth waits for
    one), prompts in chunks of 32: each answer is the model's eager one, and the answers share their steps."""
    answerer = BatchAnswerer(sharp, max_batch=4, prefill_chunk=32)
    assert answerer.cache.prefix_len == 0 and answerer.decoder.max_seq_len == 72 + 256 + 24
    asked = [(reads[i % 3], q) for i, q in enumerate(QUESTIONS)]
    requests = [answerer.submit(read.tokens, q, max_new_tokens=16, memory=read) for read, q in asked]
    answerer.run_until_idle()
    for (read, _), request in zip(asked, requests):
        assert_like_eager(sharp, read, request)
    assert len({tuple(r.tokens) for r in requests}) == 5
    d = answerer.decoder
    assert d.widest_step == 4 and d.slot_steps > 2 * d.steps
    assert (answerer.prompts.full, answerer.prompts.from_prefix) == (5, 0)
    assert answerer.cache.free_slots == 4


def test_batched_answers_from_cached_memory_prefixes_equal_eager_ones(qwen, reads):
    """With the prefix cache on, the prepared snapshots' prompts come in as their prefix's keys and values and only
    the question is prefilled; the snapshot whose prefix was dropped prefills in full. Every answer is the eager
    one (from the prefix and from a fresh prefill alike), and the prefixes are left as they were."""
    model = sharpened(qwen.cfg).enable_prefix_cache(slots=2)
    model.prepare_answers(reads)  # two slots: the first read's prefix is dropped
    prefixes = [model._prefix_of(read) for read in reads]
    assert prefixes[0] is None and None not in prefixes[1:]
    answerer = BatchAnswerer(model, max_batch=3, prefill_chunk=16)
    asked = [(reads[i % 3], q) for i, q in enumerate(QUESTIONS)]
    requests = [answerer.submit(read.tokens, q, max_new_tokens=12, memory=read) for read, q in asked]
    answerer.run_until_idle()
    assert (answerer.prompts.from_prefix, answerer.prompts.full) == (3, 2)
    for (read, _), request in zip(asked, requests):
        assert_like_eager(model, read, request)
    for prefix in prefixes[1:]:
        assert prefix.cache.get_seq_length() == prefix.length and not prefix.busy


def test_a_qwen_question_needs_the_read_it_rests_on(qwen, reads):
    answerer = BatchAnswerer(qwen, max_batch=1)
    with pytest.raises(TypeError, match="a Qwen model answers from a FlashRead .*, got NoneType"):
        answerer.submit(reads[0].tokens, "What is there?")
    with pytest.raises(ValueError, match=r"prompt \(\d+ positions\) \+ max_new_tokens \(400\) needs \d+ "
                                         r"positions, a slot holds 352"):
        answerer.submit(reads[2].tokens, "What is there?", max_new_tokens=400, memory=reads[2])


@pytest.mark.parametrize("prefix_slots", [0, 8])
def test_engine_answers_several_qwen_streams_in_shared_steps_like_eager(qwen, prefix_slots):
    """Three streams whose memories differ in size, five questions asked at once through the engine: they decode in
    shared batched steps (four slots), and each answer is the model's eager one from the same snapshot, with the
    memory prefixes cached after each round or prefilled whole with the question."""
    from vstream.engine.scheduler import Engine, EngineConfig

    model = sharpened(qwen.cfg)
    if prefix_slots:
        model.enable_prefix_cache(slots=prefix_slots)
    engine = Engine(model, EngineConfig(round_every_s=0.0, answer_slots=4), thread=False)
    assert engine.batched and engine.stats()["answer_slots"] == 4
    lanes = []
    for n, seed in ((4, 1), (8, 2), (14, 3)):
        lane = engine.open(live=False, queue_size=16)
        for t, crop in enumerate(model.crop(frames(n, seed))):
            lane.put(0.7 * t, crop)
        lanes.append((lane, n))
    while any(lane.counters.encoded < n for lane, n in lanes):
        engine.step()
    asked = [(*engine.ask(lane, q, max_new_tokens=12), q) for (lane, _), q in zip(lanes * 2, QUESTIONS)]
    assert len({snap.memory.num_tokens for snap, _, _ in asked}) == 3
    while any(request.state != "done" for _, request, _ in asked):
        engine.step()
    d = engine.answers.decoder
    assert d.widest_step == 4 and d.slot_steps > 2 * d.steps
    for snap, request, question in asked:
        assert request.tokens == eager_tokens(model, snap.memory, question, 12)
        assert list(request) == list(model.stream_answer(snap.memory, question, max_new_tokens=12))
    prompts = engine.answers.prompts
    assert (prompts.from_prefix, prompts.full) == ((5, 0) if prefix_slots else (0, 5))
    assert engine.eager.pending == 0
    engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")
@pytest.mark.parametrize("preset", PRESETS)
def test_graph_replayed_qwen_step_equals_eager_and_never_synchronises(preset):
    """On CUDA the step, the model's own rotary at each slot's position included, is captured and replayed; the
    answers stay the eager ones, and the step alone never reads the device from the host."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = vstream.load(preset, device="cuda", dtype="float32")
    reads = []
    for n, seed in ((4, 1), (10, 2)):
        p = StreamProcessor(model)
        p.insert([0.7 * t for t in range(n)], frames=frames(n, seed))
        reads.append(p.snapshot().memory)
    answerer = BatchAnswerer(model, max_batch=4, prefill_chunk=24)
    assert answerer.decoder.graphs
    requests = [answerer.submit(r.tokens, q, max_new_tokens=12, memory=r) for r, q in zip(reads * 2, QUESTIONS)]
    answerer.run_until_idle()
    for read, request in zip(reads * 2, requests):
        assert request.tokens == eager_tokens(model, read, request.question, 12)
    decoder = answerer.decoder
    for slot in range(4):
        decoder.cache.acquire()
        decoder.active[slot] = True
        decoder.host_active.add(slot)
    decoder.cache.lengths.fill_(0)
    decoder.cache.host_lengths = [0] * 4
    with no_host_sync():
        for _ in range(20):
            decoder.fetch()
            decoder.step()
    assert decoder.cache.lengths.tolist() == [20] * 4
