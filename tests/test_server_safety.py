"""Safety and limits of the server against a real uvicorn on 127.0.0.1: URL sources (SSRF cases, redirects, a loopback
canary that must see no connection), decoding limits, body caps, limits naming their value, 429 with Retry-After,
cancellation on disconnect, the page cookie and draining a real `vstream serve` process. Every wait is bounded."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from helpers import AUTH, DEADLINE_S, KEY, EngineHook, free_port, running_server, vstream_serve, wait_frames, wait_ready
from vstream.server import create_app
from vstream.server.cookies import PageCookies
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video



class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves the media folder; `/go?to=URL` redirects; counts every request it gets."""

    hits: list[str]

    def do_GET(self):
        self.hits.append(self.path)
        if self.path.startswith("/go?to="):
            self.send_response(302)
            self.send_header("Location", self.path.partition("=")[2])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def _http_server(host: str, root: Path):
    handler = type("Handler", (_Files,), {"hits": []})
    server = http.server.ThreadingHTTPServer((host, 0), lambda *a: handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler.hits, f"http://{host}:{server.server_address[1]}"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "small.mp4", seconds=3, fps=5, size=(160, 120))
    write_test_video(root / "big.mp4", seconds=1, fps=5, size=(320, 240))
    write_test_video(root / "long.mp4", seconds=6, fps=2, size=(160, 120))
    write_test_video(root / "many.mp4", seconds=4, fps=10, size=(160, 120))
    (root / "junk.mp4").write_bytes(os.urandom(4096))
    return root


@pytest.fixture(scope="module")
def canary(media):
    """An HTTP server on loopback that a default server must never reach."""
    server, hits, base = _http_server("127.0.0.1", media)
    yield base, hits
    server.shutdown()


LIMITS = Limits(max_body_bytes=4096, max_answer_tokens=8, max_question_chars=100, max_running=1,
                max_frame_pixels=200 * 200, max_source_seconds=5, max_source_frames=30, max_fps=5, url_timeout_s=2)


@pytest.fixture(scope="module")
def strict(model, media):
    """A server with the defaults for URLs (public addresses only) and small limits."""
    app = create_app(model, media_root=media, api_key=KEY, max_streams=3, limits=LIMITS)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        yield client, app


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def _url_source(client, url: str) -> httpx.Response:
    return client.post("/v1/streams", json={"source": {"type": "url", "url": url}})


def test_private_and_odd_urls_are_refused_and_never_reached(strict, canary):
    client, _ = strict
    base, hits = canary
    port = base.rsplit(":", 1)[1]
    forbidden = [f"{base}/small.mp4", f"http://[::1]:{port}/small.mp4", "http://169.254.169.254/latest/meta-data",
                 f"http://localhost:{port}/small.mp4", f"http://0x7f.1:{port}/small.mp4",
                 f"http://2130706433:{port}/small.mp4", f"http://[::ffff:127.0.0.1]:{port}/small.mp4",
                 f"http://0.0.0.0:{port}/small.mp4", "http://10.0.0.1/x", "http://192.168.1.1/x",
                 "http://100.64.0.1/x", f"rtsp://127.0.0.1:{port}/test", f"https://127.0.0.1:{port}/x",
                 f"http://user:pw@127.0.0.1:{port}/small.mp4"]
    for url in forbidden:
        err = _error(_url_source(client, url), 403)
        assert err["code"] == "url_forbidden" and err["param"] == "source.url" and "address" in err["message"], url
    invalid = ["ftp://example.com/x.mp4", "file:///etc/passwd", "gopher://x", f"http://example.com\\@127.0.0.1:{port}/",
               "http://exa mple.com/", "http:///nohost", "data:video/mp4;base64,AAAA", "http://x:99999/"]
    for url in invalid:
        assert _error(_url_source(client, url), 400)["code"] in ("invalid_url", "invalid_request"), url
    assert hits == [], "a refused URL reached the loopback server"


def test_redirect_to_loopback_is_refused(model, media, canary):
    """A source allowed to reach 127.0.0.2 only: its redirect to the 127.0.0.1 canary is checked and refused."""
    base, hits = canary
    hits.clear()
    server, relay_hits, relay = _http_server("127.0.0.2", media)
    app = create_app(model, api_key=KEY, allow_private_sources=["127.0.0.2/32"])
    try:
        with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=DEADLINE_S) as client:
            err = _error(_url_source(client, f"{relay}/go?to={base}/small.mp4"), 403)
            assert "127.0.0.1" in err["message"] and err["code"] == "url_forbidden"
            assert relay_hits == ["/go?to=" + f"{base}/small.mp4"] and hits == []
    finally:
        server.shutdown()


def test_loopback_sources_when_allowed(model, media, canary):
    base, hits = canary
    app = create_app(model, api_key=KEY, allow_private_sources=True, limits=Limits(url_timeout_s=2))
    with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=DEADLINE_S) as client:
        for source in (f"{base}/small.mp4", f"{base}/go?to=/small.mp4", f"{base}/go?to={base}/go?to=/small.mp4"):
            r = _url_source(client, source)
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            wait_frames(client, sid, 3)
            client.delete(f"/v1/streams/{sid}")
        chain = f"{base}/go?to=/go?to=/go?to=/go?to=/small.mp4"
        assert "redirects" in _error(_url_source(client, chain), 403)["message"]
        assert _error(_url_source(client, f"{base}/missing.mp4"), 400)["code"] == "url_unreachable"
        assert _error(_url_source(client, f"{base}/junk.mp4"), 400)["code"] == "invalid_video"
        closed = free_port()
        assert _error(_url_source(client, f"http://127.0.0.1:{closed}/x.mp4"), 400)["code"] == "url_unreachable"
        assert _error(client.post("/v1/streams", json={"source": {"type": "webcam", "device": 63}}), 400)["message"]


def test_declared_size_over_the_byte_cap_is_refused(model, media, canary):
    base, _ = canary
    small = (media / "small.mp4").stat().st_size
    app = create_app(model, api_key=KEY, allow_private_sources=True,
                     limits=Limits(url_timeout_s=2, max_source_bytes=small - 1))
    with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=DEADLINE_S) as client:
        error = _error(_url_source(client, f"{base}/go?to=/small.mp4"), 400)  # the size of the redirect's target
        assert error["code"] == "limit_exceeded" and error["param"] == "source.url"
        assert f"declares {small} bytes, over the limit max_source_bytes={small - 1}" in error["message"]
        assert client.get("/v1/streams").json()["data"] == []


@pytest.mark.parametrize(("path", "limit"), [("big.mp4", "max_frame_pixels=40000"),
                                            ("long.mp4", "max_source_seconds=5"),
                                            ("many.mp4", "max_source_frames=30")])
def test_decoding_limits_bind_before_decoding(strict, path, limit):
    err = _error(strict[0].post("/v1/streams", json={"source": {"type": "file", "path": path}}), 400)
    assert limit in err["message"] and err["code"] == "limit_exceeded"


def test_unreadable_file_is_refused_at_creation(strict):
    err = _error(strict[0].post("/v1/streams", json={"source": {"type": "file", "path": "junk.mp4"}}), 400)
    assert err["code"] == "invalid_video" and strict[0].get("/v1/streams").json()["data"] == []


def test_body_caps_and_parameter_limits(strict):
    client, _ = strict
    big = {"model": "x", "messages": [{"role": "user", "content": "a" * 5000}]}
    err = _error(client.post("/v1/chat/completions", json=big), 413)
    assert "max_body_bytes=4096" in err["message"]
    chunked = client.post("/v1/chat/completions", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]),
                          headers={"content-type": "application/json"})
    assert "max_body_bytes=4096" in _error(chunked, 413)["message"]
    sid = client.post("/v1/streams", json={"source": {"type": "file", "path": "small.mp4"}}).json()["id"]
    try:
        ask = lambda **kw: client.post("/v1/chat/completions", json={"model": sid, **kw})  # noqa: E731
        err = _error(ask(messages=[{"role": "user", "content": "hi"}], max_tokens=9), 400)
        assert "max_tokens=9" in err["message"] and "max_answer_tokens=8" in err["message"]
        err = _error(ask(messages=[{"role": "user", "content": "q" * 101}]), 400)
        assert "101" in err["message"] and "max_question_chars=100" in err["message"]
        err = _error(ask(messages=[{"role": "user", "content": "hi"}], as_of=-1), 400)
        assert err["param"] == "as_of" and "-1" in err["message"]
    finally:
        client.delete(f"/v1/streams/{sid}")
    err = _error(client.post("/v1/streams", json={"source": {"type": "push"}, "fps": 6}), 400)
    assert "fps=6.0" in err["message"] and "max_fps=5" in err["message"]
    fast = {"source": {"type": "file", "path": "small.mp4"}, "speed": 5000}
    err = _error(client.post("/v1/streams", json=fast), 400)
    assert "1000" in err["message"] and "5000" in err["message"]


def _ready_stream(client, path="small.mp4") -> str:
    sid = client.post("/v1/streams", json={"source": {"type": "file", "path": path}}).json()["id"]
    deadline = time.monotonic() + DEADLINE_S
    while client.get(f"/v1/streams/{sid}").json()["stats"]["frames_encoded"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return sid


def _metric(client, name: str) -> float:
    line = next(li for li in client.get("/metrics").text.splitlines() if li.startswith(name + " "))
    return float(line.split()[1])


def _wait_idle(client) -> None:
    deadline = time.monotonic() + 3
    while _metric(client, "vstream:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the generation kept running after its client left"
        time.sleep(0.02)


def test_too_many_answers_and_disconnects_cancel(strict):
    client, app = strict
    sid = _ready_stream(client)
    try:
        with EngineHook(app.state.vstream, pause_s=0.15) as hook:
            body = {"model": sid, "messages": [{"role": "user", "content": "Tell me all."}], "max_tokens": 8,
                    "stream": True}
            cancelled = _metric(client, "vstream:requests_cancelled_total")
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert '"content"' in next(li for li in lines if '"content": "' in li and '"role"' not in li)
                busy = client.post("/v1/chat/completions", json=body)
                assert _error(busy, 429)["code"] == "too_many_requests" and busy.headers["retry-after"] == "1"
            _wait_idle(client)  # the client left after one piece: the generation stopped
            time.sleep(0.3)
            assert hook.tokens < 8
            assert _metric(client, "vstream:requests_cancelled_total") == cancelled + 1
            hook.tokens = 0
            with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up before the answer is done
                httpx.post(str(client.base_url).rstrip("/") + "/v1/chat/completions", json=body | {"stream": False},
                           headers=AUTH, timeout=0.4)
            _wait_idle(client)
            time.sleep(0.3)
            assert hook.tokens < 8
            assert _metric(client, "vstream:requests_cancelled_total") == cancelled + 2
    finally:
        client.delete(f"/v1/streams/{sid}")


def test_page_cookie(strict):
    client, _ = strict
    base = str(client.base_url).rstrip("/")
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as page:
        assert page.get("/").status_code == 200 and page.get("/v1/streams").status_code == 401
        assert page.post("/v1/auth/cookie", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = page.post("/v1/auth/cookie", headers=AUTH)
        assert r.status_code == 204
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie and "domain" not in cookie
        assert KEY.lower() not in cookie
        assert page.get("/v1/streams").status_code == 200
        token = page.cookies["vstream_session"]
        forged = PageCookies(KEY, b"another server!!").mint()  # signed, but not with this server's secret
        sent = {"Cookie": f"vstream_session={forged}"}
        assert httpx.get(f"{base}/v1/streams", headers=sent, timeout=DEADLINE_S).status_code == 401
        assert page.get("/v1/streams", headers={"Origin": "http://evil.example"}).status_code == 401
        assert page.get("/v1/streams", headers={"Origin": base}).status_code == 200
        sid = page.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"]  # outlives the socket
        with ws_connect(base.replace("http", "ws") + f"/v1/realtime?stream_id={sid}", open_timeout=DEADLINE_S,
                        additional_headers={"Cookie": f"vstream_session={token}", "Origin": base}) as ws, \
                page.stream("GET", f"/v1/streams/{sid}/events") as feed:
            assert json.loads(ws.recv(timeout=DEADLINE_S))["type"] == "session.created"
            lines = feed.iter_lines()
            assert next(lines).startswith(": vstream")
            assert page.delete("/v1/auth/cookie").status_code == 204  # the socket and the feed it let in end
            notice = json.loads(ws.recv(timeout=DEADLINE_S))
            assert notice["type"] == "session.closing" and notice["reason"] == "logged_out"
            with pytest.raises(Exception) as closed:
                ws.recv(timeout=DEADLINE_S)
            assert closed.value.rcvd.code == 1001
            assert [line for line in lines if line] == []  # the feed ended, its stream still there:
            assert httpx.get(f"{base}/v1/streams/{sid}", headers=AUTH, timeout=DEADLINE_S).status_code == 200
        assert httpx.delete(f"{base}/v1/streams/{sid}", headers=AUTH, timeout=DEADLINE_S).status_code == 200
        page.cookies.set("vstream_session", token)
        assert page.get("/v1/streams").status_code == 401


def test_drain_on_sigterm(tmp_path):
    """A real `vstream serve`: SIGTERM -> not ready, new work refused, a session notice, then a clean exit."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = vstream_serve("--model", "tiny", "--port", str(port), "--api-key", KEY, "--drain-seconds", "1.5")
    try:
        wait_ready(proc, base)
        with ws_connect(base.replace("http", "ws") + "/v1/realtime", additional_headers=AUTH,
                        open_timeout=DEADLINE_S) as ws:
            assert json.loads(ws.recv(timeout=DEADLINE_S))["type"] == "session.created"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            notice = json.loads(ws.recv(timeout=DEADLINE_S))
            assert notice["type"] == "session.closing" and notice["reason"] == "draining"
            assert 0 < notice["time_left_s"] <= 1.5
            ready = httpx.get(f"{base}/health/ready", timeout=2)
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert httpx.get(f"{base}/health/live", timeout=2).status_code == 200
            refused = httpx.post(f"{base}/v1/streams", json={"source": {"type": "push"}}, headers=AUTH, timeout=2)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            with pytest.raises(Exception) as closed:
                while True:
                    ws.recv(timeout=DEADLINE_S)
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1001
            assert time.monotonic() - t0 >= 1.4
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
