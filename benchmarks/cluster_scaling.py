"""Throughput of the cluster (`vstream serve --ray`) with 1 and with 2 engine replicas of the tiny model on the CPU,
through its ingress, measured from the client side on a local Ray instance this script starts for each size.

    PYTHONPATH=. python benchmarks/cluster_scaling.py --replicas 1,2 --streams 8 --clients 8 --seconds 20

For each size: S push streams are created (placed by the directory) and fed 4 frames each; then, for `--seconds`,
C clients ask questions back to back (closed loop, `max_tokens` each, stream i % S) -> answers per second and their
latency; then, for `--seconds`, every stream pushes timed JPEG frames (one per sampling slot, so none is skipped) as
fast as their acks come -> frames ingested per second (the owners' counts) and frames dropped. Each replica runs
torch with `--threads` threads. The ingress and this client share the machine with the replicas: on 2 cores the
ratio is a floor, not what separate machines give. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    runs = [run(int(n), args) for n in args.replicas.split(",")]
    base = runs[0]
    ratios = {f"{r['replicas']}/{base['replicas']}": {
        "answers_per_s": round(r["questions"]["answers_per_s"] / base["questions"]["answers_per_s"], 2),
        "frames_per_s": round(r["frames"]["ingested_per_s"] / base["frames"]["ingested_per_s"], 2)} for r in runs[1:]}
    env = {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__, "date": time.strftime("%F %T")}
    print(json.dumps({"environment": env, "options": vars(args), "runs": runs, "ratios": ratios}, indent=1))


def run(replicas: int, args) -> dict:
    """One cluster of `replicas`, its streams, the question phase and the frame phase."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as state_dir:
            t0 = time.perf_counter()
            fleet = start_fleet(args.model, Path(state_dir), replicas, {"device": "cpu", "max_streams": 64},
                                threads=args.threads)
            ready_s = time.perf_counter() - t0
            with serving(create_ingress(fleet, None)) as base:
                result = asyncio.run(load(base, args))
            result["directory"] = asyncio.run(lookups(fleet, args.clients, min(args.seconds, 5.0)))
            placement = {r["id"]: len(r["streams"]) for r in ray.get(fleet.listing.remote())["replicas"]}
            ray.get(fleet.stop.remote())
    finally:
        ray.shutdown()
    return {"replicas": replicas, "ready_s": round(ready_s, 1), "streams_per_replica": placement, **result}


class serving:
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


async def load(base: str, args) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        ids = []
        for _ in range(args.streams):
            r = await client.post("/v1/streams", json={"source": {"type": "push"}})
            r.raise_for_status()
            ids.append(r.json()["id"])
        await asyncio.gather(*(push(base, sid, range(4), time.monotonic() + 60) for sid in ids))
        await settle(client, ids, 4)
        questions = await ask_loop(client, ids, args)
        before = await encoded(client, ids)
        deadline = time.monotonic() + args.seconds
        pushed = await asyncio.gather(*(push(base, sid, range(4, 1 << 30), deadline) for sid in ids))
        await asyncio.sleep(1.0)  # the last frames leave the owners' queues
        after = await encoded(client, ids)
    ingested = sum(after[s][0] - before[s][0] for s in ids)
    frames = {"sent": sum(pushed), "ingested": ingested, "dropped": sum(after[s][1] - before[s][1] for s in ids),
              "ingested_per_s": round(ingested / args.seconds, 1)}
    return {"questions": questions, "frames": frames}


async def lookups(fleet, callers: int, seconds: float) -> dict:
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


async def ask_loop(client: httpx.AsyncClient, ids: list[str], args) -> dict:
    latencies, statuses = [], {}
    deadline = time.monotonic() + args.seconds
    body = {"messages": [{"role": "user", "content": "What is on the screen?"}], "max_tokens": args.max_tokens}

    async def worker(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body | {"model": ids[i % len(ids)]})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            i += args.clients

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(args.clients)))
    wall = time.perf_counter() - t0
    return {"answers": len(latencies), "statuses": statuses, "answers_per_s": round(len(latencies) / wall, 1),
            "latency_ms": p50_p95_ms(latencies, 1)}


def p50_p95_ms(seconds: list[float], digits: int) -> dict:
    """p50 and p95 in milliseconds, nearest rank (`vstream.stats.percentile`, as every report); NaN without values."""
    ordered = sorted(seconds)
    return {f"p{round(100 * q)}": round(1000 * percentile(ordered, q), digits) if ordered else float("nan")
            for q in (0.5, 0.95)}


FRAME = None


def jpeg() -> str:
    global FRAME
    if FRAME is None:
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)).save(out, "JPEG")
        FRAME = base64.b64encode(out.getvalue()).decode()
    return FRAME


async def push(base: str, stream_id: str, slots, deadline: float) -> int:
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


async def encoded(client: httpx.AsyncClient, ids: list[str]) -> dict[str, tuple[int, int]]:
    views = [(await client.get(f"/v1/streams/{sid}")).json()["stats"] for sid in ids]
    return {sid: (v["frames_encoded"], v["frames_dropped_total"]) for sid, v in zip(ids, views)}


async def settle(client: httpx.AsyncClient, ids: list[str], count: int) -> None:
    deadline = time.monotonic() + 60
    while min(v[0] for v in (await encoded(client, ids)).values()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the first {count} frames of every stream were not ingested within 60 s")
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    main()
