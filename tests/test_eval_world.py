"""`vstream.eval.world.answer_batch`: the world evaluation's answers come from the model's engine, in the order asked,
equal to the greedy answers of the model's own eager path (with memory parts dropped too), whatever the size of the
engine's waiting room. The command's results, report and plot are checked in test_demo.py."""

import pytest

import vstream
from vstream.engine.scheduler import EngineConfig, engine_of
from vstream.eval.world import answer_batch
from vstream.memory import without
from vstream.synth import world as w


def world_pairs(model, seeds, per_stream: int) -> list:
    """(memory as of the question's time, question) for the first `per_stream` questions of each stream."""
    pairs = []
    for seed in seeds:
        stream = w.generate_stream(seed)
        qas = sorted(w.make_questions(stream, seed=seed), key=lambda q: q.time)[:per_stream]
        frames = stream.frames(fps=model.cfg.sample_fps, size=128)
        memories = model.memory_snapshots(frames, [q.time for q in qas])
        pairs += [(memory, qa.question) for qa, memory in zip(qas, memories)]
    return pairs


def eager(model, pairs, max_new_tokens=8) -> list[str]:
    return [model.answer_from(memory, question, max_new_tokens=max_new_tokens).text for memory, question in pairs]


def test_answers_come_in_order_through_a_waiting_room_smaller_than_the_batch():
    model = vstream.load("tiny", device="cpu")
    engine = engine_of(model, EngineConfig(answer_slots=1, max_waiting=2))  # the engine answer_batch will find
    pairs = world_pairs(model, w.split_seeds("test", 2, 0), 3)
    pairs += [(without(memory, [part]), question) for (memory, question), part in zip(pairs, ("spatial", "temporal"))]
    assert len(pairs) == 8 > engine.config.max_waiting
    answers = answer_batch(model, [m for m, _ in pairs], [q for _, q in pairs])
    assert answers == eager(model, pairs)
    assert engine.pending_answers == 0


def test_a_memory_missing_for_a_question_is_named():
    model = vstream.load("tiny", device="cpu")
    memory, question = world_pairs(model, w.split_seeds("test", 1, 0), 1)[0]
    with pytest.raises(ValueError, match="one memory per question, got 1 memories and 2 questions"):
        answer_batch(model, [memory], [question, question])


@pytest.mark.slow
def test_engine_answers_equal_the_demo_models_eager_greedy_answers(smollm2):
    """The trained demo model (real SmolLM2 weights): a wrong token anywhere changes the text."""
    demo = vstream.load("demo", device="cpu")
    pairs = world_pairs(demo, w.split_seeds("test", 3, 0), 2)
    pairs += [(without(pairs[0][0], ["spatial"]), pairs[0][1]), (without(pairs[2][0], ["retrieved"]), pairs[2][1])]
    answers = answer_batch(demo, [m for m, _ in pairs], [q for _, q in pairs])
    assert answers == eager(demo, pairs)
    assert len(set(answers)) > 2  # the answers differ from question to question: the memory matters
