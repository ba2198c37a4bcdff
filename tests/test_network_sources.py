"""`network_source` / `open_source` against real servers on 127.0.0.1: a file over HTTP (Python's http.server), URLs
that refuse, hang or 404, unknown schemes, playlists FFmpeg must not open, and a live RTSP stream (GStreamer's RTSP
server, `tests/rtsp_server.py`, run by Debian's `/usr/bin/python3`, which sees `python3-gi`) that goes away mid-stream
or comes back during the backoff, read directly and through the server's relay.
No mocks; every wait is bounded. The RTSP tests need the Debian packages that `.ci/run` installs.
"""

import contextlib
import functools
import http.server
import socket
import threading
import time

import pytest

from helpers import RtspServer, free_port, rtsp_available
from vstream.server.netsafe import check_url
from vstream.sources import network_source, open_source
from vstream.synth.clips import write_test_video
from vstream.video import VideoError

def take(frames, n: int, seconds: float = 30.0) -> list:
    """The first `n` items of `frames`, failing (not hanging) if they take longer than `seconds` in all."""
    out, deadline = [], time.monotonic() + seconds
    for item in frames:
        out.append(item)
        assert time.monotonic() < deadline, f"got only {len(out)} of {n} frames in {seconds} s"
        if len(out) == n:
            break
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_url(tmp_path_factory):
    """Base URL of an HTTP server serving a directory that holds `clip.mp4` (6 s at 10 fps)."""
    root = tmp_path_factory.mktemp("http")
    write_test_video(root / "clip.mp4", seconds=6, fps=10, size=(160, 120), seed=3)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_file_is_sampled_by_time_and_ends(http_url):
    start = time.monotonic()
    got = list(network_source(f"{http_url}/clip.mp4", fps=1, retries=0, timeout=5))
    assert len(got) in (6, 7)
    assert [round(t, 3) for t, _ in got] == list(range(len(got)))
    assert all(f.shape == (120, 160, 3) and f.dtype.name == "uint8" for _, f in got)
    assert time.monotonic() - start < 15

    frames, live = open_source(f"{http_url}/clip.mp4", fps=1)
    assert live is False
    assert [round(t, 3) for t, _ in frames] == [round(t, 3) for t, _ in got]  # ends: no reconnect, no repeat


def test_http_404_is_a_clear_error(http_url):
    with pytest.raises(VideoError) as err:
        list(network_source(f"{http_url}/missing.mp4", retries=1, backoff=0.01, timeout=2))
    message = str(err.value)
    assert "missing.mp4" in message and "gave up after 1 reconnect attempts" in message
    assert "404" in message or "Not Found" in message, message


def test_playlists_are_refused_and_their_entries_never_fetched(tmp_path):
    """An HLS playlist, a concat list: FFmpeg opens neither (they would make it fetch what nobody checked)."""
    write_test_video(tmp_path / "seg.ts", seconds=2, fps=5, size=(64, 48))
    (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nseg.ts\n#EXT-X-ENDLIST\n")
    (tmp_path / "list.ffconcat").write_text("ffconcat version 1.0\nfile seg.ts\n")
    hits = []

    class Recording(QuietHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recording, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        for name in ("list.m3u8", "list.ffconcat"):
            hits.clear()
            with pytest.raises(VideoError, match="expected one of the containers .*playlists") as err:
                list(network_source(f"http://127.0.0.1:{server.server_address[1]}/{name}", retries=0, timeout=2))
            assert name in str(err.value) and hits and all(h == f"/{name}" for h in hits), hits
            with pytest.raises(VideoError, match="playlists"):  # and as a local file
                list(open_source(str(tmp_path / name))[0])
    finally:
        server.shutdown()
        server.server_close()


def test_refused_connection_gives_up_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}/clip.mp4"  # nothing listens there
    pauses = []
    start = time.monotonic()
    with pytest.raises(VideoError, match="gave up after 2 reconnect attempts") as err:
        list(network_source(url, retries=2, backoff=0.05, timeout=1, sleep=lambda s: (pauses.append(s), time.sleep(s))))
    assert time.monotonic() - start < 15
    assert pauses == [0.05, 0.1]  # exponential backoff, one pause per reconnect attempt
    assert url in str(err.value) and "refused" in str(err.value).lower()


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_server_that_never_answers_times_out(scheme):
    """A socket that accepts connections and never sends a byte: each attempt ends after `timeout`, not never."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()
    listener.settimeout(0.1)

    def accept():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):  # no client within the timeout: look at `stop` again
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/stream"
    try:
        start = time.monotonic()
        with pytest.raises(VideoError, match="gave up after 2 reconnect attempts"):
            list(network_source(url, retries=2, backoff=0.05, timeout=1))
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
    assert elapsed < 15, f"3 attempts with timeout=1 took {elapsed:.1f} s"
    assert len(held) >= 3  # every attempt did connect: what ended them was the timeout


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/clip.mp4", "gopher://example.org/x", "clip.mp4://x"])
def test_unknown_scheme_is_refused_at_call_time(url):
    with pytest.raises(ValueError, match="expected one of") as err:
        network_source(url)  # no iteration: the check happens before any connection
    assert all(s in str(err.value) for s in ("rtsp", "http", "https"))
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        open_source(url)


@pytest.fixture
def rtsp():
    reason = rtsp_available()
    if reason:
        pytest.skip(reason)
    servers = []

    def make(port=None):
        servers.append(RtspServer(port or free_port()).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def test_rtsp_live_stream(rtsp):
    server = rtsp()
    _, live = open_source(server.url, fps=5)
    assert live is True
    got = take(network_source(server.url, fps=5, retries=0, timeout=5), 10)
    times = [t for t, _ in got]
    assert times[0] == 0 and all(b > a for a, b in zip(times, times[1:])), times
    assert 1.5 < times[-1] < 3.0, times  # 10 samples at 5 fps of a 10 fps stream: ~1.8 s of stream time
    assert all(f.shape == (240, 320, 3) for _, f in got)


def test_rtsp_server_going_away_ends_with_a_clear_error(rtsp):
    server = rtsp()
    pauses, times = [], []
    source = network_source(server.url, fps=5, retries=2, backoff=0.05, timeout=2,
                            sleep=lambda s: (pauses.append(s), time.sleep(s)))
    start = time.monotonic()
    with pytest.raises(VideoError, match="gave up after 2 reconnect attempts"):
        for t, _ in source:
            times.append(t)
            if len(times) == 5:
                server.stop()  # mid-stream: the frames already buffered may still come
            assert time.monotonic() - start < 30, "the source did not notice the server had gone"
    assert len(times) >= 5 and all(b > a for a, b in zip(times, times[1:])), times
    assert pauses == [0.05, 0.1]


def test_rtsp_reconnect_succeeds_and_stream_time_continues(rtsp):
    server = rtsp()
    times, back_at = [], []  # back_at: how many frames had come when the server was restarted

    def pause(seconds):  # the server comes back on the same port during the first backoff
        if not back_at and server.proc.poll() is not None:  # only once the old server is gone
            rtsp(server.port)
            back_at.append(len(times))
        time.sleep(seconds)

    source = network_source(server.url, fps=5, retries=2, backoff=0.05, timeout=5, sleep=pause)
    deadline = time.monotonic() + 40
    for t, _ in source:
        times.append(t)
        if len(times) == 5:
            server.stop()  # the frames already buffered still come, then the stream ends
        if back_at and len(times) >= back_at[0] + 3:
            break
        assert time.monotonic() < deadline, f"no frames from the restarted server: {times}, restarted: {back_at}"
    source.close()
    assert all(b > a for a, b in zip(times, times[1:])), times
    k = back_at[0]  # first frame of the new connection: one sampling step after the last one of the old
    assert times[k] == pytest.approx(times[k - 1] + 0.2), times


def test_rtsp_reconnects_through_a_new_relay_each_attempt(rtsp):
    """The server's RTSP path: every attempt opens a relay of its own on 127.0.0.1, which reaches the checked server."""
    server = rtsp()
    checked = check_url(server.url, allow_private=True)
    relays, back = [], []

    def connect():
        relays.append(checked.connect(5))
        return relays[-1]

    def pause(seconds):
        if not back and server.proc.poll() is not None:
            rtsp(server.port)
            back.append(len(times))
        time.sleep(seconds)

    times = []
    source = network_source(checked.url, fps=5, retries=2, backoff=0.05, timeout=5, sleep=pause,
                            options=checked.options, connect=connect)
    deadline = time.monotonic() + 40
    for t, _ in source:
        times.append(t)
        if len(times) == 5:
            server.stop()
        if back and len(times) >= back[0] + 3:
            break
        assert time.monotonic() < deadline, f"no frames after the restart: {times}, relays {len(relays)}"
    source.close()
    urls = [relay.url for relay in relays]
    assert len(urls) >= 2 and len(set(urls)) == len(urls) and server.url not in urls, urls
    assert all(url.startswith("rtsp://127.0.0.1:") and url.endswith("/test") for url in urls), urls
    assert all(relay.problem is None for relay in relays), [relay.problem for relay in relays]
