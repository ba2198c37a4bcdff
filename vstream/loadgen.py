# size: the whole client of `vstream bench serve` (server, push streams, SSE questions, health polls, summary)
"""`vstream bench serve`: load on a vstream server as its users meet it, measured from the client side.

N push streams over `WS /v1/realtime`, each sending real JPEG frames (a moving scene, so the memory changes) at a
given rate as binary messages, and questions over `POST /v1/chat/completions` (SSE) at a given rate per stream,
staggered across streams, and optionally N watches per stream (`POST /v1/streams/{id}/watches`, every_s=1). It reports
the time to the first content chunk and to `[DONE]`, HTTP statuses, frames sent and the server's own
received/ingested/dropped counts, the watches' evaluations and events (from their views) and the server's watch
scoring time (`vstream:watch_tick_seconds` of /metrics over the question window), `/health/live` latency polled during
the load, and the server's resident memory when it started the server itself (`LocalServer`: `python -m vstream serve`
on a free loopback port, stopped with SIGTERM).

It knows nothing about models and imports nothing of the server: it talks HTTP and WebSocket only, on one asyncio
event loop for all streams, directly (proxy settings of the environment are ignored). Load is open-loop: a question
or a frame goes out at its time whether or not the previous one has been answered, so a server that falls behind
shows it as latency, 429s or dropped frames rather than as a slower client.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import httpx
import websockets
from PIL import Image
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from vstream.bench import summary
from vstream.errors import ServiceError, UserInputError, VStreamError

HEALTH_EVERY_S = 0.5
WATCH_CONDITIONS = ("a red circle appears", "a blue square appears", "a green triangle appears", "something moves",
                    "the background changes", "a yellow disc leaves", "a white square turns purple", "two shapes touch")
"""The conditions of a stream's watches, in turn (the load is the scoring, not what the conditions say)."""
SETTLE_S = 10.0  # after the load: how long to wait for frames still queued in the server to be ingested or dropped


@dataclass
class LoadConfig:
    """What the client does; every field is reported with the results."""

    streams: int = 2
    """Push streams opened at once, one realtime socket each."""
    fps: float = 1.0
    """Frames sent per second on each stream."""
    seconds: float = 20.0
    """Duration of the measured load (questions and health polls), after the warm-up."""
    question_every: float = 20.0
    """Seconds between one stream's questions; streams are staggered by question_every / streams."""
    max_tokens: int = 32
    """max_tokens of each question."""
    frame_size: tuple[int, int] = (640, 480)
    """Width and height of the JPEG frames."""
    warmup: float = 2.0
    """Seconds of frames only, before the first question."""
    question: str = "What is happening on the screen?"
    """The question every stream asks."""
    answer_timeout: float = 120.0
    """Seconds a question may take, from sending it to [DONE]."""
    watches: int = 0
    """Watches set on each stream (every_s=1) before the frames start, on top of the questions."""
    watch_escalate_margin: float | None = None
    """escalate_margin of each watch (None: the server's default)."""


def stats(values_s: list[float]) -> dict:
    """p50 (median), p95 (nearest rank) and count of seconds as milliseconds, by `vstream.bench.summary`, plus max."""
    out = summary([v * 1000 for v in values_s])
    return (out | {"max_ms": round(max(values_s) * 1000, 4)}) if values_s else out


def jpeg_frames(size: tuple[int, int], count: int, fps: float) -> list[bytes]:
    """`count` JPEGs of a scene of moving shapes (a loop the streams replay from different phases)."""
    from vstream.synth.clips import moving_shapes

    out = []
    for frame in moving_shapes(count, size[0], size[1], seed=7, fps=fps):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def raise_open_files(streams: int) -> int:
    """Raise this process's soft limit on open files to the hard limit (a local server inherits it): each stream
    holds a socket, each question in flight another. Returns the limit; UserInputError when it is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    except (ValueError, OSError):  # a hard limit of "unlimited" is above what the kernel takes: keep the soft one
        pass
    needed = 2 * streams + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise UserInputError(f"{streams} streams need about {needed} open files, but the limit is {soft} "
                             "(raise it with `ulimit -n`)")
    return soft


# ------------------------------------------------------------------------------------------------- local server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`python -m vstream serve` as a subprocess on a free loopback port: started, waited for, measured, stopped.

    The server's output is read by a thread and its last lines kept for error messages (it is not printed: the access
    log of a load test is long)."""

    def __init__(self, model: str, device: str, max_streams: int, api_key: str | None = None,
                 start_timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vstream", "serve", "--model", model, "--device", device, "--host", "127.0.0.1",
               "--port", str(self.port), "--max-streams", str(max_streams)]
        env = {k: v for k, v in os.environ.items() if k != "VSTREAM_API_KEY"}  # a key only when we pass one
        if api_key:
            env["VSTREAM_API_KEY"] = api_key  # by the environment: not in the process list
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        self._wait_ready(start_timeout)
        self.start_s = time.perf_counter() - t0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceError(f"the server exited with code {self.proc.returncode} before it was ready:\n"
                                       f"{self.log_tail()}")
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:  # not listening yet
                    pass
                time.sleep(0.1)
        self.stop()
        raise ServiceError(f"the server was not ready within {timeout:g} s:\n{self.log_tail()}")

    def memory(self) -> dict:
        """Resident memory now and its peak (VmRSS, VmHWM of /proc/PID/status), in bytes, and the CPU seconds the
        process has used (`cpu_s`: user + system of /proc/PID/stat)."""
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = int(value.split()[0]) * 1024  # reported in kB
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except FileNotFoundError:  # the process has gone
            pass
        return out

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGTERM (the server drains, then exits), SIGKILL after `timeout`; the exit code and seconds taken."""
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return {"exit_code": self.proc.returncode, "stop_s": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------------- one stream


class PushStream:
    """One realtime socket with a push stream of its own: frames out on a schedule, acknowledgements in."""

    def __init__(self, index: int, ws, session: dict):
        self.index, self.ws = index, ws
        self.stream_id, self.stream_fps = session["stream_id"], session["fps"]
        self.sent = self.acks = self.accepted = 0
        self.last_counts = {"received": 0, "ingested": 0, "dropped": 0}  # the stream's, from the latest ack
        self.errors: collections.Counter = collections.Counter()
        self.send_lag_s: list[float] = []
        self.closing = False  # set by the client before it closes the socket at the end
        self.closed: str | None = None  # how the server closed it before that
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                event = json.loads(message)
                if event["type"] == "input_video_frame.ack":
                    self.acks += 1
                    self.accepted += bool(event["accepted"])
                    self.last_counts = {k: event[k] for k in self.last_counts}
                elif event["type"] == "error":
                    self.errors[event["error"].get("code") or event["error"].get("type")] += 1
        except ConnectionClosed:  # a close other than 1000/1001; both kinds are recorded below
            pass
        self._closed()

    def _closed(self) -> None:
        if self.closing or self.closed is not None:
            return
        got, sent = self.ws.protocol.close_rcvd, self.ws.protocol.close_sent  # a client echoes the server's close
        self.closed = (f"server {got.code} {got.reason}" if got is not None else
                       f"client {sent.code} {sent.reason}" if sent is not None else "1006 without a close frame")

    async def send_frames(self, frames: list[bytes], t0: float, end: float, fps: float, phase: float) -> None:
        """Frame k at t0 + (k + phase) / fps until `end` (loop clock); a late frame goes out at once, its lag kept."""
        loop = asyncio.get_running_loop()
        k = 0
        while (due := t0 + (k + phase) / fps) < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.send_lag_s.append(max(0.0, loop.time() - due))
            try:
                await self.ws.send(frames[(k + self.index * 7) % len(frames)])
            except ConnectionClosed:
                self._closed()
                return
            self.sent += 1
            k += 1


async def open_stream(index: int, ws_url: str, headers: dict) -> PushStream | int | str:
    """A PushStream, or the HTTP status that refused the handshake, or the error text."""
    try:
        # no keepalive pings of the client: a slow server's pongs would close sockets on the client's rule (the
        # server pings on its own); no compression of JPEGs
        ws = await ws_connect(ws_url, additional_headers=headers, compression=None, proxy=None, open_timeout=30,
                              ping_interval=None, max_size=1 << 20)
    except InvalidStatus as exc:
        return exc.response.status_code
    except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    except (ConnectionClosed, asyncio.TimeoutError) as exc:
        return f"no session.created: {type(exc).__name__}: {exc}"
    if event.get("type") != "session.created":
        await ws.close()
        return f"expected session.created first, got {event.get('type')!r}"
    return PushStream(index, ws, event["session"])


# ------------------------------------------------------------------------------------------------- questions


async def ask(http: httpx.AsyncClient, stream: PushStream, cfg: LoadConfig, at_s: float) -> dict:
    """One streamed question: status, and seconds from sending it to the response headers, the first content chunk
    and `[DONE]` (None where it never came); content chunks and characters; an error code sent inside the SSE."""
    body = {"model": stream.stream_id, "messages": [{"role": "user", "content": cfg.question}], "stream": True,
            "max_tokens": cfg.max_tokens}
    rec = {"stream": stream.index, "at_s": round(at_s, 3), "status": None, "headers_s": None, "first_chunk_s": None,
           "done_s": None, "chunks": 0, "chars": 0, "visible_chars": 0, "error": None}
    t0 = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            rec["status"], rec["headers_s"] = r.status_code, time.perf_counter() - t0
            if r.status_code != 200:
                rec["error"] = _error_code(await r.aread())
                return rec
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    _sse_data(rec, line[6:], time.perf_counter() - t0)
    except httpx.HTTPError as exc:  # no response, or the body broke off: no status, or a 200 without [DONE]
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return rec


def _sse_data(rec: dict, data: str, now_s: float) -> None:
    if data == "[DONE]":
        rec["done_s"] = now_s
        return
    chunk = json.loads(data)
    if "error" in chunk:  # the generation failed after the 200
        rec["error"] = chunk["error"].get("code") or chunk["error"].get("message")
        return
    delta = chunk["choices"][0]["delta"]
    content = delta.get("content") or ""
    if "role" in delta or not content:  # the role chunk (sent before any token), the stop chunk
        return
    if rec["first_chunk_s"] is None:
        rec["first_chunk_s"] = now_s
    rec["chunks"] += 1
    rec["chars"] += len(content)
    rec["visible_chars"] += len(content.strip())


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body)["error"]
        return error.get("code") or error.get("type")
    except (ValueError, KeyError, TypeError):
        return body[:80].decode(errors="replace")


async def ask_on_schedule(http, stream: PushStream, cfg: LoadConfig, start: float, end: float, phase: float,
                          t0: float) -> list[dict]:
    """Question k of this stream at start + (k + phase) * question_every, open-loop, until `end`."""
    loop = asyncio.get_running_loop()
    tasks, k = [], 0
    while (due := start + (k + phase) * cfg.question_every) < end:
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(ask(http, stream, cfg, loop.time() - t0)))
        k += 1
    return list(await asyncio.gather(*tasks))


def question_summary(records: list[dict]) -> dict:
    statuses = collections.Counter()
    for r in records:
        statuses[str(r["status"]) if r["status"] in (200, 429, 503) else
                 ("other" if r["status"] is not None else "no_response")] += 1
    ok = [r for r in records if r["status"] == 200]
    done = [r for r in ok if r["done_s"] is not None and r["error"] is None]
    first = [r["first_chunk_s"] for r in ok if r["first_chunk_s"] is not None]
    return {
        "sent": len(records),
        "status": {k: statuses.get(k, 0) for k in ("200", "429", "503", "other", "no_response")},
        "completed": len(done),
        "failed_after_200": len(ok) - len(done),  # an error inside the SSE, or the body broke off before [DONE]
        "no_content_chunk": sum(r["chunks"] == 0 for r in done),
        "no_visible_text": sum(r["visible_chars"] == 0 for r in done),
        "errors": dict(collections.Counter(r["error"] for r in records if r["error"] is not None)),
        "first_chunk_ms": stats(first),
        "done_ms": stats([r["done_s"] for r in done]),
        "headers_ms": stats([r["headers_s"] for r in records if r["headers_s"] is not None]),
        "chunks_per_answer": round(sum(r["chunks"] for r in done) / len(done), 2) if done else None,
        "records": [r | {k: round(r[k], 4) for k in ("headers_s", "first_chunk_s", "done_s") if r[k] is not None}
                    for r in records],
    }


# ------------------------------------------------------------------------------------------------- the run


async def poll_health(url: str, end: float, memory) -> tuple[list[float], int, list[dict]]:
    """GET /health/live every HEALTH_EVERY_S until `end` on a connection of its own: latencies, failures, and the
    server's memory sampled at each poll (when `memory` can read it)."""
    loop = asyncio.get_running_loop()
    latencies, failures, samples = [], 0, []
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        while loop.time() < end:
            t0 = time.perf_counter()
            try:
                ok = (await client.get("/health/live")).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            failures += not ok
            if memory is not None:
                samples.append(memory())
            await asyncio.sleep(max(0.0, HEALTH_EVERY_S - (time.perf_counter() - t0)))
    return latencies, failures, samples


async def server_counts(http: httpx.AsyncClient, streams: list[PushStream]) -> list[dict]:
    """Each stream's received/ingested/dropped from GET /v1/streams/{id}, once nothing is left queued in the server
    (or after SETTLE_S). A stream the server closed and deleted during the load counts its last ack's figures (its
    latest frame may still have been queued then)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        views = await asyncio.gather(*(http.get(f"/v1/streams/{s.stream_id}") for s in streams))
        counts = []
        for s, view in zip(streams, views):
            if view.status_code == 404:  # closed by the server and deleted with its socket: its last ack's counts
                counts.append(s.last_counts | {"gone": True})
                continue
            view.raise_for_status()
            st = view.json()["stats"]
            counts.append({"received": st["frames_pushed"], "ingested": st["frames_encoded"],
                           "dropped": st["frames_dropped_total"], "gone": False})
        settled = all(c["gone"] or c["received"] == c["ingested"] + c["dropped"] for c in counts)
        if settled or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def gpu_memory(http: httpx.AsyncClient) -> tuple[int | None, str]:
    """GPU memory from the server's /metrics (a `vstream:gpu_memory*` sample), or None and why."""
    r = await http.get("/metrics")
    if r.status_code != 200:
        return None, f"/metrics answered {r.status_code}"
    for line in r.text.splitlines():
        if line.startswith("vstream:gpu_memory") and not line.startswith("#"):
            return int(float(line.split()[-1])), line.split()[0]
    return None, "the server's /metrics exports no vstream:gpu_memory* metric"


async def _at(at: float, read):
    await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
    return read()


async def engine_busy(http: httpx.AsyncClient, at: float | None = None) -> dict[str, float]:
    """The engine's busy seconds by kind of work from /metrics (`vstream:engine_busy_seconds_total`), read at loop
    time `at` (now when None); {} when the server exports none."""
    if at is not None:
        await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
    r = await http.get("/metrics")
    busy = {}
    for line in r.text.splitlines() if r.status_code == 200 else ():
        if line.startswith("vstream:engine_busy_seconds_total{"):
            busy[line.split('"')[1]] = float(line.split()[-1])
    return busy


async def watch_metrics(http: httpx.AsyncClient, at: float | None = None) -> dict:
    """The server's watch figures from /metrics (`vstream:watch_*`: tick count and seconds, streams scored,
    evaluations by how they ended), read at loop time `at` (now when None); {} when it exports none yet."""
    if at is not None:
        await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
    r = await http.get("/metrics")
    out: dict = {}
    for line in r.text.splitlines() if r.status_code == 200 else ():
        name, _, value = line.partition(" ")
        if name.startswith("vstream:watch_evaluations_total{"):
            out.setdefault("evaluations", {})[name.split('"')[1]] = float(value)
        elif name in ("vstream:watch_tick_seconds_count", "vstream:watch_tick_seconds_sum",
                      "vstream:watch_streams_scored_total"):
            out[name.removeprefix("vstream:watch_")] = float(value)
    return out


async def add_watches(http: httpx.AsyncClient, streams: list[PushStream], cfg: LoadConfig) -> dict[str, int]:
    """`cfg.watches` watches on each stream, all at once: the answers' statuses (or errors) by count."""
    async def one(stream: PushStream, k: int) -> str:
        body: dict = {"condition": WATCH_CONDITIONS[k % len(WATCH_CONDITIONS)], "every_s": 1.0}
        if cfg.watch_escalate_margin is not None:
            body["escalate_margin"] = cfg.watch_escalate_margin
        try:
            r = await http.post(f"/v1/streams/{stream.stream_id}/watches", json=body)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return str(r.status_code)

    return dict(collections.Counter(await asyncio.gather(*(one(s, k) for s in streams for k in range(cfg.watches)))))


async def watch_summary(http: httpx.AsyncClient, streams: list[PushStream], statuses: dict[str, int], before: dict,
                        window_s: float) -> dict:
    """The watches' figures: created and refused, their evaluations (cheap, escalated) and events from their views,
    and the server's watch ticks over the question window (`before`: `watch_metrics` at its start)."""
    views = await asyncio.gather(*(http.get(f"/v1/streams/{s.stream_id}/watches") for s in streams))
    watches = [w for v in views if v.status_code == 200 for w in v.json()["data"]]
    total = lambda key: sum(w[key] for w in watches)  # noqa: E731
    after = await watch_metrics(http)
    delta = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    ticks, tick_s, scored = delta("tick_seconds_count"), delta("tick_seconds_sum"), delta("streams_scored_total")
    earlier = before.get("evaluations", {})
    evaluations = {k: int(v - earlier.get(k, 0.0)) for k, v in after.get("evaluations", {}).items()}
    server = {"ticks": int(ticks), "tick_ms_mean": round(1e3 * tick_s / ticks, 3) if ticks else None,
              "ms_per_stream_scored": round(1e3 * tick_s / scored, 3) if scored else None,
              "busy_share": round(tick_s / window_s, 4), "evaluations": evaluations} if after else None
    return {"per_stream": len(watches) / len(streams), "created": statuses.get("201", 0),
            "refused": {k: v for k, v in statuses.items() if k != "201"}, "seen": len(watches),
            "evaluations": total("evaluations"), "cheap": total("cheap_evaluations"),
            "escalated": total("escalated_evaluations"), "events": total("events"),
            "failing": sum(bool(w["failures"]) for w in watches), "server": server}


async def run_load(url: str, cfg: LoadConfig, api_key: str | None = None, memory=None) -> dict:
    """The load on the server at `url`; `memory()`: the server's resident memory (LocalServer.memory), or None."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    frames = await asyncio.to_thread(jpeg_frames, cfg.frame_size, 60, cfg.fps)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.streams + 8)
    timeout = httpx.Timeout(cfg.answer_timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits,
                                 trust_env=False) as http:
        ready = await http.get("/health/ready")
        if ready.status_code != 200:
            raise ServiceError(f"{url}/health/ready answered {ready.status_code}: expected 200 from a ready vstream "
                               f"server, got {ready.text[:200]!r}")
        ready = ready.json()
        t_open = time.perf_counter()
        ws_url = url.replace("http", "ws", 1) + "/v1/realtime"
        opened = await asyncio.gather(*(open_stream(i, ws_url, headers) for i in range(cfg.streams)))
        open_s = time.perf_counter() - t_open
        streams = [s for s in opened if isinstance(s, PushStream)]
        refused = collections.Counter(str(s) for s in opened if not isinstance(s, PushStream))
        if not streams:
            hint = ": the server needs a key (--api-key)" if "401" in refused else ""
            raise ServiceError(f"no push stream could be opened on {ws_url}: refused {dict(refused)}{hint}")
        try:
            statuses = await add_watches(http, streams, cfg) if cfg.watches else {}
            result = await _measure(http, url, cfg, streams, frames, memory, statuses)
        finally:
            for s in streams:
                s.closing = True
            await asyncio.gather(*(s.ws.close() for s in streams))
            await asyncio.gather(*(s.reader for s in streams))
        result["streams"] = {"requested": cfg.streams, "opened": len(streams), "refused": dict(refused),
                             "open_all_s": round(open_s, 3),
                             "closed_early": dict(collections.Counter(s.closed for s in streams if s.closed)),
                             "gone_at_end": result["frames"].pop("gone_at_end")}
        result["server"] = {"model": ready.get("model"), "warmup_s": ready.get("warmup_s"),
                            "auth_required": ready.get("auth_required")}
        result["frames"]["jpeg_bytes_mean"] = round(sum(map(len, frames)) / len(frames))
        return result


async def _measure(http, url: str, cfg: LoadConfig, streams: list[PushStream], frames, memory,
                   watch_statuses: dict[str, int]) -> dict:
    """Frames from t0, questions from t0 + warmup, both until t0 + warmup + seconds; then the server's counts (and
    the watches' figures when there are watches)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    start, end = t0 + cfg.warmup, t0 + cfg.warmup + cfg.seconds
    n = len(streams)
    # staggered by position among the opened streams (a refused stream leaves no gap in the schedule)
    senders = [asyncio.create_task(s.send_frames(frames, t0, end, cfg.fps, i / n)) for i, s in enumerate(streams)]
    askers = [asyncio.create_task(ask_on_schedule(http, s, cfg, start, end, i / n, t0)) for i, s in enumerate(streams)]
    health = asyncio.create_task(poll_health(url, end, memory))
    busy_start = asyncio.create_task(engine_busy(http, start))
    cpu_start = asyncio.create_task(_at(start, memory or dict))
    watch_start = asyncio.create_task(watch_metrics(http, start)) if cfg.watches else None
    await asyncio.gather(*senders)
    records = [r for rs in await asyncio.gather(*askers) for r in rs]
    latencies, failures, samples = await health
    counts = await server_counts(http, streams)
    busy_end, busy0 = await engine_busy(http), await busy_start
    window = loop.time() - start
    watches = await watch_summary(http, streams, watch_statuses, await watch_start, window) if watch_start else None
    gpu, gpu_note = await gpu_memory(http)
    total = lambda key: sum(c[key] for c in counts)  # noqa: E731
    frames_out = {
        "sent": sum(s.sent for s in streams), "acknowledged": sum(s.acks for s in streams),
        "accepted": sum(s.accepted for s in streams), "received": total("received"),
        "ingested": total("ingested"), "dropped": total("dropped"),
        "queued_at_end": total("received") - total("ingested") - total("dropped"),
        "stream_fps": sorted({s.stream_fps for s in streams}), "gone_at_end": sum(c["gone"] for c in counts),
        "errors": dict(sum((s.errors for s in streams), collections.Counter())),
        "send_lag_ms": stats([lag for s in streams for lag in s.send_lag_s]),
    }
    rss = [m["VmRSS"] for m in samples if "VmRSS" in m]
    end_memory = memory() if memory is not None else {}
    cpu0 = (await cpu_start).get("cpu_s")
    return {
        "duration_s": round(loop.time() - t0, 3),
        "frames": frames_out,
        "questions": question_summary(records),
        "watches": watches,
        "health_live": {"ms": stats(latencies), "failures": failures, "every_s": HEALTH_EVERY_S},
        # the share of the question window the engine thread spent on each kind of work (the rest: waiting for work)
        # CPU cores the server process kept busy over the question window (all its threads; None with --url)
        "server_cpu_cores": round((end_memory["cpu_s"] - cpu0) / window, 2) if cpu0 is not None else None,
        "engine_busy": {k: round((v - busy0.get(k, 0.0)) / window, 3) for k, v in busy_end.items()},
        "server_memory": {"rss_bytes_max_sampled": max(rss) if rss else None,
                          "rss_bytes_end": end_memory.get("VmRSS"),
                          # the kernel updates VmHWM lazily: a sampled VmRSS can exceed a later VmHWM
                          "rss_bytes_peak": max(rss + [end_memory["VmHWM"]]) if "VmHWM" in end_memory else None,
                          "gpu_bytes": gpu, "gpu_note": gpu_note},
    }


def bench_serve(cfg: LoadConfig, url: str | None = None, api_key: str | None = None, model: str = "tiny",
                device: str = "auto", start_timeout: float = 600.0) -> dict:
    """The whole benchmark: start a local server (unless `url`), run the load, stop the server; one dict with what it
    ran on, the options and the figures."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    open_files = raise_open_files(cfg.streams)
    server = None if url else LocalServer(model, device, cfg.streams, api_key, start_timeout)
    cpu0 = time.process_time()
    try:
        result = asyncio.run(run_load(url or server.url, cfg, api_key, server.memory if server else None))
    except httpx.TransportError as exc:
        raise ServiceError(f"could not reach the server at {url or server.url}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if server is None:
            raise
        failed = isinstance(exc, (VStreamError, httpx.HTTPError, WebSocketException, OSError, TimeoutError))
        raise (ServiceError if failed else RuntimeError)(  # a bug of ours keeps its traceback, with the server's log
            f"{type(exc).__name__}: {exc}\nserver log:\n{server.log_tail()}") from exc
    finally:
        stopped = server.stop() if server is not None else None
    cpu_s = time.process_time() - cpu0
    result["server"] |= {"url": url or server.url, "local": server is not None,
                         "device": device if server is not None else None,
                         "start_to_ready_s": round(server.start_s, 3) if server else None, "stop": stopped}
    client = {"python": sys.version.split()[0], "httpx": httpx.__version__, "websockets": websockets.__version__,
              "open_files_limit": open_files,
              # the load generator's own CPU share: near 1 means the client, not the server, set the pace
              "cpu_s": round(cpu_s, 3), "cpu_per_wall_s": round(cpu_s / result["duration_s"], 3)}
    options = asdict(cfg) | {"frame_size": f"{cfg.frame_size[0]}x{cfg.frame_size[1]}"}
    head = {"date": started, "server": result.pop("server"), "options": options, "client": client,
            "streams": result.pop("streams")}
    return head | result
