"""`vstream bench serve`, the load generator: against a server it starts itself (`python -m vstream serve` as a
subprocess) and against one already running (`--url`, a real uvicorn in this process), with the tiny model, real
JPEG frames over the realtime socket and streamed questions over the OpenAI API. Checks the report's structure and
that its counts agree with each other and with the server's; bad options give one-line errors."""

from __future__ import annotations

import json
import time

import pytest

import vstream
from helpers import DEADLINE_S, KEY, in_process, running_server, vstream_cli
from vstream.cli.bench import _serve_table
from vstream.loadgen import free_port
from vstream.server import create_app
from vstream.server.state import Limits

STATUSES = ("200", "429", "503", "other", "no_response")


def bench_serve(*args, timeout=300) -> dict:
    out = vstream_cli("bench", "serve", *args, "--json", timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def bench_serve_in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`vstream bench serve ARGS` through the console entry point in this process: (exit code, stdout, stderr)."""
    return in_process(monkeypatch, capsys, "bench", "serve", *args)


def check_consistent(r: dict, streams: int) -> None:
    """The counts of one report agree: per question, per frame, per stream."""
    q, fr, st = r["questions"], r["frames"], r["streams"]
    assert st["opened"] + sum(st["refused"].values()) == st["requested"] == streams
    assert st["closed_early"] == {} and st["gone_at_end"] == 0
    assert set(q["status"]) == set(STATUSES) and q["sent"] == sum(q["status"].values()) == len(q["records"])
    answered = [rec for rec in q["records"] if rec["done_s"] is not None and rec["error"] is None]
    assert len(answered) == q["completed"] == q["status"]["200"] - q["failed_after_200"]
    for rec in answered:
        assert rec["status"] == 200 and rec["headers_s"] <= rec["done_s"]
        if rec["chunks"]:
            assert rec["headers_s"] <= rec["first_chunk_s"] <= rec["done_s"] and rec["chars"] >= rec["chunks"]
        else:  # an answer without any content chunk is counted, and has no first-chunk time
            assert rec["first_chunk_s"] is None
    assert q["first_chunk_ms"]["count"] == q["completed"] - q["no_content_chunk"]
    assert q["done_ms"]["count"] == q["completed"]
    assert 0 <= q["no_content_chunk"] <= q["no_visible_text"] <= q["completed"]
    # every frame the client sent was acknowledged and reached the server; each ended ingested or dropped
    assert fr["sent"] == fr["acknowledged"] == fr["received"] >= fr["ingested"] and fr["errors"] == {}
    assert fr["received"] == fr["ingested"] + fr["dropped"] + fr["queued_at_end"] and fr["queued_at_end"] == 0
    assert fr["accepted"] >= fr["ingested"] and fr["send_lag_ms"]["count"] == fr["sent"]
    assert r["health_live"]["failures"] == 0 and r["health_live"]["ms"]["count"] >= 1
    for s in (q["first_chunk_ms"], q["done_ms"], r["health_live"]["ms"]):
        if s["count"]:
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["p95_ms"] <= s["max_ms"]


@pytest.mark.slow
def test_local_server_two_streams(tmp_path):
    r = bench_serve("--model", "tiny", "--device", "cpu", "--streams", "2", "--seconds", "6", "--question-every", "2")
    check_consistent(r, 2)
    srv = r["server"]
    assert srv["local"] and srv["model"] == "tiny" and srv["device"] == "cpu" and srv["start_to_ready_s"] > 0
    assert srv["stop"]["exit_code"] == 0  # SIGTERM: the server drained and exited cleanly
    assert r["options"] | {"frame_size": "640x480", "streams": 2, "seconds": 6.0} == r["options"]
    assert r["frames"]["jpeg_bytes_mean"] > 2000  # 640x480 moving shapes, not a blank frame
    # 2 streams x 8 s at 1 fps; 2 streams x 3 questions (at 2, 4, 6 s after the warm-up, staggered by 1 s)
    assert r["frames"]["sent"] == 16 and r["questions"]["sent"] == 6
    assert r["frames"]["ingested"] >= 1 and r["questions"]["completed"] >= 1
    mem = r["server_memory"]
    assert mem["rss_bytes_peak"] >= mem["rss_bytes_end"] > 100 * 2**20  # a python with torch and the model
    assert mem["gpu_bytes"] is None and "gpu_memory" in mem["gpu_note"]


@pytest.mark.slow
def test_running_server_by_url_with_a_key_refuses_a_stream_over_its_limit(capsys):
    app = create_app(vstream.load("tiny"), api_key=KEY, max_streams=2)
    with running_server(app) as base:
        r = bench_serve("--url", base, "--api-key", KEY, "--streams", "3", "--seconds", "3", "--question-every", "1",
                        "--warmup", "1", "--frame-size", "320x240", "--fps", "2")
        deadline = time.monotonic() + DEADLINE_S  # the server drops a socket's stream just after the close
        while app.state.vstream.streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.vstream.streams == {}  # the push streams went with their sockets
    check_consistent(r, 3)
    assert r["streams"] == r["streams"] | {"opened": 2, "refused": {"429": 1}}
    srv = r["server"]
    assert not srv["local"] and srv["url"] == base and srv["auth_required"] is True and srv["device"] is None
    assert r["server_memory"]["rss_bytes_peak"] is None and srv["start_to_ready_s"] is None
    # 2 fps into the tiny model's 1-fps streams: about half the frames are sampled out, counted as dropped
    fr = r["frames"]
    assert fr["stream_fps"] == [1.0] and fr["sent"] == 16 and fr["dropped"] >= 4
    _serve_table(r)  # the text form of the same report
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"tiny on its own device at {base} (--url); ") and len(text) == 7
    assert text[1].startswith(f"  streams 2/3 opened (refused: {{'429': 1}}); frames 16 sent, {fr['received']} "
                              "received")
    q, first = r["questions"], r["questions"]["first_chunk_ms"]
    assert text[2].startswith(f"  questions {q['sent']} (200 {q['status']['200']}")
    assert text[3] == (f"  first content chunk p50 {first['median_ms']:.1f}, p95 {first['p95_ms']:.1f}, "
                       f"max {first['max_ms']:.1f} ms ({first['count']})")
    assert "server RSS peak -" in text[6] and "exports no vstream:gpu_memory" in text[6]


@pytest.mark.slow
def test_a_socket_the_server_closes_during_the_load_is_counted_with_its_reason():
    # a frame every 5 s on a server that closes sockets idle for 1 s: the session ends (1001 idle), its stream goes
    app = create_app(vstream.load("tiny"), max_streams=1, limits=Limits(ws_idle_s=1.0, ws_notice_s=0.5))
    with running_server(app) as base:
        r = bench_serve("--url", base, "--streams", "1", "--fps", "0.2", "--seconds", "2.5", "--warmup", "0.5",
                        "--question-every", "100", "--frame-size", "64x64")
    st, fr = r["streams"], r["frames"]
    assert st["opened"] == 1 and st["closed_early"] == {"server 1001 idle": 1} and st["gone_at_end"] == 1
    assert fr["sent"] == fr["acknowledged"] == fr["received"] == 1  # the gone stream's counts: its last ack's
    assert r["questions"]["sent"] == 1


@pytest.mark.slow
def test_watches_on_top_of_the_load_are_counted_from_their_views_and_the_servers_metrics(capsys):
    app = create_app(vstream.load("tiny"), max_streams=2)
    with running_server(app) as base:
        r = bench_serve("--url", base, "--streams", "2", "--seconds", "3", "--warmup", "1", "--question-every", "100",
                        "--frame-size", "160x120", "--watches", "2", "--watch-escalate-margin", "2")
        watcher = app.state.vstream.watcher
        assert watcher is not None and watcher.tick_seconds.count >= 1
    check_consistent(r, 2)
    w, srv = r["watches"], r["watches"]["server"]
    assert r["options"]["watches"] == 2 and r["options"]["watch_escalate_margin"] == 2.0
    assert (w["created"], w["refused"], w["seen"], w["per_stream"], w["failing"]) == (4, {}, 4, 2.0, 0)
    assert 4 <= w["evaluations"] and w["cheap"] + w["escalated"] == w["evaluations"]  # every watch has a margin
    assert 0 <= w["events"] <= w["evaluations"]
    assert 1 <= srv["ticks"] <= watcher.tick_seconds.count and 0 < srv["tick_ms_mean"] and 0 < srv["busy_share"] < 1
    assert 0 < srv["ms_per_stream_scored"] <= srv["tick_ms_mean"]
    assert set(srv["evaluations"]) == {"recent", "escalated", "full", "failed"} and srv["evaluations"]["full"] == 0
    assert 1 <= sum(srv["evaluations"].values()) <= w["evaluations"]  # the window's, of all the watches' evaluations
    _serve_table(r)
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  watches")]
    assert line.startswith(f"  watches 4 created: {w['evaluations']} evaluations ({w['cheap']} cheap, ") and \
        f"server: {srv['ticks']} ticks, {srv['tick_ms_mean']} ms each" in line


def test_an_unreachable_url_is_named(monkeypatch, capsys):
    port = free_port()  # closed again: nothing listens there
    code, out, err = bench_serve_in_process(monkeypatch, capsys, "--url", f"http://127.0.0.1:{port}", "--seconds", "1")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: could not reach the server at http://127.0.0.1:{port}: ConnectError")


def test_a_key_is_needed_and_named(monkeypatch, capsys):
    app = create_app(vstream.load("tiny"), api_key=KEY, max_streams=1)
    with running_server(app) as base:
        code, out, err = bench_serve_in_process(monkeypatch, capsys, "--url", base, "--seconds", "1", "--warmup", "0")
    ours = [line for line in err.splitlines() if not line.startswith("ERROR:  ")]  # uvicorn logs each refusal
    assert code == 2 and out == "" and ours == ["error: no push stream could be opened on "
                                                f"{base.replace('http', 'ws')}/v1/realtime: refused {{'401': 2}}: "
                                                "the server needs a key (--api-key)"]


@pytest.mark.parametrize("args, message", [
    (["--frame-size", "640by480"], "--frame-size must be WIDTHxHEIGHT in pixels, e.g. 640x480, got '640by480'"),
    (["--frame-size", "8x8"], "--frame-size must be at least 16x16, got '8x8'"),
    (["--streams", "0"], "--streams and --max-tokens must be >= 1, got 0 and 32"),
    (["--fps", "0"], "--fps must be > 0, got 0"),
    (["--question-every", "-1"], "--question-every must be > 0, got -1"),
    (["--warmup", "-1"], "--warmup must be >= 0 seconds, got -1"),
    (["--question", " "], "--question must be a non-empty question, got ' '"),
    (["--watches", "-1"], "--watches and --watch-escalate-margin must be >= 0, got -1 and None"),
    (["--url", "127.0.0.1:8000"], "--url must be http://HOST:PORT or https://HOST:PORT, got '127.0.0.1:8000'"),
    (["--url", "http://127.0.0.1:9", "--model", "tiny"], "with --url the server has its own (got --model tiny"),
    (["--device", "tpu"], "--device: device must be"),
])
def test_bad_options_are_one_line_errors(monkeypatch, capsys, args, message):
    code, out, err = bench_serve_in_process(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
