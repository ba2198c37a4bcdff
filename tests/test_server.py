"""The HTTP server end to end: a real uvicorn on a free port, the tiny model, a generated video, httpx and the openai
client. Every wait is bounded. The same tests run against a one-replica cluster on Ray behind its ingress
(`api_server`'s "cluster" case, in the ray and slow tiers), except those that reach into the engine."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from openai import OpenAI
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from helpers import (AUTH, DEADLINE_S, KEY, EngineHook, api_client, assert_error, cluster_server, running_server,
                     wait_frames)
from vstream.server import create_app
from vstream.synth.clips import write_test_video

@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "clip.mp4", seconds=6, fps=5)
    outside = tmp_path_factory.mktemp("outside")
    write_test_video(outside / "secret.mp4", seconds=1, fps=5)
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    (root / "sub").mkdir()
    return root


@pytest.fixture(scope="module")
def server(model, media):
    """(base url, app) of a server running in a background thread; stopped at the end of the module."""
    app = create_app(model, media_root=media, api_key=KEY, max_streams=3)
    with running_server(app) as base:
        yield base, app


@pytest.fixture(scope="module", params=["process", pytest.param("cluster", marks=[pytest.mark.ray, pytest.mark.slow])])
def api_server(request, model, media, tmp_path_factory):
    """(base url, app) of the single-process server, or of the cluster's ingress with an app made like its
    replica's (for its route table)."""
    if request.param == "process":
        yield request.getfixturevalue("server")
        return
    options = {"media_root": media, "api_key": KEY, "max_streams": 3}
    with cluster_server(1, tmp_path_factory.mktemp("state"), **options) as (base, _):
        yield base, create_app(model, **options)


@pytest.fixture
def client(api_server):
    with api_client(api_server[0]) as c:
        yield c


def _create(client, **source) -> dict:
    r = client.post("/v1/streams", json={"source": source})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def stream_id(client):
    sid = _create(client, type="file", path="clip.mp4")["id"]
    wait_frames(client, sid, 6)
    yield sid
    client.delete(f"/v1/streams/{sid}")


def test_create_list_get_delete(client):
    view = _create(client, type="file", path="clip.mp4")
    sid = view["id"]
    assert sid.startswith("str_") and view["live"] is False and view["source"] == {"type": "file", "path": "clip.mp4"}
    view = wait_frames(client, sid, 6)
    assert view["stats"]["memory_tokens"] > 0 and view["stats"]["frames_dropped"] == 0
    assert sid in [s["id"] for s in client.get("/v1/streams").json()["data"]]
    assert client.delete(f"/v1/streams/{sid}").json()["deleted"] is True
    assert_error(client.get(f"/v1/streams/{sid}"), 404)
    assert_error(client.delete(f"/v1/streams/{sid}"), 404)
    assert sid not in [s["id"] for s in client.get("/v1/streams").json()["data"]]


def test_live_replay_and_push_streams(client):
    replay = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}, "speed": 50.0}).json()
    push = _create(client, type="push")
    assert replay["live"] is True and push["live"] is True and push["state"] == "starting"
    for sid in (replay["id"], push["id"]):
        assert client.delete(f"/v1/streams/{sid}").status_code == 200


@pytest.mark.parametrize("path", ["../secret.mp4", "link.mp4", "/etc/passwd", "sub/../../x.mp4"])
def test_paths_outside_media_root_are_refused(client, path):
    err = assert_error(client.post("/v1/streams", json={"source": {"type": "file", "path": path}}), 403)
    assert err["param"] == "source.path"


def test_missing_file_and_bad_bodies(client):
    missing = client.post("/v1/streams", json={"source": {"type": "file", "path": "missing.mp4"}})
    assert "missing.mp4" in assert_error(missing, 404)["message"]
    assert_error(client.post("/v1/streams", json={"source": {"type": "file", "path": "sub"}}), 400)
    assert_error(client.post("/v1/streams", json={"source": {"type": "ftp", "url": "x"}}), 400)
    assert_error(client.post("/v1/streams", json={"source": {"type": "url", "url": "ftp://x/y"}}), 400)


def test_too_many_streams(client):
    ids = [_create(client, type="push")["id"] for _ in range(3)]
    try:
        assert_error(client.post("/v1/streams", json={"source": {"type": "push"}}), 429)
    finally:
        for sid in ids:
            client.delete(f"/v1/streams/{sid}")


def test_every_route_needs_the_key(api_server):
    base, app = api_server
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    paths = {(m, r.path.replace("{stream_id}", "str_x")) for r in routes for m in r.methods}
    paths |= {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")}
    paths |= {("GET", "/v1/cluster"), ("POST", "/v1/cluster/streams/str_x/move")}  # a cluster ingress's own routes
    assert ("POST", "/v1/chat/completions") in paths and ("GET", "/metrics") in paths
    assert {("GET", "/v1/streams/str_x/memory"), ("GET", "/v1/streams/str_x/frames"), ("POST", "/v1/auth/cookie")} \
        <= paths
    public = {"/health/live", "/health/ready", "/"}  # the page itself holds no data and no key
    cookie = {"Cookie": "vstream_session=forged"}
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as anon:
        for method, path in sorted(paths):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, cookie):
                r = anon.request(method, path, headers=headers, json={})
                if path in public:
                    assert r.status_code == 200, (method, path, r.text)
                else:
                    assert assert_error(r, 401)["code"] == "invalid_api_key", (method, path)
        assert anon.get("/static/app.js").status_code == 200
    ws_routes = [r.path for r in app.routes if isinstance(r, APIWebSocketRoute)]
    assert ws_routes == ["/v1/realtime"]
    url = base.replace("http", "ws") + "/v1/realtime"
    for headers in ({}, {"Authorization": "Bearer wrong"}, cookie):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, additional_headers=headers, open_timeout=DEADLINE_S)
        assert refused.value.response.status_code == 401
        assert b"invalid_api_key" in refused.value.response.body


def test_chat_completion_with_openai_client(api_server, stream_id):
    oai = OpenAI(base_url=f"{api_server[0]}/v1", api_key=KEY, timeout=DEADLINE_S, max_retries=0)
    done = oai.chat.completions.create(model=stream_id, messages=[{"role": "user", "content": "What is on screen?"}],
                                       max_tokens=5)
    assert done.object == "chat.completion" and done.model == stream_id
    assert isinstance(done.choices[0].message.content, str) and done.choices[0].finish_reason == "stop"
    assert 1 <= done.usage.completion_tokens <= 5 and done.usage.prompt_tokens > done.usage.completion_tokens
    ext = done.model_extra["vstream"]
    assert ext["frames"] == 6 and ext["stream_time"] == pytest.approx(5.0)
    assert ext["spatial_times"][-1] == pytest.approx(5.0)
    assert set(ext) == {"stream_time", "spatial_times", "retrieved_times", "temporal_spans", "frames", "as_of"}


def test_streamed_chat_with_openai_client(api_server, stream_id):
    oai = OpenAI(base_url=f"{api_server[0]}/v1", api_key=KEY, timeout=DEADLINE_S, max_retries=0)
    chunks = list(oai.chat.completions.create(
        model="ignored", messages=[{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "What moved?"}]}],
        max_tokens=4, stream=True, extra_body={"stream_id": stream_id}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) - 2 in range(1, 5)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(client, stream_id):
    body = {"model": stream_id, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_errors(client, stream_id):
    ask = lambda **kw: client.post("/v1/chat/completions", json={"model": stream_id, **kw})  # noqa: E731
    assert_error(ask(messages=[{"role": "user", "content": "  "}]), 400)
    assert_error(ask(messages=[]), 400)
    assert_error(ask(), 400)
    assert_error(ask(messages=[{"role": "system", "content": "x"}]), 400)
    assert_error(ask(messages=[{"role": "user", "content": "hi"}], max_tokens=0), 400)
    hi = [{"role": "user", "content": "hi"}]
    err = assert_error(client.post("/v1/chat/completions", json={"model": "str_nope", "messages": hi}), 404)
    assert "str_nope" in err["message"]
    push = _create(client, type="push")["id"]
    try:
        assert_error(client.post("/v1/chat/completions", json={"model": push, "messages": hi}), 409)
    finally:
        client.delete(f"/v1/streams/{push}")


@pytest.mark.parametrize("api_server", ["process"], indirect=True)  # it slows the engine of this process
def test_health_answers_while_an_answer_streams(server, client, stream_id):
    body = {"model": stream_id, "messages": [{"role": "user", "content": "Describe it all."}], "stream": True,
            "max_tokens": 6}
    with EngineHook(server[1].state.vstream, pause_s=0.3), \
            client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")  # the role chunk: the answer is under way
        t0 = time.perf_counter()
        with httpx.Client(base_url=str(client.base_url), timeout=5) as other:
            assert other.get("/health/live").status_code == 200
            readiness = other.get("/health/ready").json()
            assert readiness["status"] == "ready" and readiness["warmup_s"] > 0  # an answer ran before ready
            metrics = other.get("/metrics", headers=AUTH).text
        assert time.perf_counter() - t0 < 0.3, "health waited for a generation step"
        assert "vstream:num_requests_running 1" in metrics.splitlines()
        assert [line for line in lines if line][-1] == "data: [DONE]"


def test_metrics(client, stream_id):
    client.post("/v1/chat/completions", json={"model": stream_id, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 2}).raise_for_status()
    text = client.get("/metrics").text
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    values = {}
    for name, value in samples:  # a cluster's ingress labels each sample with its replica: summed over replicas
        name = re.sub(r',?replica="[^"]*"', "", name).replace("{}", "").replace("{,", "{")
        values[name] = values.get(name, 0.0) + float(value)
    label = f'{{stream_id="{stream_id}"}}'
    assert values[f"vstream:frames_ingested_total{label}"] == 6
    assert values[f"vstream:frames_dropped_total{label}"] == 0
    assert values[f"vstream:memory_tokens{label}"] > 0
    assert values["vstream:num_requests_running"] == 0
    assert values["vstream:time_to_first_token_seconds_count"] >= 1
    ttft = "vstream:time_to_first_token_seconds"
    assert values[f'{ttft}_bucket{{le="+Inf"}}'] == values[f"{ttft}_count"]
    assert 0 < values["vstream:time_to_first_token_seconds_sum"] < 60
    assert values["vstream:engine_answer_slots"] >= 1 and values["vstream:engine_memory_page_updates_total"] >= 0
