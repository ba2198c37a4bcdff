"""`vstream demo` (a world stream played live through the engine, answers scored against the ground truth) and
`vstream world-eval` (accuracy per question type with memory parts switched off; results, report and plot)."""

import json
import os
import subprocess
import sys

import pytest

from vstream.demo import accuracy_table, paced, pick_questions, run_demo
from vstream.synth import world as w


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vstream", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHONWARNINGS": "ignore", "COLUMNS": "200"})


def in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`vstream ARGS` through the console entry point in this process: (exit code, stdout, stderr)."""
    from vstream.cli import main

    monkeypatch.setattr(sys, "argv", ["vstream", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def test_demo_command_plays_a_world_stream_and_scores_each_answer():
    out = cli("demo", "--model", "tiny", "--seed", "3", "--speed", "40")
    assert out.returncode == 0, out.stderr
    questions = w.make_questions(w.generate_stream(3))
    text = out.stdout
    assert "seed 3" in text and "random and untrained" in text
    for qa in questions:  # every question, in time order, with its ground truth beside the answer
        assert f"{qa.time:6.1f}s  {qa.type:<10} {qa.question}" in text
    assert text.count("truth: ") == len(questions)
    assert text.count("✗") + text.count("✓") == len(questions)
    right = text.count("✓")
    assert f"accuracy: {right}/{len(questions)} = " in text
    assert "the stream starts: " in text and "Repeat with: vstream demo --seed 3 --model tiny" in text


def test_run_demo_answers_from_the_memory_at_each_question_time():
    seen = []
    result = run_demo("tiny", seed=2_500_000, speed=30, questions=5, on_answer=seen.append)
    stream = w.generate_stream(2_500_000)
    expected = pick_questions(w.make_questions(stream), 5)
    assert [r["question"] for r in result["rows"]] == [qa.question for qa in expected] == [r["question"] for r in seen]
    assert [r["answer"] for r in result["rows"]] == [qa.answer for qa in expected]
    assert result["frames"]["received"] == stream.duration
    assert result["frames"]["encoded"] + result["frames"]["dropped"] == stream.duration
    for row in result["rows"]:
        assert row["memory_time"] <= row["time"] and row["answer_s"] >= row["first_token_s"] >= 0
        if result["frames"]["dropped"] == 0:  # every frame's memory is kept: the answer rests on the question's time
            assert row["memory_time"] == row["time"] and row["memory_frames"] == row["time"] + 1
    overall = result["accuracy"]["overall"]
    assert overall["total"] == 5 and overall["right"] == sum(r["correct"] for r in result["rows"])
    assert result["untrained"] and result["timeline"]["seed"] == 2_500_000
    json.dumps(result)


def test_pick_questions_balances_types_and_keeps_time_order():
    qas = w.make_questions(w.generate_stream(3))
    four = pick_questions(qas, 4)
    assert sorted(qa.type for qa in four) == sorted(w.QUESTION_TYPES)
    assert [qa.time for qa in four] == sorted(qa.time for qa in four)
    assert pick_questions(qas, None) == qas == pick_questions(qas, 100)
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        pick_questions(qas, 0)


def test_accuracy_table_counts_each_type_and_overall():
    rows = [{"type": "spatial", "correct": True}, {"type": "spatial", "correct": False},
            {"type": "abstract", "correct": True}]
    assert accuracy_table(rows) == {
        "spatial": {"right": 1, "total": 2, "accuracy": 0.5},
        "abstract": {"right": 1, "total": 1, "accuracy": 1.0},
        "overall": {"right": 2, "total": 3, "accuracy": 2 / 3},
    }


def test_paced_source_holds_each_frame_until_its_time():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    frames = [(float(t), None) for t in range(4)]
    out = list(paced(frames, speed=2.0, start=100.0, clock=lambda: now[0], sleep=sleep))
    assert out == frames and slept == [0.5, 0.5, 0.5] and now[0] == 101.5
    with pytest.raises(ValueError, match="speed must be > 0, got 0"):
        list(paced(frames, speed=0))


@pytest.mark.parametrize("args, message", [
    (["--speed", "0"], "--speed must be > 0, got 0.0"),
    (["--questions", "0"], "--questions must be >= 1, got 0"),
    (["--seed", "-4"], "--seed must be >= 0, got -4"),
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' is not a local directory"),
])
def test_demo_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, args, message):
    code, out, err = in_process(monkeypatch, capsys, "demo", "--seed", "1", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
