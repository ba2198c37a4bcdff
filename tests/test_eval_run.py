"""Evaluation end to end with PyAV-written videos and the tiny random model: both modes, feature files, resuming,
live replay, several workers, and the `vstream eval` command's outputs."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from helpers import vstream_cli
import vstream
from vstream.cli import app
from vstream.eval.datasets import load_benchmark
from vstream.eval.features import extract_features
from vstream.errors import UserInputError
from vstream.eval.runner import PREDICTIONS, RunConfig, check_run_file, run_predictions
from vstream.synth.clips import write_test_video


@pytest.fixture(scope="module")
def data(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("bench")
    (root / "videos").mkdir()
    for i in range(2):
        write_test_video(root / "videos" / f"v{i}.mp4", seconds=8, fps=4, size=(64, 48), seed=i)
    records = [{"video_id": f"v{i}", "question": f"What is on screen at {t}?", "id": f"q{i}-{t}",
                "answer": "a red square", "answer_type": "now" if t else "all", **({"time": t} if t else {})}
               for i in range(2) for t in (1, 4.5, 6, None)]
    (root / "test_qa.json").write_text(json.dumps(records))
    mcq = [{"videoID": f"v{i}", "question_id": f"m{i}", "question": "Which shape?", "task_type": "shapes",
            "options": ["A. disc", "B. square", "C. line"], "answer": "B", "time": 3} for i in range(2)]
    (root / "mcq.json").write_text(json.dumps(mcq))
    extract_features(model, root / "videos", root / "features", frames_per_call=8)
    return root


def predictions(model, bench, out, **kw):
    cfg = RunConfig(benchmark=bench.name, mode=kw.pop("mode"), model="tiny", max_new_tokens=6,
                    source="features" if bench.features_dir else "video", **kw)
    return run_predictions(bench, cfg, out, model=model)


def texts(records):
    return {r["id"]: r["pred"] for r in records}


def test_offline_and_simulated_streaming_see_the_same_frames(model, data, tmp_path):
    bench = load_benchmark("open", data)
    offline = predictions(model, bench, tmp_path / "off", mode="offline")
    streaming = predictions(model, bench, tmp_path / "str", mode="streaming")
    assert [r["id"] for r in offline] == [q.id for q in bench.questions]
    by_id = {r["id"]: r for r in streaming}
    for r in offline:
        s = by_id[r["id"]]
        # paper mode: the stream's memory at the question equals the offline memory up to it (frames at 0..t s)
        assert r["frames"] == s["frames"] == (8 if r["time"] is None else int(r["time"]) + 1)
        assert r["pred"] == s["pred"]
        assert s["stream"]["lag_s"] == (None if r["time"] is None else pytest.approx(r["time"] - int(r["time"])))
        assert s["latency"]["answer_s"] > 0 and s["latency"]["first_token_s"] > 0
    assert by_id["q0-4.5"]["position"] == pytest.approx(4.5 / 8)
    from_features = predictions(model, load_benchmark("open", data, features=data / "features"),
                                tmp_path / "feat", mode="offline")
    assert texts(from_features) == texts(offline)


def test_resume_recomputes_nothing_finished_and_gives_the_same_results(model, data, tmp_path):
    bench = load_benchmark("open", data)
    first = predictions(model, bench, tmp_path, mode="streaming")
    path = tmp_path / PREDICTIONS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20])  # 5 finished, one cut mid-line by an interruption
    calls = []
    real = model.prompt_embeds  # built once per answer, on either answer path
    model.prompt_embeds = lambda memory, question, **kw: calls.append(question) or real(memory, question, **kw)
    try:
        second = predictions(model, bench, tmp_path, mode="streaming")
        assert len(calls) == 3
        calls.clear()
        assert texts(predictions(model, bench, tmp_path, mode="streaming")) == texts(first)
        assert calls == []
    finally:
        del model.prompt_embeds
    assert texts(second) == texts(first)
    assert len(path.read_text().splitlines()) == 8
    with pytest.raises(ValueError, match="another run"):
        predictions(model, bench, tmp_path, mode="offline")
    run = json.loads((tmp_path / "run.json").read_text())
    run["batch_size"] = run.pop("frames_per_call")  # a run from before the rename resumes too
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert texts(predictions(model, bench, tmp_path, mode="streaming")) == texts(first)


def test_official_memory_mode_in_both_modes(data, tmp_path):
    official = vstream.load("tiny", memory_mode="official")
    bench = load_benchmark("open", data, limit=4)
    for mode in ("offline", "streaming"):
        records = predictions(official, bench, tmp_path / mode, mode=mode, memory_mode="official")
        assert all(0 < r["memory_tokens"] <= 681 for r in records)


def test_live_replay_records_lag(model, data, tmp_path):
    bench = load_benchmark("open", data, limit=4)
    records = predictions(model, bench, tmp_path, mode="streaming", speed=8.0)
    assert [r["id"] for r in records] == ["q0-1", "q0-4.5", "q0-6", "q0-None"]
    for r in records:
        assert r["stream"]["snapshot_frames"] >= 1 and r["stream"]["frames_dropped"] >= 0
        assert r["time"] is None or r["stream"]["lag_s"] >= 0


def test_live_replay_of_feature_files_is_refused(model, data, tmp_path):
    from vstream.errors import UserInputError

    bench = load_benchmark("open", data, features=data / "features", limit=1)
    with pytest.raises(UserInputError, match="live replay .* plays videos"):
        predictions(model, bench, tmp_path, mode="streaming", speed=2.0)


@pytest.mark.slow
def test_two_workers_give_the_same_predictions(model, data, tmp_path):
    bench = load_benchmark("open", data)
    bench.questions = [q for q in bench.questions if q.time in (None, 4.5)]
    cfg = RunConfig(benchmark="open", mode="offline", model="tiny", max_new_tokens=6)
    alone = run_predictions(bench, cfg, tmp_path / "one", model=model)
    pooled = run_predictions(bench, cfg, tmp_path / "two", workers=2)
    assert texts(pooled) == texts(alone)


@pytest.mark.slow
def test_cli_eval_open_and_choice(data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "mcq"
    args = ["eval", "--benchmark", "videomme", "--data", str(data), "--qa", str(data / "mcq.json"),
            "--mode", "both", "--out", str(out), "--max-new-tokens", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "videomme offline: accuracy" in result.output and "videomme streaming: accuracy" in result.output
    assert "unparsable" in result.output
    assert (out / "offline" / "report.md").exists()
    out = out / "streaming"
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["n"] == 2 and results["by_type"]["shapes"]["n"] == 2
    assert results["overall"]["correct"] + results["overall"]["unparsable"] <= 2
    for png in ("accuracy_by_position.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| shapes | 2 |" in report and "![latency.png](latency.png)" in report

    out = tmp_path / "open"
    result = runner.invoke(app, ["eval", "--benchmark", "nextoe", "--model", "tiny", "--data", str(data), "--features",
                                 str(data / "features"), "--judge", "offline", "--out", str(out), "--limit", "3",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "not comparable to LLM-judged numbers" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["n"] == 3 and results["overall"]["failed"] == 0
    assert set(results["by_type_letter"]) == {"N"}
    assert "NOT comparable" in (out / "report.md").read_text()


def test_cli_eval_errors_exit_2(data, tmp_path):
    from vstream.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(data / "videos", bad / "videos")
    (bad / "test_qa.json").write_text(json.dumps([{"video_id": "v9", "question": "q", "id": 1, "answer": "a"}]))
    proc = vstream_cli("eval", "--benchmark", "msvd", "--data", str(bad), timeout=120)
    assert proc.returncode == 2
    assert "record '1', field video: no video file for 'v9'" in proc.stderr
    assert main  # the console entry point maps DatasetError (a VStreamError) to exit code 2


def test_a_run_names_its_lora_adapter_only_when_it_has_one(tmp_path):
    plain = RunConfig(benchmark="open", mode="offline", model="tiny")
    adapted = RunConfig(benchmark="open", mode="offline", model="tiny", lora="adapters/run1")
    assert "lora" not in plain.key() and adapted.key() == plain.key() | {"lora": "adapters/run1"}
    check_run_file(tmp_path, plain)  # a run written before `lora` existed still resumes
    with pytest.raises(UserInputError, match=r"another run .*'lora': \(None, 'adapters/run1'\)"):
        check_run_file(tmp_path, adapted)
