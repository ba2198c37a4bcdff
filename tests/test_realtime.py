"""The realtime WebSocket, the memory view, thumbnails, answers "as of" a time, and isolation between streams, against
a real uvicorn on 127.0.0.1 with the tiny model and real websockets/httpx/openai clients. Every wait is bounded."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from helpers import AUTH, DEADLINE_S, EngineHook, KEY, api_client, cluster_server, recv, running_server, wait_frames
from vstream.server import create_app
from vstream.server.state import Limits
from vstream.synth.clips import moving_shapes, write_test_video

FRAMES = list(moving_shapes(40, 160, 120, seed=1, fps=10))


def jpeg(i: int = 0, size: tuple[int, int] | None = None) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(FRAMES[i % len(FRAMES)]))
    if size is not None:
        image = image.resize(size)
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def append(i: int, t: float, event_id: str | None = None) -> str:
    return json.dumps({"type": "input_video_frame.append", "event_id": event_id or f"f{i}", "timestamp": t,
                       "image": base64.b64encode(jpeg(i)).decode()})


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    write_test_video(media / "clip.mp4", seconds=6, fps=5)
    limits = Limits(max_ws_message_bytes=200_000, max_frame_pixels=640 * 480)
    app = create_app(model, media_root=media, api_key=KEY, max_streams=4, limits=limits)
    with running_server(app) as base:
        yield base, app


@pytest.fixture(scope="module", params=["process", pytest.param("cluster", marks=[pytest.mark.ray, pytest.mark.slow])])
def api_server(request, model, tmp_path_factory):
    """(base url, app) of the single-process server, or (base url of the ingress, None) of a one-replica cluster on
    Ray made with the same options (the same client code runs against both)."""
    if request.param == "process":
        yield request.getfixturevalue("server")
        return
    media = tmp_path_factory.mktemp("media")
    write_test_video(media / "clip.mp4", seconds=6, fps=5)
    limits = Limits(max_ws_message_bytes=200_000, max_frame_pixels=640 * 480)
    with cluster_server(1, tmp_path_factory.mktemp("state"), media_root=media, api_key=KEY, max_streams=4,
                        limits=limits) as (base, _):
        yield base, None


@pytest.fixture
def client(api_server):
    with api_client(api_server[0]) as c:
        yield c


def connect(base: str, stream_id: str | None = None):
    url = base.replace("http://", "ws://") + "/v1/realtime" + (f"?stream_id={stream_id}" if stream_id else "")
    return ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S, close_timeout=5)


def push_seconds(ws, seconds: int, start: int = 0) -> list[dict]:
    acks = []
    for i in range(start, start + seconds):
        ws.send(append(i, float(i)))
        acks.append(recv(ws, "input_video_frame.ack"))
    return acks


def test_push_frames_are_acknowledged_and_answered(api_server, client):
    with connect(api_server[0]) as ws:
        created = recv(ws)
        assert created["type"] == "session.created" and created["session"]["owns_stream"] is True
        sid = created["session"]["stream_id"]
        acks = push_seconds(ws, 3)
        assert [a["item_event_id"] for a in acks] == ["f0", "f1", "f2"] and all(a["accepted"] for a in acks)
        assert [a["received"] for a in acks] == [1, 2, 3] and acks[-1]["dropped"] == 0
        ws.send(jpeg(3))  # a binary frame, timed by the server's clock
        assert recv(ws, "input_video_frame.ack")["received"] == 4
        wait_frames(client, sid, 3)
        ws.send(json.dumps({"type": "response.create", "event_id": "q1", "question": "What is there?",
                            "max_tokens": 4}))
        created = recv(ws, "response.created")["response"]
        assert created["vstream"]["frames"] >= 3 and created["vstream"]["spatial_times"]
        deltas, event = [], recv(ws)
        while event["type"] == "response.output_text.delta":
            deltas.append(event["delta"])
            event = recv(ws)
        assert event["type"] == "response.output_text.done" and event["text"] == "".join(deltas)
        done = recv(ws, "response.done")["response"]
        assert done["status"] == "completed" and done["id"] == created["id"] and 1 <= len(deltas) <= 4
    deadline = time.monotonic() + DEADLINE_S  # the socket's own stream goes with it: its slot is free again
    while sid in [s["id"] for s in client.get("/v1/streams").json()["data"]]:
        assert time.monotonic() < deadline, "the session's stream outlived its socket"
        time.sleep(0.05)


def test_30fps_into_1fps_keeps_memory_flat_and_counts_drops(api_server, client):
    with connect(api_server[0]) as ws:
        sid = recv(ws)["session"]["stream_id"]
        for i in range(60):  # 2 s of stream time at 30 fps, as fast as the socket takes them
            ws.send(append(i, i / 30))
            ack = recv(ws, "input_video_frame.ack")
        assert ack["received"] == 60 and ack["dropped"] == 60 - 3  # slots 0, 1 and 2
        first = wait_frames(client, sid, 2)["stats"]
        for i in range(60, 300):
            ws.send(append(i, i / 30))
            ack = recv(ws, "input_video_frame.ack")
        view = wait_frames(client, sid, 10)["stats"]
        assert ack["received"] == 300 and ack["dropped"] == 300 - 11 and ack["ingested"] <= 11
        assert view["memory_bytes"] == first["memory_bytes"]
        assert view["frames_dropped_total"] == ack["dropped"]
        metrics = client.get("/metrics").text
        assert f'vstream:frames_dropped_total{{stream_id="{sid}"}} {ack["dropped"]}' in metrics


def test_memory_view_thumbnails_and_as_of(api_server, client):
    with connect(api_server[0]) as ws:
        sid = recv(ws)["session"]["stream_id"]
        assert client.get(f"/v1/streams/{sid}/memory").status_code == 409
        push_seconds(ws, 8)
        wait_frames(client, sid, 8)
        memory = client.get(f"/v1/streams/{sid}/memory").json()
        assert memory["frames_seen"] == 8 and memory["stream_time"] == 7.0 and memory["bytes"] > 0
        assert memory["tokens"]["total"] == sum(memory["tokens"][k] for k in ("abstract", "temporal", "retrieved",
                                                                               "spatial"))
        clusters = memory["temporal"]
        assert clusters and sum(c["weight"] for c in clusters) == pytest.approx(8)
        assert all(0 <= c["first"] <= c["mean"] <= c["last"] <= 7 for c in clusters)
        assert memory["spatial"][-1]["time"] == 7.0
        for frame in memory["retrieved"] + memory["spatial"]:
            r = client.get(frame["thumbnail"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
            assert float(r.headers["x-frame-time"]) == frame["time"]
        missing = client.get(f"/v1/streams/{sid}/frames", params={"t": 100.5})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "t"
        past = client.get(f"/v1/streams/{sid}/memory", params={"as_of": 3.5}).json()
        assert past["stream_time"] == 3.0 and past["frames_seen"] == 4 and past["as_of"] == 3.5
        assert max(f["time"] for f in past["spatial"]) == 3.0
        oai = OpenAI(base_url=f"{api_server[0]}/v1", api_key=KEY, timeout=DEADLINE_S, max_retries=0)
        reply = oai.chat.completions.create(model=sid, messages=[{"role": "user", "content": "What was there?"}],
                                            max_tokens=3, extra_body={"as_of": 2.0})
        ext = reply.model_extra["vstream"]
        assert ext["stream_time"] == 2.0 and ext["frames"] == 3 and ext["as_of"] == 2.0
        assert max(ext["spatial_times"]) == 2.0 and all(t <= 2.0 for t in ext["retrieved_times"])
        assert all(b <= 2.0 for _, b in ext["temporal_spans"])
        now = oai.chat.completions.create(model=sid, messages=[{"role": "user", "content": "And now?"}], max_tokens=2)
        assert now.model_extra["vstream"]["stream_time"] == 7.0
        ws.send(json.dumps({"type": "response.create", "question": "then?", "as_of": 5.0, "max_tokens": 2}))
        assert recv(ws, "response.created")["response"]["vstream"]["stream_time"] == 5.0
        assert recv(ws, "response.done")["response"]["status"] == "completed"


@pytest.mark.parametrize("api_server", ["process"], indirect=True)  # it reaches into this process's engine
def test_cancel_stops_the_answer(server, client):
    with connect(server[0]) as ws:
        sid = recv(ws)["session"]["stream_id"]
        push_seconds(ws, 2)
        wait_frames(client, sid, 2)
        with EngineHook(server[1].state.vstream, pause_s=0.2):
            ws.send(json.dumps({"type": "response.create", "question": "Describe everything.", "max_tokens": 30}))
            recv(ws, "response.output_text.delta")
            ws.send(json.dumps({"type": "response.create", "question": "again", "event_id": "q2"}))
            busy = recv(ws, "error")["error"]
            assert busy["code"] == "response_in_progress" and busy["event_id"] == "q2"
            ws.send(json.dumps({"type": "response.cancel"}))
            done = recv(ws, "response.done")["response"]
        assert done["status"] == "cancelled" and done["usage"]["output_tokens"] < 30
    assert server[1].state.vstream.running == 0


def test_session_end_answers_every_message_before_it_then_closes_1000(api_server, client):
    """`session.end`: every frame sent before it is acknowledged and the answer in progress finishes, then the server
    closes with 1000 (how a cluster's ingress hands a socket's stream over to its next owner)."""
    sid = client.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"]
    with connect(api_server[0], sid) as ws:
        recv(ws, "session.created")
        push_seconds(ws, 1)
        wait_frames(client, sid, 1)
        ws.send(json.dumps({"type": "response.create", "question": "What is there?", "max_tokens": 8}))
        for i in (1, 2, 3):
            ws.send(append(i, float(i)))
        ws.send(json.dumps({"type": "session.end"}))
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(recv(ws))
    assert closed.value.rcvd.code == 1000
    assert [e["item_event_id"] for e in events if e["type"] == "input_video_frame.ack"] == ["f1", "f2", "f3"]
    assert next(e for e in events if e["type"] == "response.done")["response"]["status"] == "completed"
    wait_frames(client, sid, 4)
    assert client.delete(f"/v1/streams/{sid}").status_code == 200


def test_bad_events_get_error_events_and_the_session_goes_on(api_server, client):
    with connect(api_server[0]) as ws:
        recv(ws, "session.created")
        big = io.BytesIO()
        Image.new("RGB", (800, 600)).save(big, format="JPEG")  # 480,000 pixels > 640x480
        bomb = _png_header(40000, 40000)  # a header claiming 1.6e9 pixels: refused before any decoding
        cases = [
            ("not json", "invalid_json"),
            (json.dumps({"no": "type"}), "invalid_event"),
            (json.dumps({"type": "dance"}), "unknown_event"),
            (json.dumps({"type": "input_video_frame.append", "image": "%%%", "timestamp": 0}), "invalid_image"),
            (json.dumps({"type": "input_video_frame.append", "image": base64.b64encode(b"GIF89a").decode(),
                         "timestamp": 0}), "invalid_image"),
            (json.dumps({"type": "input_video_frame.append", "timestamp": 0,
                         "image": base64.b64encode(big.getvalue()).decode()}), "limit_exceeded"),
            (json.dumps({"type": "input_video_frame.append", "timestamp": 0,
                         "image": "data:image/png;base64," + base64.b64encode(bomb).decode()}), "limit_exceeded"),
            (json.dumps({"type": "input_video_frame.append", "timestamp": -1, "image": "AAAA"}), None),
            (json.dumps({"type": "response.create", "question": "x" * 5000}), "limit_exceeded"),
            (json.dumps({"type": "response.create", "question": "hi", "max_tokens": 5000}), "limit_exceeded"),
            (json.dumps({"type": "response.create", "question": "  "}), None),
        ]
        for message, code in cases:
            ws.send(message)
            err = recv(ws, "error")["error"]
            assert err["message"] and (code is None or err["code"] == code), (message[:60], err)
        ws.send(append(0, 5.0))
        assert recv(ws, "input_video_frame.ack")["accepted"] is True
        ws.send(append(1, 4.0))  # going back in time
        assert recv(ws, "error")["error"]["code"] == "invalid_timestamp"
        ws.send(append(2, 6.0))
        assert recv(ws, "input_video_frame.ack")["accepted"] is True


def test_limit_errors_name_the_limit_and_the_value(api_server):
    with connect(api_server[0]) as ws:
        recv(ws, "session.created")
        big = io.BytesIO()
        Image.new("RGB", (800, 600)).save(big, format="JPEG")
        ws.send(big.getvalue())
        message = recv(ws, "error")["error"]["message"]
        assert "800x600" in message and f"max_frame_pixels={640 * 480}" in message
        ws.send(json.dumps({"type": "response.create", "question": "hi", "max_tokens": 5000}))
        message = recv(ws, "error")["error"]["message"]
        assert "max_tokens=5000" in message and "max_answer_tokens=1024" in message


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_message_over_the_cap_closes_1009(api_server):
    with connect(api_server[0]) as ws:
        recv(ws, "session.created")
        ws.send(b"\xff" * 200_001)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=DEADLINE_S)
        assert closed.value.rcvd.code == 1009


def test_refusals_on_connect_and_frames_to_a_pulled_stream(api_server, client):
    with pytest.raises(InvalidStatus) as refused:
        connect(api_server[0], "str_nope")
    assert refused.value.response.status_code == 404
    file_stream = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}}).json()["id"]
    try:
        with connect(api_server[0], file_stream) as ws:
            assert recv(ws)["session"]["push"] is False
            ws.send(append(0, 0.0))
            assert recv(ws, "error")["error"]["code"] == "not_a_push_stream"
            wait_frames(client, file_stream, 6)
            assert recv(ws, "stream.ended")["error"] is None
            ws.send(json.dumps({"type": "response.create", "question": "What moved?", "max_tokens": 2}))
            assert recv(ws, "response.done")["response"]["status"] == "completed"
        others = [client.post("/v1/streams", json={"source": {"type": "push"}}) for _ in range(4)]
        opened = [r.json()["id"] for r in others if r.status_code == 201]
        assert len(opened) == 3 and others[-1].status_code == 429 and others[-1].headers["retry-after"]
        with pytest.raises(InvalidStatus) as full:
            connect(api_server[0])
        assert full.value.response.status_code == 429 and full.value.response.headers["retry-after"]
        for sid in opened:
            client.delete(f"/v1/streams/{sid}")
    finally:
        client.delete(f"/v1/streams/{file_stream}")


def _broken_insert(*args, **kwargs):
    raise RuntimeError("injected encoder fault")


@pytest.mark.parametrize("api_server", ["process"], indirect=True)  # it reaches into this process's engine
def test_one_failing_stream_leaves_the_others_running(server, client):
    with connect(server[0]) as bad, connect(server[0]) as good:
        bad_id, good_id = recv(bad)["session"]["stream_id"], recv(good)["session"]["stream_id"]
        server[1].state.vstream.streams[bad_id].session.processor.insert = _broken_insert  # this stream's frames fail
        bad.send(append(0, 0.0))
        recv(bad, "input_video_frame.ack")
        err = recv(bad, "error")["error"]
        assert err["code"] == "stream_failed" and "injected encoder fault" in err["message"]
        assert client.get(f"/v1/streams/{bad_id}").json()["state"] == "failed"
        stop = threading.Event()
        health: list[int] = []

        def probe():
            while not stop.is_set():
                health.append(httpx.get(f"{server[0]}/health/live", timeout=5).status_code)
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            push_seconds(good, 5)
            wait_frames(client, good_id, 5)
            good.send(json.dumps({"type": "response.create", "question": "Still there?", "max_tokens": 3}))
            assert recv(good, "response.done")["response"]["status"] == "completed"
        finally:
            stop.set()
            prober.join(5)
        assert health and set(health) == {200}


def test_concurrent_streams_and_questions(api_server, client):
    """Three pushed streams fed at once while questions arrive on all of them over HTTP: every one is answered."""
    with contextlib.ExitStack() as opened:
        sockets = [opened.enter_context(connect(api_server[0])) for _ in range(3)]
        ids = [recv(ws)["session"]["stream_id"] for ws in sockets]
        feeders = [threading.Thread(target=push_seconds, args=(ws, 4)) for ws in sockets]
        for f in feeders:
            f.start()
        for f in feeders:
            f.join(DEADLINE_S)
        for sid in ids:
            wait_frames(client, sid, 4)
        oai = OpenAI(base_url=f"{api_server[0]}/v1", api_key=KEY, timeout=DEADLINE_S, max_retries=0)
        answers: list = []

        def ask(sid):
            r = oai.chat.completions.create(model=sid, messages=[{"role": "user", "content": "What?"}], max_tokens=3)
            answers.append(r.model_extra["vstream"]["frames"])

        askers = [threading.Thread(target=ask, args=(sid,)) for sid in ids for _ in range(2)]
        for a in askers:
            a.start()
        for a in askers:
            a.join(DEADLINE_S)
        assert sorted(answers) == [4] * 6


def test_idle_session_gets_a_notice_then_is_closed(model):
    app = create_app(model, limits=Limits(ws_idle_s=1.0, ws_notice_s=0.6))
    with running_server(app) as base:
        url = base.replace("http://", "ws://") + "/v1/realtime"
        with ws_connect(url, open_timeout=DEADLINE_S) as ws:
            recv(ws, "session.created")
            t0 = time.monotonic()
            notice = recv(ws, "session.closing")
            assert notice["reason"] == "idle" and 0 < notice["time_left_s"] <= 0.6
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=DEADLINE_S)
            assert closed.value.rcvd.code == 1001 and 0.9 < time.monotonic() - t0 < 5
