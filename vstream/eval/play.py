"""One loop that plays a stream to a model and answers questions along it; the clock is its only argument that changes
what the answers rest on.

    for played in play(model, file_source(path, fps=1.0), [(4.5, "What is on the table?")], clock=SimulatedClock()):
        played.answer.text, played.snapshot.stream_time

- no clock (offline): the frames up to each question's time go through a `StreamProcessor` with the offline memory
  (in `official` mode the released offline function over every frame so far; in `paper` mode the streaming memory);
- `SimulatedClock()`: the same, with the streaming memory: stream time is advanced by the loop, one frame at a time,
  and stands still while a question is answered, so each answer rests on exactly the frames up to its time;
- `WallClock(speed)`: live. The source runs at its own pace (a camera, a network stream, a file replayed at `speed`)
  into the model's engine as a live stream (when the engine falls behind, its oldest frames drop, counted); each
  question is asked at its moment on the wall clock from whatever the engine has ingested by then.

Offline and simulated time are one code path over the same frames (`snapshots_at`), so their memories differ only where
the memory mode makes the offline memory differ, and in `paper` mode they are equal by construction. Every answer,
whatever the clock, is decoded by the model's engine (`engine_of`) from the snapshot it rests on.

What this module does not do: read datasets, write records, judge, or choose the source (see `vstream.eval.runner`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vstream.model.processor import Snapshot, StreamProcessor, collect_answer, snapshots_at
from vstream.engine.scheduler import EngineConfig, engine_of
from vstream.engine.session import StreamSession
from vstream.model.vlm import Answer

Frame = tuple[float, np.ndarray | torch.Tensor]


@dataclass(frozen=True)
class Played:
    """One question's answer, the snapshot it rests on, and when it was asked."""

    snapshot: Snapshot
    answer: Answer
    asked_wall_s: float
    """Wall-clock seconds from the start of the play to the question."""
    frames_dropped: int
    """Frames the stream had dropped by then (live only)."""


class SimulatedClock:
    """Stream time advanced by the loop: the source is read up to each question's time, then waits while it is
    answered."""

    live = False
    dropped = 0

    def snapshots(self, model, source: Iterable[Frame], at: Sequence[float | None], frames_per_call: int,
                  name: str) -> Iterator[Snapshot]:
        return snapshots_at(StreamProcessor(model), source, at, frames_per_call, name=name)


class WallClock:
    """Live: stream time runs with the wall clock, `speed` stream seconds a second, from the start of the play."""

    live = True

    def __init__(self, speed: float = 1.0, timeout: float = 600.0):
        """`timeout`: seconds any wait on the stream may take (its first frame, its end)."""
        if not speed > 0:
            raise ValueError(f"the wall clock's speed must be > 0, got {speed}")
        self.speed, self.timeout = speed, timeout
        self.dropped = 0

    def snapshots(self, model, source: Iterable[Frame], at: Sequence[float | None], frames_per_call: int,
                  name: str) -> Iterator[Snapshot]:
        """The engine's latest snapshot of the stream at each time's wall-clock moment (None: once the source ended
        and every frame was ingested); at most `frames_per_call` of its frames go into one round of the engine."""
        session = StreamSession(model, frames_per_round=frames_per_call).start(source, live=True)
        start = time.monotonic()
        try:
            for t in at:
                if t is None or math.isinf(t):
                    if not session.wait(self.timeout):
                        raise TimeoutError(f"{name} did not end within {self.timeout} s")
                else:
                    delay = start + t / self.speed - time.monotonic()
                    if delay > 0:
                        session.wait(delay)  # returns at the moment, or earlier when the stream ends
                if session.error is not None:
                    raise session.error
                snap = session.wait_for_frames(1, self.timeout)
                self.dropped = session.counters.dropped
                yield snap
        finally:
            session.close()


def play(model, source: Iterable[Frame], questions: Sequence[tuple[float | None, str]],
         clock: SimulatedClock | WallClock | None = None, *, frames_per_call: int = 8,
         max_new_tokens: int | None = None, name: str = "the source") -> Iterator[Played]:
    """Play `source` ((t, frame) in time order: RGB frames, or pre-extracted features [grid^2, D]) and answer
    `questions` ((time, prompt), times increasing, None = at the end) under `clock` (see the module docstring),
    `frames_per_call` frames a call of the encoder."""
    at = [t for t, _ in questions]
    keys = [math.inf if t is None else t for t in at]
    if keys != sorted(keys):
        raise ValueError(f"question times must increase (None last), got {at}")
    if clock is None:
        snaps = snapshots_at(StreamProcessor(model, offline=True), source, at, frames_per_call, name=name)
    else:
        snaps = clock.snapshots(model, source, at, frames_per_call, name)
    # an engine made here gets one KV-cache slot per question (at most 32): `vstream ask` with one question on a 7B
    # model holds 1.2 K positions of keys (0.6 GB in fp16), not the serving default's 32 slots (20 GB)
    slots = EngineConfig(answer_slots=max(1, min(len(questions), 32)))
    engine, start = engine_of(model, slots), time.monotonic()
    try:
        t0 = time.perf_counter()
        for (_, prompt), snap in zip(questions, snaps):
            timings = {} if clock is not None and clock.live else {"memory_build_s": time.perf_counter() - t0}
            asked = time.monotonic() - start
            t1 = time.perf_counter()
            request = engine.submit(snap.memory.tokens, prompt, max_new_tokens=max_new_tokens, memory=snap.memory)
            try:
                answer = collect_answer(snap, prompt, request, timings, start=t1)
            finally:
                if request.state != "done":  # left early (an interrupt): free the answer's slot
                    request.cancel()
            yield Played(snap, answer, asked, 0 if clock is None else clock.dropped)
            t0 = time.perf_counter()
    finally:
        snaps.close()
