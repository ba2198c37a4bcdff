"""Flash Memory (CSM + DAM): the fast memory against its slow literal reference, bounded state, retrieval of the
nearest units of the heaviest clusters, snapshots and input errors."""

import pytest
import torch

from vstream.memory.flash import FlashMemory, FlashMemoryConfig, am_rope_positions, flash_state_bytes
from vstream.memory.flash_reference import RefFlashMemory, ref_seeds

C, NS, NF = 8, 4, 16  # feature width, small-pass and full-resolution features per unit


def units(n, seed=0, scene_len=7, spread=2.0):
    """n units whose small features drift scene by scene (a new scene every `scene_len` units)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, NS, C, generator=g) + spread * (torch.arange(n) // scene_len).float()[:, None, None]
    full = torch.randn(n, NF, C, generator=g)
    return small, full, torch.arange(n, dtype=torch.float64) * 2.0  # one unit per 2 s (2 frames at 1 fps)


def check_equal(fast: FlashMemory, ref: RefFlashMemory) -> None:
    read = fast.read()
    want = ref.read_tokens()
    assert read.tokens.shape == want.shape
    torch.testing.assert_close(read.tokens, want, atol=1e-5, rtol=1e-5)
    assert read.retrieved_times.tolist() == [u["time"] for u in ref.dam_units()]
    spans = torch.tensor([c["span"] for c in ref.clusters], dtype=torch.float64)
    torch.testing.assert_close(read.temporal_spans, spans)
    torch.testing.assert_close(read.temporal_weights, torch.tensor([c["weight"] for c in ref.clusters]))


@pytest.mark.parametrize("seed,scene_len,chunk", [(0, 7, 1), (1, 3, 1), (2, 50, 4), (3, 1, 3)])
def test_flash_equals_reference_after_every_update(seed, scene_len, chunk):
    cfg = FlashMemoryConfig(csm_length=6, dam_length=3)
    fast, ref = FlashMemory(cfg, C, NS, NF), RefFlashMemory(cfg)
    small, full, times = units(45, seed, scene_len)
    for i in range(0, 45, chunk):
        sl = slice(i, i + chunk)
        fast.update(small[sl], full[sl], times[sl])
        ref.update(small[sl], full[sl], times[sl].tolist())
        check_equal(fast, ref)


def test_flash_equals_reference_on_a_static_scene_with_repeated_units():
    """Bit-identical units (a paused stream) leave clusters empty and tie distances: both break ties the same way."""
    cfg = FlashMemoryConfig(csm_length=4, dam_length=2)
    fast, ref = FlashMemory(cfg, C, NS, NF), RefFlashMemory(cfg)
    small, full, times = units(6, seed=5, scene_len=1)
    order = [0, 1, 1, 1, 2, 2, 0, 3, 3, 3, 3, 4, 5, 5]
    for i, j in enumerate(order):
        fast.update(small[j : j + 1], full[j : j + 1], torch.tensor([float(i)], dtype=torch.float64))
        ref.update(small[j : j + 1], full[j : j + 1], [float(i)])
        check_equal(fast, ref)
    assert float(fast.read().temporal_weights.sum()) == len(order)


def test_flash_token_budget_and_counts():
    cfg = FlashMemoryConfig()  # the spec's defaults: 60 CSM units x 64 tokens + 30 DAM units x 256 tokens
    assert FlashMemory(cfg, 4, 256, 1024).max_tokens == 11520
    m = FlashMemory(FlashMemoryConfig(csm_length=6, dam_length=3), C, NS, NF)
    small, full, times = units(2)
    m.update(small, full, times)
    read = m.read()
    assert read.counts == {"retrieved": 2 * NF // 4, "temporal": 2 * NS // 4}
    assert read.num_tokens == sum(read.counts.values()) and read.tokens.shape == (2 * NF + 2 * NS, C)
    m.update(*units(10, seed=1))
    assert m.read().num_tokens == m.max_tokens == (6 * NS + 3 * NF) // 4


def check_flat(marks):
    cfg = FlashMemoryConfig(csm_length=4, dam_length=2, kmeans_iters=3)
    m = FlashMemory(cfg, 2, 4, 4)
    expected = flash_state_bytes(cfg, 2, 4, 4, torch.float32)
    ids = {k: v.data_ptr() for k, v in m._state().items()}
    g = torch.Generator().manual_seed(0)
    n = marks[-1]
    small, full = torch.randn(n, 4, 2, generator=g), torch.randn(n, 4, 2, generator=g)
    times = torch.arange(n, dtype=torch.float64)
    sizes, done = {}, 0
    for mark in marks:
        m.update(small[done:mark], full[done:mark], times[done:mark])
        done = mark
        sizes[mark] = m.nbytes
    assert set(sizes.values()) == {expected}
    assert {k: v.data_ptr() for k, v in m._state().items()} == ids  # written in place, never reallocated
    assert m.units_seen == n and float(m.read().temporal_weights.sum()) == n


def test_flash_state_bytes_are_flat_from_10_to_500_units():
    check_flat((10, 100, 500))


@pytest.mark.slow
def test_flash_state_bytes_are_flat_from_10_to_10000_units():
    check_flat((10, 100, 1000, 10_000))  # about 13 ms per update on 2 CPU cores: 2 minutes


def test_dam_returns_the_nearest_units_of_the_heaviest_clusters():
    """Four well-separated scenes of 12, 3, 8 and 2 units: the two heaviest clusters are the 12- and 8-unit scenes,
    and DAM reads, for each, a unit of that scene: the nearest its centroid among the units still held (the previous
    representatives and the new unit). The bounded state cannot promise the true nearest unit of the whole stream (an
    unbounded memory's choice): the chosen unit is nearer than most of its scene's units."""
    cfg = FlashMemoryConfig(csm_length=4, dam_length=2)
    fast, ref = FlashMemory(cfg, C, NS, NF), RefFlashMemory(cfg, keep_all=True)
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, NS, C, generator=g) * 20
    scene = [0] * 12 + [1] * 3 + [2] * 8 + [3] * 2
    small = centres[scene] + 0.3 * torch.randn(len(scene), NS, C, generator=g)
    full = torch.randn(len(scene), NF, C, generator=g)
    times = torch.arange(len(scene), dtype=torch.float64)
    for i in range(len(scene)):
        fast.update(small[i : i + 1], full[i : i + 1], times[i : i + 1])
        ref.update(small[i : i + 1], full[i : i + 1], times[i : i + 1].tolist())
    read = fast.read()
    assert read.temporal_weights.tolist() == [12.0, 3.0, 8.0, 2.0]
    heaviest = [ref.clusters[0], ref.clusters[2]]
    chosen = [c["rep"] for c in heaviest]
    assert read.retrieved_times.tolist() == sorted(u["time"] for u in chosen)
    assert [scene[int(u["time"])] for u in chosen] == [0, 2]
    for cluster, unit in zip(heaviest, chosen):
        best = ref.true_nearest(cluster)
        held = [u for u in ref.all_units if u["id"] in {c["rep"]["id"] for c in ref.clusters}]
        assert unit is min(held, key=lambda u: float(((u["small"] - cluster["centroid"].float()) ** 2).sum()))
        d_chosen = float(((unit["small"] - cluster["centroid"].float()) ** 2).sum())
        members = [float(((u["small"] - cluster["centroid"].float()) ** 2).sum()) for u in ref.all_units
                   if scene[u["id"]] == scene[unit["id"]]]
        assert min(members) == float(((best["small"] - cluster["centroid"].float()) ** 2).sum())
        assert sum(d < d_chosen for d in members) <= len(members) // 4, (sorted(members), d_chosen)
    for t, tokens in zip(read.retrieved_times.tolist(), read.tokens[: 2 * NF].view(2, NF, C)):
        assert torch.equal(tokens, full[int(t)])  # the unit's own full-resolution features


def test_flash_snapshot_is_isolated_and_state_roundtrips():
    cfg = FlashMemoryConfig(csm_length=4, dam_length=2)
    a = FlashMemory(cfg, C, NS, NF)
    small, full, times = units(20, seed=4)
    a.update(small[:10], full[:10], times[:10])
    snap = a.read()
    before = snap.tokens.clone()
    state = a.state_dict()
    a.update(small[10:], full[10:], times[10:])
    assert torch.equal(snap.tokens, before)
    b = FlashMemory(cfg, C, NS, NF)
    b.load_state_dict(state)
    b.update(small[10:], full[10:], times[10:])
    assert torch.equal(a.read().tokens, b.read().tokens) and b.units_seen == 20


def test_flash_input_errors_name_expected_and_actual():
    m = FlashMemory(FlashMemoryConfig(csm_length=4, dam_length=2), C, NS, NF)
    with pytest.raises(ValueError, match=r"expected small features \[units, 4, 8\], got \(1, 5, 8\)"):
        m.update(torch.zeros(1, 5, C), torch.zeros(1, NF, C), [0.0])
    with pytest.raises(ValueError, match=r"expected 1 unit times, got 2"):
        m.update(torch.zeros(1, NS, C), torch.zeros(1, NF, C), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"dam_length must be in \[0, csm_length=4\], got 5"):
        FlashMemory(FlashMemoryConfig(csm_length=4, dam_length=5), C, NS, NF)
    with pytest.raises(ValueError, match=r"n_full must be a positive multiple of the merge group 4, got 6"):
        FlashMemory(FlashMemoryConfig(csm_length=4, dam_length=2), C, NS, 6)


def test_am_rope_positions_follow_the_definition():
    """DAM tokens: (start + s x own time, start + row, start + column) on the full merged grid; CSM tokens: the same
    with the centroid's weighted-mean time on the small merged grid; both in the read's token order."""
    cfg = FlashMemoryConfig(csm_length=3, dam_length=2)
    m = FlashMemory(cfg, C, NS, NF)  # small grid 1x1 (4 features), full grid 2x2 (16 features) after a 2x2 merge
    small, full, times = units(7, seed=6, scene_len=2)
    m.update(small, full, times)
    read = m.read()
    pos = am_rope_positions(read, (1, 1), (2, 2), seconds_scale=2.0, start=5.0)  # Qwen2.5-VL: 2 tokens per second
    assert pos.shape == (3, read.num_tokens) == (3, 2 * 4 + 3 * 1)
    want = []
    for t in read.retrieved_times.tolist():
        want += [(5 + 2 * t, 5 + i, 5 + j) for i in range(2) for j in range(2)]
    for first, last, mean in read.temporal_spans.tolist():
        assert first <= mean <= last
        want.append((5 + 2 * mean, 5.0, 5.0))
    assert [tuple(p) for p in pos.T.tolist()] == want
    weights, spans = read.temporal_weights, read.temporal_spans
    unit_times = times.tolist()
    assert abs(float((weights.double() * spans[:, 2]).sum()) - sum(unit_times)) < 1e-9  # means carry the weights
    with pytest.raises(ValueError, match="merged grid of 3x3 does not hold"):
        am_rope_positions(read, (1, 1), (3, 3), 2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_lloyd_equals_the_shared_weighted_kmeans_loop(seed):
    """The Gram-space loop gives the partition, weights, sources and (to rounding) centroids of `lloyd_frozen`, also
    with weight-0 points (emptied clusters) and few iterations (the last update returned unconverged)."""
    from vstream.memory.flash import gram_lloyd
    from vstream.memory.kmeans import lloyd_frozen
    from vstream.memory.star import seed_indices

    g = torch.Generator().manual_seed(seed)
    points = torch.randn(13, 24, generator=g) + 3 * (torch.arange(13) % 4).float()[:, None]
    weight = torch.rand(13, generator=g) * 3
    weight[[2, 7]] = 0.0
    init = seed_indices(points, weight, 6)
    for iters in (1, 3, 10):
        want = lloyd_frozen(points, 6, weight, init, iters, 1e-4)
        got = gram_lloyd(points, weight, 6, init, iters, 1e-4)
        assert torch.equal(got.labels, want.labels)
        torch.testing.assert_close(got.weights, want.weights)
        torch.testing.assert_close(got.sources, want.sources)
        torch.testing.assert_close(got.centroids, want.centroids, rtol=1e-5, atol=1e-5)


def test_gram_seeds_equal_the_shared_seed_rule_with_exact_copies():
    from vstream.memory.flash import gram_seeds
    from vstream.memory.kmeans import fingerprints
    from vstream.memory.star import seed_indices

    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 40, generator=g)
    points = torch.cat([base, base[[1, 1, 3]], torch.randn(4, 40, generator=g)])  # rows 5, 6 copy 1; row 7 copies 3
    near = base[2].clone()
    near[0] = torch.nextafter(near[0], torch.tensor(10.0))  # one ulp away: not a copy
    points = torch.cat([points, near[None]])
    weight = torch.ones(points.shape[0])
    weight[9] = 0.0
    prints = fingerprints(points)
    same = (prints[:, None] == prints[None]).all(-1)
    assert torch.equal(same, (points[:, None] == points[None]).all(-1))  # bit-equal rows, and only those
    # seeds: a one-ulp distance is below the Gram expansion's rounding (and the float32 rule's): leave that row out
    points, weight = points[:-1], weight[:-1]
    x = points.double()
    for k in (3, 6, 10):
        seeds = gram_seeds(points, weight, k, x @ x.T)
        assert seeds.tolist() == ref_seeds(list(points), weight.tolist(), k)  # the literal rule
        assert torch.equal(seeds, seed_indices(points, weight, k))  # the shared rule the STAR memory uses
