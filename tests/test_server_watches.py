"""Watches over HTTP against a real uvicorn on 127.0.0.1 with the tiny model: create, list, get and delete; bad bodies
and the per-stream limit; events on the SSE feed (in order, resumed with Last-Event-ID) and on a realtime socket.

The tiny model's weights are random, so a condition's truth cannot be relied on: the delivery tests use
`threshold: -1e9` (documented for testing and calibration), which fires at a watch's first evaluation."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from helpers import DEADLINE_S, KEY, assert_error, running_server, wait_frames
from vstream.server import create_app
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video

AUTH = {"Authorization": f"Bearer {KEY}"}
ALWAYS = {"threshold": -1e9, "hysteresis": 0.0, "cooldown_s": 0.0}


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    write_test_video(media / "clip.mp4", seconds=3, fps=5)
    app = create_app(model, media_root=media, api_key=KEY, max_streams=4, limits=Limits(max_watches_per_stream=3, max_watches=5))
    with running_server(app) as base:
        yield base


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=DEADLINE_S) as c:
        yield c


@pytest.fixture
def stream_id(client):
    r = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    wait_frames(client, sid, 1)
    yield sid
    client.delete(f"/v1/streams/{sid}")


def test_a_watch_is_created_listed_got_and_deleted(client, stream_id):
    r = client.post(f"/v1/streams/{stream_id}/watches", json={"condition": "a purple square appears",
                                                              "every_s": 2, "cooldown_s": 5})
    assert r.status_code == 201, r.text
    watch = r.json()
    assert watch["id"].startswith("wat_") and watch["object"] == "watch" and watch["stream_id"] == stream_id
    assert (watch["every_s"], watch["cooldown_s"], watch["threshold"]) == (2, 5, 0)
    listed = client.get(f"/v1/streams/{stream_id}/watches").json()["data"]
    assert [w["id"] for w in listed] == [watch["id"]]
    assert client.get(f"/v1/streams/{stream_id}/watches/{watch['id']}").json()["condition"] == watch["condition"]
    assert client.delete(f"/v1/streams/{stream_id}/watches/{watch['id']}").json()["deleted"] is True
    assert assert_error(client.get(f"/v1/streams/{stream_id}/watches/{watch['id']}"), 404)["param"] == "watch_id"
    assert client.get(f"/v1/streams/{stream_id}/watches").json()["data"] == []


@pytest.mark.parametrize("body,param", [({}, "condition"), ({"condition": ""}, "condition"),
                                        ({"condition": "x", "every_s": 0}, "every_s"),
                                        ({"condition": "x", "cooldown_s": -1}, "cooldown_s"),
                                        ({"condition": "x", "webhook": "http://127.0.0.1/"}, "webhook"),
                                        ({"condition": 3}, "condition")])
def test_bad_watch_bodies_get_400_naming_the_field(client, stream_id, body, param):
    assert assert_error(client.post(f"/v1/streams/{stream_id}/watches", json=body), 400)["param"] == param


def test_watches_per_stream_are_limited_and_an_unknown_stream_is_404(client, stream_id):
    for _ in range(3):
        assert client.post(f"/v1/streams/{stream_id}/watches", json={"condition": "x"}).status_code == 201
    err = assert_error(client.post(f"/v1/streams/{stream_id}/watches", json={"condition": "x"}), 429)
    assert err["code"] == "too_many_watches" and "max_watches_per_stream" in err["message"]
    assert assert_error(client.post("/v1/streams/str_nope/watches", json={"condition": "x"}), 404)["param"] == \
        "stream_id"


def test_watches_per_server_are_limited(client, stream_id):
    other = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}}).json()["id"]
    for sid in (stream_id, stream_id, stream_id, other, other):
        assert client.post(f"/v1/streams/{sid}/watches", json={"condition": "x"}).status_code == 201
    err = assert_error(client.post(f"/v1/streams/{other}/watches", json={"condition": "x"}), 429)
    assert err["code"] == "too_many_watches" and "max_watches=5" in err["message"], err
    client.delete(f"/v1/streams/{other}")  # its watches go with it
    assert client.post(f"/v1/streams/{stream_id}/watches", json={"condition": "x"}).status_code == 429, \
        "the stream's own limit (3) still holds"
    assert client.post(f"/v1/streams/{stream_id}/watches", json={"condition": "x"}).json()["error"]["message"] \
        .count("max_watches_per_stream") == 1


def sse(client, stream_id: str, count: int, last_event_id: str | None = None) -> list[tuple[int, str, dict]]:
    """The first `count` events of the feed as (id, event type, data)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    out, fields = [], {}
    with client.stream("GET", f"/v1/streams/{stream_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
            elif not line and "data" in fields:
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                if len(out) == count:
                    return out
    raise AssertionError(f"the feed ended after {out}")


def test_the_sse_feed_delivers_events_in_order_and_resumes(client, stream_id):
    ids = [client.post(f"/v1/streams/{stream_id}/watches", json={"condition": f"thing {i}"} | ALWAYS).json()["id"]
           for i in range(3)]
    events = sse(client, stream_id, 3, last_event_id="0")
    assert [e[0] for e in events] == [1, 2, 3] and {e[1] for e in events} == {"watch.triggered"}
    assert sorted(e[2]["watch_id"] for e in events) == sorted(ids)
    for _, _, data in events:
        assert data["stream_id"] == stream_id and data["score"] > -1e9 and data["spatial_times"]
        assert data["stream_time"] >= 0
    assert sse(client, stream_id, 2, last_event_id="1") == events[1:]
    assert assert_error(client.get(f"/v1/streams/{stream_id}/events", headers={"Last-Event-ID": "x"}), 400)[
        "param"] == "Last-Event-ID"
    views = client.get(f"/v1/streams/{stream_id}/watches").json()["data"]
    assert all(v["active"] and v["events"] == 1 and v["evaluations"] >= 1 for v in views)


def test_a_realtime_socket_of_the_stream_gets_its_watch_events(server, client):
    url = server.replace("http://", "ws://") + "/v1/realtime"
    with ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S, close_timeout=5) as ws:
        sid = json.loads(ws.recv(timeout=DEADLINE_S))["session"]["stream_id"]
        r = client.post(f"/v1/streams/{sid}/watches", json={"condition": "a red circle", "every_s": 1} | ALWAYS)
        assert r.status_code == 201, r.text
        image = _jpeg_b64()
        for i in range(3):
            ws.send(json.dumps({"type": "input_video_frame.append", "timestamp": float(i), "image": image}))
        deadline = time.monotonic() + DEADLINE_S
        while True:
            event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if event["type"] == "watch.triggered":
                break
        assert event["event"]["watch_id"] == r.json()["id"] and event["event"]["stream_id"] == sid


def _jpeg_b64() -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()
