"""`vstream demo` (a world stream played live through the engine, answers scored against the ground truth) and
`vstream world-eval` (accuracy per question type with memory parts switched off; results, report and plot)."""

import json
import sys

import pytest

from helpers import in_process, vstream_cli
from vstream.demo import accuracy_table, paced, pick_questions, run_demo
from vstream.synth import world as w


def cli(*args):
    return vstream_cli(*args, timeout=120, env={"COLUMNS": "200"})


@pytest.mark.slow
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


def test_run_demo_sets_a_watch_on_the_first_new_object_and_evaluates_it_every_second():
    from vstream import demo_watch

    seed, fired = 2_500_001, []
    result = run_demo("tiny", seed=seed, speed=20, questions=1, watch=True, on_watch=fired.append)
    stream = w.generate_stream(seed)
    task = demo_watch.choose(stream)
    first = min(e.time for e in stream.events if e.kind == "appear" or e.kind == "scene")
    assert task is not None and task.type == "appear" and task.events[0] >= first
    assert result["watch"] == {"condition": task.condition, "events": list(task.events), "threshold": 0.0}
    assert 1 <= result["watch_evaluations"] <= stream.duration and isinstance(result["watch_last_score"], float)
    assert result["watch_triggers"] == fired
    for t in fired:  # the tiny model's weights are random: whether it fires says nothing, how it reports does
        assert t["condition"] == task.condition and 0 <= t["time"] < stream.duration
        assert t["delay_s"] is None or t["delay_s"] == t["time"] - t["event_time"] >= 0
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


@pytest.fixture(scope="module")
def world_eval_run(tmp_path_factory):
    """`vstream world-eval --model tiny --streams 2 --ablate` run once through the console entry point."""
    from vstream.cli import main

    out = tmp_path_factory.mktemp("world-eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["vstream", "world-eval", "--model", "tiny", "--streams", "2", "--start", "5",
                                 "--ablate", "--out", str(out)])
        with pytest.raises(SystemExit) as exit_:
            main()
    assert exit_.value.code in (0, None)
    return out


def test_world_eval_writes_results_report_and_plot(world_eval_run):
    from vstream.cli.world import REQUIRED

    results = json.loads((world_eval_run / "results.json").read_text())
    assert set(REQUIRED) <= set(results)
    names = ["full", "no_spatial", "no_temporal", "no_abstract", "no_retrieved"]
    assert results["ablations"] == names and list(results["accuracy"]) == names
    assert results["model"] == "tiny" and results["split"] == "test" and results["streams"] == 2
    command = f"vstream world-eval --model tiny --streams 2 --start 5 --ablate --out {world_eval_run}"
    assert results["command"] == command
    assert results["device"].startswith("cpu") and results["versions"]["vstream"]
    seeds = w.split_seeds("test", 2, start=5)
    expected = [(seed, qa.time, qa.question, qa.answer) for seed in seeds
                for qa in w.make_questions(w.generate_stream(seed), seed=seed)]
    rows = results["rows"]
    assert results["questions"] == len(rows) == len(expected)
    assert sorted((r["seed"], r["time"], r["question"], r["answer"]) for r in rows) == sorted(expected)
    for name in names:
        assert all(isinstance(r[name], str) and isinstance(r[name + "_right"], bool) for r in rows)
        assert results["right"][name]["overall"] == sum(r[name + "_right"] for r in rows)
        assert results["accuracy"][name]["overall"] == pytest.approx(results["right"][name]["overall"] / len(rows))
    assert sum(results["per_type"].values()) == len(rows)

    report = (world_eval_run / "report.md").read_text()
    for text in ("| full model |", "| without spatial |", "| without retrieved |", f"overall (n={len(rows)})",
                 results["command"], results["date"], "torch ", results["device"], "![accuracy per question type]"):
        assert text in report
    assert report.count("| without ") == 8  # 4 ablation rows in the table, 4 in the contributions
    png = (world_eval_run / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_world_eval_report_is_reproduced_from_the_results_file(world_eval_run, tmp_path, monkeypatch, capsys):
    code, out, _ = in_process(monkeypatch, capsys, "world-eval", "--from-results",
                              str(world_eval_run / "results.json"), "--out", str(tmp_path / "again"))
    assert code == 0 and "report written to" in out
    again = tmp_path / "again"
    assert (again / "report.md").read_text() == (world_eval_run / "report.md").read_text()
    assert (again / "results.json").read_bytes() == (world_eval_run / "results.json").read_bytes()
    assert (again / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_world_eval_report_tells_the_parts_apart():
    from vstream.cli.world import report_markdown

    rows = [{"seed": 2_000_000, "time": 3.0, "type": "spatial", "question": "q", "answer": "red", "full": "red",
             "full_right": True, "no_spatial": "blue", "no_spatial_right": False},
            {"seed": 2_000_000, "time": 5.0, "type": "abstract", "question": "q", "answer": "yes", "full": "yes",
             "full_right": True, "no_spatial": "yes", "no_spatial_right": True}]
    results = {"command": "vstream world-eval", "model": "m", "date": "d", "device": "cpu", "versions": {},
               "split": "test", "streams": 1, "start": 0, "source": "render", "questions": 2,
               "per_type": {"spatial": 1, "abstract": 1}, "rows": rows,
               "accuracy": {"full": {"spatial": 1.0, "abstract": 1.0, "overall": 1.0},
                            "no_spatial": {"spatial": 0.0, "abstract": 1.0, "overall": 0.5}}}
    report = report_markdown(results)
    assert "| full model | 100.0% (1/1) | 100.0% (1/1) | 100.0% (2/2) |" in report
    assert "| without spatial | 0.0% (0/1) | 100.0% (1/1) | 50.0% (1/2) |" in report
    assert "| without spatial | +100.0 | +0.0 | +50.0 |" in report


@pytest.mark.parametrize("args, message", [
    (["--streams", "2"], "--model is required"),
    (["--model", "tiny", "--split", "dev"], "--split must be one of train, val, test, got 'dev'"),
    (["--model", "tiny", "--streams", "0"], "--streams must be >= 1, got 0"),
    (["--model", "tiny", "--start", "99999"], "split 'test' has 100000 seeds"),
    (["--model", "tiny", "--source", "camera"], "--source must be render or video, got 'camera'"),
    (["--model", "tiny", "--device", "tpu"],
     "--device: device must be auto (CUDA when torch sees a device, else the CPU), cpu, cuda or cuda:N; got 'tpu'"),
    (["--from-results", "/nonexistent/results.json"], "--from-results must be a results.json file"),
    (["--model", "tiny", "--questions-per-call", "0"], "--questions-per-call must be >= 1, got 0"),
    (["--model", "tiny", "--watches", "--conditions-per-forward", "0"], "--conditions-per-forward must be >= 1, got 0"),
])
def test_world_eval_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, args, message):
    code, _, err = in_process(monkeypatch, capsys, "world-eval", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("watches, option", [([], "--questions-per-call"), (["--watches"], "--conditions-per-forward")])
def test_world_eval_batch_size_is_the_deprecated_name_of_both_counts(monkeypatch, capsys, watches, option):
    code, _, err = in_process(monkeypatch, capsys, "world-eval", "--model", "tiny", *watches, "--batch-size", "0")
    deprecated, error = err.strip().splitlines()
    assert code == 2 and "--batch-size is deprecated" in deprecated and f"{option} must be >= 1, got 0" in error


def test_world_eval_rejects_a_file_that_is_not_its_results(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"accuracy": {}}))
    code, _, err = in_process(monkeypatch, capsys, "world-eval", "--from-results", str(bad), "--out", str(tmp_path))
    assert code == 2 and "is not a world-eval results file: missing ['command'" in err


def test_the_packaged_demo_model_ships_in_the_wheel():
    """The files `load("demo")` reads are matched by the package data of the package that holds them."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from vstream.model.loading import OWN_CONFIG, OWN_WEIGHTS, PACKAGED

    root = Path(__file__).resolve().parent.parent
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ".".join(PACKAGED["demo"].relative_to(root).parts)
    assert package == "vstream.assets.demo"
    for name in (OWN_CONFIG, OWN_WEIGHTS):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in package_data[package]), name


def test_default_model_is_the_packaged_demo_model_once_installed(tmp_path, monkeypatch, smollm2):
    from vstream.config import preset
    from vstream.demo import default_model
    from vstream.model.loading import PACKAGED, build_random, save_pretrained

    monkeypatch.setitem(PACKAGED, "demo", tmp_path / "demo")
    assert default_model() == "tiny"  # not installed: the untrained preset, said plainly
    save_pretrained(build_random(preset("smollm2-demo")), tmp_path / "demo")
    assert default_model() == "demo"
    result = run_demo(seed=5, speed=50, questions=1, max_new_tokens=2)
    assert result["model"] == "demo" and result["defaulted"] and not result["untrained"]
    assert result["model_name"] == "smollm2-demo" and result["accuracy"]["overall"]["total"] == 1
