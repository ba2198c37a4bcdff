"""Durable streams for the server (`vstream serve --state-dir DIR`): every stream's state saved to DIR, and the streams
brought back with their ids when a server starts on the same directory.

- What is saved (`vstream.engine.snapshots` is the format): the stream's memory (every tensor and counter, the times it
  cites), its frame count, last stream time and snapshot version, its source spec and settings (fps, speed, live).
  The "as of" history is not saved: after a restart it starts empty (questions as of a time before the restart get 400).
- When: by a saver thread every `every_s` seconds (a stream whose memory has not changed since its last save is not
  written again), on drain (SIGTERM: at shutdown, before the streams close; a socket-owned push stream closed by the
  drain is saved first), and on `DELETE` (its files are removed; also when the socket that owns a push stream leaves).
  The state is taken on the engine thread between two iterations (`Lane.state_dict`). A kill -9 loses at most the
  frames of the last `every_s` seconds.
- Its watches (settings, ids, where each state machine stands) and its event feed (the last id and the kept events,
  so `Last-Event-ID` resumes across the restart) are saved with it; a change to them alone (a watch added or deleted,
  an event) is saved at the next interval. A webhook delivery still pending at the restart is lost.
- On start: a snapshot of another model or memory configuration refuses the start (`IncompatibleSnapshot`, naming
  both; the operator chooses the model or removes the directory). A corrupt or half-written one is logged as an error
  and skipped, its files left for inspection (never loaded). Every other stream comes back with its id and memory
  (published at once: questions are answered from it before any new frame). A file source reopens and skips the frames
  up to its last saved time; a network or webcam source reopens with its stream time shifted to continue after it;
  a push stream (socket-owned ones included, now owned by none) waits for a socket with `?stream_id=`, its next frame
  due after the saved time. A source that cannot be reopened leaves the stream failed with that error, its memory
  answerable.

In a cluster (`vstream.cluster`) many servers share one directory: each is made with `restore=False` (it restores
nothing at start) and takes the streams its directory assigns with `adopt`; `release` hands one over (a push stream
once every frame it took is ingested; saved, closed, its files kept) so that another server can adopt it.

What this module does not do: run model code on the event loop (everything here blocks: thread pool or its own
thread), or restore a stream's thumbnails or counters of dropped frames (they restart at zero).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from vstream.engine import snapshots
from vstream.errors import SourceError
from vstream.server.errors import ApiError
from vstream.server.inputs import open_stream_source
from vstream.server.schemas import StreamCreate
from vstream.server.state import ServerState, Stream
from vstream.sources import paced

log = logging.getLogger("vstream.server.durable")
INGEST_WAIT_S = 30.0  # how long a release waits for a push stream's taken frames to be ingested before saving


class Durable:
    """The state directory of one server: checks it at start, restores its streams, saves them while they run."""

    def __init__(self, root: Path, every_s: float, identity: dict, restore: bool = True):
        if not every_s > 0:
            raise ValueError(f"the snapshot interval must be > 0 seconds, got {every_s}")
        self.root, self.every_s, self.identity = Path(root), every_s, identity
        self.restore_at_start = restore
        self.root.mkdir(parents=True, exist_ok=True)
        self.problems: dict[str, str] = {}  # stream id -> why its snapshot was not restored
        self._saved: dict[str, tuple] = {}  # stream id -> (version, frames) of its last save
        self._lock = threading.Lock()  # one save or removal at a time: a deleted stream is never written again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """The ids of the saved streams whose manifest is sound; IncompatibleSnapshot when one was saved by another
        model or memory configuration; a corrupt manifest is logged and recorded in `problems`."""
        ids = []
        for stream_id in snapshots.stream_ids(self.root):
            try:
                snapshots.check_identity(snapshots.read_manifest(self.root, stream_id), self.identity)
            except snapshots.CorruptSnapshot as exc:
                self._problem(stream_id, exc)
                continue
            ids.append(stream_id)
        return ids

    def restore(self, state: ServerState) -> list[Stream]:
        """Bring back every saved stream that reads intact (see the module docstring); returns them."""
        restored = []
        for stream_id in self.check():
            try:
                snap = snapshots.read(self.root, stream_id, self.identity)
            except snapshots.CorruptSnapshot as exc:
                self._problem(stream_id, exc)
                continue
            try:
                restored.append(_reopen(state, snap))
            except Exception as exc:  # this stream cannot start again: reported, the others are restored  # noqa: BLE001
                self._problem(stream_id, exc)
                continue
            log.info("stream %s restored: %d frames, stream time %s", stream_id, snap.state["frames"],
                     snap.state["stream_time"])
        return restored

    def adopt(self, state: ServerState, stream_id: str) -> Stream:
        """Bring back one saved stream (another server saved it: a move or that server's death); KeyError when it is
        already open here, CorruptSnapshot or IncompatibleSnapshot when its files cannot be loaded."""
        if stream_id in state.streams:
            raise KeyError(f"stream {stream_id} is already open on this server")
        snap = snapshots.read(self.root, stream_id, self.identity)
        stream = _reopen(state, snap)
        with self._lock:
            self._saved[stream_id] = (snap.state["version"], snap.state["frames"])
        log.info("stream %s adopted: %d frames, stream time %s", stream_id, snap.state["frames"],
                 snap.state["stream_time"])
        return stream

    def release(self, state: ServerState, stream_id: str) -> None:
        """Hand a stream over: save it (anyway; a push stream once every frame it took is ingested or counted
        dropped: its sockets must be closed first), unregister it and close it, its files kept for `adopt`
        elsewhere; KeyError when it is not open here."""
        stream = state.streams.get(stream_id)
        if stream is None:
            raise KeyError(f"stream {stream_id} is not open on this server")
        if stream.push is not None:
            _wait_ingested(stream, INGEST_WAIT_S)
        self.save(state, stream, force=True)
        with state.lock:
            state.streams.pop(stream_id, None)
        stream.close()
        with self._lock:
            self._saved.pop(stream_id, None)

    def start(self, state: ServerState) -> None:
        """Save every stream every `every_s` seconds on a thread of its own, until `stop`."""
        self._thread = threading.Thread(target=self._run, args=(state,), name="vstream-snapshots", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def save_all(self, state: ServerState, force: bool = False) -> None:
        for stream in list(state.streams.values()):
            try:
                self.save(state, stream, force)
            except Exception:  # one stream's save failed: logged, the others are saved  # noqa: BLE001
                log.exception("stream %s: the snapshot failed; its last one stays", stream.id)

    def save(self, state: ServerState, stream: Stream, force: bool = False) -> bool:
        """Write the current state of `stream` unless it is unchanged since its last save (`force`: anyway), it failed
        (its last good snapshot stays) or it is no longer registered -> whether it was written."""
        with self._lock:
            lane = stream.session.lane
            snap = lane.snapshot
            key = None if snap is None else (snap.version, snap.frames, stream.board.version)
            memory = lane.processor.memory
            if (state.streams.get(stream.id) is not stream or lane.error is not None
                    or getattr(memory, "released", False) or (not force and self._saved.get(stream.id) == key)):
                return False
            processor_state = lane.state_dict()
            snapshots.write(self.root, stream.id, processor_state, self.identity, _meta(stream))
            self._saved[stream.id] = key
            return True

    def remove(self, stream_id: str) -> None:
        """Delete the files of a stream that was deleted (unregister it first: a save skips unregistered streams)."""
        with self._lock:
            snapshots.remove(self.root, stream_id)
            self._saved.pop(stream_id, None)

    def _run(self, state: ServerState) -> None:
        while not self._stop.wait(self.every_s):
            self.save_all(state)

    def _problem(self, stream_id: str, exc: Exception) -> None:
        if self.problems.get(stream_id) != str(exc):  # `check` runs at create_app and again at restore: log once
            log.error("stream %s not restored: %s", stream_id, exc)
        self.problems[stream_id] = str(exc)


def _wait_ingested(stream: Stream, timeout_s: float) -> None:
    """Until every frame the stream's push source took is in its memory or counted dropped (the engine's live queue
    drops the oldest), it failed or ended, or `timeout_s` passed (logged: the save misses the frames still queued)."""
    counters, deadline = stream.session.counters, time.monotonic() + timeout_s
    while True:
        with stream.push_lock:
            taken = stream.pushed - stream.sampled_out - stream.push.rejected
        if counters.encoded + counters.dropped >= taken or stream.session.finished:
            return
        if time.monotonic() > deadline:
            log.warning("stream %s: %d of its %d frames ingested after %s s; saved without the others", stream.id,
                        counters.encoded + counters.dropped, taken, timeout_s)
            return
        time.sleep(0.005)


def _meta(stream: Stream) -> dict:
    return {"source": stream.source, "fps": stream.fps, "speed": stream.speed, "live": stream.session.live,
            "created": stream.created, "push": stream.push is not None, "watches": stream.board.state()}


def _reopen(state: ServerState, snap: snapshots.Snapshot) -> Stream:
    """Start the saved stream again with its id and memory; its source reopened to continue after the saved time."""
    meta, last = snap.meta, snap.state["stream_time"]
    frames, live, push, fps = _source(state, meta, last)
    stream = state.start_stream(frames, live, push, meta["source"], fps, stream_id=snap.stream_id, speed=meta["speed"],
                                created=meta["created"], memory_state=snap.state)
    if push is not None and last is not None:
        stream.last_time, stream.next_slot = last, math.floor(last * fps + 0.5) + 1
    _restore_watches(state, stream, meta.get("watches"))
    return stream


def _restore_watches(state: ServerState, stream: Stream, saved: dict | None) -> None:
    """Give the stream back its watches and event feed (a snapshot from before watches were saved has none)."""
    if saved is None:
        return
    stream.board.load(saved)
    watches = stream.board.list()
    if watches:
        state.start_watcher()
    if state.webhooks is None and any(w.webhook for w in watches):
        log.warning("stream %s: watches with a webhook restored on a server without a webhook secret: their events "
                    "go to the feed and sockets only", stream.id)


def _source(state: ServerState, meta: dict, last: float | None):
    """(frames, live, push, fps) of a saved stream's source, reopened to continue after `last`."""
    body = StreamCreate.model_validate({"source": meta["source"], "fps": meta["fps"]})  # a file unpaced: skipped fast
    try:
        frames, _, push, fps = open_stream_source(state, body)
    except ApiError as exc:
        return _Unavailable(f"its source could not be reopened after a restart: {exc.message}"), True, None, meta["fps"]
    if last is not None and push is None:
        frames = _after(frames, last) if meta["source"]["type"] == "file" else _shifted(frames, last + 1.0 / fps)
    if meta["speed"] is not None:
        frames = paced(frames, meta["speed"])
    return frames, meta["live"], push, fps


def _after(frames: Iterable, last: float) -> Iterator:
    """The frames later than `last` (a file read again up to where its stream stopped)."""
    for t, frame in frames:
        if t > last:
            yield t, frame


def _shifted(frames: Iterable, start: float) -> Iterator:
    """A live source whose clock restarted: its stream time continues from `start`."""
    for t, frame in frames:
        yield start + t, frame


class _Unavailable:
    """A source that could not be reopened: iterating it raises, so the stream ends failed with `message`."""

    def __init__(self, message: str):
        self.message = message

    def __iter__(self) -> Iterator:
        raise SourceError(self.message)
