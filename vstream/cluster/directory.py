"""The directory of a cluster: which replica owns each stream, where each replica listens, and the decisions made
from that alone: where a new stream goes (the least-loaded replica), where the streams of a dead replica go, and
which streams a draining replica must hand over.

Ownership is hard: a stream has exactly one owner or is `moving` (being restored elsewhere: requests for it wait or
get 503, they never go to another replica). Nothing here talks to Ray, to a replica or to the network; the fleet
(`vstream.cluster.fleet`) calls these methods and carries out what they decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class NoReplica(LookupError):
    """No live replica takes new streams."""


class MoveRefused(Exception):
    """A move that cannot start: `reason` is "moving", "unknown_stream", "unknown_replica" or "already_there";
    `message` names what was expected."""

    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)  # both in `args`: pickled whole when Ray sends it back to a caller
        self.reason, self.message = reason, message

    def __str__(self) -> str:
        return self.message


@dataclass
class Replica:
    """One engine replica as the directory sees it."""

    id: str
    url: str
    """Base URL of its server (http://host:port)."""
    pid: int
    """Its process id (on its node)."""
    streams: set[str] = field(default_factory=set)
    pending: int = 0
    """Streams being created on it now (placed, not yet confirmed)."""
    running: int = 0
    """Answers running or waiting on it at its last report (its queue)."""
    ttft_p95_ms: float | None = None
    """Its answers' p95 time to first token over the last minute, at its last report (None: no answer in it)."""
    alive: bool = True
    accepting: bool = True
    """False while it drains (scaling down): it keeps its streams until they move, and takes no new ones."""

    def load(self) -> tuple[int, int]:
        return len(self.streams) + self.pending, self.running

    def view(self) -> dict:
        return {"id": self.id, "url": self.url, "pid": self.pid, "alive": self.alive, "accepting": self.accepting,
                "streams": sorted(self.streams), "pending": self.pending, "running": self.running,
                "ttft_p95_ms": self.ttft_p95_ms}


class Directory:
    """Stream id -> owner replica, and the replicas. Not thread-safe: its owner (one actor) serialises the calls."""

    def __init__(self):
        self.replicas: dict[str, Replica] = {}
        self.owners: dict[str, str] = {}
        self.moving: dict[str, str] = {}
        """Stream id -> the replica it is being restored on (not answerable until `settle`)."""

    def join(self, replica_id: str, url: str, pid: int) -> None:
        if replica_id in self.replicas:
            raise ValueError(f"replica {replica_id} has already joined")
        self.replicas[replica_id] = Replica(replica_id, url, pid)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.alive]

    def place(self) -> Replica:
        """The least-loaded live replica that takes streams (fewest streams, then shortest queue, then oldest), with
        one more stream pending on it; `placed` or `unplace` must follow."""
        chosen = self._least_loaded(exclude=())
        chosen.pending += 1
        return chosen

    def placed(self, replica_id: str, stream_id: str) -> None:
        """The stream created on the replica `place` chose: it owns it now (unless that replica died meanwhile: the
        stream, never saved, died with it)."""
        replica = self.replicas[replica_id]
        replica.pending = max(0, replica.pending - 1)
        if replica.alive:
            self._own(stream_id, replica)

    def unplace(self, replica_id: str) -> None:
        """The creation that `place` was for failed: nothing is owned."""
        replica = self.replicas[replica_id]
        replica.pending = max(0, replica.pending - 1)

    def owner(self, stream_id: str) -> Replica | None:
        """The replica that owns the stream, None when it is unknown; KeyError-free. A moving stream has none yet."""
        replica_id = self.owners.get(stream_id)
        return None if replica_id is None else self.replicas[replica_id]

    def forget(self, stream_id: str) -> None:
        """The stream was deleted."""
        replica_id = self.owners.pop(stream_id, None) or self.moving.pop(stream_id, None)
        if replica_id is not None:
            self.replicas[replica_id].streams.discard(stream_id)

    def fail(self, replica_id: str) -> dict[str, str]:
        """The replica died: it owns nothing any more; each of its streams is assigned to the least-loaded live
        replica and marked moving -> {stream id: new owner id} (empty when no replica is left: the streams stay
        moving until `reassign_orphans` finds one)."""
        dead = self.replicas[replica_id]
        dead.alive = False
        for stream_id in dead.streams:
            self.owners.pop(stream_id, None)
            self.moving[stream_id] = replica_id
        dead.streams = set()
        return self.reassign_orphans()

    def reassign_orphans(self) -> dict[str, str]:
        """Assign every moving stream whose target is dead to the least-loaded live replica -> {stream: new owner}."""
        plan = {}
        for stream_id, target in sorted(self.moving.items()):
            if self.replicas[target].alive:
                continue
            try:
                replica = self._least_loaded(exclude=())
            except NoReplica:
                break
            self.moving[stream_id] = replica.id
            replica.pending += 1
            plan[stream_id] = replica.id
        return plan

    def check_move(self, stream_id: str, to: str) -> None:
        """MoveRefused when the stream cannot move to replica `to` now: it moves already, the cluster does not hold it,
        `to` is not a live replica that takes streams (the message names those that are), or `to` owns it."""
        if stream_id in self.moving:
            raise MoveRefused("moving", f"stream {stream_id} is already moving to {self.moving[stream_id]}: wait "
                              "for it to settle")
        if stream_id not in self.owners:
            raise MoveRefused("unknown_stream", f"no stream with id {stream_id!r} in the cluster: expected one of the "
                              "ids from GET /v1/streams")
        targets = sorted(r.id for r in self.replicas.values() if r.alive and r.accepting)
        if to not in targets:
            raise MoveRefused("unknown_replica", f"no live replica {to!r} that takes streams: expected one of "
                              f"{', '.join(targets)}")
        if self.owners[stream_id] == to:
            raise MoveRefused("already_there", f"stream {stream_id} is already on {to}: expected another replica")

    def begin_move(self, stream_id: str, to: str) -> str:
        """Mark an owned stream moving to replica `to` -> its old owner's id (which must release it first)."""
        source = self.owners.pop(stream_id)
        self.replicas[source].streams.discard(stream_id)
        self.moving[stream_id] = to
        self.replicas[to].pending += 1
        return source

    def settle(self, stream_id: str, ok: bool) -> None:
        """A move or restore ended: the target owns the stream (`ok`), or it is lost (its snapshot could not load)."""
        target = self.moving.pop(stream_id, None)
        if target is None:
            return
        replica = self.replicas[target]
        replica.pending = max(0, replica.pending - 1)
        if ok:
            self._own(stream_id, replica)

    def adopt_plan(self, stream_ids: list[str]) -> dict[str, str]:
        """Saved streams that no replica owns (a cluster restarting on its state directory), each assigned in turn to
        the least-loaded replica and marked moving -> {stream: replica}."""
        plan = {}
        for stream_id in stream_ids:
            if stream_id in self.owners or stream_id in self.moving:
                continue
            replica = self._least_loaded(exclude=())
            replica.pending += 1
            self.moving[stream_id] = replica.id
            plan[stream_id] = replica.id
        return plan

    def drain_plan(self, replica_id: str) -> dict[str, str]:
        """Stop placing streams on the replica -> {stream: the replica each of its streams should move to}."""
        source = self.replicas[replica_id]
        source.accepting = False
        plan = {}
        for stream_id in sorted(source.streams):
            target = self._least_loaded(exclude=(replica_id,))
            target.pending += 1  # counted while the plan is made, so the streams spread; `begin_move` counts again
            plan[stream_id] = target.id
        for target in plan.values():
            self.replicas[target].pending -= 1
        return plan

    def scale_step(self, least: int, most: int, target: int, ttft_ms: float | None = None) -> str | None:
        """The autoscaler's next step: "up" (while fewer than `most` are live) when the live replicas that take streams
        hold `target` streams or more each on average, or, with `ttft_ms`, when their answers' p95 time to first token
        (the mean over the replicas that answered in the last minute) is above `ttft_ms`; the id of the emptiest one to
        drain (while more than `least` are live) when the streams would fit in one replica fewer at half the target and
        no replica's p95 is above half of `ttft_ms`; else None. A new replica takes the new streams (placement goes to
        the least loaded); streams already placed stay with their owner unless moved."""
        serving = [r for r in self.live() if r.accepting]
        streams = sum(r.load()[0] for r in serving)
        timed = [r.ttft_p95_ms for r in serving if r.ttft_p95_ms is not None]
        slow = ttft_ms is not None and bool(timed) and sum(timed) / len(timed) > ttft_ms
        if len(serving) < least or (len(serving) < most and (streams >= target * len(serving) or slow)):
            return "up"
        calm = ttft_ms is None or all(t <= ttft_ms / 2 for t in timed)
        if len(serving) > least and calm and streams <= target * (len(serving) - 1) / 2:
            return min(serving, key=lambda r: (*r.load(), -list(self.replicas).index(r.id))).id
        return None

    def report(self, replica_id: str, running: int, ttft_p95_ms: float | None = None) -> None:
        replica = self.replicas[replica_id]
        replica.running, replica.ttft_p95_ms = running, ttft_p95_ms

    def listing(self) -> dict[str, str | None]:
        """Every stream the cluster holds -> its owner id (None while it moves)."""
        return {**dict.fromkeys(self.moving), **self.owners}

    def _own(self, stream_id: str, replica: Replica) -> None:
        self.owners[stream_id] = replica.id
        replica.streams.add(stream_id)

    def _least_loaded(self, exclude) -> Replica:
        candidates = [r for r in self.replicas.values() if r.alive and r.accepting and r.id not in exclude]
        if not candidates:
            raise NoReplica("no live replica takes new streams")
        return min(candidates, key=lambda r: (*r.load(), list(self.replicas).index(r.id)))
