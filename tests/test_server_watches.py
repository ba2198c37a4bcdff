"""Watches over HTTP against a real uvicorn on 127.0.0.1 with the tiny model: create, list, get and delete; bad bodies
and the per-stream limit; events on the SSE feed (in order, resumed with Last-Event-ID) and on a realtime socket; a
trigger's thumbnail; the evaluations by how they ended in the watches' views and /metrics. And the `Watcher`'s tick on
real streams without HTTP: every stream's due watches in one engine call, a stream with a corrupted memory failing
alone.

The tiny model's weights are random, so a condition's truth cannot be relied on: the delivery tests use
`threshold: -1e9` (documented for testing and calibration), which fires at a watch's first evaluation."""

from __future__ import annotations

import json
import time

import pytest
from websockets.sync.client import connect as ws_connect

from helpers import AUTH, DEADLINE_S, KEY, api_client, assert_error, nan_memory, running_server, wait_frames, wait_until
from vstream.engine.watches import Watch
from vstream.server import create_app
from vstream.server.state import Limits, ServerState
from vstream.server.watches import Watcher
from vstream.sources import file_source
from vstream.synth.clips import write_test_video

ALWAYS = {"threshold": -1e9, "hysteresis": 0.0, "cooldown_s": 0.0}


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    write_test_video(media / "clip.mp4", seconds=3, fps=5)
    return create_app(model, media_root=media, api_key=KEY, max_streams=4,
                      limits=Limits(max_watches_per_stream=3, max_watches=5))


@pytest.fixture(scope="module")
def server(app):
    with running_server(app) as base:
        yield base


@pytest.fixture
def client(server):
    with api_client(server) as c:
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


def test_views_and_metrics_count_evaluations_by_how_they_ended_and_a_trigger_links_its_frame(app, client):
    """Three finished streams: a watch decided by the recent part and one escalated (margin 1e6) on the first, one
    scored on the full memory at once on the second, and one on the third whose memory is NaN (it fails, backs off,
    and the others fire anyway). The trigger's thumbnail_url answers with the JPEG of its frame."""
    ids = [client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}}).json()["id"]
           for _ in range(3)]
    for sid in ids:
        wait_until(lambda s=sid: client.get(f"/v1/streams/{s}").json()["state"] == "finished", "the clip ingested")
    lane = app.state.vstream.streams[ids[2]].session.lane
    lane.snapshot = nan_memory(lane.snapshot)
    bodies = [(ids[0], {"condition": "a red circle", "escalate_margin": 2} | ALWAYS),
              (ids[0], {"condition": "a blue square", "threshold": 0, "hysteresis": 0, "escalate_margin": 1e6}),
              (ids[1], {"condition": "something moves"} | ALWAYS), (ids[2], {"condition": "anything"} | ALWAYS)]
    watches = [client.post(f"/v1/streams/{sid}/watches", json=body).json()["id"] for sid, body in bodies]

    def view(i):
        return client.get(f"/v1/streams/{bodies[i][0]}/watches/{watches[i]}").json()

    wait_until(lambda: all(view(i)["evaluations"] for i in range(3)) and view(3)["failures"], "every watch scored")
    cheap, escalated, full, failing = (view(i) for i in range(4))
    assert cheap["escalate_margin"] == 2 and full["escalate_margin"] is None
    assert cheap["cheap_evaluations"] == cheap["evaluations"] == 1 and cheap["escalated_evaluations"] == 0
    assert escalated["escalated_evaluations"] == escalated["evaluations"] == 1
    assert full["evaluations"] == 1 and full["cheap_evaluations"] == full["escalated_evaluations"] == 0
    assert failing["evaluations"] == 0 and "not a finite number: nan" in failing["error"]
    [(_, kind, event)] = sse(client, ids[0], 1, last_event_id="0")
    assert kind == "watch.triggered" and event["watch_id"] == watches[0] and event["scored_on"] == "recent"
    assert event["thumbnail_url"] == f"/v1/streams/{ids[0]}/frames?t={event['stream_time']!r}"
    jpeg = client.get(event["thumbnail_url"])
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    assert float(jpeg.headers["X-Frame-Time"]) == event["stream_time"]
    metrics = {line.split()[0]: float(line.split()[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("vstream:watch")}
    for how in ("recent", "escalated", "full", "failed"):
        assert metrics[f'vstream:watch_evaluations_total{{scored="{how}"}}'] >= 1, metrics
    assert metrics["vstream:watch_tick_seconds_count"] >= 1 and metrics["vstream:watch_tick_seconds_sum"] > 0
    assert metrics["vstream:watch_streams_scored_total"] >= metrics["vstream:watch_tick_seconds_count"]
    for sid in ids:
        client.delete(f"/v1/streams/{sid}")


def test_one_tick_scores_every_stream_in_one_engine_call_and_a_broken_stream_fails_alone(model, tmp_path):
    from vstream.engine.scheduler import engine_of

    state = ServerState(model, None, None, 4, engine=engine_of(model))
    path = write_test_video(tmp_path / "clip.mp4", seconds=3, fps=5)
    streams = [state.start_stream(file_source(path, fps=1.0), False, None, {}, 1.0) for _ in range(3)]
    watcher = Watcher(state, tick_s=3600.0)  # its thread sleeps: the test ticks it
    try:
        assert all(s.session.wait(60) for s in streams)
        streams[2].session.lane.snapshot = nan_memory(streams[2].session.snapshot())
        always = {"threshold": -1e9, "hysteresis": 0.0, "cooldown_s": 0.0}
        plan = [[Watch("a red circle", escalate_margin=2.0, **always), Watch("x", escalate_margin=1e6)],
                [Watch("something moves", **always)], [Watch("anything", **always)]]
        for stream, watches in zip(streams, plan):
            for w in watches:
                stream.board.add(w)
        events = watcher.tick()
        assert watcher.tick_seconds.count == 1 and watcher.streams_scored == 3  # one engine call for the three
        assert dict(watcher.evaluations) == {"recent": 1, "escalated": 1, "full": 1, "failed": 1}
        assert set(events) == {s.id for s in streams} and events[streams[2].id] == []
        first = events[streams[0].id][0]
        assert first["watch_id"] == plan[0][0].id and first["stream_id"] == streams[0].id and first["id"] == 1
        assert first["thumbnail_url"] == f"/v1/streams/{streams[0].id}/frames?t=2.0" and first["stream_time"] == 2.0
        assert [e["watch_id"] for e in events[streams[1].id]] == [plan[1][0].id]
        assert plan[2][0].failures == 1 and plan[2][0].evaluations == 0
        assert watcher.tick() == {}  # nothing new to score, the broken one backs off
    finally:
        watcher.stop()
        for s in streams:
            s.close()
