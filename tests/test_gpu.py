"""Checks that need a CUDA device: the paper-mode memory update and the fast decode step are free of host
synchronisation, official mode matches the literal reference on the GPU (its random init comes from the CUDA generator
there), and the fast path (graph-replayed decoding, fused tower) gives the eager results."""

import random

import numpy as np
import pytest
import torch

from helpers import no_host_sync
from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.official import OfficialStreamingMemory
from vstream.memory.reference import RefOfficialStreaming

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")

D = 1024  # CLIP ViT-L/14 width: the released memory shapes


def test_paper_update_and_read_never_synchronise():
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    mem = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    frames = torch.randn(400, 256, D, device="cuda", dtype=torch.float16)
    times = torch.arange(400, dtype=torch.float64, device="cuda")
    for i in range(30):  # past the fill phase, so every later update clusters, attends and retrieves
        mem.update(frames[i : i + 1], times[i : i + 1])
    with no_host_sync():
        for i in range(30, 400):
            mem.update(frames[i : i + 1], times[i : i + 1])
        mem.update(frames[:5], times[:5] + 1000)  # a chunk too
        read = mem.read()
    assert read.num_tokens == 681
    assert read.temporal_weights.sum().item() == pytest.approx(405)


def test_cuda_graph_replay_equals_eager_updates_and_never_synchronises():
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    eager = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    graphed = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
    graphed.enable_cuda_graph()
    frames = torch.randn(420, 256, D, device="cuda", dtype=torch.float16)
    times = torch.arange(420, dtype=torch.float64, device="cuda")
    for i in range(40):  # the fill phase from its graph (captured at the first frame), then the steady one's
        for mem in (eager, graphed):
            mem.update(frames[i : i + 1], times[i : i + 1])
        if i < 25:  # every frame of the fill phase leaves the state of the eager update, bit for bit
            mine, theirs = graphed.state_dict(), eager.state_dict()
            assert mine["counters"] == theirs["counters"], i
            for name, value in theirs["tensors"].items():
                assert torch.equal(mine["tensors"][name].nan_to_num(-1), value.nan_to_num(-1)), (i, name)
    assert graphed.graph.fill_graph is not None and graphed.graph.graph is not None
    with no_host_sync():
        for i in range(40, 420):
            for mem in (eager, graphed):
                mem.update(frames[i : i + 1], times[i : i + 1])
    a, b = eager.read(), graphed.read()
    torch.testing.assert_close(b.tokens, a.tokens)
    assert torch.equal(b.temporal_weights, a.temporal_weights) and torch.equal(b.retrieved_times, a.retrieved_times)
    assert graphed.frames_seen == 420 and int(graphed.count) == 420



def test_a_graph_pool_outlives_the_graphs_captured_into_it():
    """Memories come and go (streams close) while their graphs share one pool: after the first memory and its graphs
    are freed, the next memory still captures both of its graphs into the pool (a bare `graph_pool_handle()` is
    retired with its last graph, and the next capture into it fails)."""
    import gc
    import weakref

    from vstream.devices import GraphPool
    from vstream.memory.star import CapturedUpdate

    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    pool = GraphPool("cuda")
    frames = torch.randn(30, 256, D, device="cuda", dtype=torch.float16)
    failures = CapturedUpdate.fill_failures
    for _ in range(2):
        mem = PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16)
        mem.enable_cuda_graph(pool.handle)
        for i in range(30):  # the fill phase's graph, then the steady one's
            mem.update(frames[i : i + 1], torch.tensor([float(i)], dtype=torch.float64, device="cuda"))
        assert mem.graph.fill_graph is not None and mem.graph.graph is not None
        freed = weakref.ref(mem)
        del mem
        gc.collect()
        assert freed() is None
    assert CapturedUpdate.fill_failures == failures


def test_the_engine_captures_a_new_streams_graphs_after_a_closed_stream_was_freed():
    """What the server does: its warm-up stream closes, then the real streams open on the same engine; every one
    captures its fill and steady graphs in the engine's pool."""
    import gc

    import vstream
    from vstream.engine import Engine
    from vstream.memory.star import CapturedUpdate

    model = vstream.load("tiny", device="cuda")
    engine = Engine(model)
    side = model.cfg.vision.image_size
    crops = np.random.default_rng(0).integers(0, 255, (30, side, side, 3), dtype=np.uint8)
    failures = CapturedUpdate.fill_failures
    for _ in range(2):
        lane = engine.open(frames_per_round=4, live=False)
        for t in range(30):
            lane.put(float(t), crops[t])
        while lane.snapshot is None or lane.snapshot.frames < 30:
            lane.done.wait(0.01)
        graphs = lane.processor.memory.graph
        assert lane.error is None and graphs.fill_graph is not None and graphs.graph is not None
        engine.close(lane)
        del lane, graphs
        gc.collect()
    engine.shutdown()
    assert CapturedUpdate.fill_failures == failures

@pytest.mark.parametrize("chunks", [[1] * 40, [3, 1, 5, 25, 2, 7]])
def test_official_streaming_matches_reference_on_cuda(chunks):
    cfg = MemoryConfig(mode="official")
    torch.manual_seed(0)
    att = AbstractAttention(64, 32).cuda()
    ref = RefOfficialStreaming(cfg, att)
    fast = OfficialStreamingMemory(cfg, 64, att, 16, device="cuda", dtype=torch.float32)
    x = torch.randn(sum(chunks), 256, 64, device="cuda")
    start = 0
    for i, n in enumerate(chunks):
        for impl in (ref, fast):
            torch.manual_seed(100 + i)
            random.seed(100 + i)
            impl.update(x[start : start + n])
        start += n
        torch.testing.assert_close(fast.read().tokens, ref.read(), atol=1e-4, rtol=1e-4)


def _repeating(kind: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, 256, D] features whose frames repeat (most cameras are static), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(3)
    palette = torch.randn(4, 256, D, device="cuda", generator=g)
    index = torch.arange(n, device="cuda")
    if kind == "static":
        x = palette[0].expand(n, 256, D)
    elif kind == "cycle4":
        x = palette[index % 4]
    else:  # paused, then moving
        moving = (palette[0]
                  + 0.3 * torch.randn(n, 256, D, device="cuda", generator=g).cumsum(0) / (1 + index[:, None, None]))
        x = torch.cat([palette[0].expand(n // 2, 256, D), moving[n // 2 :]])
    return x.to(dtype).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["static", "cycle4", "paused"])
def test_official_streaming_equals_reference_bit_for_bit_on_repeating_scenes(kind, dtype):
    """The released arithmetic at the released width on CUDA: every read equal to the literal reference's."""
    cfg = MemoryConfig(mode="official")
    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().to(dtype)
    ref = RefOfficialStreaming(cfg, att)
    fast = OfficialStreamingMemory(cfg, D, att, 16, device="cuda", dtype=dtype)
    x = _repeating(kind, 48, dtype)
    for i in range(x.shape[0]):
        for impl in (ref, fast):
            torch.manual_seed(100 + i)
            random.seed(100 + i)
            impl.update(x[i : i + 1])
        got = fast.read()
        assert torch.equal(got.tokens, ref.read()), f"{kind}: differs from the reference after {i + 1} frames"
        assert torch.isfinite(got.temporal_spans).all() and torch.isfinite(got.temporal_weights).all()


# ---------------------------------------------------------------- the fast path


def _llama(dtype=torch.float32, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def test_fast_decode_gives_the_eager_greedy_tokens_on_cuda():
    from vstream.model.static_decode import StaticLlama
    from vstream.model.generate import iter_tokens

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = _llama()
    dec = StaticLlama(llm, max_seq_len=512)
    assert dec.graph is not None
    for seed in range(3):
        torch.manual_seed(seed)
        embeds = torch.randn(1, 100 + 37 * seed, 256, device="cuda")
        eager = list(iter_tokens(llm, embeds, max_new_tokens=48))
        fast = list(dec.iter_tokens(embeds, max_new_tokens=48))
        assert fast == eager
        # prefix cached separately, then the rest from its position: the same tokens again
        with torch.inference_mode():
            dec.prefill(embeds[:, :20], 0)
        assert list(dec.iter_tokens(embeds[:, 20:], 20, max_new_tokens=48)) == eager


def test_decode_step_never_synchronises():
    from vstream.model.static_decode import StaticLlama

    llm = _llama(torch.float16)
    dec = StaticLlama(llm, max_seq_len=256)
    with torch.inference_mode():
        dec.token.fill_(3)
        dec.prefill(torch.randn(1, 10, 256, device="cuda", dtype=torch.float16), 0)
        dec.pos.fill_(10)
    with no_host_sync():
        for _ in range(20):
            dec.step()
    assert int(dec.pos) == 30


def test_fast_tower_graphs_equal_the_transformers_tower():
    from vstream.config import VisionConfig
    from vstream.encoder.tower import VisionTower

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4))
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    tower = tower.cuda()
    x = torch.randn(7, 3, 224, 224, device="cuda")
    ref = tower.encode(x)
    tower.use_fused(graph_sizes=(1, 2, 4))
    got = tower.encode(x)  # 4 + 2 + 1 replays
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_load_on_cuda_answers_through_the_fast_path_like_the_eager_one():
    import vstream

    torch.backends.cuda.matmul.allow_tf32 = False
    fast = vstream.load("tiny", device="cuda", dtype="float32")
    plain = vstream.load("tiny", device="cuda", dtype="float32", eager=True)
    assert (fast.static_answerer is not None and fast.static_answerer.decoder.graph is not None
            and fast.static_answerer.decoder.fused)
    assert plain.static_answerer is None
    torch.manual_seed(0)
    memory = plain.memory_from_features(torch.randn(30, 256, plain.cfg.vision.hidden_size, device="cuda"))
    for question in ("What is happening?", "Which colours appeared?"):
        assert fast.answer_from(memory, question, max_new_tokens=24).text == \
            plain.answer_from(memory, question, max_new_tokens=24).text
    frames = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    torch.testing.assert_close(fast.encode(frames), plain.encode(frames), atol=1e-4, rtol=1e-4)


def test_the_engines_round_and_decode_step_never_synchronise():
    """A round of frames of three streams (crops to the device, the tower's graphs, the memories' batched update
    replayed from their page's graph) and the batched decode step with answers in flight: no host synchronisation
    (publishing the snapshots reads their times to the host, once per round, outside this)."""
    import vstream
    from vstream.engine import Engine, EngineConfig

    model = vstream.load("tiny", device="cuda")
    engine = Engine(model, EngineConfig(memory_page=64))
    lanes = [engine.open(frames_per_round=4, live=False) for _ in range(3)]
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (60, model.cfg.vision.image_size, model.cfg.vision.image_size, 3), dtype=np.uint8)
    for t in range(40):  # past the fill phase: every later update is a steady, graph-replayed one
        for lane in lanes:
            lane.put(float(t), crops[t])
    for lane in lanes:
        while lane.snapshot is None or lane.snapshot.frames < 40:
            lane.done.wait(0.01)
    engine.shutdown()  # from here on the test drives the engine's steps itself
    snap = lanes[0].snapshot
    request = engine.answers.submit(snap.memory.tokens, "What is there?", max_new_tokens=64)
    while request.state != "running":  # admitted, prefilled chunk by chunk
        engine.answers.run_once()
    work = [(lane, [(40.0 + i, crops[40 + i]) for i in range(4)]) for lane in lanes]
    with no_host_sync():
        with torch.inference_mode():  # as the engine thread's round runs
            features = engine._encode(work)
            for (lane, items), feats in zip(work, features):
                engine._insert(lane, items, feats)
            for page in engine.pages:  # what the first read of a page's memory does
                page.flush()
        for _ in range(10):
            engine.answers.decoder.step()
    assert [repr(lane.error) for lane in lanes if lane.error is not None] == []
    assert all(lane.counters.encoded == 44 for lane in lanes)
    assert len(engine.pages) == 1 and engine.pages[0].captured and engine.pages[0].updates > 4
    assert snap.frames == 40 and engine.answers.decoder.step_size() == 1


def test_a_memory_page_on_cuda_equals_memories_updating_alone_and_never_synchronises():
    """The 7B preset's memory shapes: four memories of one page (one captured batched update) against four memories
    each replaying its own captured update, on streams with static and cycling scenes among them."""
    from vstream.memory.paged import MemoryPage

    torch.manual_seed(0)
    att = AbstractAttention(D, 32).cuda().half()
    page = MemoryPage(MemoryConfig(), D, att, 16, capacity=8, device="cuda", dtype=torch.float16)
    paged = [page.new_memory() for _ in range(4)]
    alone = [PaperStarMemory(MemoryConfig(), D, att, 16, device="cuda", dtype=torch.float16) for _ in range(4)]
    for m in alone:
        m.enable_cuda_graph()
    frames = torch.randn(4, 120, 256, D, device="cuda", dtype=torch.float16)
    frames[1] = frames[1, :1]  # a static scene
    frames[2] = frames[2, torch.arange(120) % 3]  # a cycling one
    times = torch.arange(120, dtype=torch.float64, device="cuda")

    def feed(i):
        for k in range(4):
            paged[k].update(frames[k, i : i + 1], times[i : i + 1])
            alone[k].update(frames[k, i : i + 1], times[i : i + 1])
        page.flush()

    for i in range(40):
        feed(i)
    assert page.captured
    with no_host_sync():
        for i in range(40, 120):
            feed(i)
    for a, b in zip(paged, alone):
        ra, rb = a.read(), b.read()
        torch.testing.assert_close(ra.tokens, rb.tokens, atol=2e-3, rtol=1e-3)
        assert torch.equal(ra.temporal_weights, rb.temporal_weights)
        assert torch.equal(ra.retrieved_times, rb.retrieved_times) and torch.equal(ra.spatial_times, rb.spatial_times)
        assert a.frames_seen == 120 and int(a.count) == 120


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_distances_equal_the_float32_ones_and_copies_match_comparison(dtype):
    from vstream.memory.kmeans import exact_copies, squared_distances

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 26, 16384, generator=g).to(dtype)
    x[1, 5] = x[1, 2]
    c = torch.randn(4, 300, 16384, generator=g).to(dtype)
    want = squared_distances(x.float(), c.float())  # the float32 path (copies of the operands)
    for got in (squared_distances(x.cuda(), c.cuda()), torch.stack([squared_distances(x[b].cuda(), c[b].cuda())
                                                                     for b in range(4)])):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-2)
        assert torch.equal(got.cpu().argmin(-1), want.argmin(-1))
    same = exact_copies(x.cuda()).cpu()
    assert torch.equal(same, (x[..., :, None, :] == x[..., None, :, :]).all(-1)) and same[1, 5, 2]


def test_flash_memory_steady_update_from_its_graph_equals_eager_and_never_synchronises():
    """Flash Memory (Qwen) at small shapes in float32: the steady update replayed from its captured graph against the
    eager update, unit by unit past the fill phase, and no host synchronisation in a replay."""
    from vstream.memory.flash import FlashMemory, FlashMemoryConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = FlashMemoryConfig(csm_length=6, dam_length=3)
    graphed, eager = (FlashMemory(cfg, 32, 16, 64, 4, "cuda", torch.float32) for _ in range(2))
    graphed.enable_cuda_graph()
    gen = torch.Generator("cuda").manual_seed(0)
    static = torch.randn(1, 16, 32, device="cuda", generator=gen)  # a static scene half the time: exact copies
    for i in range(30):
        small = static if i % 2 else torch.randn(1, 16, 32, device="cuda", generator=gen)
        full = torch.randn(1, 64, 32, device="cuda", generator=gen)
        t = torch.full((1,), 2.0 * i, dtype=torch.float64, device="cuda")
        if i == 29:
            with no_host_sync():
                graphed.update(small, full, t)
        else:
            graphed.update(small, full, t)
        eager.update(small, full, t)
    assert graphed.graph is not None and graphed.units_seen == eager.units_seen == 30
    a, b = graphed.read(), eager.read()
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.temporal_spans, b.temporal_spans)
    assert torch.equal(graphed.rep_slot, eager.rep_slot) and torch.equal(graphed.csm_weight, eager.csm_weight)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def test_the_qwen_towers_batched_attention_on_cuda_equals_its_own_forward(preset):
    """On the GPU (sdpa's CUDA kernels, float32 without TF32): the tower's attention batched over runs of equal windows
    and frames gives transformers' own per-sequence forward's features, both passes of several units in one call."""
    from vstream.encoder.qwen_preprocess import small_pass
    from vstream.model.qwen.config import qwen_preset
    from vstream.model.qwen.loading import build_random_qwen

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_random_qwen(qwen_preset(preset), device="cuda", dtype=torch.float32)
    full = torch.randn(6, 3, 224, 336, device="cuda")
    small = small_pass(full)
    batched = model.tower.features(full, small)
    blocks = model.hf.model.visual.blocks
    forwards = [block.attn.__dict__.pop("forward") for block in blocks]
    try:
        own = model.tower.features(full, small)
    finally:
        for block, forward in zip(blocks, forwards):
            block.attn.forward = forward
    for got, want in zip(batched, own):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
