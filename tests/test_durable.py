"""Durable streams through the real server (`--state-dir`): a snapshot/restore round trip in process, a `kill -9` of a
`vstream serve` subprocess, corrupt files, another memory configuration, DELETE. The tiny model, real video files,
loopback only; every wait is bounded."""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect as ws_connect

import vstream
from helpers import DEADLINE_S, free_port, recv, running_server, vstream_serve, wait_frames, wait_ready, wait_until
from vstream.engine import snapshots
from vstream.server import create_app
from vstream.synth.clips import moving_shapes, write_test_video

FRAMES = list(moving_shapes(20, 160, 120, seed=1, fps=10))
HI = [{"role": "user", "content": "What is on the screen?"}]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_test_video(root / "clip.mp4", seconds=6, fps=5)
    return root


def append(i: int, t: float) -> str:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(FRAMES[i % len(FRAMES)])).save(out, format="JPEG")
    return json.dumps({"type": "input_video_frame.append", "event_id": f"f{i}", "timestamp": t,
                       "image": base64.b64encode(out.getvalue()).decode()})


def connect(base: str, stream_id: str):
    url = base.replace("http://", "ws://") + f"/v1/realtime?stream_id={stream_id}"
    return ws_connect(url, open_timeout=DEADLINE_S, close_timeout=5)


def push_frames(base: str, stream_id: str, times: list[float], pause_s: float = 0.0) -> list[tuple[float, int]]:
    """Push one frame at each time; -> (wall clock of its ack, frames ingested by then) per frame."""
    acks = []
    with connect(base, stream_id) as ws:
        recv(ws, "session.created")
        for i, t in enumerate(times):
            ws.send(append(i, t))
            ack = recv(ws, "input_video_frame.ack")
            assert ack["accepted"], ack
            acks.append((time.monotonic(), ack["ingested"]))
            time.sleep(pause_s)
    return acks


def create(client, **body) -> str:
    r = client.post("/v1/streams", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]



def finished(client, sid: str) -> dict:
    return wait_until(lambda: (v := client.get(f"/v1/streams/{sid}").json())["stats"]["finished"] and v,
                      f"stream {sid} finished")


def ask(client, sid: str) -> dict:
    r = client.post("/v1/chat/completions", json={"model": sid, "messages": HI, "max_tokens": 3})
    assert r.status_code == 200, r.text
    return r.json()


def lane_state(app, sid: str) -> dict:
    return app.state.vstream.streams[sid].session.lane.state_dict()


def assert_same_state(a: dict, b: dict) -> None:
    assert snapshots.tensors_equal(a["memory"]["tensors"], b["memory"]["tensors"])
    assert a["memory"]["counters"] == b["memory"]["counters"]
    assert (a["frames"], a["stream_time"]) == (b["frames"], b["stream_time"])


def files_of(state_dir: Path, sid: str) -> list[str]:
    return sorted(p.name for p in (state_dir / sid).iterdir())


def test_round_trip_restores_memory_bit_for_bit_and_continues(model, media, tmp_path):
    state_dir = tmp_path / "state"
    app = create_app(model, media_root=media, state_dir=state_dir, snapshot_every=60)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        replay = create(client, source={"type": "file", "path": "clip.mp4"}, speed=1.0)
        done = create(client, source={"type": "file", "path": "clip.mp4"})
        push = create(client, source={"type": "push"})
        push_frames(base, push, [0.0, 1.0, 2.0])
        finished(client, done)
        wait_frames(client, push, 3)
        wait_frames(client, replay, 2)
    before = {sid: snapshots.read(state_dir, sid, snapshots.identity(model)).state for sid in (done, replay, push)}
    assert before[push]["frames"] == 3 and before[push]["stream_time"] == 2.0 and before[done]["frames"] == 6
    assert 2 <= before[replay]["frames"] < 6, "the drain saved the replay mid-stream"
    for sid in before:
        assert files_of(state_dir, sid) == ["manifest.json", "memory-00000001.safetensors"]

    again = create_app(model, media_root=media, state_dir=state_dir, snapshot_every=60)
    with running_server(again) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        assert {s["id"] for s in client.get("/v1/streams").json()["data"]} == set(before)
        for sid in (done, push):
            assert_same_state(lane_state(again, sid), before[sid])
            assert ask(client, sid)["choices"][0]["message"]["content"] is not None
        memory = client.get(f"/v1/streams/{push}/memory").json()
        assert memory["stream_time"] == 2.0 and memory["frames_seen"] == 3
        with connect(base, push) as ws:
            recv(ws, "session.created")
            ws.send(append(0, 2.0))
            assert recv(ws, "error")["error"]["code"] == "invalid_timestamp"  # time continues after the saved one
        push_frames(base, push, [3.0])
        wait_until(lambda: client.get(f"/v1/streams/{push}").json()["stats"]["stream_time"] == 3.0, "frame at 3 s")
        view = finished(client, replay)
        assert view["state"] == "finished" and view["stats"]["stream_time"] == 5.0
        replayed = lane_state(again, replay)
        assert replayed["frames"] == 6, "the replay went on after its saved time, no frame twice, none lost"
        for sid in before:
            assert client.delete(f"/v1/streams/{sid}").status_code == 200
            assert not (state_dir / sid).exists(), "DELETE removes the stream's files"
    assert snapshots.stream_ids(state_dir) == []


ALWAYS = {"threshold": -1e9, "hysteresis": 0.0, "cooldown_s": 0.0}  # the tiny model's watch fires at once


def sse(client, sid: str, last_event_id: int, count: int) -> list[dict]:
    """The first `count` events of the stream's feed after `last_event_id`."""
    out = []
    with client.stream("GET", f"/v1/streams/{sid}/events", headers={"Last-Event-ID": str(last_event_id)}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
                if len(out) == count:
                    return out
    raise AssertionError(f"the feed ended after {out}")


def test_watches_come_back_with_their_ids_state_and_feed_and_keep_firing(model, tmp_path):
    """A stream whose watch fired and a stream whose watch had no frame yet, restarted on the state directory: both
    listed with their ids and state, the first's feed resumes with Last-Event-ID across the restart and its watch is
    evaluated on new frames, the second's watch fires on its first frame after the restart."""
    state_dir = tmp_path / "state"
    app = create_app(model, state_dir=state_dir, snapshot_every=60)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        fired, waiting = create(client, source={"type": "push"}), create(client, source={"type": "push"})
        push_frames(base, fired, [0.0, 1.0])
        w1 = client.post(f"/v1/streams/{fired}/watches", json={"condition": "a red circle", "every_s": 1} | ALWAYS)
        w2 = client.post(f"/v1/streams/{waiting}/watches", json={"condition": "a blue square"} | ALWAYS)
        [before] = sse(client, fired, 0, 1)
        assert before["watch_id"] == w1.json()["id"] and before["type"] == "watch.triggered"
        saved = wait_until(lambda: (v := client.get(f"/v1/streams/{fired}/watches").json()["data"][0])["events"]
                           and v, "the watch's view counts its event")

    again = create_app(model, state_dir=state_dir, snapshot_every=60)
    with running_server(again) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        [back] = client.get(f"/v1/streams/{fired}/watches").json()["data"]
        for key in ("id", "condition", "every_s", "active", "events", "last_eval", "evaluations"):
            assert back[key] == saved[key], key
        assert back["active"] and back["events"] == 1
        assert [w["id"] for w in client.get(f"/v1/streams/{waiting}/watches").json()["data"]] == [w2.json()["id"]]
        assert sse(client, fired, 0, 1) == [before], "the saved feed is served again"
        push_frames(base, fired, [2.0, 3.0])
        wait_until(lambda: client.get(f"/v1/streams/{fired}/watches/{back['id']}").json()["last_eval"] == 3.0,
                   "the restored watch evaluated on the new frames")
        push_frames(base, waiting, [0.0])
        [after] = sse(client, waiting, 0, 1)
        assert after["watch_id"] == w2.json()["id"] and after["type"] == "watch.triggered" and after["id"] == 1
        w3 = client.post(f"/v1/streams/{fired}/watches", json={"condition": "anything"} | ALWAYS).json()["id"]
        [next_] = sse(client, fired, before["id"], 1)
        assert next_["watch_id"] == w3 and next_["id"] == before["id"] + 1, "the feed's ids go on after the restart"


def test_corrupt_snapshots_are_reported_and_not_loaded(model, media, tmp_path, caplog):
    state_dir = tmp_path / "state"
    app = create_app(model, media_root=media, state_dir=state_dir, snapshot_every=60)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        ids = [create(client, source={"type": "push"}) for _ in range(3)]
        for sid in ids:
            push_frames(base, sid, [0.0, 1.0])
            wait_frames(client, sid, 2)
    flipped, truncated, sound = ids
    tensors = next((state_dir / flipped).glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x01
    tensors.write_bytes(bytes(data))
    (state_dir / truncated / "manifest.json").write_text('{"format": "vstream.str')
    again = create_app(model, media_root=media, state_dir=state_dir, snapshot_every=60)
    with caplog.at_level("ERROR", "vstream.server.durable"), running_server(again) as base, \
            httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        assert [s["id"] for s in client.get("/v1/streams").json()["data"]] == [sound]
    problems = again.state.vstream.durable.problems
    assert set(problems) == {flipped, truncated}
    assert "checksum mismatch" in problems[flipped] and "JSON" in problems[truncated]
    assert f"stream {flipped} not restored" in caplog.text and f"stream {truncated} not restored" in caplog.text
    assert (state_dir / flipped).exists(), "a corrupt snapshot is left for inspection, not removed"


def test_another_memory_configuration_is_refused(model, media, tmp_path):
    state_dir = tmp_path / "state"
    app = create_app(model, media_root=media, state_dir=state_dir, snapshot_every=60)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        push_frames(base, create(client, source={"type": "push"}), [0.0])
    official = vstream.load("tiny", memory_mode="official")
    with pytest.raises(snapshots.IncompatibleSnapshot) as caught:
        create_app(official, media_root=media, state_dir=state_dir)
    assert "memory.mode='paper'" in str(caught.value) and "memory.mode='official'" in str(caught.value)


def read_live(root: Path, sid: str, ident: dict) -> snapshots.Snapshot:
    """The current snapshot of a stream that a running server keeps saving: read again when a newer save replaced
    the tensor file between reading the manifest and the file (the names only grow, so a changed name tells)."""
    while True:
        before = snapshots.read_manifest(root, sid)["tensors"]
        try:
            return snapshots.read(root, sid, ident)
        except snapshots.CorruptSnapshot:
            if snapshots.read_manifest(root, sid)["tensors"] == before:
                raise


def test_kill_9_loses_at_most_the_snapshot_interval(media, tmp_path):
    """`vstream serve --state-dir D --snapshot-every 1`, SIGKILL, restart: every stream back with its id and its last
    snapshot's memory bit for bit, answers from it, at most 1 s of frames lost, one snapshot per stream on disk."""
    state_dir, every = tmp_path / "state", 1.0
    server = Serve(media, state_dir, every)
    with httpx.Client(base_url=server.base, timeout=DEADLINE_S) as client:
        file_id = create(client, source={"type": "file", "path": "clip.mp4"})
        push_id = create(client, source={"type": "push"})
        finished(client, file_id)
        acks = push_frames(server.base, push_id, [float(i) for i in range(20)], pause_s=0.15)
    server.kill()
    killed_at = time.monotonic()
    saved = shutil.copytree(state_dir, tmp_path / "at-kill")
    ident = snapshots.identity(vstream.load("tiny"))
    last = {sid: snapshots.read(saved, sid, ident) for sid in (file_id, push_id)}
    safe = max((ingested for at, ingested in acks if at <= killed_at - every - 1.0), default=0)
    assert last[push_id].state["frames"] >= safe, "frames ingested more than the interval before the kill were lost"
    assert last[file_id].state["frames"] == 6

    server = Serve(media, state_dir, every)
    try:
        with httpx.Client(base_url=server.base, timeout=DEADLINE_S) as client:
            assert {s["id"] for s in client.get("/v1/streams").json()["data"]} == {file_id, push_id}
            for sid, snap in last.items():
                memory = client.get(f"/v1/streams/{sid}/memory").json()
                assert (memory["frames_seen"], memory["stream_time"]) == (snap.state["frames"],
                                                                          snap.state["stream_time"])
                answer = ask(client, sid)
                assert max(answer["vstream"]["spatial_times"]) <= snap.state["stream_time"]
            for sid, snap in last.items():  # the restarted server saves each restored memory: the same bits
                wait_until(lambda sid=sid, snap=snap: read_live(state_dir, sid, ident).saved_at > snap.saved_at,
                           f"a new snapshot of {sid}")
                assert_same_state(read_live(state_dir, sid, ident).state, snap.state)
                # one current snapshot: a manifest and one tensor file (a save in flight holds the next one for an
                # instant before the old one is removed)
                wait_until(lambda sid=sid: len(files_of(state_dir, sid)) == 2, f"{sid}'s files down to one snapshot")
                names = files_of(state_dir, sid)
                assert names[0] == "manifest.json" and names[1].endswith(".safetensors"), names
            resume = last[push_id].state["stream_time"] + 1.0
            push_frames(server.base, push_id, [resume])
            wait_until(lambda: client.get(f"/v1/streams/{push_id}").json()["stats"]["stream_time"] == resume,
                       "the pushed frame after the restart")
    finally:
        server.kill()


class Serve:
    """`vstream serve --model tiny --state-dir D --snapshot-every S` as a subprocess, ready on a free port."""

    def __init__(self, media: Path, state_dir: Path, every: float):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = vstream_serve("--model", "tiny", "--port", str(port), "--media-root", str(media), "--state-dir",
                                  str(state_dir), "--snapshot-every", str(every))
        wait_ready(self.proc, self.base)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(DEADLINE_S)
