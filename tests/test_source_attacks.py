"""Sources as an attacker would try them, against a real uvicorn on 127.0.0.1: playlists that point elsewhere (HLS over
HTTP, manifests and concat lists in the media root, an SDP file), RTSP redirects to refused hosts and redirect loops
(a fake RTSP server on 127.0.0.2, the one host these servers may reach), IPv6 forms that carry 127.0.0.1, Unicode
hosts, and paths that used to give 500s (NUL, over-long names, symlink loops). Canary listeners on 127.0.0.1,
127.0.0.3 and ::1 count every connection and datagram; none may come. Every answer is a 4xx that keeps the connection
open and carries no server path. Every wait is bounded."""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

import vstream
from helpers import AUTH, DEADLINE_S, KEY, RtspServer, free_port, rtsp_available, running_server, wait_frames
from vstream.server import create_app
from vstream.server.netsafe import address_refusal
from vstream.server.rtsp_relay import Refused, messages
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video

RELAY_HOST = "127.0.0.2"  # the servers here may reach this host and no other


class Canary:
    """TCP and UDP listeners on one loopback address that record every connection and datagram."""

    def __init__(self, host: str):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.tcp = socket.create_server((host, 0), family=family)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.udp.bind((host, self.port))
        self.hits: list[str] = []
        self.netloc = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        for target in (self._accept, self._receive):
            threading.Thread(target=target, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            self.hits.append(f"tcp from {peer}")
            conn.close()

    def _receive(self):
        while True:
            try:
                _, peer = self.udp.recvfrom(65536)
            except OSError:
                return
            self.hits.append(f"udp from {peer}")

    def close(self):
        self.tcp.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.tcp.close()
        self.udp.close()


@pytest.fixture(scope="module")
def canaries():
    made = [Canary("127.0.0.1"), Canary("127.0.0.3"), Canary("::1")]
    yield made
    for canary in made:
        canary.close()


def assert_untouched(canaries):
    assert [c.hits for c in canaries] == [[], [], []], "a canary was reached"


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the media root holding a video and an MPEG-TS segment."""
    root = tmp_path_factory.mktemp("outside")
    write_test_video(root / "secret.mp4", seconds=2, fps=5, size=(64, 48))
    write_test_video(root / "seg.ts", seconds=2, fps=5, size=(64, 48))
    return root


def _playlist(entry: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{entry}\n#EXT-X-ENDLIST\n"


@pytest.fixture(scope="module")
def media(tmp_path_factory, outside, canaries) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "small.mp4", seconds=2, fps=5, size=(64, 48))
    write_test_video(root / "seg.ts", seconds=2, fps=5, size=(64, 48))
    (root / "relative.m3u8").write_text(_playlist(f"../{outside.name}/seg.ts"))
    (root / "absolute.m3u8").write_text(_playlist(str(outside / "seg.ts")))
    (root / "file-url.m3u8").write_text(_playlist(f"file://{outside / 'seg.ts'}"))
    (root / "inside.m3u8").write_text(_playlist("seg.ts"))
    (root / "remote.m3u8").write_text(_playlist(f"http://{canaries[0].netloc}/seg.ts"))
    (root / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile ../{outside.name}/secret.mp4\n")
    (root / "list.txt").write_text(f"ffconcat version 1.0\nfile {outside / 'secret.mp4'}\n")
    (root / "rtp.sdp").write_text(f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                                  f"m=video {canaries[0].port} RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return root


@pytest.fixture(scope="module")
def web(media, canaries):
    """An HTTP server on 127.0.0.2 serving the media folder and playlists that name other hosts; records paths."""
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/hls/"):  # /hls/<netloc>/index.m3u8: a playlist whose segment is on <netloc>
                body = _playlist(f"http://{self.path.split('/')[2]}/seg.ts").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((RELAY_HOST, 0), functools.partial(Handler, directory=str(media)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{RELAY_HOST}:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(media):
    """A server that may reach 127.0.0.2 only, with `media` as its media root."""
    app = create_app(vstream.load("tiny"), media_root=media, api_key=KEY, allow_private_sources=[f"{RELAY_HOST}/32"],
                     limits=Limits(url_timeout_s=2))
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as http_client:
        yield http_client


def _source(client, source: dict) -> httpx.Response:
    return client.post("/v1/streams", json={"source": source})


def _refused(r: httpx.Response, status: int, media: Path | None = None) -> dict:
    assert r.status_code == status, r.text
    if media is not None:
        assert str(media) not in r.text and str(media.parent) not in r.text, r.text
    return r.json()["error"]


# --- playlists and lists that name other inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["relative.m3u8", "absolute.m3u8", "file-url.m3u8", "inside.m3u8", "remote.m3u8",
                                  "list.ffconcat", "list.txt", "rtp.sdp"])
def test_manifests_in_the_media_root_are_refused(client, media, canaries, name):
    err = _refused(_source(client, {"type": "file", "path": name}), 400, media)
    assert err["code"] == "invalid_video" and err["param"] == "source.path", err
    assert name in err["message"] and "playlists" in err["message"], err
    time.sleep(0.05)  # a datagram sent during the probe would have arrived
    assert_untouched(canaries)
    assert client.get("/v1/streams").json()["data"] == []


def test_hls_over_http_is_refused_and_its_segments_never_fetched(client, web, canaries):
    base, hits = web
    for netloc in [c.netloc for c in canaries] + [base.partition("://")[2]]:  # refused hosts, then the allowed one
        hits.clear()
        err = _refused(_source(client, {"type": "url", "url": f"{base}/hls/{netloc}/index.m3u8"}), 400)
        assert err["code"] == "invalid_video" and "playlists" in err["message"], err
        assert hits and all(h.startswith("/hls/") for h in hits), hits  # the playlist was read, no segment
    assert_untouched(canaries)


def test_concat_list_over_http_is_refused(client, web, canaries):
    base, hits = web
    err = _refused(_source(client, {"type": "url", "url": f"{base}/list.ffconcat"}), 400)
    assert err["code"] == "invalid_video", err
    assert "/secret.mp4" not in " ".join(hits)
    assert_untouched(canaries)


def test_a_plain_video_still_plays_from_the_allowed_host_and_the_media_root(client, web):
    base, _ = web
    for source in ({"type": "url", "url": f"{base}/small.mp4"}, {"type": "file", "path": "small.mp4"}):
        r = _source(client, source)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        wait_frames(client, sid, 2)
        client.delete(f"/v1/streams/{sid}")


# --- RTSP redirects -------------------------------------------------------------------------------------------------

class FakeRtsp:
    """An RTSP server on 127.0.0.2 that answers every request with `reply(request_line, cseq, port)`; records the
    request lines."""

    def __init__(self, reply, tls: ssl.SSLContext | None = None):
        self.reply, self.requests, self.tls = reply, [], tls
        self.listener = socket.create_server((RELAY_HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"{'rtsps' if tls else 'rtsp'}://{RELAY_HOST}:{self.port}/live"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buffer = b""
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                return  # the client did not trust the certificate
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    self.requests.append(head.split(b"\r\n")[0].decode())
                    cseq = next((li.split(b":")[1].strip() for li in head.split(b"\r\n")
                                 if li.lower().startswith(b"cseq")), b"0")
                    try:
                        conn.sendall(self.reply(self.requests[-1], cseq.decode(), self.port).encode("latin-1"))
                    except OSError:
                        return

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def _redirect(location: str, eol: str = "\r\n", before: str = ""):
    return lambda request, cseq, port: (f"{before}RTSP/1.0 302 Found{eol}CSeq: {cseq}{eol}"
                                        f"Location: {location.format(port=port)}{eol}{eol}")


@pytest.mark.parametrize("case", ["loopback", "other-loopback", "ipv6-loopback", "loop", "bare-lf", "after-packet",
                                  "moved-permanently"])
def test_rtsp_redirects_are_not_followed(client, canaries, case):
    """A 3xx sent to any request is never followed, however it is framed, and the connection carries one request."""
    ipv4, other, ipv6 = (f"rtsp://{c.netloc}/x" for c in canaries)
    reply = {"loopback": _redirect(ipv4), "other-loopback": _redirect(other), "ipv6-loopback": _redirect(ipv6),
             "loop": _redirect(f"rtsp://{RELAY_HOST}:{{port}}/again"), "bare-lf": _redirect(ipv4, eol="\n"),
             "after-packet": _redirect(ipv4, before="$\x00\x00\x03abc"),
             "moved-permanently": lambda request, cseq, port: (f"RTSP/1.0 301 Moved\r\nCSeq: {cseq}\r\n"
                                                               f"Location: {ipv6}\r\n\r\n"),
             }[case]
    server = FakeRtsp(reply)
    try:
        err = _refused(_source(client, {"type": "url", "url": server.url}), 400)
        assert err["code"] == "invalid_video" and err["param"] == "source.url", err
        if case not in ("bare-lf", "after-packet"):
            assert "redirects are not followed" in err["message"], err
        assert len(server.requests) == 1 and server.requests[0].startswith("OPTIONS "), server.requests
    finally:
        server.close()
    assert_untouched(canaries)
    assert client.get("/v1/streams").json()["data"] == []


def test_rtsp_urls_inside_the_session_never_open_a_connection(client, canaries):
    """A description whose base and track point at a canary: FFmpeg sends SETUP for it on the relayed connection (the
    one it has), opens nothing else, and gives up when the server refuses the transport."""
    canary = canaries[0].netloc

    def reply(request, cseq, port):
        if request.startswith("OPTIONS"):
            return f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY\r\n\r\n"
        if request.startswith("DESCRIBE"):
            sdp = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                   f"m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=control:rtsp://{canary}/track\r\n")
            return (f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nContent-Base: rtsp://{canary}/\r\n"
                    f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
        return f"RTSP/1.0 461 Unsupported Transport\r\nCSeq: {cseq}\r\n\r\n"

    server = FakeRtsp(reply)
    try:
        err = _refused(_source(client, {"type": "url", "url": server.url}), 400)
        assert err["code"] == "invalid_video", err
        methods = [line.split()[0] for line in server.requests]
        assert methods == ["OPTIONS", "DESCRIBE", "SETUP"] and canary in server.requests[2], server.requests
    finally:
        server.close()
    assert_untouched(canaries)


@pytest.fixture
def tls_certificate(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for the address 127.0.0.2 (made by Debian's openssl) and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=relay",
                    "-addext", f"subjectAltName=IP:{RELAY_HOST}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_rtsps_goes_through_the_relay_with_tls(client, canaries, tls_certificate, monkeypatch):
    """rtsps: the relay speaks TLS to the checked address and verifies its certificate; its redirect is refused."""
    cert, key = tls_certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = FakeRtsp(_redirect(f"rtsp://{canaries[0].netloc}/x"), tls=context)
    try:
        err = _refused(_source(client, {"type": "url", "url": server.url}), 400)
        assert "could not be reached" in err["message"] and "CERTIFICATE_VERIFY_FAILED" in err["message"], err
        assert server.requests == []  # not trusted: nothing was sent
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now the relay trusts it
        err = _refused(_source(client, {"type": "url", "url": server.url}), 400)
        assert "redirects are not followed" in err["message"], err
        assert len(server.requests) == 1 and server.requests[0].startswith("OPTIONS "), server.requests
    finally:
        server.close()
    assert_untouched(canaries)


def test_relay_frames_the_server_side_as_ffmpeg_does():
    ok = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 5\r\n\r\nv=0\r\n"
    packet = b"$\x00\x00\x04RTSP"  # interleaved data that looks like text
    assert messages(bytearray(ok + packet)) == len(ok + packet)
    assert messages(bytearray(ok[:-2])) == 0  # the body is not complete yet
    assert messages(bytearray(packet + ok[:10])) == len(packet)
    for bad, why in [(b"RTSP/1.0 302 Found\r\nLocation: rtsp://h/\r\n\r\n", "redirecting to 'rtsp://h/'"),
                     (packet + b"RTSP/1.0 305 Use Proxy\r\n\r\n", "305"),
                     (b"RTSP/1.0 200 OK\nCSeq: 1\r\n\r\n", "CRLF"), (b" RTSP/1.0 302 x\r\n\r\n", "neither"),
                     (b"RTSP/1.0 200 OK\r\n$\x00\x00\x01:\r\n\r\n", "Name: value"),
                     (b"RTSP/1.0 200 OK\r\nContent-Length: 1\r\ncontent-length: 9\r\n\r\n", "one length"),
                     (b"RTSP/1.0 200 OK\r\nContent-Length: 2000000\r\n\r\n", "one length"),
                     (b"RTSP/1.0 200 OK\r\nX: " + b"y" * 70000, "over 65536 bytes")]:
        with pytest.raises(Refused, match=why):
            messages(bytearray(bad))


def test_rtsp_through_the_relay_streams_frames():
    """A real RTSP server (GStreamer's, on 127.0.0.1) read through the relay by a server allowed to reach it."""
    reason = rtsp_available()
    if reason:
        pytest.skip(reason)
    rtsp = RtspServer(free_port()).start()
    app = create_app(vstream.load("tiny"), api_key=KEY, allow_private_sources=True, limits=Limits(url_timeout_s=5))
    try:
        with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
            r = _source(client, {"type": "url", "url": rtsp.url})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            deadline = time.monotonic() + 30
            while (view := client.get(f"/v1/streams/{sid}").json())["stats"]["frames_encoded"] < 3:
                assert view["state"] != "failed" and time.monotonic() < deadline, view
                time.sleep(0.05)
            client.delete(f"/v1/streams/{sid}")
    finally:
        rtsp.stop()


# --- addresses and host names ---------------------------------------------------------------------------------------

EMBEDDING = {"2002:7f00:1::": "6to4", "64:ff9b::7f00:1": "NAT64", "::127.0.0.1": "IPv4-compatible",
             "::ffff:127.0.0.1": "IPv4-mapped", "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo client"}


def test_ipv6_forms_of_loopback_are_refused(client, canaries):
    port = canaries[0].port
    for address, form in EMBEDDING.items():
        for scheme in ("http", "rtsp"):
            err = _refused(_source(client, {"type": "url", "url": f"{scheme}://[{address}]:{port}/x"}), 403)
            assert err["code"] == "url_forbidden" and f"the {form} form of 127.0.0.1" in err["message"], err
    err = _refused(_source(client, {"type": "url", "url": f"http://[64:ff9b:1::7f00:1]:{port}/x"}), 403)
    assert "local-use NAT64" in err["message"]
    assert_untouched(canaries)


def test_embedded_ipv4_is_judged_like_ipv4():
    for address, form in EMBEDDING.items():
        assert f"the {form} form of 127.0.0.1, a loopback address" in address_refusal(address)
    assert "the 6to4 form of 10.0.0.1, a private address" in address_refusal("2002:a00:1::")
    assert "the NAT64 form of 169.254.169.254" in address_refusal("64:ff9b::a9fe:a9fe")
    assert address_refusal("2002:808:808::") is None  # 6to4 of 8.8.8.8: public
    assert address_refusal("::ffff:8.8.8.8") is None  # dialled as 8.8.8.8 itself
    assert address_refusal("2606:4700:4700::1111") is None


def _keep_alive_posts(base: str, bodies: list[dict]) -> list[tuple[int, str]]:
    """POST each body on one HTTP/1.1 connection; fails if the server closes it."""
    conn = http.client.HTTPConnection(base.partition("://")[2], timeout=DEADLINE_S)
    out = []
    try:
        conn.connect()
        sock = conn.sock
        for body in bodies:
            conn.request("POST", "/v1/streams", body=json.dumps(body),
                         headers={**AUTH, "Content-Type": "application/json"})
            response = conn.getresponse()
            out.append((response.status, response.read().decode()))
            assert not response.will_close and conn.sock is sock, f"the connection was dropped after {body}"
    finally:
        conn.close()
    return out


def test_odd_hosts_and_paths_get_a_4xx_that_keeps_the_connection(client, media, canaries):
    port = canaries[0].port
    urls = {f"http://127\u30020\u30020\u30021:{port}/x": 400,  # ideographic full stops
            f"http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/x": 400,  # fullwidth digits
            f"http://0x7f\uff0e1:{port}/x": 400,  # a fullwidth full stop in a hex address
            f"http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:{port}/x": 403,  # fullwidth "localhost"
            f"rtsp://\uff11\uff12\uff17.0.0.1:{port}/x": 400,
            "http://ex\u00e4mple.invalid/x.mp4": 400, "http://example.com/\u00e9.mp4": 400,
            "http://a\ufe6bb.example/x": 400, "http://" + "\u00e4" * 70 + ".example/x": 400}
    paths = {"a\x00.mp4": 400, "a" * 300 + ".mp4": 400, "/".join(["\u00e9" * 120] * 20): 400, "loop-a": 400,
             "loop-a/x.mp4": 400, "missing/../../x.mp4": 403, "nope.mp4": 404}
    bodies = [{"source": {"type": "url", "url": u}} for u in urls] + [{"source": {"type": "file", "path": p}}
                                                                      for p in paths]
    answers = _keep_alive_posts(str(client.base_url).rstrip("/"), bodies)
    for (status, text), expected, body in zip(answers, [*urls.values(), *paths.values()], bodies):
        assert status == expected, (body, status, text)
        assert str(media) not in text and str(media.parent) not in text, text
        error = json.loads(text)["error"]
        assert error["message"] and error["param"] in ("source.url", "source.path"), error
        if body["source"].get("path", "").startswith("loop-a"):
            assert "symlink loop" in error["message"], error
    assert_untouched(canaries)
