"""The fused kernels (`vstream.kernels`) against the PyTorch ops they replace.

Not collected by the main run (no `test_` prefix): `tests/test_kernels.py` runs this file under Triton's interpreter on
the CPU, and on a CUDA machine `python -m pytest tests/kernel_checks.py` runs the compiled kernels."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vstream import kernels
from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.kmeans import exact_copies, weighted_kmeans
from vstream.memory.star import seed_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE),
                                reason="needs Triton on a CUDA device or TRITON_INTERPRET=1")


@pytest.mark.parametrize("t,k", [(26, 25), (26, 20), (32, 25), (8, 3), (6, 1)])
def test_gram_kmeans_equals_the_seeded_torch_loop(t, k):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(t, 512, generator=g).half()
        if seed % 2:
            x[3] = x[5]  # a paused stream: identical frames
        w = torch.rand(t, generator=g) * 10 + 1
        if seed % 3 == 0:
            w[2] = 0  # a cluster emptied earlier
        x, w = x.to(DEVICE), w.to(DEVICE)
        ref = weighted_kmeans(x, k, weights=w, init_indices=seed_indices(x, w, k), max_iter=10, tol=1e-4, empty="keep")
        centroids, wsum, labels, sources = kernels.gram_kmeans(x, w, k, 10, 1e-4, exact_copies(x))
        assert torch.equal(labels, ref.labels)
        torch.testing.assert_close(wsum, ref.weights)
        torch.testing.assert_close(sources, ref.sources)
        torch.testing.assert_close(centroids.half(), ref.centroids, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("distinct", [1, 2, 4])
def test_gram_kmeans_on_repeated_frames_empties_the_clusters_the_torch_loop_empties(distinct):
    """A static or cycling scene: 26 points with only `distinct` values leave clusters empty; both keep the same
    centroids with weight 0 and say the same about what each kept centroid averages."""
    g = torch.Generator().manual_seed(distinct)
    x = torch.randn(distinct, 512, generator=g).half()[torch.arange(26) % distinct].to(DEVICE)
    w = torch.ones(26, device=DEVICE)
    w[4] = 0  # a cluster emptied by an earlier update
    ref = weighted_kmeans(x, 25, weights=w, init_indices=seed_indices(x, w, 25), max_iter=10, tol=1e-4, empty="keep")
    centroids, wsum, labels, sources = kernels.gram_kmeans(x, w, 25, 10, 1e-4, exact_copies(x))
    assert (ref.weights == 0).sum() >= 25 - distinct
    assert torch.equal(labels, ref.labels) and torch.equal(wsum, ref.weights)
    torch.testing.assert_close(sources, ref.sources)
    torch.testing.assert_close(centroids.half(), ref.centroids, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("t,k", [(33, 25), (25, 25)])
def test_gram_kmeans_refuses_what_its_tile_cannot_cluster(t, k):
    with pytest.raises(ValueError, match=f"1 <= k < T <= 32, got \\({t}, 8\\), \\({t},\\), k={k}"):
        x = torch.randn(t, 8, device=DEVICE)
        kernels.gram_kmeans(x, torch.ones(t, device=DEVICE), k, 10, 1e-4, exact_copies(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rms_norm_with_residual_equals_add_then_transformers_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(*shape, generator=g).to(DEVICE, dtype) for shape in ((2, 7, 300), (2, 7, 300), (300,)))
    total = x + r
    h = total.float()
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = kernels.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(x, total)  # the sum is left in x
    # the variance is summed in another order than torch sums it: the normalised value may differ by one unit in the
    # last place, and the product with the weight, rounded again, by two (2 eps relative covers two units)
    torch.testing.assert_close(out, ref, atol=0, rtol=2 * torch.finfo(dtype).eps if dtype == torch.float16 else 1e-6)


def test_silu_mul_equals_silu_gate_times_up():
    gu = torch.randn(3, 2 * 1500, device=DEVICE, dtype=torch.float16)
    ref = F.silu(gu[:, :1500]) * gu[:, 1500:]
    torch.testing.assert_close(kernels.silu_mul(gu), ref, atol=0, rtol=1e-3)


def test_rope_to_cache_rotates_q_and_writes_k_v_at_the_positions():
    heads, kv_heads, dh, s, s_max = 4, 2, 32, 5, 16
    qkv = torch.randn(s, (heads + 2 * kv_heads) * dh, device=DEVICE, dtype=torch.float16)
    angle = torch.arange(s_max, device=DEVICE)[:, None] * torch.rand(dh // 2, device=DEVICE)[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1).half(), torch.cat([angle.sin()] * 2, -1).half()
    k_cache = torch.full((kv_heads, s_max, dh), float("nan"), device=DEVICE, dtype=torch.float16)
    v_cache = k_cache.clone()
    start = torch.tensor([7], device=DEVICE)
    q = kernels.rope_to_cache(qkv, cos, sin, start, k_cache, v_cache, heads, kv_heads, dh)

    def rope(x):  # x [h, s, dh]: transformers' rotate_half form, in the storage dtype
        c, s_ = cos[7:12], sin[7:12]
        return x * c + torch.cat((-x[..., dh // 2 :], x[..., : dh // 2]), -1) * s_

    split = qkv.view(s, heads + 2 * kv_heads, dh).transpose(0, 1)  # [h, s, dh]
    # the same roundings as the unfused ops; a compiler may still contract a product and a sum into one rounding
    torch.testing.assert_close(q[0], rope(split[:heads]), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(k_cache[:, 7:12], rope(split[heads : heads + kv_heads]), atol=2e-3, rtol=1e-3)
    assert torch.equal(v_cache[:, 7:12], split[heads + kv_heads :])
    assert k_cache[:, :7].isnan().all() and k_cache[:, 12:].isnan().all()  # nothing else written


@pytest.mark.parametrize("kv_heads", [8, 4])
def test_fused_decoder_gives_the_eager_greedy_tokens(kv_heads):
    from vstream.model.static_decode import StaticLlama
    from vstream.model.generate import iter_tokens

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    llm = LlamaForCausalLM(cfg).to(DEVICE).eval()
    dec = StaticLlama(llm, 256, fused=True)
    embeds = torch.randn(1, 40, 256, device=DEVICE)
    eager = list(iter_tokens(llm, embeds, max_new_tokens=12))
    assert list(dec.iter_tokens(embeds, max_new_tokens=12)) == eager
    with torch.inference_mode():
        dec.prefill(embeds[:, :20], 0)  # a cached prefix, then the rest from its position
    assert list(dec.iter_tokens(embeds[:, 20:], 20, max_new_tokens=12)) == eager


@pytest.mark.parametrize("kv_heads", [8, 4])
def test_batched_decoder_with_fused_prefills_gives_the_eager_greedy_tokens(kv_heads):
    """Prompts prefilled through the fused layers into their slots (a shared prefix, then chunks), then decoded
    together: each slot's tokens are the eager path's for its prompt alone."""
    from vstream.model.batch_decode import BatchDecoder
    from vstream.model.generate import iter_tokens

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    llm = LlamaForCausalLM(cfg).to(DEVICE).eval()
    dec = BatchDecoder(llm, 4, 128, cuda_graph=False, fused=True)
    prefix = torch.randn(1, 6, 256, device=DEVICE)
    prompts = [torch.randn(1, n, 256, device=DEVICE) for n in (30, 17, 41)]
    eager = [list(iter_tokens(llm, torch.cat([prefix, p], 1), max_new_tokens=8)) for p in prompts]
    with torch.inference_mode():
        dec.set_prefix(tuple(range(6)), prefix)
        slots = []
        for p in prompts:
            slots.append(dec.cache.acquire())
            dec.prefill(slots[-1], p[:, :10], last=False)
            dec.prefill(slots[-1], p[:, 10:])
        tokens = [[] for _ in prompts]
        for _ in range(8):  # each step is fed the newest tokens, which come back to the host
            dec.fetch()
            dec.step()
            fed = dec.fetched()
            for k, slot in enumerate(slots):
                tokens[k].append(fed[slot])
    assert dec.fused is not None and tokens == eager


@pytest.mark.parametrize("scene", ["paused", "cycling"])
def test_memory_with_the_kmeans_kernel_follows_the_torch_memory(monkeypatch, scene):
    torch.manual_seed(0)
    att = AbstractAttention(64, 16)
    att_cpu = AbstractAttention(64, 16)
    att_cpu.load_state_dict(att.state_dict())
    att.to(DEVICE)
    cfg = MemoryConfig(temporal_length=6, abstract_length=4, buffer_length=20)
    fused = PaperStarMemory(cfg, 64, att, 16, device=DEVICE)
    frames = torch.randn(30, 256, 64, device=DEVICE)
    if scene == "cycling":  # four frames over and over: clusters end empty
        frames = frames[torch.arange(30) % 4]
    frames[12:15] = frames[11]  # a pause
    with monkeypatch.context() as env:
        env.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter the CPU keeps the torch loop
        plain = PaperStarMemory(cfg, 64, att_cpu, 16, device="cpu")
        for i in range(30):
            plain.update(frames[i : i + 1].cpu(), torch.tensor([float(i)], dtype=torch.float64))
    for i in range(30):
        fused.update(frames[i : i + 1], torch.tensor([float(i)], dtype=torch.float64, device=DEVICE))
    a, b = fused.read(), plain.read()
    torch.testing.assert_close(a.temporal_weights.cpu(), b.temporal_weights)
    torch.testing.assert_close(a.temporal_spans.cpu(), b.temporal_spans)
    assert torch.isfinite(a.temporal_spans).all() and (scene == "paused" or (a.temporal_weights == 0).any())
    torch.testing.assert_close(a.tokens.cpu(), b.tokens, atol=1e-4, rtol=1e-4)


def test_gram_kmeans_batched_equals_each_problem_alone_and_the_batched_torch_loop():
    """A batch of problems (the memories of several streams) in one launch: each as if alone, and as the torch loop
    batched over the same leading dimension gives it."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 26, 512, generator=g).half()
    x[1, 3] = x[1, 5]  # a paused stream in one problem
    x[2] = x[2, torch.arange(26) % 2]  # a static scene in another
    w = torch.rand(5, 26, generator=g) * 10 + 1
    w[0, 2] = 0
    x, w = x.to(DEVICE), w.to(DEVICE)
    centroids, wsum, labels, sources = kernels.gram_kmeans(x, w, 25, 10, 1e-4, exact_copies(x))
    ref = weighted_kmeans_batched(x, w, 25)
    assert torch.equal(labels, ref.labels)
    torch.testing.assert_close(wsum, ref.weights)
    torch.testing.assert_close(sources, ref.sources)
    for b in range(5):
        one = kernels.gram_kmeans(x[b], w[b], 25, 10, 1e-4, exact_copies(x[b]))
        assert torch.equal(one[2], labels[b]) and torch.equal(one[1], wsum[b])
        torch.testing.assert_close(one[0], centroids[b])


def weighted_kmeans_batched(x, w, k):
    from vstream.memory.kmeans import lloyd_frozen

    return lloyd_frozen(x, k, w.float(), seed_indices(x, w, k), 10, 1e-4)
