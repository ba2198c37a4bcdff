"""The I/O-free stream processor: chunking never changes the memory, offline and streaming agree in paper mode, the
snapshots carry their times on the host, and bad inserts are refused before anything changes."""

import math
import random

import numpy as np
import pytest
import torch

from vstream.engine import StreamProcessor, StreamSession
from vstream.model.processor import snapshots_at
from vstream.memory import official_offline_memory
from vstream.encoder.pooling import pool_grid


TINY_DEVICE = "cpu"  # the `model` fixture (conftest.py) on the CPU, also where CUDA is present


def features(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = model.cfg.vision
    return torch.randn(n, v.grid**2, v.hidden_size, generator=g)


def test_chunks_and_modes_give_the_same_paper_memory(model):
    f, times = features(model, 40), [float(i) for i in range(40)]
    whole = StreamProcessor(model)
    whole.insert(times, features=f)
    chunked = StreamProcessor(model, offline=True)  # offline is the streaming memory in paper mode
    for a, b in [(0, 1), (1, 7), (7, 30), (30, 40)]:
        chunked.insert(times[a:b], features=f[a:b])
    assert torch.equal(whole.snapshot().memory.tokens, chunked.snapshot().memory.tokens)
    assert whole.snapshot().temporal_spans == chunked.snapshot().temporal_spans


def test_snapshot_times_are_host_copies_of_the_memory_times(model):
    p = StreamProcessor(model)
    p.insert([0.5 * i for i in range(30)], features=features(model, 30))
    snap = p.snapshot()
    m = snap.memory
    assert snap.spatial_times == tuple(m.spatial_times.tolist())
    assert snap.retrieved_times == tuple(m.retrieved_times.tolist())
    assert snap.temporal_spans == tuple(tuple(r) for r in m.temporal_spans.tolist())
    assert snap.temporal_weights == tuple(m.temporal_weights.tolist())
    assert (snap.frames, snap.stream_time) == (30, 14.5)
    assert all(math.isfinite(x) for row in snap.temporal_spans for x in row)


def test_a_snapshot_never_changes_after_later_inserts(model):
    p = StreamProcessor(model)
    f = features(model, 20)
    p.insert([float(i) for i in range(10)], features=f[:10])
    snap = p.snapshot()
    before = snap.memory.tokens.clone()
    p.insert([float(i) for i in range(10, 20)], features=f[10:])
    assert torch.equal(snap.memory.tokens, before) and p.snapshot().version > snap.version


def test_history_answers_as_of_an_earlier_time(model):
    f, times = features(model, 12), [float(i) for i in range(12)]
    p = StreamProcessor(model, history=64)
    p.insert(times[:5], features=f[:5])
    p.insert(times[5:], features=f[5:])
    upto = StreamProcessor(model)
    upto.insert(times[:4], features=f[:4])
    past = p.snapshot_at(3.5)
    assert past.frames == 4 and torch.equal(past.memory.tokens, upto.snapshot().memory.tokens)
    snap, pieces = p.ask("What is on the screen?", as_of=3.5, max_new_tokens=3)
    assert snap is past and isinstance("".join(pieces), str)
    with pytest.raises(LookupError, match="no memory snapshot at or before -1"):
        p.snapshot_at(-1.0)


def test_official_offline_is_the_released_offline_function(model, monkeypatch):
    monkeypatch.setattr(model.cfg.memory, "mode", "official")
    f, times = features(model, 30), [float(i) for i in range(30)]
    p = StreamProcessor(model, offline=True)
    p.insert(times[:13], features=f[:13])
    p.insert(times[13:], features=f[13:])
    torch.manual_seed(7), random.seed(7)  # the released k-means draws from both
    got = p.snapshot().memory.tokens
    torch.manual_seed(7), random.seed(7)
    want = official_offline_memory(pool_grid(f, model.cfg.memory.spatial_size), times, model.cfg.memory,
                                   model.attention_model).tokens
    assert torch.equal(got, want)


def test_snapshots_at_equal_separate_processors(model):
    rng = np.random.default_rng(0)
    frames = [(float(t), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for t in range(9)]
    at = [2.0, 2.5, 8.0, None]
    got = [s.memory.tokens for s in snapshots_at(StreamProcessor(model), iter(frames), at, frames_per_call=4)]
    for tokens, t in zip(got, at):
        p = StreamProcessor(model)
        kept = [(u, f) for u, f in frames if t is None or u <= t]
        p.insert([u for u, _ in kept], frames=[f for _, f in kept])
        assert torch.equal(tokens, p.snapshot().memory.tokens)


@pytest.mark.parametrize("times, kwargs, message", [
    ([0.0, 1.0], {}, "frames or features, exactly one"),
    ([0.0], {"frames": [np.zeros((8, 8, 3), np.uint8)] * 2}, "one time per frame: 2 frames, 1 times"),
    ([0.0], {"features": torch.zeros(2, 16, 8)}, r"expected features \[n=1, tokens, D\]"),
    ([1.0, 0.5], {"features": None}, "in time order: got 0.5 after 1.0"),
    ([float("nan")], {"features": None}, "finite"),
])
def test_bad_inserts_are_refused_and_change_nothing(model, times, kwargs, message):
    p = StreamProcessor(model)
    p.insert([0.0], features=features(model, 1))
    before = p.snapshot()
    if kwargs.get("features", 0) is None:
        kwargs = {"features": features(model, len(times))}
    with pytest.raises(ValueError, match=message):
        p.insert(times, **kwargs)
    assert p.frames == 1 and p.snapshot() is before


def test_empty_question_and_no_frame_are_clear_errors(model):
    p = StreamProcessor(model)
    with pytest.raises(RuntimeError, match="no frame has been ingested"):
        p.ask("What?")
    p.insert([0.0], features=features(model, 1))
    with pytest.raises(ValueError, match="question is empty"):
        p.ask("  ")


def test_reset_forgets_everything(model):
    p = StreamProcessor(model, history=4)
    p.insert([0.0, 1.0], features=features(model, 2))
    p.reset()
    assert p.frames == 0 and p.snapshot() is None and p.history.earliest() is None
    p.insert([0.0], features=features(model, 1))  # times start over after a reset
    assert p.snapshot().frames == 1


def test_the_session_publishes_what_its_processor_builds(model):
    rng = np.random.default_rng(1)
    frames = [(float(t), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for t in range(10)]
    with StreamSession(model, frames_per_round=3) as session:
        session.start(iter(frames), live=False)
        assert session.wait(30)
        got = session.snapshot()
    p = StreamProcessor(model)
    p.insert([t for t, _ in frames], frames=[f for _, f in frames])
    assert got.frames == 10 and torch.equal(got.memory.tokens, p.snapshot().memory.tokens)
