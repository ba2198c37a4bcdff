"""Helpers shared by test files: the `vstream` command in a subprocess or in this process, a real uvicorn on a free
port, bounded waits on a stream or a `vstream serve` subprocess, the error-object check, a hook that slows the
running server's engine, a snapshot with a corrupted memory, prompts juggled through a batched decoder's slots, a
block free of host synchronisation, GStreamer's RTSP server as a subprocess, and a cluster on a local Ray instance
behind its ingress. No fixtures here (shared ones live in conftest.py) and no tests; no test module imports another."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}  # the headers of a client holding KEY
DEADLINE_S = 20.0
SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


def vstream_cli(*args, stdin: str | None = None, timeout: float = 180, env: dict | None = None,
                preexec_fn=None, module: str = "vstream") -> subprocess.CompletedProcess:
    """`python -m vstream ARGS` (or `-m MODULE`) in a subprocess (Python's warnings off, `env` added to the
    environment), its output captured as text; the exit code is the caller's to check."""
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"} | (env or {}))


def vstream_serve(*args) -> subprocess.Popen:
    """`vstream serve ARGS` as a running subprocess, stdout and stderr merged into `proc.stdout` (see `wait_ready`)."""
    return subprocess.Popen([sys.executable, "-m", "vstream", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`vstream ARGS` through the console entry point in this process: (exit code, stdout, stderr)."""
    from vstream.cli import main

    monkeypatch.setattr(sys, "argv", ["vstream", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def api_client(base: str, auth: bool = True) -> httpx.Client:
    """An HTTP client of the server at `base` (holding KEY unless `auth` is False), with the tests' deadline."""
    return httpx.Client(base_url=base, headers=AUTH if auth else None, timeout=DEADLINE_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """The base URL of `app` served by uvicorn on 127.0.0.1 in a background thread; stopped on exit."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE_S
    while not srv.started:
        assert thread.is_alive(), "uvicorn exited during startup"
        assert time.monotonic() < deadline, f"uvicorn did not start within {DEADLINE_S} s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
    assert not thread.is_alive(), "uvicorn did not stop within 10 s"


def wait_until(check, what: str, timeout: float = DEADLINE_S):
    """Poll `check` until it returns something true (returned), or fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def recv(ws, type_: str | None = None, timeout: float = DEADLINE_S) -> dict:
    """The next realtime event (of `type_`, skipping others) on a websockets sync client; every event has `type` and
    `event_id`."""
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        assert isinstance(event["type"], str) and event["event_id"].startswith("evt_"), event
        if type_ is None or event["type"] == type_:
            return event


def wait_frames(client, stream_id: str, count: int) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        view = client.get(f"/v1/streams/{stream_id}").json()
        if view["stats"]["frames_encoded"] >= count:
            return view
        assert view["state"] != "failed", view
        time.sleep(0.05)
    raise AssertionError(f"{count} frames not encoded within {DEADLINE_S} s: {view}")


def wait_ready(proc, base: str, timeout: float = 60) -> None:
    """Until a `vstream serve` subprocess answers /health/ready with 200 (it must not exit first)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


class EngineHook:
    """The running server's engine with its answer iterations slowed for a test: each `pause_s` late (so that an
    answer is surely in flight), none while `go` is clear (`held=True`), the tokens they produce counted, and the
    answers' prompts built by `prompts` when given (a model that fails, say). The engine is restored on exit."""

    def __init__(self, state, pause_s: float = 0.0, held: bool = False, prompts=None):
        self.answers, self.pause_s, self.prompts = state.engine.answers, pause_s, prompts
        self.go = threading.Event()
        if not held:
            self.go.set()
        self.tokens = 0

    def __enter__(self) -> "EngineHook":
        answers = self.answers
        run_once, take, self._model = answers.run_once, answers._take, answers.model

        def slow_run_once():
            self.go.wait(DEADLINE_S)
            pending = run_once()
            time.sleep(self.pause_s)  # blocks the engine thread: the event loop must not be that thread
            return pending

        def counting_take(request, token):
            self.tokens += 1
            take(request, token)

        answers.run_once, answers._take = slow_run_once, counting_take
        if self.prompts is not None:  # the model whose prompts go into the slots (`BatchAnswerer.prompts.model`)
            answers.model = answers.prompts.model = self.prompts
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        del self.answers.run_once, self.answers._take  # the class's methods again
        self.answers.model = self.answers.prompts.model = self._model


def nan_memory(snapshot):
    """The engine snapshot with every memory token NaN (what a corrupted memory state gives); nothing else changed."""
    import torch

    tokens = torch.full_like(snapshot.memory.tokens, math.nan)
    return dataclasses.replace(snapshot, memory=dataclasses.replace(snapshot.memory, tokens=tokens))


def prefill_in_chunks(decoder, slot: int, embeds, positions=None, chunk: int = 16) -> None:
    """Prefill `embeds` [1, S, H] into a `BatchDecoder` slot `chunk` tokens at a time (with their M-RoPE `positions`
    [3, S] when given), the last chunk marked as such."""
    embeds_ = embeds.split(chunk, dim=1)
    where = positions.split(chunk, dim=1) if positions is not None else [None] * len(embeds_)
    for k, (piece, at) in enumerate(zip(embeds_, where)):
        decoder.prefill(slot, piece, last=k == len(embeds_) - 1, positions=None if at is None else at.contiguous())


def juggle_slots(decoder, lengths: list[int], admit, on_step=None) -> dict[int, list[int]]:
    """Prompts 0, 1, ... through a `BatchDecoder`'s slots: each joins, in order, as soon as a slot is free
    (`admit(slot, i)` prefills prompt i into it); after each step every joined prompt takes its slot's token and,
    with `lengths[i]` tokens, leaves (its slot deactivated and released for the next). `on_step()` runs after each
    step. Returns each prompt's tokens."""
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}  # slot -> prompt
    waiting = list(range(len(lengths)))
    while waiting or owner:
        if waiting and decoder.cache.free_slots:
            i = waiting.pop(0)
            slot = decoder.cache.acquire()
            admit(slot, i)
            owner[slot], got[i] = i, []
        decoder.fetch()
        decoder.step()
        if on_step is not None:
            on_step()
        tokens = decoder.fetched()
        for slot, i in list(owner.items()):
            got[i].append(tokens[slot])
            if len(got[i]) == lengths[i]:
                decoder.deactivate(slot)
                decoder.cache.release(slot)
                del owner[slot]
    return got


@contextlib.contextmanager
def no_host_sync():
    """A block in which any host synchronisation with the CUDA device raises (torch's sync debug mode "error"), after
    the device has finished what came before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def rtsp_available() -> str | None:
    """Why the RTSP server cannot run here, or None when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    check = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return ("GStreamer RTSP server not importable by /usr/bin/python3 (apt-get install gir1.2-gst-rtsp-server-1.0 "
                f"gstreamer1.0-rtsp python3-gi gstreamer1.0-plugins-{{base,good,ugly}}): {probe.stderr.strip()[-300:]}")
    return None


class RtspServer:
    """`tests/rtsp_server.py` as a subprocess on `port`; `start()` waits (bounded) for its ready line."""

    def __init__(self, port: int):
        self.port, self.proc = port, None
        self.url = f"rtsp://127.0.0.1:{port}/test"

    def start(self, seconds: float = 20.0) -> "RtspServer":
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(self.port), "/test"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=seconds)
        if not (ready and ready[0].startswith("READY")):
            self.stop()
            pytest.fail(f"RTSP server on port {self.port} not ready within {seconds} s: stdout {ready}, "
                        f"stderr {self.proc.stderr.read()[-1000:]!r}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def cluster_server(replicas: int, state_dir: Path, replica_host: str | None = "127.0.0.1", **server_options):
    """(base URL of the ingress, fleet actor) of a cluster of `replicas` tiny-model replicas on a local Ray instance
    started here (2 CPUs), each replica a `create_app(**server_options)` over the shared `state_dir`, listening on
    `replica_host` (None: the node's address, as on several machines), the ingress under the same `limits` (as
    `vstream serve --ray` gives them); Ray is shut down on exit. Needs [ray]."""
    import ray

    from vstream.cluster.ingress import create_ingress
    from vstream.cluster.run import start_fleet
    from vstream.server import access

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fleet = start_fleet("tiny", state_dir, replicas, {"device": "cpu"} | server_options,
                            replica_host=replica_host)
        app = create_ingress(fleet, access.allowed_hosts(["127.0.0.1", "localhost"]), server_options.get("limits"))
        with running_server(app) as base:
            yield base, fleet
        ray.get(fleet.stop.remote())
    finally:
        ray.shutdown()
