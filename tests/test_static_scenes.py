"""Static and repetitive scenes (most real cameras are static): frames that repeat leave k-means clusters empty, and
nothing the memory hands out may become NaN or infinite because of it, in either mode, fp32 or fp16.

Three layers:
- hours-long synthetic streams fed straight to `memory.update` on a tiny memory (one frame 10^4 times, two frames
  alternating, a four-colour cycle, a paused stream that starts moving, a stream that goes black): every read finite,
  strictly JSON-serialisable, memory bytes flat;
- official mode against its literal reference (`memory/reference.py`) on the same scenes, bit for bit, fp32 and fp16;
- the real server (uvicorn on 127.0.0.1, the tiny model, each memory mode) on a static and a four-colour video written
  with PyAV, and on a static camera pushed over the realtime socket: every JSON body, SSE chunk and socket event parsed
  with a parser that refuses NaN and Infinity.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from websockets.sync.client import connect as ws_connect

import vstream
from helpers import AUTH, DEADLINE_S, KEY, running_server, wait_frames
from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, OfficialStreamingMemory, PaperStarMemory, official_offline_memory
from vstream.memory.reference import RefOfficialStreaming, ref_official_offline
from vstream.server import create_app
from vstream.synth.clips import write_video

SCENES = ("static", "alternating", "cycle4", "paused_then_moving", "goes_black")
DTYPES = (torch.float32, torch.float16)


def _refuse(name: str):
    raise ValueError(f"expected finite JSON numbers, got the constant {name}")


def strict_json(text: str):
    """json.loads that fails on NaN, Infinity and -Infinity (what a browser's JSON.parse refuses)."""
    return json.loads(text, parse_constant=_refuse)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two and leaves the other core to others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(kind: str, n: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[n, tokens, dim] float32 frame features of a synthetic scene whose frames repeat."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randn(4, tokens, dim, generator=g)
    index = torch.arange(n)
    if kind == "static":
        return palette[0].expand(n, tokens, dim)
    if kind == "alternating":
        return palette[index % 2]
    if kind == "cycle4":
        return palette[index % 4]
    moving = palette[0] + 0.3 * torch.randn(n, tokens, dim, generator=g).cumsum(0) / (1 + index[:, None, None]) ** 0.5
    if kind == "paused_then_moving":
        return torch.cat([palette[0].expand(n // 2, tokens, dim), moving[n // 2 :]])
    if kind == "goes_black":
        return torch.cat([moving[: n // 3], torch.zeros(n - n // 3, tokens, dim)])
    raise ValueError(f"scene kind must be one of {SCENES}, got {kind!r}")


# ---------------------------------------------------------------- memory level: hours-long streams

TINY = dict(temporal_length=6, abstract_length=4, retrieved_length=2, buffer_length=20, spatial_size=2, temporal_size=1,
            attention_dim=4)
DIM, GRID = 8, 2


def check_read(mem, frames: int) -> None:
    """Everything a read hands out is finite, JSON-serialisable without NaN, and within the stream's times."""
    read = mem.read()
    assert read.frames_seen == frames
    assert torch.isfinite(read.tokens.float()).all(), "a memory token is not finite"
    meta = {"spatial": read.spatial_times.tolist(), "retrieved": read.retrieved_times.tolist(),
            "spans": read.temporal_spans.tolist(), "weights": read.temporal_weights.tolist()}
    json.dumps(meta, allow_nan=False)  # raises ValueError on NaN or Infinity
    times = meta["spatial"] + meta["retrieved"] + [t for span in meta["spans"] for t in span]
    assert all(0 <= t <= frames - 1 for t in times), meta
    assert all(first <= mean <= last for first, last, mean in meta["spans"]), meta["spans"]
    assert all(w >= 0 for w in meta["weights"])
    if isinstance(mem, PaperStarMemory):
        assert sum(meta["weights"]) == pytest.approx(frames)  # weights still count every frame seen


def run_scene(mode: str, kind: str, dtype: torch.dtype, n: int, check_every: int) -> None:
    torch.manual_seed(0)
    random.seed(0)
    att = AbstractAttention(DIM, 4).eval().to(dtype)
    cls = PaperStarMemory if mode == "paper" else OfficialStreamingMemory
    mem = cls(MemoryConfig(mode=mode, **TINY), DIM, att, GRID)
    nbytes = mem.nbytes
    features = scene(kind, n, GRID * GRID, DIM).to(dtype)
    times = torch.arange(n, dtype=torch.float64)
    for i in range(n):
        mem.update(features[i : i + 1], times[i : i + 1])
        if (i + 1) % check_every == 0 or i == n - 1:
            check_read(mem, i + 1)
    assert mem.nbytes == nbytes


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("kind", SCENES)
def test_short_repetitive_streams_stay_finite(one_thread, kind, mode, dtype):
    run_scene(mode, kind, dtype, 120, check_every=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("kind", SCENES)
def test_hours_long_repetitive_streams_stay_finite(one_thread, kind, mode, dtype):
    """An hour at 1 fps of each scene; the static one for 10^4 frames."""
    run_scene(mode, kind, dtype, 10_000 if kind == "static" else 3600, check_every=97)


def test_empty_clusters_keep_weight_zero_and_the_span_of_their_centroid(one_thread):
    """Four colours, six clusters: two clusters end empty; they keep a centroid equal to one colour, weight 0 and a
    span inside the stream, and the clusters with weight stand for every frame of their colour."""
    mem = PaperStarMemory(MemoryConfig(**TINY), DIM, AbstractAttention(DIM, 4).eval(), GRID)
    features = scene("cycle4", 40, GRID * GRID, DIM)
    for i in range(40):
        mem.update(features[i : i + 1], [float(i)])
    read = mem.read()
    weights = read.temporal_weights.tolist()
    assert sorted(weights) == [0.0, 0.0, 10.0, 10.0, 10.0, 10.0]
    palette = features[:4].mean(1)  # the temporal map is pooled to one token
    for centroid, weight, (first, last, mean) in zip(mem.temporal[:, 0], weights, read.temporal_spans.tolist()):
        colour = int((palette - centroid).norm(dim=1).argmin())
        torch.testing.assert_close(centroid, palette[colour])
        if weight:  # the cluster of colour c holds frames c, c + 4, ..., c + 36
            assert (first, last, mean) == (colour, colour + 36, colour + 18)
        else:
            assert 0 <= first <= mean <= last <= 39 and (first - colour) % 4 == 0


# ---------------------------------------------------------------- official mode equals its reference, bit for bit

D, G = 16, 16


def seeded(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", SCENES)
def test_official_streaming_equals_reference_bit_for_bit(one_thread, kind, dtype):
    cfg = MemoryConfig(mode="official")
    torch.manual_seed(1)
    att = AbstractAttention(D, 8).eval().to(dtype)
    ref, fast = RefOfficialStreaming(cfg, att), OfficialStreamingMemory(cfg, D, att, G)
    x = scene(kind, 64, G * G, D, seed=2).to(dtype)
    chunks, start = [1] * 40 + [3, 5, 1, 7, 8], 0
    for i, n in enumerate(chunks):
        seeded(100 + i)
        ref.update(x[start : start + n])
        seeded(100 + i)
        fast.update(x[start : start + n], torch.arange(start, start + n, dtype=torch.float64))
        start += n
        got = fast.read()
        assert torch.equal(got.tokens, ref.read()), f"differs from the reference after {start} frames"
        check_read(fast, start)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", SCENES)
def test_official_offline_equals_reference_bit_for_bit(one_thread, kind, dtype):
    cfg = MemoryConfig(mode="official")
    torch.manual_seed(1)
    att = AbstractAttention(D, 8).eval().to(dtype)
    for t in (26, 27, 60):
        x = scene(kind, t, G * G, D, seed=t).to(dtype)
        seeded(t)
        want = ref_official_offline(x, cfg, att)
        seeded(t)
        got = official_offline_memory(x, None, cfg, att)
        assert torch.equal(got.tokens, want), f"{t} frames"
        assert torch.isfinite(got.temporal_spans).all() and torch.isfinite(got.retrieved_times).all()


# ---------------------------------------------------------------- the real server, every JSON route


def _colour_frames(colours: list[tuple[int, int, int]], seconds: int) -> list[np.ndarray]:
    frames = []
    for i in range(seconds):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:] = colours[i % len(colours)]
        frames.append(frame)
    return frames


@pytest.fixture(scope="module", params=["paper", "official"])
def scene_server(request, tmp_path_factory):
    """(base url, memory mode) of a server whose media root holds a static and a four-colour video of 40 s at 1 fps."""
    media = tmp_path_factory.mktemp("scenes")
    write_video(media / "static.mp4", _colour_frames([(90, 140, 200)], 40), fps=1)
    cycle = [(230, 40, 40), (40, 200, 60), (40, 60, 220), (240, 220, 40)]
    write_video(media / "cycle.mp4", _colour_frames(cycle, 40), fps=1)
    model = vstream.load("tiny", memory_mode=request.param)
    with running_server(create_app(model, media_root=media, api_key=KEY, max_streams=3)) as base:
        yield base, request.param


def _get(client: httpx.Client, path: str, **params):
    r = client.get(path, params=params)
    assert r.status_code == 200, f"{path} {params}: {r.status_code} {r.text[:500]}"
    return strict_json(r.text)


def _chat(client: httpx.Client, sid: str, **extra) -> dict:
    body = {"model": sid, "messages": [{"role": "user", "content": "What is on screen?"}], "max_tokens": 3, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, f"{extra}: {r.status_code} {r.text[:500]}"
    return strict_json(r.text)


def _sse(client: httpx.Client, sid: str, **extra) -> list[dict]:
    body = {"model": sid, "messages": [{"role": "user", "content": "What changed?"}], "max_tokens": 3,
            "stream": True, **extra}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()[:500]
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [strict_json(line.removeprefix("data: ")) for line in lines[:-1]]


def _connect(base: str, sid: str | None = None):
    url = base.replace("http://", "ws://") + "/v1/realtime" + (f"?stream_id={sid}" if sid else "")
    return ws_connect(url, additional_headers=AUTH, open_timeout=DEADLINE_S)


def _until(ws, type_: str) -> list[dict]:
    """Every event up to and including the first of `type_`, each parsed strictly."""
    events, deadline = [], time.monotonic() + DEADLINE_S
    while not events or events[-1]["type"] != type_:
        events.append(strict_json(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    return events


def _ask(ws, **extra) -> list[dict]:
    ws.send(json.dumps({"type": "response.create", "question": "What is there?", "max_tokens": 3, **extra}))
    return _until(ws, "response.done")


def _socket_events(base: str, sid: str, **extra) -> list[dict]:
    """Every event of a realtime session attached to stream `sid` that asks one question, up to response.done."""
    with _connect(base, sid) as ws:
        return _ask(ws, **extra)


@pytest.mark.parametrize("video", ["static.mp4", "cycle.mp4"])
def test_every_json_route_stays_finite_on_static_and_repetitive_video(scene_server, video):
    base, mode = scene_server
    with httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
        r = client.post("/v1/streams", json={"source": {"type": "file", "path": video}})
        assert r.status_code == 201, r.text
        sid = strict_json(r.text)["id"]
        try:
            wait_frames(client, sid, 40)
            assert sid in [s["id"] for s in _get(client, "/v1/streams")["data"]]
            _get(client, f"/v1/streams/{sid}")
            now = _get(client, f"/v1/streams/{sid}/memory")
            assert now["frames_seen"] == 40 and now["tokens"]["total"] == 681
            assert sum(c["weight"] for c in now["temporal"]) == pytest.approx(40 if mode == "paper" else 26)
            for as_of in (5.0, 25.0, 30.5, 39.0):
                past = _get(client, f"/v1/streams/{sid}/memory", as_of=as_of)
                assert past["stream_time"] <= as_of
            for extra in ({}, {"as_of": 30.0}):
                reply = _chat(client, sid, **extra)
                assert reply["vstream"]["temporal_spans"] and reply["choices"][0]["message"]["content"] is not None
                chunks = _sse(client, sid, **extra)
                assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
                events = _socket_events(base, sid, **extra)
                assert events[-1]["response"]["status"] == "completed"
        finally:
            client.delete(f"/v1/streams/{sid}")


def test_a_static_camera_pushed_over_the_realtime_socket_stays_finite(scene_server):
    """Thirty seconds of one JPEG pushed at 1 fps: the socket's events, the memory view and the answers all parse."""
    base, mode = scene_server
    out = io.BytesIO()
    Image.fromarray(_colour_frames([(90, 140, 200)], 1)[0]).save(out, format="JPEG")
    image = base64.b64encode(out.getvalue()).decode()
    with _connect(base) as ws, httpx.Client(base_url=base, headers=AUTH,
                                             timeout=DEADLINE_S) as client:
        sid = _until(ws, "session.created")[-1]["session"]["stream_id"]
        for i in range(30):  # each frame ingested before the next: a live source drops the oldest queued frames
            ws.send(json.dumps({"type": "input_video_frame.append", "timestamp": float(i), "image": image}))
            assert _until(ws, "input_video_frame.ack")[-1]["accepted"]
            wait_frames(client, sid, i + 1)
        now = _get(client, f"/v1/streams/{sid}/memory")
        assert now["frames_seen"] == 30 and all(c["first"] <= c["mean"] <= c["last"] <= 29 for c in now["temporal"])
        _get(client, f"/v1/streams/{sid}/memory", as_of=27.5)
        for extra in ({}, {"as_of": 26.0}):
            assert _ask(ws, **extra)[-1]["response"]["status"] == "completed"
            _chat(client, sid, **extra)
