"""The cluster ingress's pieces that need no Ray: the merge of the replicas' Prometheus text (every server-wide sample
labelled with its replica; a stream's samples keep their labels: a stream has one owner; each metric one group with its
HELP and TYPE lines once), the frames a socket holds while its stream moves (in order, the oldest dropped beyond the
cap; only frames are held), and the ingress's HTTP client, which keeps no cookie and takes no proxy from the
environment (against a real server on loopback)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from helpers import running_server
from vstream.cluster.ingress import Proxy
from vstream.cluster.metrics import labelled, merge_metrics
from vstream.cluster.pipe import Held, classify
from vstream.server.state import Limits

ONE = """# HELP vstream:streams Open streams.
# TYPE vstream:streams gauge
vstream:streams 2
# HELP vstream:frames_ingested_total Frames encoded into the memory.
# TYPE vstream:frames_ingested_total counter
vstream:frames_ingested_total{stream_id="str_a"} 6
"""


def test_samples_get_the_replica_label():
    assert labelled("vstream:streams 2", "replica-1") == 'vstream:streams{replica="replica-1"} 2'
    assert labelled('x_bucket{le="0.1"} 3', "r2") == 'x_bucket{le="0.1",replica="r2"} 3'


def test_each_metric_is_one_group_over_every_replica():
    families = {}
    merge_metrics(families, ONE, "replica-1")
    merge_metrics(families, ONE.replace("str_a", "str_b").replace("streams 2", "streams 1"), "replica-2")
    text = "".join("".join(f"{c}\n" for c in comments) + "".join(f"{x}\n" for x in samples)
                   for comments, samples in families.values())
    assert text.splitlines() == [
        "# HELP vstream:streams Open streams.", "# TYPE vstream:streams gauge",
        'vstream:streams{replica="replica-1"} 2', 'vstream:streams{replica="replica-2"} 1',
        "# HELP vstream:frames_ingested_total Frames encoded into the memory.",
        "# TYPE vstream:frames_ingested_total counter",
        'vstream:frames_ingested_total{stream_id="str_a"} 6',
        'vstream:frames_ingested_total{stream_id="str_b"} 6']


def test_held_frames_keep_their_order_and_the_oldest_is_dropped_beyond_the_cap():
    held = Held(2)
    assert held.hold(b"a", None) is None and held.hold("b", "e1") is None
    assert held.hold(b"c", None) == (b"a", None)
    assert held.hold("d", "e2") == ("b", "e1")
    assert list(held.frames) == [(b"c", None), ("d", "e2")]
    with pytest.raises(ValueError, match="move_held_frames must be >= 1, got 0"):
        Held(0)


def test_binary_messages_and_appends_are_frames_other_messages_are_not():
    assert classify(b"\xff\xd8") == (True, None)
    assert classify(json.dumps({"type": "input_video_frame.append", "event_id": "f1"})) == (True, "f1")
    assert classify(json.dumps({"type": "response.create", "event_id": "q"})) == (False, "q")
    assert classify("not json") == (False, None) and classify("[1]") == (False, None)


def test_the_ingress_client_sends_no_cookie_that_a_replica_set(monkeypatch):
    """The ingress forwards every client's requests with one HTTP client: a replica's Set-Cookie (a page's login) must
    not make that client send the cookie with the requests of others. A real server on loopback sets and echoes it."""

    async def login(request):
        response = PlainTextResponse("set")
        response.set_cookie("vstream_session", "token", path="/")
        return response

    async def echo(request):
        return PlainTextResponse(request.headers.get("cookie", "none"))

    app = Starlette(routes=[Route("/login", login), Route("/echo", echo)])

    async def calls(base: str) -> list[str]:
        proxy = Proxy(None, None, Limits())  # no fleet: only its client is used
        try:
            return [(await proxy.client.get(base + path)).text for path in ("/login", "/echo", "/echo")]
        finally:
            await proxy.close()

    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):  # a proxy no replica is behind: ignored
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with running_server(app) as base:
        assert asyncio.run(calls(base)) == ["set", "none", "none"]
