"""`vstream ask` with questions at several stream times, and `vstream run` with questions on stdin (real processes)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import vstream_cli
from vstream.synth.clips import write_test_video


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("cli") / "long.mp4", seconds=40, fps=5, size=(160, 120), seed=4)


@pytest.mark.slow
def test_ask_answers_each_question_from_the_memory_at_its_time(long_clip):
    out = vstream_cli("ask", str(long_clip), "What is at thirty?", "What is at twelve?", "And at the end?",
              "--at", "30", "--at", "12.5", "--at", "39", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)["answers"]
    assert [a["question"] for a in answers] == ["What is at thirty?", "What is at twelve?", "And at the end?"]
    thirty, twelve, end = answers
    assert thirty["frames"] == 31 and thirty["spatial_times"] == [30.0]
    assert max(b for _, b in thirty["temporal_spans"]) == 30.0 and max(thirty["retrieved_times"]) <= 30.0
    assert twelve["frames"] == 13 and twelve["spatial_times"] == [12.0]
    assert end["frames"] == 40 and end["memory_tokens"] == 681


@pytest.mark.parametrize(
    "args, message",
    [
        (["What?", "Why?", "--at", "3"], "give one --at per question: 2 questions, 1 --at times"),
        (["   "], "a question is empty"),
        (["What?", "--at", "-2"], "--at must be a time in seconds >= 0"),
    ],
)
@pytest.mark.slow
def test_ask_rejects_bad_questions(long_clip, args, message):
    out = vstream_cli("ask", str(long_clip), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_ask_unknown_scheme_is_a_clear_error():
    out = vstream_cli("ask", "gopher://127.0.0.1/x.mp4", "What?")
    assert out.returncode == 2 and "unsupported URL scheme 'gopher'" in out.stderr


@pytest.mark.slow
def test_run_answers_questions_from_stdin_while_the_stream_plays(long_clip):
    out = vstream_cli("run", str(long_clip), "--speed", "40", "--max-new-tokens", "5",
                      stdin="What is there?\nAnd now?\n")
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(answers) == 2 and answers[0].split("]")[0].endswith("s")
    last_status = out.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"\[stream +([\d.]+)s \| frames 40 encoded (\d+) dropped (\d+) \| memory (\d+) tokens\]",
                         last_status)
    assert match, last_status
    assert int(match[2]) + int(match[3]) == 40 and int(match[4]) <= 681


@pytest.mark.slow
def test_run_on_a_missing_file_ends_with_its_error(tmp_path):
    out = vstream_cli("run", str(tmp_path / "absent.mp4"), stdin="")
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_bench_stream_reports_throughput_drops_and_latency():
    out = vstream_cli("bench", "stream", "--seconds", "10", "--speed", "20", "--questions", "2",
                      "--max-new-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["environment"]["model"] == "tiny" and result["environment"]["torch"]
    assert (result["offline"]["frames"] == 10 and result["offline"]["dropped"] == 0
            and result["offline"]["ingest_fps"] > 0)
    live = result["live"]
    assert live["frames_received"] == 10 and live["frames_encoded"] + live["frames_dropped"] == 10
    assert live["latency"]["first_token"]["count"] == 2 and live["latency"]["first_token"]["p95_ms"] > 0


def test_run_exits_cleanly_on_ctrl_c(long_clip):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vstream.cli", "run", str(long_clip), "--speed", "1"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"},
        # a shell without job control starts background commands with SIGINT ignored, and the child would inherit
        # that (Python then installs no KeyboardInterrupt): give it the terminal's default, as Ctrl-C meets it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stderr:  # wait until the stream is being ingested
            if "encoded 1 " in line or "encoded 2 " in line:
                break
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == 130
    assert "interrupted" in proc.stderr.read()


def test_run_prints_each_watch_trigger_with_its_stream_time(tmp_path):
    clip = write_test_video(tmp_path / "short.mp4", seconds=4, fps=5, size=(160, 120), seed=2)
    # a threshold of -1e9 fires at the first evaluation whatever the tiny model's random weights say
    out = vstream_cli("run", str(clip), "--speed", "4", "--watch", "a purple square appears", "--watch", "a red circle",
                      "--watch-threshold", "-1e9", stdin="")
    assert out.returncode == 0, out.stderr
    fired = [line for line in out.stdout.splitlines() if "watch triggered" in line]
    assert len(fired) == 2, out.stdout
    assert re.fullmatch(r"\[[\d.]+s\] watch triggered: a purple square appears \(score -?[\d.]+\)", fired[0]), fired
    bad = vstream_cli("run", str(clip), "--watch", " ", stdin="")
    assert bad.returncode != 0 and "condition" in bad.stderr
