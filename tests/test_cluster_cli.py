"""`vstream serve --ray`: each wrong combination of options is refused before anything starts (no Ray, no model), with
a message naming what was expected and what came; and the command end to end in a subprocess (ray and slow tiers)."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect as ws_connect

from helpers import DEADLINE_S, free_port, in_process, vstream_serve, wait_ready, wait_until
from vstream.engine import snapshots


@pytest.mark.parametrize(("args", "message"), [
    (["--replicas", "2"], "--replicas need --ray"),
    (["--autoscale", "1:3", "--ray-address", "auto"], "--autoscale, --ray-address need --ray"),
    (["--ray"], "--ray needs --state-dir DIR"),
    (["--ray", "--state-dir", "{tmp}", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--ray", "--state-dir", "{tmp}", "--replicas", "2", "--autoscale", "1:2"], "exclude each other"),
    (["--ray", "--state-dir", "{tmp}", "--autoscale", "3:1"], "MIN:MAX with 1 <= MIN <= MAX (replicas), got '3:1'"),
    (["--ray", "--state-dir", "{tmp}", "--autoscale", "two"], "got 'two'"),
    (["--ray", "--state-dir", "{tmp}", "--replica-threads", "0"], "--replica-threads must be >= 1"),
    (["--ttft-target-ms", "500"], "--ttft-target-ms need --ray"),
    (["--ray", "--state-dir", "{tmp}", "--ttft-target-ms", "500"], "--ttft-target-ms needs --autoscale"),
    (["--ray", "--state-dir", "{tmp}", "--autoscale", "1:2", "--ttft-target-ms", "0"], "got 0.0 with --autoscale 1:2"),
])
def test_bad_cluster_options_are_refused_before_anything_starts(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = in_process(monkeypatch, capsys, "serve", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err, err


def serve_ray(state_dir, port: int, *args) -> subprocess.Popen:
    return vstream_serve("--model", "tiny", "--device", "cpu", "--ray", "--state-dir", str(state_dir),
                         "--port", str(port), "--replica-threads", "1", "--snapshot-every", "600", *args)


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as an orchestrator stops it; the process re-raises it once the replicas have saved and stopped."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode in (-signal.SIGTERM, signal.SIGTERM), out[-3000:]  # re-raised (Ray: exit 15)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_serve_ray_end_to_end_and_a_restart_brings_the_streams_back(tmp_path):
    """`vstream serve --ray --replicas 2` on its own local Ray: streams over both replicas; SIGTERM stops it, each
    replica saving its streams (the interval, 600 s, never came); `--replicas 1` on the same state directory brings
    them all back with their memories."""
    pytest.importorskip("ray", reason="needs the [ray] extra: pip install -e '.[ray]'")
    state_dir, port = tmp_path / "state", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve_ray(state_dir, port, "--replicas", "2")
    try:
        wait_ready(proc, base, timeout=240)
        with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
            assert sorted(client.get("/health/ready").json()["replicas"]) == ["replica-1", "replica-2"]
            ids = [client.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"] for _ in range(2)]
            for k, sid in enumerate(ids):
                with ws_connect(f"ws://127.0.0.1:{port}/v1/realtime?stream_id={sid}", open_timeout=DEADLINE_S) as ws:
                    for t in (0.0, 1.0):
                        ws.send(json.dumps({"type": "input_video_frame.append", "timestamp": 10.0 * k + t,
                                            "image": base64.b64encode(_jpeg(50 * k)).decode()}))
            owners = client.get("/v1/cluster").json()["streams"]
            assert sorted(owners.values()) == ["replica-1", "replica-2"]
            for k, sid in enumerate(ids):
                wait_until(lambda sid=sid: client.get(f"/v1/streams/{sid}").json()["stats"]["frames_encoded"] == 2,
                           f"2 frames of {sid} ingested")
    finally:
        stop(proc)
    assert snapshots.stream_ids(state_dir) == sorted(ids)

    proc = serve_ray(state_dir, port, "--replicas", "1")
    try:
        wait_ready(proc, base, timeout=240)
        with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
            assert sorted(s["id"] for s in client.get("/v1/streams").json()["data"]) == sorted(ids)
            for k, sid in enumerate(ids):
                r = client.post("/v1/chat/completions", json={"model": sid, "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.headers["x-vstream-replica"] == "replica-1", r.text
                assert r.json()["vstream"]["stream_time"] == 10.0 * k + 1.0, "its memory came back"
    finally:
        stop(proc)


def _jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), value, np.uint8)).save(out, format="JPEG")
    return out.getvalue()

