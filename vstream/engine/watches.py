"""Standing questions ("watches") on a stream: the state machine that turns a condition's scores into events, and
the evaluation of many streams' due watches in two batched passes.

A `Watch` holds a condition ("a purple square appears") and is scored at most every `every_s` seconds of stream time
(the score: `vstream.model.yesno`, the log-odds of "Yes" against "No", > 0 leaning to yes). It fires
`watch.triggered` when the score rises above `threshold + hysteresis` and `watch.cleared` when it falls below
`threshold - hysteresis`; between the two bands it keeps its state, so a score that hovers around the threshold fires
once. No event fires within `cooldown_s` of stream time of the watch's last event: a crossing inside the cooldown is
held (the state does not change) and fires at the first evaluation after it if the score is still past its band.

A cheap score first: a watch with an `escalate_margin` is scored on its memory's recent part (`recent_tokens`: the
spatial tokens, the newest frames' at the finest pooling; 64 of the paper's 681 tokens), and on the whole memory only
when that score lies within `escalate_margin` of the band [threshold - hysteresis, threshold + hysteresis]; a recent
score further out decides alone, as a full score within the margin of it would decide the same. Each watch counts its
evaluations decided by the recent part (`cheap_evaluations`) and those escalated (`escalated_evaluations`); the rest
were scored on the whole memory at once (no margin, or a memory with no separate recent part). Events say which
memory decided them (`scored_on`: "recent" or "full").

`evaluate_streams` scores the due watches of many snapshots with two calls of a `Scorer` (all the recent parts, then
all the full memories; `vstream.model.yesno.scorer` batches each call), `evaluate_due` those of one snapshot. Both run
on the calling thread: call them where the model may run (the engine thread, through `Engine.call`). A score that
raises, or a snapshot whose memory cannot be read, marks only its watches failed (`error`, `failures`) and backs them
off: not due again for `FAIL_BACKOFF_S * 2**(failures-1)` seconds of wall time (at most `MAX_FAIL_BACKOFF_S`), so a
condition that keeps failing costs a few tries a minute, not ten a second; the next good score clears the failure.
This module knows no server: events are plain dicts for whoever delivers them.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from vstream.errors import UserInputError
from vstream.memory import PARTS, without

TRIGGERED, CLEARED = "watch.triggered", "watch.cleared"
FAIL_BACKOFF_S, MAX_FAIL_BACKOFF_S = 1.0, 60.0
ESCALATE_MARGIN: float | None = None
"""A watch's default `escalate_margin`: None, no cheap pass. On the demo model the recent part's score runs about 1.9
below the full memory's and both stay near the calibrated thresholds, so a margin of 2 escalated most evaluations and
still changed some triggers, and one wide enough to change none escalated nearly all (docs/watches/README.md,
Mechanism): the cheap pass pays where a model's scores are confident, and a watch asks for it."""
RECENT, ESCALATED, FULL, FAILED = "recent", "escalated", "full", "failed"
"""How an evaluation ended: decided by the recent part, escalated to the full memory, scored on the full memory at
once, or failed."""

Scorer = Callable[[Sequence[tuple[torch.Tensor, str]]], list]
"""Scores (memory tokens, condition) pairs: a float per pair, or the exception that scoring it raised
(`vstream.model.yesno.scorer`, or `pairwise` of a function of one pair)."""
log = logging.getLogger("vstream.watches")


@dataclass
class Watch:
    """One standing question on a stream, and where its state machine stands."""

    condition: str
    every_s: float = 1.0
    cooldown_s: float = 10.0
    threshold: float = 0.0
    hysteresis: float = 0.5
    webhook: str | None = None
    """A URL its events are POSTed to (delivered by the server; this module only carries it)."""
    escalate_margin: float | None = ESCALATE_MARGIN
    """Score the memory's recent part first, and the whole memory only when that score lies within this many log-odds
    of the band [threshold - hysteresis, threshold + hysteresis]; None: always the whole memory."""
    id: str = field(default_factory=lambda: "wat_" + secrets.token_hex(6))
    active: bool = False
    """True between a trigger and the next clear."""
    last_eval: float | None = None
    """Stream time of the last evaluation."""
    last_event: float | None = None
    """Stream time of the last event (the cooldown runs from it)."""
    last_score: float | None = None
    evaluations: int = 0
    cheap_evaluations: int = 0
    """Evaluations decided by the recent part of the memory alone."""
    escalated_evaluations: int = 0
    """Evaluations whose recent score came within `escalate_margin` of the band, scored again on the whole memory."""
    events: int = 0
    webhook_delivered: int = 0
    webhook_failed: int = 0
    failures: int = 0
    """Evaluations in a row whose score raised (0 after a good one)."""
    error: str | None = None
    """Why the last failed evaluation failed (None after a good one)."""
    retry_at: float = 0.0
    """`time.monotonic()` before which a failing watch is not due."""

    def __post_init__(self):
        for name in ("every_s", "cooldown_s", "hysteresis"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserInputError(f"a watch's {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise UserInputError(f"a watch's threshold must be a finite number, got {self.threshold!r}")
        margin = self.escalate_margin
        if margin is not None and not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise UserInputError(f"a watch's escalate_margin must be a finite number >= 0 or None, got {margin!r}")

    def due(self, stream_time: float, now: float | None = None) -> bool:
        """Whether the watch is to be evaluated at `stream_time` (at most once every `every_s` of stream time; a
        failing one not before `retry_at` on the monotonic clock `now`)."""
        if self.failures and (time.monotonic() if now is None else now) < self.retry_at:
            return False
        if self.last_eval is None:
            return True
        return stream_time > self.last_eval and stream_time - self.last_eval >= self.every_s

    def near_band(self, score: float) -> bool:
        """Whether a recent-part score is too near the band to decide alone (see the module docstring)."""
        m = self.escalate_margin
        return m is None or self.threshold - self.hysteresis - m <= score <= self.threshold + self.hysteresis + m

    def update(self, stream_time: float, score: float, spatial_times: Iterable[float] = (),
               retrieved_times: Iterable[float] = (), how: str = FULL) -> dict | None:
        """Take one evaluation's score (`how`: RECENT, ESCALATED or FULL); the event it fires (a dict), or None."""
        self.last_eval, self.last_score = stream_time, score
        self.evaluations += 1
        self.cheap_evaluations += how == RECENT
        self.escalated_evaluations += how == ESCALATED
        self.failures, self.error = 0, None
        if self.active:
            crossed, kind = score < self.threshold - self.hysteresis, CLEARED
        else:
            crossed, kind = score > self.threshold + self.hysteresis, TRIGGERED
        cooling = self.last_event is not None and stream_time - self.last_event < self.cooldown_s
        if not crossed or cooling:
            return None
        self.active = not self.active
        self.last_event = stream_time
        self.events += 1
        return {"type": kind, "watch_id": self.id, "condition": self.condition, "stream_time": stream_time,
                "score": score, "scored_on": "recent" if how == RECENT else "full",
                "spatial_times": list(spatial_times), "retrieved_times": list(retrieved_times)}

    def fail(self, error: BaseException, now: float | None = None) -> None:
        """Record an evaluation that raised `error` and back the watch off (see the module docstring)."""
        self.failures += 1
        self.error = f"{type(error).__name__}: {error}"[:500]
        wait = min(MAX_FAIL_BACKOFF_S, FAIL_BACKOFF_S * 2 ** (self.failures - 1))
        self.retry_at = (time.monotonic() if now is None else now) + wait
        if self.failures == 1 or wait < MAX_FAIL_BACKOFF_S:  # logged as it backs off, then quiet
            log.warning("watch %s (%r) failed %d time(s) in a row, next try in %.0f s: %s", self.id, self.condition,
                        self.failures, wait, self.error)

    SAVED = ("condition", "every_s", "cooldown_s", "threshold", "hysteresis", "webhook", "id", "active", "last_eval",
             "last_event", "last_score", "evaluations", "events")
    ADDED = ("escalate_margin", "cheap_evaluations", "escalated_evaluations")
    """Saved too, but read only when present: a state saved before they existed still loads (with their defaults)."""

    def state(self) -> dict:
        """Its settings and where its state machine stands, as JSON (what a durable stream saves)."""
        return {name: getattr(self, name) for name in self.SAVED + self.ADDED}

    @classmethod
    def from_state(cls, state: dict) -> Watch:
        """The watch `state()` described; a dict without its fields is a ValueError naming them."""
        missing = [name for name in cls.SAVED if name not in state]
        if missing:
            raise ValueError(f"a saved watch lacks the fields {missing}: expected those of Watch.state()")
        return cls(**{name: state[name] for name in cls.SAVED + cls.ADDED if name in state})

    def view(self) -> dict:
        """The watch as the API shows it."""
        return {"id": self.id, "object": "watch", "condition": self.condition, "every_s": self.every_s,
                "cooldown_s": self.cooldown_s, "threshold": self.threshold, "hysteresis": self.hysteresis,
                "active": self.active, "last_score": self.last_score, "last_eval": self.last_eval,
                "escalate_margin": self.escalate_margin, "evaluations": self.evaluations,
                "cheap_evaluations": self.cheap_evaluations, "escalated_evaluations": self.escalated_evaluations,
                "events": self.events, "webhook": self.webhook,
                "webhook_delivered": self.webhook_delivered, "webhook_failed": self.webhook_failed,
                "failures": self.failures, "error": self.error}


def recent_tokens(memory) -> torch.Tensor | None:
    """The tokens of the memory's recent part (its spatial part: the newest frames' at the finest pooling), or None
    when it has no separate one: a memory without STAR parts (the Flash memory) or one that is all spatial yet."""
    counts = memory.counts
    if set(counts) != set(PARTS) or not 0 < counts["spatial"] < memory.num_tokens:
        return None
    return without(memory, [p for p in PARTS if p != "spatial"]).tokens


def pairwise(score_one: Callable[[torch.Tensor, str], float]) -> Scorer:
    """A `Scorer` that calls `score_one(tokens, condition)` pair by pair (what it raises is that pair's result)."""
    def score(pairs: Sequence[tuple[torch.Tensor, str]]) -> list:
        out: list = []
        for tokens, condition in pairs:
            try:
                out.append(float(score_one(tokens, condition)))
            except Exception as exc:  # the pair's result: its watch backs off  # noqa: BLE001
                out.append(exc)
        return out
    return score


@dataclass
class _Job:
    """One snapshot's due watches, the tokens of its recent part, and the results so far (watch index -> (score,
    how) or the exception)."""

    snapshot: object
    due: list[Watch]
    recent: torch.Tensor | None = None
    results: dict[int, tuple[float, str] | BaseException] = field(default_factory=dict)


def evaluate_streams(jobs: Sequence[tuple[object, Iterable[Watch]]], score: Scorer) \
        -> tuple[list[list[dict]], collections.Counter]:
    """Score the watches of each (snapshot, watches) job that are due at its stream time, with one `score` call over
    every job's recent parts and one over the full memories (see the module docstring). Returns each job's events, in
    the order of its watches, and how many evaluations ended each way (RECENT, ESCALATED, FULL, FAILED). Each snapshot
    is an engine `Snapshot`, or None before the first frame (nothing to score)."""
    plans = [_plan(snap, watches) for snap, watches in jobs]
    cheap = [(job, i) for job in plans if job.recent is not None
             for i, w in enumerate(job.due) if w.escalate_margin is not None]
    for (job, i), value in zip(cheap, _scores(score, [(job.recent, job.due[i].condition) for job, i in cheap])):
        if isinstance(value, BaseException) or not job.due[i].near_band(value):
            job.results[i] = value if isinstance(value, BaseException) else (value, RECENT)
    escalated = {(id(job), i) for job, i in cheap}
    full = [(job, i) for job in plans for i in range(len(job.due)) if i not in job.results]
    pairs = [(job.snapshot.memory.tokens, job.due[i].condition) for job, i in full]
    for (job, i), value in zip(full, _scores(score, pairs)):
        how = ESCALATED if (id(job), i) in escalated else FULL
        job.results[i] = value if isinstance(value, BaseException) else (value, how)
    counts: collections.Counter = collections.Counter()
    return [_apply(job, counts) for job in plans], counts


def evaluate_due(watches: Iterable[Watch], snapshot, score: Scorer) -> list[dict]:
    """`evaluate_streams` of one snapshot: the events its due watches fire."""
    return evaluate_streams([(snapshot, watches)], score)[0][0]


def _plan(snapshot, watches: Iterable[Watch]) -> _Job:
    if snapshot is None:
        return _Job(None, [])
    job = _Job(snapshot, [w for w in list(watches) if w.due(snapshot.stream_time)])
    if job.due and any(w.escalate_margin is not None for w in job.due):
        try:
            job.recent = recent_tokens(snapshot.memory)
        except Exception as exc:  # a memory that cannot be read fails its own watches only  # noqa: BLE001
            job.results = dict.fromkeys(range(len(job.due)), exc)
    return job


def _scores(score: Scorer, pairs: list) -> list:
    if not pairs:
        return []
    values = score(pairs)
    if len(values) != len(pairs):
        raise ValueError(f"the scorer returned {len(values)} results for {len(pairs)} (memory, condition) pairs")
    return values


def _apply(job: _Job, counts: collections.Counter) -> list[dict]:
    """Feed each due watch its result (a score, or the exception that fails it); the events they fire."""
    events = []
    snap = job.snapshot
    for i, watch in enumerate(job.due):
        result = job.results[i]
        if isinstance(result, BaseException):
            watch.fail(result)
            counts[FAILED] += 1
            continue
        value, how = result
        counts[how] += 1
        event = watch.update(snap.stream_time, float(value), snap.spatial_times, snap.retrieved_times, how)
        if event is not None:
            events.append(event)
    return events
