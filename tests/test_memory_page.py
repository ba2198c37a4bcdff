"""A memory page: the steady updates of many streams' memories as one batched computation, equal to each memory
updating alone."""

import pytest
import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.paged import MemoryPage

D, GRID = 16, 16
CFG = MemoryConfig(mode="paper", temporal_length=6, abstract_length=4, retrieved_length=2, buffer_length=9)


def make_page(capacity=6):
    torch.manual_seed(0)
    attention = AbstractAttention(D, 8).eval()
    return MemoryPage(CFG, D, attention, GRID, capacity, "cpu", torch.float32), attention


def scene(stream: int, n: int) -> torch.Tensor:
    """Frames of one stream: random (0), static (1: one frame repeated), cycling over two frames (2), random (3...)."""
    g = torch.Generator().manual_seed(100 + stream)
    if stream % 4 == 1:
        return torch.randn(1, GRID * GRID, D, generator=g).expand(n, -1, -1).clone()
    if stream % 4 == 2:
        return torch.randn(2, GRID * GRID, D, generator=g)[torch.arange(n) % 2]
    return torch.randn(n, GRID * GRID, D, generator=g)


def test_batched_steady_updates_equal_each_memory_alone():
    page, attention = make_page()
    streams = 5
    paged = [page.new_memory() for _ in range(streams)]
    alone = [PaperStarMemory(CFG, D, attention, GRID) for _ in range(streams)]
    frames = [scene(i, 40) for i in range(streams)]
    seen = [0] * streams
    for step in range(40):
        due = [i for i in range(streams) if (step + i) % 3 != 0 and seen[i] < 40]  # a different subset each time
        batch = [i for i in due if paged[i].steady]
        for i in due:
            t = torch.tensor([float(seen[i])], dtype=torch.float64)
            alone[i].update(frames[i][seen[i] : seen[i] + 1], t)
            if i not in batch:  # filling: its own update, on its row of the page
                paged[i].update(frames[i][seen[i] : seen[i] + 1], t)
        if batch:
            feats = torch.cat([frames[i][seen[i] : seen[i] + 1] for i in batch])
            times = torch.tensor([float(seen[i]) for i in batch], dtype=torch.float64)
            page.update([paged[i] for i in batch], feats, times)
        for i in due:
            seen[i] += 1
    assert all(m.steady for m in paged) and min(seen) > 2 * CFG.temporal_length
    for i in range(streams):
        a, b = paged[i], alone[i]
        assert a.frames_seen == b.frames_seen
        for name in ("buffer", "buffer_tem", "buffer_time", "count", "retrieved", "tem_weight"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (i, name)
        torch.testing.assert_close(a.tem_span, b.tem_span, equal_nan=True)
        torch.testing.assert_close(a.temporal, b.temporal)
        torch.testing.assert_close(a.abstract, b.abstract)
        ra, rb = a.read(), b.read()
        torch.testing.assert_close(ra.tokens, rb.tokens)
        assert ra.counts == rb.counts and ra.frames_seen == rb.frames_seen


def test_a_page_refuses_what_it_cannot_update_and_reuses_freed_rows():
    page, _ = make_page(capacity=2)
    first, second = page.new_memory(), page.new_memory()
    with pytest.raises(ValueError, match="all 2 rows hold a memory"):
        page.new_memory()
    with pytest.raises(ValueError, match="distinct steady memories"):  # not steady yet
        page.update([first], scene(0, 1), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected features \[1, 256, 16\] and times \[1\]"):
        page.update([first], scene(0, 2), torch.zeros(2, dtype=torch.float64))
    first.update(scene(0, 3), torch.arange(3, dtype=torch.float64))
    row = first.page_row
    page.release(first)
    again = page.new_memory()  # the freed row, back to an empty memory
    assert again.page_row == row and again.num_tokens == 0
    assert torch.isnan(again.buffer_time).all() and int(again.count) == 0
    assert second.page_row != again.page_row


def test_deferred_updates_run_together_when_read_and_a_released_memory_says_so():
    page, attention = make_page(capacity=4)
    paged = [page.new_memory() for _ in range(3)]
    alone = [PaperStarMemory(CFG, D, attention, GRID) for _ in range(3)]
    frames = [scene(i, 12) for i in range(3)]
    for t in range(12):
        stamp = torch.tensor([float(t)], dtype=torch.float64)
        for i in range(3):
            paged[i].update(frames[i][t : t + 1], stamp)  # steady ones queue on the page
            alone[i].update(frames[i][t : t + 1], stamp)
    updates = page.updates
    torch.testing.assert_close(paged[2].read().tokens, alone[2].read().tokens)  # the read runs the queued updates
    assert page.updates == updates + 1  # all three memories' last frames in one batched update
    for i in range(3):
        torch.testing.assert_close(paged[i].read().tokens, alone[i].read().tokens)
    before = paged[0].read()
    copy = before.tokens.clone()
    page.release(paged[0])
    reused = page.new_memory()
    reused.update(scene(3, 8), torch.arange(8, dtype=torch.float64))
    torch.testing.assert_close(before.tokens, copy)  # a read taken before is a copy: the row's new memory leaves it
    with pytest.raises(RuntimeError, match="released from its memory page"):
        paged[0].read()
    with pytest.raises(RuntimeError, match="released from its memory page"):
        paged[0].update(scene(0, 1), torch.zeros(1, dtype=torch.float64))


def assert_same_memory(a, b, where):
    ra, rb = a.read(), b.read()  # a read runs the page's queued updates first
    assert a.frames_seen == b.frames_seen and (a.n_tem, a.n_abs, a.n_ret) == (b.n_tem, b.n_abs, b.n_ret), where
    for name in ("buffer", "buffer_tem", "buffer_time", "count", "retrieved", "tem_weight"):  # exactly
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{where} {name}: {m}")
    torch.testing.assert_close(a.tem_span, b.tem_span, equal_nan=True)
    torch.testing.assert_close(a.temporal, b.temporal)
    torch.testing.assert_close(a.abstract, b.abstract)
    torch.testing.assert_close(ra.tokens, rb.tokens)
    assert ra.counts == rb.counts, where


@pytest.mark.parametrize("cfg", [CFG, MemoryConfig(mode="paper", temporal_length=5, abstract_length=5,
                                                   retrieved_length=3, buffer_length=7)],
                         ids=["a middle phase", "fill then steady"])
def test_fill_phase_updates_batched_equal_each_memory_alone(cfg):
    """Streams that start one step apart sit at different counts in one batched fill-phase update; through the fill
    phase (and, where the temporal and abstract lengths differ, the phase between, which runs on each row), into the
    steady one, every memory equals one updating alone after every step."""
    torch.manual_seed(0)
    attention = AbstractAttention(D, 8).eval()
    page = MemoryPage(cfg, D, attention, GRID, 8, "cpu", torch.float32)
    streams, steps = 5, 3 * cfg.temporal_length
    paged, alone, frames = [], [], [scene(i, steps) for i in range(streams)]
    fills = 0
    for step in range(steps):
        if step < streams:  # one more stream joins
            paged.append(page.new_memory())
            alone.append(PaperStarMemory(cfg, D, attention, GRID))
        fills += sum(m.filling for m in paged) > 1  # a batch of fill-phase frames at different counts
        for i, (p, a) in enumerate(zip(paged, alone)):
            k = step - i
            stamp = torch.tensor([float(k)], dtype=torch.float64)
            p.update(frames[i][k : k + 1], stamp)  # queued on the page, run together when read
            a.update(frames[i][k : k + 1], stamp)
        for i, (p, a) in enumerate(zip(paged, alone)):
            assert_same_memory(p, a, (step, i))
    assert fills >= 3 and all(m.steady for m in paged)


def test_a_fill_phase_update_refuses_memories_past_their_fill_phase():
    page, _ = make_page(capacity=2)
    memory = page.new_memory()
    memory.update(scene(0, 12), torch.arange(12, dtype=torch.float64))  # steady by now
    with pytest.raises(ValueError, match="distinct filling memories"):
        page.fill_update([memory], scene(0, 1), torch.zeros(1, dtype=torch.float64))
