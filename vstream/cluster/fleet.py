"""The fleet: one Ray actor that holds the directory (`directory.Directory`) and the engine replicas (Ray actors
running `replica.ReplicaServer`), and carries out what the directory decides: start replicas, place and register
streams, notice a replica's death (its actor is gone) and restore its streams on the others from their snapshots,
move a stream (release -> adopt: the ingress's `POST /v1/cluster/streams/{id}/move`, or a drain), drain a replica
before it stops.

A replica is declared dead only when Ray says its actor died, never because it is slow: a slow owner keeps its
streams (its queue answers 429), since two owners of one stream would both write its snapshot.

What it does not do: handle HTTP (the ingress, `ingress`, asks it where a stream lives) or save any stream itself
(replicas save their own, in the shared state directory).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from vstream.cluster.directory import Directory, MoveRefused, NoReplica
from vstream.cluster.replica import ReplicaServer
from vstream.engine import snapshots

log = logging.getLogger("vstream.cluster")
ReplicaActor = ray.remote(max_restarts=0, max_concurrency=8, num_cpus=0)(ReplicaServer)
FLEET_NAME = "vstream-fleet"


class Fleet:
    """The directory and the replica actors of one cluster (run as the named actor `FleetActor`)."""

    def __init__(self, model_name: str, state_dir: str, options: dict, threads: int | None = 1,
                 monitor_s: float = 0.2, autoscale: tuple[int, int] | None = None, target_streams: int = 4,
                 scale_every_s: float = 10.0, gpus: int = 0, replica_host: str | None = "127.0.0.1",
                 ttft_target_ms: float | None = None):
        self.model_name, self.state_dir, self.options = model_name, state_dir, dict(options)
        self.threads, self.monitor_s = threads, monitor_s
        self.autoscale, self.target_streams, self.scale_every_s = autoscale, target_streams, scale_every_s
        self.ttft_target_ms = ttft_target_ms  # with autoscale: also add a replica while answers start slower
        self.gpus = gpus  # GPUs each replica asks Ray for (Ray then shows it that one as cuda:0)
        self.replica_host = replica_host  # None: each replica's node address (a cluster of several machines)
        self._scaling: asyncio.Task | None = None
        self._scaled_at = 0.0
        self.directory = Directory()
        self.handles: dict = {}
        self.restores: dict[str, dict] = {}  # stream id -> what its last restore took (seconds, frames)
        self._count = 0
        self._monitor: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one failover, move or drain at a time

    async def start(self, replicas: int) -> list[dict]:
        """Start `replicas` replicas, give them the saved streams no one owns, then watch them."""
        infos = await asyncio.gather(*(self.add() for _ in range(replicas)))
        plan = self.directory.adopt_plan(snapshots.stream_ids(Path(self.state_dir)))
        await asyncio.gather(*(self._restore(sid, rid) for sid, rid in plan.items()))
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        return list(infos)

    async def add(self) -> dict:
        """Start one more replica; it takes new streams at once (it has the fewest) -> its info."""
        self._count += 1
        replica_id = f"replica-{self._count}"
        options = dict(self.options) | ({"device": "cuda"} if self.gpus else {})  # its one GPU, as Ray shows it
        handle = ReplicaActor.options(num_gpus=self.gpus).remote(replica_id, self.model_name, self.state_dir, options,
                                                                 host=self.replica_host, threads=self.threads)
        info = await handle.info.remote()
        self.handles[replica_id] = handle
        self.directory.join(replica_id, info["url"], info["pid"])
        log.info("replica %s joined at %s (pid %s)", replica_id, info["url"], info["pid"])
        orphans = self.directory.reassign_orphans()  # streams of dead replicas that found no live one yet
        await asyncio.gather(*(self._restore(sid, rid) for sid, rid in orphans.items()))
        return info

    # ---------------------------------------------------------------------------------------------- routing

    async def route(self, stream_id: str) -> dict | None:
        """Where a stream's requests go: {"state": "owned", "replica", "url"}, {"state": "moving", "to": replica},
        or None."""
        owner = self.directory.owner(stream_id)
        if owner is not None:
            return {"state": "owned", "replica": owner.id, "url": owner.url}
        to = self.directory.moving.get(stream_id)
        return None if to is None else {"state": "moving", "to": to}

    async def any_replica(self) -> dict:
        live = self.directory.live()
        if not live:
            raise NoReplica("no live replica")
        return {"replica": live[0].id, "url": live[0].url}

    async def place(self) -> dict:
        replica = self.directory.place()
        return {"replica": replica.id, "url": replica.url}

    async def placed(self, replica_id: str, stream_id: str) -> None:
        """Register a new stream and have its owner save it at once (so that its death cannot lose it)."""
        self.directory.placed(replica_id, stream_id)
        try:
            await self.handles[replica_id].save.remote(stream_id)
        except RayActorError:
            await self.suspect(replica_id)

    async def unplace(self, replica_id: str) -> None:
        self.directory.unplace(replica_id)

    async def forget(self, stream_id: str) -> None:
        self.directory.forget(stream_id)

    async def listing(self) -> dict:
        return {"streams": self.directory.listing(), "replicas": [r.view() for r in self.directory.replicas.values()],
                "restores": dict(self.restores)}

    # ---------------------------------------------------------------------------------------------- failure

    async def suspect(self, replica_id: str) -> bool:
        """A caller could not reach the replica: fail it over if its actor is dead -> whether it was."""
        replica = self.directory.replicas.get(replica_id)
        if replica is None or not replica.alive:
            return True
        try:
            await self.handles[replica_id].load.remote()
        except RayActorError:
            await self._failover(replica_id)
            return True
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_s)
            await asyncio.gather(*(self._probe(r.id) for r in self.directory.live()))
            self._autoscale()

    async def _probe(self, replica_id: str) -> None:
        """Read a replica's queue; fail it over if its actor died (a slow answer is no death: it keeps its streams)."""
        try:
            load = await asyncio.wait_for(self.handles[replica_id].load.remote(), timeout=10)
        except RayActorError:
            await self._failover(replica_id)
            return
        except TimeoutError:
            log.warning("replica %s did not report its load within 10 s", replica_id)
            return
        self.directory.report(replica_id, load["running"], load.get("ttft_p95_ms"))

    def _autoscale(self) -> None:
        """One step of the autoscaler (at most one running, one per `scale_every_s`): add a replica, or drain one."""
        busy = self._scaling is not None and not self._scaling.done()
        if self.autoscale is None or busy or time.monotonic() - self._scaled_at < self.scale_every_s:
            return
        step = self.directory.scale_step(*self.autoscale, self.target_streams, self.ttft_target_ms)
        if step is None:
            return
        log.info("autoscaler: %s", "adding a replica" if step == "up" else f"draining {step}")
        self._scaled_at = time.monotonic()
        self._scaling = asyncio.get_running_loop().create_task(self.add() if step == "up" else self.drain(step))

    async def _failover(self, replica_id: str) -> None:
        async with self._lock:
            if not self.directory.replicas[replica_id].alive:
                return
            plan = self.directory.fail(replica_id)
            log.warning("replica %s died: restoring %d streams elsewhere", replica_id, len(plan))
            await asyncio.gather(*(self._restore(sid, rid) for sid, rid in plan.items()))

    async def _restore(self, stream_id: str, replica_id: str) -> str | None:
        """Have the replica adopt the stream from its snapshot -> None, or why it did not (logged)."""
        t0 = time.perf_counter()
        try:
            restored = await self.handles[replica_id].adopt.remote(stream_id)
        except RayActorError:
            log.error("replica %s died while restoring stream %s", replica_id, stream_id)
            return f"replica {replica_id} died while restoring it"  # still moving: the next failover reassigns it
        except Exception as exc:  # its snapshot cannot load (corrupt, missing): it is lost, reported  # noqa: BLE001
            log.error("stream %s could not be restored on %s: %s", stream_id, replica_id, exc)
            self.directory.settle(stream_id, ok=False)
            return f"its snapshot could not be loaded on {replica_id}: {exc}"
        self.directory.settle(stream_id, ok=True)
        self.restores[stream_id] = {"replica": replica_id, "seconds": round(time.perf_counter() - t0, 3),
                                    "frames": restored["frames"], "stream_time": restored["stream_time"]}
        return None

    # ---------------------------------------------------------------------------------------------- moves

    async def move(self, stream_id: str, to: str) -> dict:
        """Drain -> snapshot -> restore: the owner ends the stream's sockets, saves the stream with every frame it took
        and closes it (`ReplicaServer.release`), `to` adopts it -> {"replica", "from", "seconds", "frames",
        "stream_time"} (what the restore took). MoveRefused when it cannot start (`Directory.check_move`),
        RuntimeError when the restore failed (the stream is lost, or restored elsewhere once `to` is failed over)."""
        self.directory.check_move(stream_id, to)  # at once, not after the move or failover in progress
        async with self._lock:
            self.directory.check_move(stream_id, to)
            source = self.directory.begin_move(stream_id, to)
            try:
                await self.handles[source].release.remote(stream_id)
            except RayActorError:  # its owner died: the stream comes from its last snapshot (the failover skips it)
                log.error("replica %s died while releasing stream %s: its last snapshot moves", source, stream_id)
            failed = await self._restore(stream_id, to)
            if failed is not None:
                raise RuntimeError(f"stream {stream_id} did not move to {to}: {failed}")
            return {**self.restores[stream_id], "from": source}

    async def drain(self, replica_id: str) -> None:
        """Scale down: move every stream of the replica to the others, then stop it (never killed with streams)."""
        for stream_id, target in self.directory.drain_plan(replica_id).items():
            try:
                await self.move(stream_id, target)
            except (MoveRefused, RuntimeError) as exc:  # deleted or moved since the plan was made, or lost: logged
                log.warning("drain of %s: stream %s not moved: %s", replica_id, stream_id, exc)
        await self.handles[replica_id].stop.remote()
        self.directory.replicas[replica_id].alive = False
        ray.kill(self.handles.pop(replica_id))

    async def stop(self) -> None:
        """Stop every replica (each saves its streams at shutdown); the directory keeps them for the next start."""
        if self._monitor is not None:
            self._monitor.cancel()
        live = [r.id for r in self.directory.live()]
        await asyncio.gather(*(self.handles[rid].stop.remote() for rid in live), return_exceptions=True)

    async def save(self, stream_id: str) -> bool:
        """Have the stream's owner write its snapshot now -> whether it did."""
        owner = self.directory.owner(stream_id)
        return owner is not None and await self.handles[owner.id].save.remote(stream_id)


FleetActor = ray.remote(num_cpus=0, max_restarts=0)(Fleet)
