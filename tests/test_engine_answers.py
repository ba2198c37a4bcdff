"""The engine with the trained demo model (real SmolLM2 weights): memories built by the engine's rounds equal the
I/O-free processor's, and answers decoded together in one batch equal the ones decoded alone on the eager path."""

import pytest
import torch

import vstream
from vstream.engine import Engine, EngineConfig, StreamSession
from vstream.synth import world as w


@pytest.fixture(scope="module")
def demo(smollm2):
    return vstream.load("demo")


def _questions(seed: int, count: int) -> tuple[list, list]:
    stream = w.generate_stream(seed)
    qas = sorted(w.make_questions(stream, seed=seed), key=lambda q: q.time)[:count]
    return stream, qas


def test_engine_memories_equal_the_processors_and_batched_answers_equal_eager_ones(demo):
    seeds = w.split_seeds("test", 3, 0)
    engine = Engine(demo, EngineConfig(answer_slots=8))
    snapshots, offline, questions = [], [], []
    for seed in seeds:
        stream, qas = _questions(seed, 4)
        times = [qa.time for qa in qas]
        frames = list(stream.frames(fps=demo.cfg.sample_fps, size=128))
        with StreamSession(demo, history=len(frames) + 1, engine=engine) as session:
            session.start(iter(frames), live=False)
            assert session.wait(timeout=120) and session.error is None
            snapshots += [session.snapshot_at(t) for t in times]
        offline += list(demo.memory_snapshots(iter(frames), times))
        questions += [qa.question for qa in qas]
    for snap, memory in zip(snapshots, offline):
        assert snap.frames == memory.frames_seen
        torch.testing.assert_close(snap.memory.tokens, memory.tokens, rtol=0, atol=0)
    requests = [engine.submit(s.memory.tokens, q, max_new_tokens=8) for s, q in zip(snapshots, questions)]
    batched = [request.text() for request in requests]  # all 12 submitted before the first step: one batch of 8, then 4
    eager = ["".join(demo.stream_answer(m, q, max_new_tokens=8)) for m, q in zip(offline, questions)]
    assert batched == eager
    assert len(set(batched)) > 3  # the answers differ from question to question: the memory matters
    engine.shutdown()
