"""Throughput of the cluster (`vstream serve --ray`) at several numbers of engine replicas of a model on the CPU,
through its ingress, measured from the client side on a local Ray instance started for each size
(`cluster_benchmark`, what `vstream bench cluster` runs; the [ray] extra).

For each size: S push streams are created (placed by the directory) and fed 4 frames each; then, for `seconds`, C
clients ask questions back to back (closed loop, `max_tokens` each, stream i % S) -> answers per second and their
latency; then, for `seconds`, every stream pushes timed JPEG frames (one per sampling slot, so none is skipped) as fast
as their acks come -> frames ingested per second (the owners' counts) and frames dropped; and the directory alone:
C concurrent `route` calls to the fleet actor -> calls per second. Each replica runs torch with `threads` threads. The
ingress and this client share the machine with the replicas: on 2 cores the ratio is a floor, not what separate
machines give. One server through its API is `vstream bench serve` (`vstream.loadgen`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
import uvicorn
from PIL import Image
from websockets.asyncio.client import connect as ws_connect

from vstream.cluster.ingress import create_ingress
from vstream.cluster.run import start_fleet
from vstream.stats import percentile

WARM_FRAMES = 4
"""Frames every stream is fed, and has ingested, before the question phase."""


@dataclasses.dataclass(frozen=True)
class ClusterLoad:
    """The client side of one run."""

    streams: int = 8
    """Push streams created through the ingress."""
    clients: int = 8
    """Concurrent clients asking questions back to back (and concurrent directory callers)."""
    seconds: float = 20.0
    """Length of the question phase and of the frame phase each."""
    max_tokens: int = 16
    """max_tokens of each question."""


def cluster_benchmark(replicas=(1, 2), load: ClusterLoad = ClusterLoad(), threads: int = 1,
                      model: str = "tiny") -> dict:
    """One run per count of `replicas`, and each larger run's answers/s and frames/s over the first run's."""
    runs = [run_cluster(n, load, threads, model) for n in replicas]
    base = runs[0]
    ratios = {f"{r['replicas']}/{base['replicas']}": {
        "answers_per_s": round(r["questions"]["answers_per_s"] / base["questions"]["answers_per_s"], 2),
        "frames_per_s": round(r["frames"]["ingested_per_s"] / base["frames"]["ingested_per_s"], 2)} for r in runs[1:]}
    env = {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__, "date": time.strftime("%F %T")}
    options = {"replicas": ",".join(map(str, replicas)), **dataclasses.asdict(load), "threads": threads,
               "model": model}  # the keys and order of the options the script of benchmarks/ printed
    return {"environment": env, "options": options, "runs": runs, "ratios": ratios}


def run_cluster(replicas: int, load: ClusterLoad, threads: int, model: str) -> dict:
    """One cluster of `replicas` on a fresh local Ray instance: its streams, the question, frame and directory
    phases."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as state_dir:
            t0 = time.perf_counter()
            fleet = start_fleet(model, Path(state_dir), replicas, {"device": "cpu", "max_streams": 64},
                                threads=threads)
            ready_s = time.perf_counter() - t0
            with Serving(create_ingress(fleet, None)) as base:
                result = asyncio.run(_load(base, load))
            result["directory"] = asyncio.run(_lookups(fleet, load.clients, min(load.seconds, 5.0)))
            placement = {r["id"]: len(r["streams"]) for r in ray.get(fleet.listing.remote())["replicas"]}
            ray.get(fleet.stop.remote())
    finally:
        ray.shutdown()
    return {"replicas": replicas, "ready_s": round(ready_s, 1), "streams_per_replica": placement, **result}


class Serving:
    """An app served by uvicorn on a free loopback port in a thread (the context's value is its base URL)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def _load(base: str, load: ClusterLoad) -> dict:
    """The streams created and warmed, then the question phase and the frame phase."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        ids = []
        for _ in range(load.streams):
            r = await client.post("/v1/streams", json={"source": {"type": "push"}})
            r.raise_for_status()
            ids.append(r.json()["id"])
        await asyncio.gather(*(_push(base, sid, range(WARM_FRAMES), time.monotonic() + 60) for sid in ids))
        await _settle(client, ids, WARM_FRAMES)
        questions = await _ask_loop(client, ids, load)
        before = await _encoded(client, ids)
        deadline = time.monotonic() + load.seconds
        pushed = await asyncio.gather(*(_push(base, sid, range(WARM_FRAMES, 1 << 30), deadline) for sid in ids))
        await asyncio.sleep(1.0)  # the last frames leave the owners' queues
        after = await _encoded(client, ids)
    ingested = sum(after[s][0] - before[s][0] for s in ids)
    frames = {"sent": sum(pushed), "ingested": ingested, "dropped": sum(after[s][1] - before[s][1] for s in ids),
              "ingested_per_s": round(ingested / load.seconds, 1)}
    return {"questions": questions, "frames": frames}


async def _lookups(fleet, callers: int, seconds: float) -> dict:
    """The directory alone: `callers` concurrent `route` calls to the fleet actor, back to back, as the ingress
    makes one per request -> calls per second and their latency."""
    listing = await fleet.listing.remote()
    ids = list(listing["streams"]) or ["str_0000000000000000"]
    latencies = []
    deadline = time.monotonic() + seconds

    async def caller(k: int) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await fleet.route.remote(ids[k % len(ids)])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return {"route_calls_per_s": round(len(latencies) / (time.perf_counter() - t0)),
            "latency_ms": p50_p95_ms(latencies, 2)}


async def _ask_loop(client: httpx.AsyncClient, ids: list[str], load: ClusterLoad) -> dict:
    """`load.clients` closed-loop askers for `load.seconds`: answers, their statuses, answers/s and latency."""
    latencies, statuses = [], {}
    deadline = time.monotonic() + load.seconds
    body = {"messages": [{"role": "user", "content": "What is on the screen?"}], "max_tokens": load.max_tokens}

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body | {"model": ids[i % len(ids)]})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            i += load.clients

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(load.clients)))
    wall = time.perf_counter() - t0
    return {"answers": len(latencies), "statuses": statuses, "answers_per_s": round(len(latencies) / wall, 1),
            "latency_ms": p50_p95_ms(latencies, 1)}


def p50_p95_ms(seconds: list[float], digits: int) -> dict:
    """p50 and p95 in milliseconds, nearest rank (`vstream.stats.percentile`, as every report); NaN without values."""
    ordered = sorted(seconds)
    return {f"p{round(100 * q)}": round(1000 * percentile(ordered, q), digits) if ordered else float("nan")
            for q in (0.5, 0.95)}


@functools.cache
def jpeg() -> str:
    """One random 320 x 240 JPEG frame, base64, the same for every push."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(out, "JPEG")
    return base64.b64encode(out.getvalue()).decode()


async def _push(base: str, stream_id: str, slots, deadline: float) -> int:
    """Frames at times 0, 1, 2... (one per 1-fps slot) as fast as acked, until `deadline` -> frames sent."""
    sent = 0
    async with ws_connect(base.replace("http://", "ws://") + f"/v1/realtime?stream_id={stream_id}",
                          max_size=None) as ws:
        await ws.recv()  # session.created
        for t in slots:
            if time.monotonic() >= deadline:
                break
            await ws.send(json.dumps({"type": "input_video_frame.append", "timestamp": float(t), "image": jpeg()}))
            while json.loads(await ws.recv())["type"] != "input_video_frame.ack":
                pass
            sent += 1
    return sent


async def _encoded(client: httpx.AsyncClient, ids: list[str]) -> dict[str, tuple[int, int]]:
    """Frames encoded and frames dropped so far, per stream, as its owner counts them."""
    views = [(await client.get(f"/v1/streams/{sid}")).json()["stats"] for sid in ids]
    return {sid: (v["frames_encoded"], v["frames_dropped_total"]) for sid, v in zip(ids, views)}


async def _settle(client: httpx.AsyncClient, ids: list[str], count: int) -> None:
    """Wait until every stream has ingested `count` frames (TimeoutError after 60 s)."""
    deadline = time.monotonic() + 60
    while min(v[0] for v in (await _encoded(client, ids)).values()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the first {count} frames of every stream were not ingested within 60 s")
        await asyncio.sleep(0.1)
