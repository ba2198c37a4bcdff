"""Watch webhooks against a real uvicorn and a real HTTP receiver, both on 127.0.0.1 (the server allows private
sources for that): signed deliveries verified by the receiver, retries with backoff after failures, redirects
refused, a hanging receiver that delays no other delivery; and, on a server that does not allow private sources or
has no secret, webhook URLs refused with 400 naming the rule.

As in test_server_watches, `threshold: -1e9` makes a watch of the tiny random model fire at its first evaluation."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from helpers import AUTH, DEADLINE_S, KEY, api_client, assert_error, running_server, wait_frames
from vstream.server import create_app
from vstream.server.state import Limits
from vstream.server.webhooks import backoff
from vstream.synth.clips import write_test_video

SECRET = "whsec-test-5f1c"
ALWAYS = {"threshold": -1e9, "hysteresis": 0.0, "cooldown_s": 0.0}
BACKOFF_S = 0.2


class Receiver(ThreadingHTTPServer):
    """A webhook receiver: records every POST as (path, monotonic time, headers, body); `/ok` answers 204,
    `/flaky` 503 to its first two requests then 200, `/hang` answers after 3 s, `/redirect` 302 to `/ok`."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.posts: list[tuple[str, float, dict, bytes]] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def of(self, path: str) -> list[tuple[str, float, dict, bytes]]:
        with self.lock:
            return [p for p in self.posts if p[0] == path]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Receiver = self.server
        with server.lock:
            server.posts.append((self.path, time.monotonic(), dict(self.headers), body))
            seen = len([p for p in server.posts if p[0] == self.path])
        if self.path == "/hang":
            time.sleep(3)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
        else:
            self.send_response(503 if self.path == "/flaky" and seen <= 2 else 204 if self.path == "/ok" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    write_test_video(media / "clip.mp4", seconds=3, fps=5)
    return media


@pytest.fixture(scope="module")
def server(model, media):
    limits = Limits(webhook_backoff_s=BACKOFF_S, webhook_attempts=4, url_timeout_s=1.0)
    app = create_app(model, media_root=media, api_key=KEY, allow_private_sources=True, webhook_secret=SECRET,
                     limits=limits)
    with running_server(app) as base:
        yield base


@pytest.fixture
def client(server):
    with api_client(server) as c:
        yield c


def open_stream(client) -> str:
    r = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}})
    assert r.status_code == 201, r.text
    wait_frames(client, r.json()["id"], 1)
    return r.json()["id"]


def wait_posts(receiver: Receiver, path: str, count: int, timeout: float = DEADLINE_S) -> list:
    deadline = time.monotonic() + timeout
    while len(posts := receiver.of(path)) < count:
        assert time.monotonic() < deadline, f"{path}: {len(posts)} of {count} deliveries within {timeout} s"
        time.sleep(0.02)
    return posts


def watch_view(client, sid: str, wid: str, until, what: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while not until(view := client.get(f"/v1/streams/{sid}/watches/{wid}").json()):
        assert time.monotonic() < deadline, f"{what}: {view}"
        time.sleep(0.05)
    return view


def test_a_webhook_gets_each_event_signed_with_the_server_secret(client, receiver):
    sid = open_stream(client)
    r = client.post(f"/v1/streams/{sid}/watches", json={"condition": "a red circle", "webhook": receiver.url("/ok")}
                    | ALWAYS)
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    assert r.json()["webhook"] == receiver.url("/ok")
    [(_, _, headers, body)] = wait_posts(receiver, "/ok", 1)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Vstream-Signature"], expected)
    assert not hmac.compare_digest(headers["X-Vstream-Signature"],
                                   "sha256=" + hmac.new(b"another", body, hashlib.sha256).hexdigest())
    event = json.loads(body)
    assert headers["Content-Type"] == "application/json" and headers["X-Vstream-Event"] == "watch.triggered"
    assert (event["type"], event["watch_id"], event["stream_id"]) == ("watch.triggered", wid, sid)
    assert headers["X-Vstream-Delivery"] == f"{sid}/{event['id']}"
    assert abs(event["created"] - time.time()) < DEADLINE_S and event["spatial_times"]
    assert watch_view(client, sid, wid, lambda v: v["webhook_delivered"] == 1, "delivered")["webhook_failed"] == 0
    client.delete(f"/v1/streams/{sid}")


def test_a_failing_webhook_is_retried_with_growing_waits_until_it_succeeds(client, receiver):
    sid = open_stream(client)
    wid = client.post(f"/v1/streams/{sid}/watches", json={"condition": "x", "webhook": receiver.url("/flaky")}
                      | ALWAYS).json()["id"]
    posts = wait_posts(receiver, "/flaky", 3)
    assert len({p[3] for p in posts}) == 1 and len({p[2]["X-Vstream-Delivery"] for p in posts}) == 1, \
        "every attempt carries the same body and delivery id"
    gaps = [b[1] - a[1] for a, b in zip(posts, posts[1:])]
    assert gaps[0] >= backoff(1, BACKOFF_S) * 0.9 and gaps[1] >= backoff(2, BACKOFF_S) * 0.9, gaps
    view = watch_view(client, sid, wid, lambda v: v["webhook_delivered"] == 1, "delivered after 2 failures")
    assert view["webhook_failed"] == 0
    time.sleep(backoff(3, BACKOFF_S) * 1.5)
    assert len(receiver.of("/flaky")) == 3, "no attempt after the delivery succeeded"
    client.delete(f"/v1/streams/{sid}")


def test_a_redirect_is_not_followed_and_ends_the_delivery(client, receiver):
    sid = open_stream(client)
    before = len(receiver.of("/ok"))
    wid = client.post(f"/v1/streams/{sid}/watches", json={"condition": "x", "webhook": receiver.url("/redirect")}
                      | ALWAYS).json()["id"]
    watch_view(client, sid, wid, lambda v: v["webhook_failed"] == 1, "the redirect counted as a failed delivery")
    assert len(receiver.of("/redirect")) == 1 and len(receiver.of("/ok")) == before
    client.delete(f"/v1/streams/{sid}")


def test_a_hanging_webhook_delays_no_other_watch_or_delivery(client, receiver):
    sid = open_stream(client)
    before = len(receiver.of("/ok"))
    hanging = client.post(f"/v1/streams/{sid}/watches", json={"condition": "x", "webhook": receiver.url("/hang")}
                          | ALWAYS)
    t0 = time.monotonic()
    assert hanging.status_code == 201, hanging.text
    ok = client.post(f"/v1/streams/{sid}/watches", json={"condition": "y", "webhook": receiver.url("/ok")} | ALWAYS)
    wait_posts(receiver, "/hang", 1)
    wait_posts(receiver, "/ok", before + 1)
    assert time.monotonic() - t0 < 2.5, "the other delivery waited for the hanging receiver"
    assert client.get(f"/v1/streams/{sid}/watches/{ok.json()['id']}").json()["events"] == 1
    assert client.get("/health/live").status_code == 200
    client.delete(f"/v1/streams/{sid}")


@pytest.fixture(scope="module")
def public_only(model, media):
    """A server with a webhook secret that allows no private address, and one with no secret."""
    strict = create_app(model, media_root=media, api_key=KEY, webhook_secret=SECRET)
    unsigned = create_app(model, media_root=media, api_key=KEY, allow_private_sources=True)
    with running_server(strict) as a, running_server(unsigned) as b:
        yield a, b


@pytest.mark.parametrize("url,code,words", [
    ("http://127.0.0.1:9/hook", "url_forbidden", ["loopback", "--allow-private-sources"]),
    ("http://10.1.2.3/hook", "url_forbidden", ["private"]),
    ("http://[::ffff:169.254.169.254]/", "url_forbidden", ["IPv4-mapped form of 169.254.169.254"]),
    ("http://0x7f.1/hook", "url_forbidden", ["loopback"]),
    ("ftp://127.0.0.1/hook", "invalid_url", ["scheme"]),
    ("http://user:pw@127.0.0.1:9/hook", "invalid_url", ["user name or password"]),
    ("http://127.0.0.1\\@example.com/", "invalid_url", ["backslash"]),
])
def test_a_private_or_malformed_webhook_is_refused_naming_the_rule(public_only, url, code, words):
    with httpx.Client(base_url=public_only[0], headers=AUTH, timeout=DEADLINE_S) as client:
        sid = open_stream(client)
        err = assert_error(client.post(f"/v1/streams/{sid}/watches", json={"condition": "x", "webhook": url}), 400)
        assert err["param"] == "webhook" and err["code"] == code, err
        assert all(w in err["message"] for w in words), err["message"]
        assert client.get(f"/v1/streams/{sid}/watches").json()["data"] == [], "a refused watch is not created"


def test_a_server_without_a_secret_refuses_webhooks(public_only, receiver):
    with httpx.Client(base_url=public_only[1], headers=AUTH, timeout=DEADLINE_S) as client:
        sid = open_stream(client)
        err = assert_error(client.post(f"/v1/streams/{sid}/watches",
                                       json={"condition": "x", "webhook": receiver.url("/ok")}), 400)
        assert err["code"] == "webhooks_disabled" and "--webhook-secret" in err["message"]


def test_backoff_doubles_and_is_capped():
    assert [backoff(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(40, 1.0) == 300.0
