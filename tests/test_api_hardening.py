"""The HTTP and WebSocket surface as an attacker sees it, against a real uvicorn on 127.0.0.1 (and one real
`vstream serve`): Host names and Origins, the page's CSP, errors that no route expected (a logged 500 naming no
server path, on a connection that stays usable), lone surrogates, hostile realtime events, an OpenAPI document that
says what the server sends and enforces, and a deterministic schemathesis run that must find no 5xx (widened in the
slow tier). Every wait is bounded."""

from __future__ import annotations

import base64
import errno
import http.client
import io
import json
import logging
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from helpers import (
    AUTH,
    DEADLINE_S,
    KEY,
    EngineHook,
    assert_error,
    free_port,
    running_server,
    vstream_cli,
    vstream_serve,
    wait_frames,
    wait_ready,
)
from vstream.server import create_app
from vstream.server.run import begin_drain
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video, write_video

LIMITS = Limits(max_body_bytes=4096, max_answer_tokens=8, max_question_chars=100, max_running=1,
                max_frame_pixels=200 * 200, max_source_seconds=5, max_source_frames=30, max_fps=5, url_timeout_s=2,
                max_watches_per_stream=1)
SECRET = "/srv/vstream-secret/weights.bin"  # a server path that no answer may show


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "small.mp4", seconds=3, fps=5, size=(160, 120))
    rng = np.random.default_rng(0)  # a file that plays for a while and then breaks
    frames = (rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(25))  # within LIMITS
    data = bytearray(write_video(root / "full.mp4", frames, fps=10, options={"preset": "ultrafast"}).read_bytes())
    data[len(data) // 2: len(data) // 2 + 20_000] = rng.bytes(20_000)
    (root / "broken.mp4").write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def strict(model, media):
    """A server with a key, a media root and small limits (any Host: a key needs no Host list)."""
    app = create_app(model, media_root=media, api_key=KEY, max_streams=3, limits=LIMITS)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        yield client, app


@pytest.fixture(scope="module")
def keyless(model, media):
    """A server without a key: it answers only to the loopback names."""
    app = create_app(model, media_root=media, max_streams=3, limits=LIMITS)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        yield client, app


def _port(client) -> int:
    return client.base_url.port


def _ws_url(client, stream_id: str | None = None) -> str:
    url = str(client.base_url).rstrip("/").replace("http", "ws", 1) + "/v1/realtime"
    return url + (f"?stream_id={stream_id}" if stream_id else "")


def _handshake_status(port: int, headers: dict) -> int:
    """The status of a WebSocket handshake sent by hand (so that Host can be anything)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    conn.request("GET", "/v1/realtime", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                 "Sec-WebSocket-Version": "13"} | headers)
    status = conn.getresponse().status
    conn.close()
    return status


def _fuzz(client, max_examples: int, modes=(GenerationMode.POSITIVE,)) -> tuple[int, list]:
    """Generated requests for every operation of /openapi.json, the same ones on every run (derandomized): the
    number of calls, and every answer that is a 5xx or has a status the document does not list for its route."""
    base = str(client.base_url).rstrip("/")
    raw = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        documented = raw["paths"][operation.path][operation.method.lower()]["responses"]
        for mode in modes:

            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal calls
                response = case.call(base_url=base, headers=AUTH, timeout=DEADLINE_S)
                calls += 1
                if response.status_code >= 500 or str(response.status_code) not in documented:
                    failures.append((case.method, case.formatted_path, case.query, case.body, response.status_code,
                                     response.text[:200]))

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE, operation.label
    for sid in [s["id"] for s in client.get("/v1/streams", headers=AUTH).json()["data"]]:
        client.delete(f"/v1/streams/{sid}", headers=AUTH)
    return calls, failures


def test_schemathesis_finds_no_server_error(strict):
    calls, failures = _fuzz(strict[0], max_examples=6)
    assert calls >= 30 and failures == []


@pytest.mark.slow
@pytest.mark.parametrize("server", ["strict", "keyless"])
def test_schemathesis_wide(server, request):
    """More cases, schema-valid and schema-invalid, with and without a key."""
    calls, failures = _fuzz(request.getfixturevalue(server)[0], max_examples=60,
                            modes=(GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
    assert calls >= 600 and failures == []


# ---------------------------------------------------------------------------------------------------------- hosts


def test_without_a_key_only_the_loopback_names_are_answered(keyless):
    client, app = keyless
    port = _port(client)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert client.get("/v1/streams", headers={"Host": host}).status_code == 200, host
    for host in (f"rebind.example:{port}", "127.0.0.1.nip.io", "[::1", "", "localhost:x", "127.0.0.2"):
        for method, path in (("GET", "/v1/streams"), ("GET", "/"), ("GET", "/openapi.json"),
                             ("POST", "/v1/streams"), ("GET", "/v1/streams/str_x/frames?t=0")):
            err = assert_error(client.request(method, path, headers={"Host": host}, json={"source": {"type": "push"}}),
                         403)
            assert err["code"] == "host_not_allowed" and repr(host) in err["message"], (host, path)
            assert err["message"].count("localhost") == host.count("localhost")  # the allowed names stay unsaid
        assert _handshake_status(port, {"Host": host}) == 403
    assert client.get("/health/live", headers={"Host": "probe.example"}).status_code == 200  # probes dial addresses
    assert app.state.vstream.streams == {}


def test_origin_is_checked_on_the_socket_and_on_state_changing_routes(keyless):
    client, app = keyless
    base = str(client.base_url).rstrip("/")
    url = base.replace("http", "ws") + "/v1/realtime"
    for origin in ("http://evil.example", "null", f"http://localhost:{_port(client)}", "http://127.0.0.1:1",
                   f"ftp://127.0.0.1:{_port(client)}", f"http://127.0.0.1:{_port(client)}/x"):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, origin=origin, open_timeout=DEADLINE_S)
        assert refused.value.response.status_code == 403 and b"origin_not_allowed" in refused.value.response.body
        r = client.post("/v1/streams", json={"source": {"type": "push"}}, headers={"Origin": origin})
        err = assert_error(r, 403)
        assert err["code"] == "origin_not_allowed" and origin[:20] in err["message"]
    assert app.state.vstream.streams == {}
    sid = client.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"]  # no Origin: curl, SDKs
    try:
        evil = {"Origin": "http://evil.example"}
        assert assert_error(client.delete(f"/v1/streams/{sid}", headers=evil), 403)["code"] == "origin_not_allowed"
        assert assert_error(client.post("/v1/auth/cookie", headers=evil), 403)["code"] == "origin_not_allowed"
        assert client.get(f"/v1/streams/{sid}", headers=evil).status_code == 200  # reads: the Host check covers them
        with ws_connect(url, origin=base, open_timeout=DEADLINE_S) as ws:  # the page's own origin
            assert json.loads(ws.recv(timeout=DEADLINE_S))["type"] == "session.created"
        assert client.delete(f"/v1/streams/{sid}", headers={"Origin": base}).status_code == 200
    finally:
        client.delete(f"/v1/streams/{sid}")


def test_allowed_hosts_are_configurable(model):
    names = create_app(model, allowed_hosts=["Vstream.Example", "[fd00::1]"])
    with running_server(names) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        ok = lambda host: client.get("/v1/streams", headers={"Host": host}).status_code  # noqa: E731
        assert ok("vstream.example:8443") == 200 and ok("[fd00::1]:80") == 200
        assert ok(f"127.0.0.1:{_port(client)}") == 403  # the list given replaces the loopback default
    keyed = create_app(model, api_key=KEY)  # the key is the guard: a rebinding page has neither it nor the cookie
    with running_server(keyed) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        assert client.get("/v1/streams", headers={"Host": "any.example"} | AUTH).status_code == 200
        assert client.get("/v1/streams", headers={"Host": "any.example"}).status_code == 401
    keyed_names = create_app(model, api_key=KEY, allowed_hosts=["vstream.example"])
    with running_server(keyed_names) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        assert assert_error(client.get("/v1/streams", headers={"Host": "any.example"} | AUTH), 403)["code"] == \
            "host_not_allowed"
    anything = create_app(model, allowed_hosts=["*"])
    with running_server(anything) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        assert client.get("/v1/streams", headers={"Host": "any.example"}).status_code == 200
    for bad in (["host:8000"], [], ["a/b"], ["[::1]:80"]):
        with pytest.raises(ValueError, match="allowed hosts"):
            create_app(model, allowed_hosts=bad)


def test_serve_allowed_host_option():
    port = free_port()
    proc = vstream_serve("--model", "tiny", "--port", str(port), "--allowed-host", "vstream.test",
                         "--drain-seconds", "0")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        host = lambda name: httpx.get(f"{base}/v1/streams", headers={"Host": name}, timeout=5).status_code  # noqa
        assert host("vstream.test") == 200 and host(f"localhost:{port}") == 200 and host("evil.test") == 403
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)
    bad = vstream_cli("serve", "--allowed-host", "vstream.test:80", timeout=60)
    assert bad.returncode == 2 and "without a port" in bad.stderr


# ---------------------------------------------------------------------------------------------------------- page


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_sends_a_csp_that_its_own_resources_fit(keyless):
    """The policy, and the page's markup and script read for anything it would block, so that this holds without a
    browser too (tests/test_browser.py runs the page under it in Chromium, where a blocked resource fails)."""
    client, _ = keyless
    r = client.get("/")
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert policy["frame-ancestors"] == "'none'" and r.headers["x-frame-options"] == "DENY"
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    tags = _Tags()
    tags.feed(r.text)
    for tag, attrs in tags.tags:
        assert not any(a.startswith("on") for a in attrs) and "style" not in attrs, (tag, attrs)  # inline: blocked
        url = attrs.get("src") or (attrs.get("href") if tag == "link" else None)
        if url is not None:
            assert url.startswith("/static/") or url.startswith("data:") and "data:" in policy["img-src"], url
            assert client.get(url).status_code == 200 if url.startswith("/") else True
    assert ("script", {}) not in tags.tags and "<style" not in r.text  # no inline script or style element
    script = client.get("/static/app.js").text
    assert not re.search(r"\beval\(|new Function|setTimeout\(\s*[\"'`]|\.innerHTML|setAttribute\(\s*[\"']style", script)
    assert "http://" not in script.replace('"http://www.w3.org/2000/svg"', "")  # no other origin is contacted
    assert "URL.createObjectURL" in script and "blob:" in policy["media-src"]  # the uploaded file plays from blob:
    assert "url(" not in client.get("/static/style.css").text  # nothing else for style-src or img-src to allow


# ---------------------------------------------------------------------------------------------------------- errors


class _BrokenModel:
    """The real model whose tokenizer (`tokenizer=True`) or prompt building fails with an error that names a server
    path, as a failing disk or a missing weight file would."""

    def __init__(self, model, tokenizer: bool = False):
        self._model, self._tokenizer = model, tokenizer

    def __getattr__(self, name):
        if name == "tokenizer" and self._tokenizer:
            raise OSError(errno.EIO, "Input/output error", SECRET)
        return getattr(self._model, name)

    def prompt_embeds(self, *args, **kwargs):
        if not self._tokenizer:
            raise OSError(errno.ENOENT, "No such file or directory", SECRET)
        return self._model.prompt_embeds(*args, **kwargs)


@pytest.fixture
def fragile(model, media):
    """A fresh keyed server (its model gets broken by the test) with a stream of 3 frames."""
    app = create_app(model, media_root=media, api_key=KEY, limits=LIMITS)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        sid = client.post("/v1/streams", json={"source": {"type": "file", "path": "small.mp4"}}).json()["id"]
        wait_frames(client, sid, 3)
        yield client, app, sid


def _ask(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict, str]:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers=AUTH | {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()


def _no_internals(text: str) -> None:
    assert SECRET not in text and "Traceback" not in text and "/vstream/" not in text and "site-packages" not in text


def test_an_unhandled_error_is_a_logged_500_naming_no_path_on_a_kept_connection(fragile, caplog):
    client, app, sid = fragile
    caplog.set_level(logging.ERROR, logger="vstream.server")
    state = app.state.vstream
    state.model = _BrokenModel(state.model, tokenizer=True)  # counting prompt tokens, after the answer: no route
    conn = http.client.HTTPConnection("127.0.0.1", _port(client), timeout=DEADLINE_S)  # expects an OSError there
    ask = {"model": sid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, headers, text = _ask(conn, ask)
    sock = conn.sock
    assert status == 500 and headers.get("connection", "").lower() != "close", (status, headers)
    _no_internals(text)
    err = json.loads(text)["error"]
    ref = re.search(r"err_[0-9a-f]{12}", err["message"]).group()
    assert err["code"] == "internal_error" and err["type"] == "server_error"
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert len(logged) == 1 and SECRET in str(logged[0].exc_info[1])  # the details stay on the server
    conn.request("GET", "/health/live")
    again = conn.getresponse()
    assert again.status == 200 and again.read() and conn.sock is sock  # the same connection answered
    conn.close()


def test_a_failed_generation_names_no_path_on_any_transport(fragile, caplog):
    client, app, sid = fragile
    caplog.set_level(logging.ERROR, logger="vstream.server")
    with EngineHook(app.state.vstream, prompts=_BrokenModel(app.state.vstream.model)):
        ask = {"model": sid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json=ask)
        _no_internals(r.text)
        assert assert_error(r, 500)["code"] == "internal_error"
        with client.stream("POST", "/v1/chat/completions", json=ask | {"stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        _no_internals("\n".join(events))
        assert events[-1] == "data: [DONE]" and "generation_failed" in events[-2] and "err_" in events[-2]
        url = _ws_url(client, sid)
        with ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S) as ws:
            ws.send(json.dumps({"type": "response.create", "question": "hi", "max_tokens": 2}))
            events = [json.loads(ws.recv(timeout=DEADLINE_S)) for _ in range(5)]
            _no_internals(json.dumps(events))
            assert [e["type"] for e in events][1:] == ["response.created", "error", "response.output_text.done",
                                                       "response.done"]
            assert events[-1]["response"]["status"] == "failed" and "err_" in events[2]["error"]["message"]
    assert len([r for r in caplog.records if r.exc_info and SECRET in str(r.exc_info[1])]) == 3


def test_a_broken_file_is_named_as_the_client_named_it(strict, media):
    client, _ = strict
    sid = client.post("/v1/streams", json={"source": {"type": "file", "path": "broken.mp4"}}).json()["id"]
    try:
        deadline = time.monotonic() + DEADLINE_S
        while (view := client.get(f"/v1/streams/{sid}").json())["state"] != "failed":
            assert view["state"] != "finished" and time.monotonic() < deadline, view
            time.sleep(0.05)
        error = view["stats"]["error"]
        assert "broken.mp4" in error and str(media) not in error and str(media.resolve()) not in error
        url = _ws_url(client, sid)
        with ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S) as ws:
            events = [json.loads(ws.recv(timeout=DEADLINE_S)) for _ in range(3)]
        assert str(media) not in json.dumps(events) and "broken.mp4" in json.dumps(events)
    finally:
        client.delete(f"/v1/streams/{sid}")


def test_lone_surrogates_and_bad_bodies_are_400s(strict):
    client, _ = strict
    sid = client.post("/v1/streams", json={"source": {"type": "file", "path": "small.mp4"}}).json()["id"]
    try:
        wait_frames(client, sid, 3)
        post = lambda raw: client.post("/v1/chat/completions", content=raw,  # noqa: E731
                                       headers={"Content-Type": "application/json"})
        for text in ('"\\ud800"', '"why\\udfff?"', '"\\ude00\\ud83d"', '[{"type": "text", "text": "a\\ud800"}]'):
            raw = f'{{"model": "{sid}", "messages": [{{"role": "user", "content": {text}}}]}}'
            err = assert_error(post(raw.encode()), 400)
            assert err["code"] == "invalid_text" and "surrogate" in err["message"] and err["param"] == "messages"
        err = assert_error(post(f'{{"model": "{sid}", "messages": [{{"role": "user", "content": '
                          '[{"type": "text", "text": 7}]}]}'.encode()), 400)
        assert "string 'text'" in err["message"]
        assert "\\ud800" in assert_error(post(b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
                                   404)["message"]
        assert assert_error(post(b'{"model": ' + b"[" * 1500 + b"]" * 1500 + b"}"), 400)["message"].startswith(
            "the body nests JSON deeper")
        for raw in (b"\xff\xfe", b'{"model": 1e999999}', b"[]", b'{"model": "x", "messages": "hi"}'):
            assert_error(post(raw), 400)
        path = client.post("/v1/streams", content=b'{"source": {"type": "file", "path": "\\ud800.mp4"}}',
                           headers={"Content-Type": "application/json"})
        assert path.status_code in (400, 403, 404), path.text  # named, escaped, and no 500
        assert "\\ud800" in path.text and path.json()["error"]["param"].endswith("path")
    finally:
        client.delete(f"/v1/streams/{sid}")


def test_hostile_realtime_events_get_error_events_and_the_session_goes_on(strict):
    client, _ = strict
    url = _ws_url(client)
    frame = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(frame, format="JPEG")
    image = base64.b64encode(frame.getvalue()).decode()
    with ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S) as ws:
        json.loads(ws.recv(timeout=DEADLINE_S))
        append = lambda t: json.dumps({"type": "input_video_frame.append", "image": image, "timestamp": t})  # noqa
        cases = [
            (json.dumps({"type": "response.create", "question": 42}), "question", "a number"),
            (json.dumps({"type": "response.create", "question": ["why"]}), "question", "an array"),
            (json.dumps({"type": "response.create", "question": {"q": 1}}), "question", "an object"),
            (json.dumps({"type": "response.create", "question": "\ud800?"}), "question", "surrogate"),
            (json.dumps({"type": "response.create", "question": "hi", "max_tokens": True}), "max_tokens", "True"),
            (json.dumps({"type": "response.create", "question": "hi", "as_of": 10 ** 400}), "as_of", "1000"),
            ("[" * 100_000 + "]" * 100_000, None, "nests JSON deeper"),
            ('{"type": "x", "n": 1' + "0" * 5000 + "}", None, "not JSON"),
            (append(1.7e308), "timestamp", "max_frame_time_s=1e+09"),
            (append(10 ** 400), "timestamp", "max_frame_time_s"),
            (append(True), "timestamp", "True"),
        ]
        for message, param, words in cases:
            ws.send(message)
            event = json.loads(ws.recv(timeout=DEADLINE_S))
            assert event["type"] == "error" and event["error"]["param"] == param, (message[:60], event)
            assert words in event["error"]["message"] and event["error"]["code"] != "internal_error", event
        ws.send(append(1e9))  # the latest time allowed is still a frame
        ack = json.loads(ws.recv(timeout=DEADLINE_S))
        assert ack["type"] == "input_video_frame.ack" and ack["accepted"] is True
        ws.send(json.dumps({"type": "response.cancel"}))
        ws.send(json.dumps({"type": "nothing"}))
        assert json.loads(ws.recv(timeout=DEADLINE_S))["error"]["code"] == "unknown_event"  # still in session


# ---------------------------------------------------------------------------------------------------------- openapi


def _operations(doc: dict) -> dict[tuple[str, str], set[int]]:
    """(METHOD, path template) -> the error statuses the document lists for it."""
    return {(m.upper(), path): {int(s) for s in op["responses"] if int(s) >= 400}
            for path, ops in doc["paths"].items() for m, op in ops.items()}


def test_openapi_lists_exactly_the_statuses_each_route_sends(model, media):
    """Every error status that each route can send is elicited here and must be documented for it; every documented
    one must be elicited (so the document claims nothing the server never does). No 422 anywhere."""
    app = create_app(model, media_root=media, api_key=KEY, max_streams=3, limits=LIMITS, allowed_hosts=["127.0.0.1"])
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        doc = client.get("/openapi.json").json()
        assert "422" not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
        documented, seen = _operations(doc), {}
        file_sid = client.post("/v1/streams", json={"source": {"type": "file", "path": "small.mp4"}}).json()["id"]
        push_sid = client.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"]
        wait_frames(client, file_sid, 3)
        real = {"{stream_id}": push_sid}

        def probe(method, template, path=None, **kw):
            url = path or template.replace("{stream_id}", real.get("{stream_id}"))
            with client.stream(method, url, **kw) as r:  # streamed: an event feed that answers 200 never ends
                if r.status_code >= 400:
                    r.read()
            assert r.status_code < 500 or r.status_code == 503, r.text  # 503: drained on purpose
            if r.status_code >= 400:
                assert r.json()["error"]["message"]
                seen.setdefault((method, template), set()).add(r.status_code)

        for method, template in documented:  # the gate's answers, on every route
            probe(method, template, json={"pad": "x" * 5000})  # 413
            probe(method, template, headers={"Authorization": "Bearer wrong"})  # 401 (off /health, / and /static)
            probe(method, template, headers={"Host": "rebind.example"})  # 403 (off /health)
            probe(method, template, headers={"Origin": "http://evil.example"})  # 403 on POST and DELETE
        ask = lambda sid, **kw: {"model": sid, "messages": [{"role": "user", "content": "hi"}], **kw}  # noqa: E731
        route = {"POST /v1/streams": [{"json": {}}, {"json": {"source": {"type": "file", "path": "../x.mp4"}}},
                                      {"json": {"source": {"type": "file", "path": "no.mp4"}}},
                                      {"json": {"source": {"type": "push"}}},  # 400, 403, 404, 201 (3 open)
                                      {"json": {"source": {"type": "push"}}}],  # 429
                 "GET /v1/streams/{stream_id}": [{"path": "/v1/streams/str_x"}],
                 "DELETE /v1/streams/{stream_id}": [{"path": "/v1/streams/str_x"}],
                 "GET /v1/streams/{stream_id}/memory": [{"path": "/v1/streams/str_x/memory"}, {},
                                                        {"params": {"as_of": -1}}],
                 "GET /v1/streams/{stream_id}/frames": [{"path": "/v1/streams/str_x/frames?t=0"}, {}],
                 "POST /v1/streams/{stream_id}/watches": [{"json": {}}, {"path": "/v1/streams/str_x/watches",
                                                                                "json": {"condition": "x"}},
                                                          {"json": {"condition": "x"}},  # 201, then 429
                                                          {"json": {"condition": "x"}}],
                 "GET /v1/streams/{stream_id}/watches": [{"path": "/v1/streams/str_x/watches"}],
                 "DELETE /v1/streams/{stream_id}/watches/{watch_id}": [{"path": "/v1/streams/str_x/watches/wat_x"}],
                 "GET /v1/streams/{stream_id}/events": [{"path": "/v1/streams/str_x/events"},
                                                        {"headers": {"Last-Event-ID": "x"}}],
                 "POST /v1/chat/completions": [{"json": ask("str_x")}, {"json": ask(push_sid)},
                                               {"json": ask(file_sid, max_tokens=9)}]}
        for key, calls in route.items():
            method, template = key.split(" ")
            for kw in calls:
                probe(method, template, **kw)
        with EngineHook(app.state.vstream, held=True):  # answers start only once the hook ends: one surely runs
            with client.stream("POST", "/v1/chat/completions", json=ask(file_sid, stream=True, max_tokens=1)) as r:
                lines = r.iter_lines()  # kept: a dropped line iterator closes the connection, cancelling the answer
                next(lines)  # the role chunk: an answer runs, and the next one is over max_running=1
                probe("POST", "/v1/chat/completions", json=ask(file_sid, max_tokens=1))
        begin_drain(app.state.vstream, 0.0)
        for method, template in (("GET", "/health/ready"), ("POST", "/v1/streams"), ("POST", "/v1/chat/completions")):
            probe(method, template, json=ask(file_sid) if "chat" in template else {"source": {"type": "push"}})
        app.state.vstream.draining = False  # so that the server stops as usual
    assert seen == {op: statuses for op, statuses in documented.items() if statuses}
    assert seen[("POST", "/v1/chat/completions")] == {400, 401, 403, 404, 409, 413, 429, 503}


def _bounds(doc: dict) -> dict[tuple[str, str, str], float]:
    """(schema or operation, field, keyword) -> value, for every numeric bound in the document."""
    found = {}

    def walk(owner: str, name: str, node):
        if isinstance(node, dict):
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if key in node:
                    found[(owner, name, key)] = node[key]
            for branch in node.get("anyOf", []):
                walk(owner, name, branch)

    for model, schema in doc["components"]["schemas"].items():
        for name, prop in schema.get("properties", {}).items():
            walk(model, name, prop)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                walk(f"{method.upper()} {path}", param["name"], param["schema"])
    return found


@pytest.mark.parametrize("limits", [Limits(), LIMITS], ids=["default", "small"])
def test_schema_bounds_are_the_bounds_the_server_enforces(model, limits):
    app = create_app(model, api_key=KEY, limits=limits)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        bounds = _bounds(client.get("/openapi.json").json())
        assert bounds == {
            ("StreamCreate", "fps", "exclusiveMinimum"): 0, ("StreamCreate", "fps", "maximum"): limits.max_fps,
            ("StreamCreate", "speed", "exclusiveMinimum"): 0, ("StreamCreate", "speed", "maximum"): 1000,
            ("WebcamSpec", "device", "minimum"): 0, ("WebcamSpec", "device", "maximum"): 63,
            ("ChatRequest", "max_tokens", "minimum"): 1,
            ("ChatRequest", "max_tokens", "maximum"): limits.max_answer_tokens,
            ("ChatRequest", "max_completion_tokens", "minimum"): 1,
            ("ChatRequest", "max_completion_tokens", "maximum"): limits.max_answer_tokens,
            ("ChatRequest", "as_of", "minimum"): 0,
            ("GET /v1/streams/{stream_id}/memory", "as_of", "minimum"): 0,
            ("GET /v1/streams/{stream_id}/frames", "t", "minimum"): 0,
            ("WatchCreate", "every_s", "minimum"): 0.1, ("WatchCreate", "every_s", "maximum"): 3600,
            ("WatchCreate", "cooldown_s", "minimum"): 0, ("WatchCreate", "cooldown_s", "maximum"): 86400,
            ("WatchCreate", "threshold", "minimum"): -1e12, ("WatchCreate", "threshold", "maximum"): 1e12,
            ("WatchCreate", "hysteresis", "minimum"): 0, ("WatchCreate", "hysteresis", "maximum"): 1e6,
            ("WatchCreate", "escalate_margin", "minimum"): 0, ("WatchCreate", "escalate_margin", "maximum"): 1e6}
        at = lambda fps: client.post("/v1/streams", json={"source": {"type": "push"}, "fps": fps})  # noqa: E731
        ok = at(limits.max_fps)
        assert ok.status_code == 201, ok.text  # the schema's maximum is accepted, the next value is not
        client.delete(f"/v1/streams/{ok.json()['id']}")
        assert f"max_fps={limits.max_fps:g}" in assert_error(at(limits.max_fps + 0.5), 400)["message"]
        push = client.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"]
        ask = lambda n: client.post("/v1/chat/completions", json={  # noqa: E731
            "model": push, "messages": [{"role": "user", "content": "hi"}], "max_tokens": n})
        assert assert_error(ask(limits.max_answer_tokens), 409)["code"] == "stream_not_ready"  # past the bound check
        assert "max_answer_tokens" in assert_error(ask(limits.max_answer_tokens + 1), 400)["message"]
