"""The server's side of watches: each stream's `WatchBoard` (its watches and its event feed) and the `Watcher`
thread that evaluates them.

`EventFeed` is a bounded in-memory ring of a stream's events, each with an id that increases by one (the SSE `id:`
and `Last-Event-ID`); readers poll it with `since(last_id)`, so a reader that fell more than the ring behind misses
the oldest events (it can tell: the first id it gets is not `last_id + 1`). The `Watcher` wakes every `tick_s`, takes
each stream's latest snapshot and the watches due on it, and scores the due watches of ALL streams in one call on the
engine thread (`Engine.call`; `vstream.engine.watches.evaluate_streams` with `vstream.model.yesno.scorer`: the recent
parts first, then the full memories where a recent score came near its band; conditions over one memory share its
prefix, the others are batched across streams, at most `prompts_per_forward` prompts a forward), waiting for it off
the event loop. A stream whose snapshot or scores fail fails only its own watches, which back off. Events go to the
stream's feed, from which the SSE route and every realtime socket of the stream read; a `watch.triggered` event carries
`thumbnail_url`, the stream's frame route (`GET /v1/streams/{id}/frames?t=...`, relative to the server) for the kept
thumbnail nearest its stream time (null when none is kept within `THUMBNAIL_WITHIN_S`).

The Watcher counts evaluations by how they ended and times each tick's engine call (read by `/metrics`). Events of a
watch with a webhook are handed to the server's `WebhookSender` (`webhooks`), which delivers them on its own threads.
A board's `state()` (watches and feed) is saved with a durable stream and `load`ed on restore.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from vstream.engine.watches import ESCALATED, FAILED, FULL, RECENT, TRIGGERED, Watch, evaluate_streams
from vstream.model.yesno import PROMPTS_PER_FORWARD, scorer
from vstream.server.metrics import WATCH_TICK_BUCKETS, Histogram

log = logging.getLogger("vstream.server")
THUMBNAIL_WITHIN_S = 2.0
"""A trigger links the kept thumbnail nearest its stream time only if it is at most this far from it."""


class EventFeed:
    """A stream's last `size` events, each a dict with an increasing integer `id`. Thread-safe."""

    def __init__(self, size: int = 256):
        self._ring: deque[dict] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.last_id = 0

    def publish(self, event: dict) -> dict:
        with self._lock:
            self.last_id += 1
            event = {"id": self.last_id, "created": round(time.time(), 3), **event}
            self._ring.append(event)
        return event

    def state(self) -> dict:
        with self._lock:
            return {"last_id": self.last_id, "events": list(self._ring)}

    def load(self, state: dict) -> None:
        """Take back a saved feed: its ids go on from the saved last one, its kept events are served again."""
        with self._lock:
            self._ring.clear()
            self._ring.extend(state["events"])
            self.last_id = int(state["last_id"])

    def since(self, last_id: int) -> list[dict]:
        """The kept events with an id above `last_id`, oldest first."""
        with self._lock:
            return [e for e in self._ring if e["id"] > last_id]


@dataclass
class WatchBoard:
    """A stream's watches (by id, in creation order) and its event feed."""

    watches: dict[str, Watch] = field(default_factory=dict)
    feed: EventFeed = field(default_factory=EventFeed)
    lock: threading.Lock = field(default_factory=threading.Lock)

    version: int = 0
    """Bumped by every change worth saving (a watch added or deleted, an event)."""

    def list(self) -> list[Watch]:
        with self.lock:
            return list(self.watches.values())

    def add(self, watch: Watch) -> None:
        with self.lock:
            self.watches[watch.id] = watch
            self.version += 1

    def remove(self, watch_id: str) -> None:
        with self.lock:
            self.watches.pop(watch_id, None)
            self.version += 1

    def state(self) -> dict:
        """The watches and the event feed as JSON (saved with a durable stream)."""
        with self.lock:
            return {"watches": [w.state() for w in self.watches.values()], "feed": self.feed.state()}

    def load(self, state: dict) -> None:
        """Take back `state()`: the watches with their ids and state, the feed with its ids."""
        watches = [Watch.from_state(w) for w in state["watches"]]
        with self.lock:
            self.watches = {w.id: w for w in watches}
            self.feed.load(state["feed"])


class Watcher:
    """One thread that, at most every `tick_s`, scores the due watches of every stream in one engine call."""

    def __init__(self, state, tick_s: float = 0.1, timeout_s: float = 60.0,
                 prompts_per_forward: int = PROMPTS_PER_FORWARD):
        self.state, self.tick_s, self.timeout_s = state, tick_s, timeout_s
        self._score = scorer(state.model, prompts_per_forward)
        self.evaluations = collections.Counter(dict.fromkeys((RECENT, ESCALATED, FULL, FAILED), 0))
        """Evaluations by how they ended, over the server's life (`vstream.engine.watches`)."""
        self.tick_seconds = Histogram(WATCH_TICK_BUCKETS)
        """Engine time of each tick's scoring call (every stream's due watches)."""
        self.streams_scored = 0
        """Streams with due watches, summed over the ticks (the tick time's sum over it: the cost of a stream)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vstream-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the next tick tries again  # noqa: BLE001
                log.exception("a tick of the watches failed")

    def tick(self) -> dict[str, list[dict]]:
        """Score every stream's due watches on its latest snapshot in one engine call; publish their events and
        return them by stream id (streams with due watches only)."""
        jobs = [job for stream in list(self.state.streams.values()) if (job := self._due(stream)) is not None]
        if not jobs:
            return {}
        future = self.state.engine.call(lambda: self._evaluate([(snap, due) for _, snap, due in jobs]))
        try:
            events, counts, seconds = future.result(timeout=self.timeout_s)
        except Exception as exc:  # the engine could not score them: they back off like a failing score  # noqa: BLE001
            for _, _, due in jobs:
                for watch in due:
                    watch.fail(exc)
                self.evaluations[FAILED] += len(due)
            return {}
        self.evaluations.update(counts)
        self.tick_seconds.observe(seconds)
        self.streams_scored += len(jobs)
        log.debug("%d watches of %d streams scored in %.1f ms", sum(counts.values()), len(jobs), 1e3 * seconds)
        return {stream.id: self._publish(stream, evs, due) for (stream, _, due), evs in zip(jobs, events)}

    def _due(self, stream) -> tuple | None:
        """(stream, its latest snapshot, the watches due on it), or None when none is (or the stream cannot tell)."""
        try:
            snap = stream.session.snapshot()
            due = [] if snap is None else [w for w in stream.board.list() if w.due(snap.stream_time)]
        except Exception:  # this stream's watches wait; the others are scored  # noqa: BLE001
            log.exception("the watches of stream %s could not be read", stream.id)
            return None
        return (stream, snap, due) if due else None

    def _evaluate(self, jobs: list) -> tuple[list[list[dict]], collections.Counter, float]:
        """On the engine thread: `evaluate_streams` of the jobs, and the seconds it took."""
        t0 = time.perf_counter()
        events, counts = evaluate_streams(jobs, self._score)
        return events, counts, time.perf_counter() - t0

    def _publish(self, stream, events: list[dict], due: list[Watch]) -> list[dict]:
        board: WatchBoard = stream.board
        published = [board.feed.publish(event | {"stream_id": stream.id} | _thumbnail(stream, event))
                     for event in events]
        board.version += len(published)
        self._send(published, {w.id: w for w in due})
        return published

    def _send(self, events: list[dict], watches: dict[str, Watch]) -> None:
        """Queue the events of watches with a webhook for delivery (never waits for it)."""
        sender = self.state.webhooks
        for event in events:
            watch = watches[event["watch_id"]]
            if watch.webhook is not None and sender is not None:
                sender.submit(watch.webhook, event, done=lambda ok, w=watch: _count(w, ok))


def _thumbnail(stream, event: dict) -> dict:
    """{"thumbnail_url": ...} for a trigger (see the module docstring), {} for other events."""
    if event["type"] != TRIGGERED:
        return {}
    kept = stream.thumbnails.nearest(event["stream_time"], tolerance=THUMBNAIL_WITHIN_S)
    return {"thumbnail_url": None if kept is None else f"/v1/streams/{stream.id}/frames?t={kept[0]!r}"}


def _count(watch: Watch, delivered: bool) -> None:
    if delivered:
        watch.webhook_delivered += 1
    else:
        watch.webhook_failed += 1
