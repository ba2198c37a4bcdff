"""STAR memory: fast implementations against the slow references, budgets, bounded state, retrieval and weights."""

import random

import pytest
import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory, build_memory, official_offline_memory, weighted_kmeans
from vstream.memory.kmeans import exact_copies, fingerprints, squared_distances
from vstream.memory.official import OfficialStreamingMemory
from vstream.memory.reference import (
    RefOfficialStreaming,
    RefPaperMemory,
    ref_official_kmeans,
    ref_official_offline,
)

D = 16
GRID = 16


def make_attention(seed=0, dim=D):
    torch.manual_seed(seed)
    return AbstractAttention(dim, 8).eval()


def frames(n, seed=0, dim=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, GRID * GRID, dim, generator=g)


def seeded(seed):
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- weighted k-means


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kmeans_matches_released_loop_bit_for_bit_with_same_seed(dtype):
    x = torch.randn(60, 4, 8).to(dtype)
    for seed in range(5):
        seeded(seed)
        ref_c, ref_w, ref_l = ref_official_kmeans(x, 25)
        state_ref = random.getstate()
        seeded(seed)
        fast = weighted_kmeans(x.flatten(1), 25, empty="python_random")
        assert random.getstate() == state_ref  # the same Python draws
        assert fast.centroids.dtype == dtype and torch.equal(fast.centroids.view(25, 4, 8), ref_c)
        assert torch.equal(fast.labels, ref_l) and torch.equal(fast.weights, ref_w.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kmeans_refills_empty_clusters_like_the_released_loop(dtype):
    # duplicated points force empty clusters after the first assignment
    base = torch.randn(6, 5)
    x = torch.cat([base.repeat(5, 1), torch.randn(4, 5)]).to(dtype)  # 34 points, many identical
    for seed in range(4):
        seeded(seed)
        ref_c, ref_w, ref_l = ref_official_kmeans(x[:, None, :], 25)
        state_ref = random.getstate()
        seeded(seed)
        fast = weighted_kmeans(x, 25, empty="python_random")
        assert random.getstate() == state_ref
        assert torch.equal(fast.centroids, ref_c.view(25, 5)) and torch.equal(fast.labels, ref_l)
        # each centroid is the mean of what `sources` names, an empty cluster's too (a refill or a kept centroid)
        torch.testing.assert_close(fast.sources @ x.float(), fast.centroids.float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(fast.sources.sum(1), torch.ones(25))


def test_kmeans_sources_say_what_each_kept_centroid_averages():
    x = torch.randn(4, 6)[torch.arange(20) % 4]  # four distinct points, many copies
    w = torch.rand(20) + 0.5
    w[3] = 0
    result = weighted_kmeans(x, 8, weights=w, init_indices=torch.arange(8))
    assert (result.weights == 0).sum() == 4  # four clusters for four distinct points; the other four empty
    torch.testing.assert_close(result.sources @ x, result.centroids)
    torch.testing.assert_close(result.sources.sum(1), torch.ones(8))


def test_kmeans_weighted_and_frozen_is_deterministic_and_conserves_weight():
    x = torch.randn(40, 6)
    w = torch.rand(40) * 5 + 0.5
    init = torch.arange(0, 40, 4)
    a = weighted_kmeans(x, 10, weights=w, init_indices=init)
    b = weighted_kmeans(x, 10, weights=w, init_indices=init)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.weights.sum(), w.sum())
    # each non-empty centroid is the weighted mean of its members
    for j in range(10):
        m = a.labels == j
        if m.any():
            torch.testing.assert_close(a.centroids[j], (w[m, None] * x[m]).sum(0) / w[m].sum(), atol=1e-4, rtol=1e-4)


def test_kmeans_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[T, F\]"):
        weighted_kmeans(torch.randn(3, 4, 5), 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_kmeans(torch.randn(10, 4), 2, weights=torch.ones(3))
    with pytest.raises(ValueError, match="init_indices"):
        weighted_kmeans(torch.randn(10, 4), 2, init_indices=torch.arange(3))
    with pytest.raises(ValueError, match="needs positive weights, got a minimum of 0.0"):
        weighted_kmeans(torch.randn(10, 4), 2, weights=torch.arange(10.0), empty="python_random")


def test_kmeans_generator_gives_reproducible_init():
    x = torch.randn(50, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(weighted_kmeans(x, 5, generator=g1).centroids, weighted_kmeans(x, 5, generator=g2).centroids)


# ---------------------------------------------------------------- official mode


@pytest.mark.parametrize("t", [1, 2, 3, 4, 10, 26, 27, 40, 51, 80])
def test_official_offline_count_and_equality_with_reference(t):
    cfg = MemoryConfig(mode="official")
    att = make_attention()
    x = frames(t, seed=t)
    seeded(t)
    want = ref_official_offline(x, cfg, att)
    seeded(t)
    got = official_offline_memory(x, None, cfg, att)
    lt = t - 1
    expected = 64 + 17 * min(lt, 25) + 64 * min(lt, 3) if lt else 64
    assert got.num_tokens == expected == want.shape[0]
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-5)
    assert sum(got.counts.values()) == expected


def test_official_offline_retrieval_bug_reproduced():
    """Frames are indexed with cluster ids: every retrieved frame is among the first N_tem frames."""
    cfg = MemoryConfig(mode="official")
    x = frames(120, seed=5)
    seeded(0)
    got = official_offline_memory(x, torch.arange(120.0), cfg, make_attention())
    assert got.retrieved_times.numel() == 3
    assert (got.retrieved_times < cfg.temporal_length).all()


@pytest.mark.parametrize("chunks", [[1] * 40, [3, 1, 5, 25, 2, 7, 1, 9]])
def test_official_streaming_equals_reference(chunks):
    cfg = MemoryConfig(mode="official")
    att = make_attention()
    ref = RefOfficialStreaming(cfg, att)
    fast = OfficialStreamingMemory(cfg, D, att, GRID)
    x = frames(sum(chunks), seed=1)
    start = 0
    for i, n in enumerate(chunks):
        chunk = x[start : start + n]
        seeded(100 + i)
        ref.update(chunk)
        seeded(100 + i)
        fast.update(chunk, torch.arange(start, start + n, dtype=torch.float64))
        start += n
        torch.testing.assert_close(fast.read().tokens, ref.read(), atol=1e-5, rtol=1e-5)
    assert fast.read().num_tokens == 681
    assert (fast.read().retrieved_times < 2 * cfg.temporal_length).all()


def test_official_streaming_rejects_oversized_chunk():
    mem = OfficialStreamingMemory(MemoryConfig(mode="official"), D, make_attention(), GRID)
    with pytest.raises(ValueError, match="at most 25 frames, got 26"):
        mem.update(frames(26))


def test_official_abstract_degenerates_with_single_frames():
    """Reproduced bug: one new frame per update makes the released rule an EMA identical across slots."""
    cfg = MemoryConfig(mode="official")
    mem = OfficialStreamingMemory(cfg, D, make_attention(), GRID)
    x = frames(60, seed=2)
    for i in range(60):
        mem.update(x[i : i + 1])
    slots = mem.abstract[:, 0]
    spread_official = (slots - slots.mean(0)).norm(dim=1).max()
    paper = PaperStarMemory(MemoryConfig(), D, make_attention(), GRID)
    for i in range(60):
        paper.update(x[i : i + 1])
    spread_paper = (paper.abstract[:, 0] - paper.abstract[:, 0].mean(0)).norm(dim=1).max()
    assert spread_official < 0.05 * spread_paper


# ---------------------------------------------------------------- paper mode


@pytest.mark.parametrize("scene", ["random", "cycling"])
@pytest.mark.parametrize("chunks", [[1] * 45, [4, 30, 1, 2, 9, 12, 1]])
def test_paper_equals_reference(chunks, scene):
    cfg = MemoryConfig(buffer_length=20, temporal_length=6, abstract_length=5, retrieved_length=2, spatial_length=2)
    att = make_attention(1)
    ref = RefPaperMemory(cfg, att)
    fast = PaperStarMemory(cfg, D, att, GRID)
    x = frames(sum(chunks), seed=4)
    if scene == "cycling":  # three frames over and over, with a pause: clusters end empty
        x = x[torch.arange(sum(chunks)) % 3]
        x[20:26] = x[19]
    start = 0
    for n in chunks:
        times = [0.5 * (start + i) for i in range(n)]
        ref.update(x[start : start + n], times)
        fast.update(x[start : start + n], times)
        start += n
        read = fast.read()
        torch.testing.assert_close(read.tokens.double(), ref.read(), atol=1e-4, rtol=1e-4)
        assert read.temporal_weights.sum().item() == pytest.approx(start)
        assert read.temporal_weights.tolist() == [cl[1] for cl in ref.clusters]
        assert read.temporal_spans[:, :2].tolist() == [cl[2:4] for cl in ref.clusters]
        assert read.temporal_spans[:, 2].tolist() == pytest.approx([cl[4] for cl in ref.clusters])


@pytest.mark.parametrize("scene", ["random", "repeated"])
def test_the_fixed_shape_fill_step_equals_the_update_bit_for_bit(scene):
    """`_fill_step` (what the fill phase's CUDA graph replays: counts as device inputs, fixed shapes) leaves every state
    tensor and counter exactly as `update` does, frame by frame through the fill phase (fewer clusters than N_ret
    included), and the steady updates after it agree too."""
    cfg = MemoryConfig(buffer_length=20, temporal_length=6, abstract_length=6, retrieved_length=3, spatial_length=2)
    att = make_attention(2)
    eager, fixed = PaperStarMemory(cfg, D, att, GRID), PaperStarMemory(cfg, D, att, GRID)
    x = frames(10, seed=5)
    if scene == "repeated":  # a static camera: equal frames, tied distances
        x[:] = x[0]
    fills = 0
    for i in range(10):
        times = torch.tensor([0.5 * i], dtype=torch.float64)
        eager.update(x[i : i + 1], times)
        if fixed.filling:
            counts = torch.tensor([fixed.n_tem]), torch.tensor([fixed.n_abs])
            with torch.no_grad():
                fixed._fill_step(*fixed._prepare(x[i : i + 1], times), *counts)
            fixed._counted_fill()
            fixed.frames_seen += 1
            fills += 1
        else:
            fixed.update(x[i : i + 1], times)
        mine, theirs = fixed.state_dict(), eager.state_dict()
        assert mine["counters"] == theirs["counters"], i
        for name, value in theirs["tensors"].items():
            assert torch.equal(mine["tensors"][name].nan_to_num(-1), value.nan_to_num(-1)), (i, name)
    assert fills == 6 and fixed.steady


def test_paper_state_is_bounded():
    cfg = MemoryConfig(buffer_length=50)
    mem = PaperStarMemory(cfg, D, make_attention(), GRID)
    x = frames(10, seed=9)
    for i in range(10):
        mem.update(x[i : i + 1])
    nbytes_10 = mem.nbytes
    for i in range(10, 10_010, 50):  # 10,000 more frames in chunks of 50
        mem.update(x.repeat(5, 1, 1) + 0.01 * i, torch.arange(i, i + 50, dtype=torch.float64))
    assert mem.frames_seen == 10_010
    assert mem.nbytes == nbytes_10
    assert mem.read().num_tokens == cfg.max_tokens == 681
    assert mem.read().temporal_weights.sum().item() == pytest.approx(10_010)


def test_paper_retrieval_returns_buffer_frames_nearest_the_largest_centroids():
    cfg = MemoryConfig(buffer_length=40)
    mem = PaperStarMemory(cfg, D, make_attention(), GRID)
    # three scenes of different lengths, with noise, so cluster sizes differ
    g = torch.Generator().manual_seed(0)
    scenes = [torch.randn(1, GRID * GRID, D, generator=g) * 3 for _ in range(5)]
    seq = [0] * 30 + [1] * 20 + [2] * 15 + [3] * 10 + [4] * 25
    for t, s in enumerate(seq):
        mem.update(scenes[s] + 0.1 * torch.randn(1, GRID * GRID, D, generator=g), [float(t)])
    read = mem.read()
    valid = min(mem.frames_seen, cfg.buffer_length)
    top = torch.sort(mem.tem_weight, descending=True, stable=True).indices[: cfg.retrieved_length]
    d = squared_distances(mem.temporal[top].flatten(1), mem.buffer_tem[:valid].flatten(1))
    expected_times = sorted(mem.buffer_time[:valid][d.argmin(1)].tolist())
    assert read.retrieved_times.tolist() == expected_times
    # the retrieved tokens are the buffer frames (at P_spa) with those times
    n = read.counts
    ret = read.tokens[n["abstract"] + n["temporal"] : n["abstract"] + n["temporal"] + n["retrieved"]]
    slots = [int((mem.buffer_time == t).nonzero()) for t in expected_times]
    torch.testing.assert_close(ret, mem.buffer[slots].flatten(0, 1))


def test_paper_spans_cover_the_stream_and_order_is_by_time():
    mem = PaperStarMemory(MemoryConfig(), D, make_attention(), GRID)
    x = frames(100, seed=3)
    for i in range(0, 100, 7):
        mem.update(x[i : i + 7], torch.arange(i, min(i + 7, 100), dtype=torch.float64) * 2.0)
    read = mem.read()
    spans = read.temporal_spans
    assert spans[:, 0].min().item() == 0.0 and spans[:, 1].max().item() == 198.0
    assert torch.all(spans[1:, 2] >= spans[:-1, 2])
    assert read.spatial_times.tolist() == [198.0]
    assert list(read.counts) == ["abstract", "temporal", "retrieved", "spatial"]


def test_paper_state_roundtrip_and_snapshot_isolation():
    cfg = MemoryConfig()
    att = make_attention()
    a = PaperStarMemory(cfg, D, att, GRID)
    x = frames(40, seed=6)
    a.update(x[:30])
    snap = a.read()
    before = snap.tokens.clone()
    b = PaperStarMemory(cfg, D, att, GRID)
    b.load_state_dict(a.state_dict())
    a.update(x[30:])
    b.update(x[30:])
    assert torch.equal(snap.tokens, before)  # a snapshot is not touched by later updates
    assert torch.equal(a.read().tokens, b.read().tokens)


def test_memory_input_errors_name_expected_and_actual():
    mem = build_memory(MemoryConfig(), D, make_attention(), GRID)
    with pytest.raises(ValueError, match=r"expected frame features \[n, tokens, 16\], got \(3, 256\)"):
        mem.update(torch.randn(3, 256))
    with pytest.raises(ValueError, match="expected 256 tokens per frame"):
        mem.update(torch.randn(2, 100, D))
    with pytest.raises(ValueError, match="expected 2 timestamps"):
        mem.update(torch.randn(2, 256, D), [0.0])
    with pytest.raises(ValueError, match="at least one frame"):
        mem.update(torch.randn(0, 256, D))
    with pytest.raises(ValueError, match="memory mode"):
        build_memory(MemoryConfig(mode="nope"), D, make_attention(), GRID)
    with pytest.raises(ValueError, match="must divide"):
        build_memory(MemoryConfig(spatial_size=5), D, make_attention(), GRID)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_copies_are_the_rows_equal_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 6, 40, generator=g).to(dtype)
    points = torch.cat([base, base[:, [2, 0]]], dim=1)  # rows 6, 7 of each problem copy rows 2 and 0
    points[1, 4] = points[1, 5]
    ulp = points[2, 1].clone()
    ulp[7] = torch.nextafter(ulp[7].float(), torch.tensor(9.0)).to(dtype)  # one step away in float32: a new value
    points[2, 3] = ulp if not torch.equal(ulp, points[2, 1]) else ulp + 1
    want = (points[..., :, None, :] == points[..., None, :, :]).all(-1)
    assert torch.equal(exact_copies(points), want)
    assert torch.equal(exact_copies(points[1]), want[1])  # no batch dimension


def test_fingerprints_see_differences_that_cancel_in_a_linear_progression():
    """Values that differ by +1, -2, +1 in three neighbouring places (a second difference) cancel against any base
    that grows linearly along the row; the random table tells them apart."""
    row = torch.zeros(2, 64, dtype=torch.int16)
    row[1, 10:13] = torch.tensor([1, -2, 1], dtype=torch.int16)
    prints = fingerprints(row.view(torch.float16))
    assert not (prints[0] == prints[1]).any()
    zeros = torch.tensor([[0.0], [-0.0]])
    assert not exact_copies(zeros)[0, 1]  # bit for bit: -0.0 is not a copy of 0.0


def test_fingerprints_refuse_rows_too_long_to_stay_exact():
    with pytest.raises(ValueError, match="at most 1048576 int16 values, got 2097152"):
        fingerprints(torch.zeros(1, 1 << 21, dtype=torch.float16))
