"""Standing questions ("watches") on a stream: the state machine that turns a condition's scores into events.

A `Watch` holds a condition ("a purple square appears") and is scored at most every `every_s` seconds of stream time
(the score: `vstream.model.yesno.yes_no_score`, the log-odds of "Yes" against "No", > 0 leaning to yes). It fires
`watch.triggered` when the score rises above `threshold + hysteresis` and `watch.cleared` when it falls below
`threshold - hysteresis`; between the two bands it keeps its state, so a score that hovers around the threshold fires
once. No event fires within `cooldown_s` of stream time of the watch's last event: a crossing inside the cooldown is
held (the state does not change) and fires at the first evaluation after it if the score is still past its band.

`evaluate_due` scores the due watches of one snapshot on the calling thread: call it where the model may run (the
engine thread, through `Engine.call`). A score that raises marks only its watch failed (`error`, `failures`) and backs
it off: it is not due again for `FAIL_BACKOFF_S * 2**(failures-1)` seconds of wall time (at most
`MAX_FAIL_BACKOFF_S`), so a condition that keeps failing costs a few tries a minute, not ten a second; the next good
score clears the failure. This module knows no server: events are plain dicts for whoever delivers them.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vstream.errors import UserInputError

TRIGGERED, CLEARED = "watch.triggered", "watch.cleared"
FAIL_BACKOFF_S, MAX_FAIL_BACKOFF_S = 1.0, 60.0
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
    id: str = field(default_factory=lambda: "wat_" + secrets.token_hex(6))
    active: bool = False
    """True between a trigger and the next clear."""
    last_eval: float | None = None
    """Stream time of the last evaluation."""
    last_event: float | None = None
    """Stream time of the last event (the cooldown runs from it)."""
    last_score: float | None = None
    evaluations: int = 0
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

    def due(self, stream_time: float, now: float | None = None) -> bool:
        """Whether the watch is to be evaluated at `stream_time` (at most once every `every_s` of stream time; a
        failing one not before `retry_at` on the monotonic clock `now`)."""
        if self.failures and (time.monotonic() if now is None else now) < self.retry_at:
            return False
        if self.last_eval is None:
            return True
        return stream_time > self.last_eval and stream_time - self.last_eval >= self.every_s

    def update(self, stream_time: float, score: float, spatial_times: Iterable[float] = (),
               retrieved_times: Iterable[float] = ()) -> dict | None:
        """Take one evaluation's score; the event it fires (a dict), or None."""
        self.last_eval, self.last_score = stream_time, score
        self.evaluations += 1
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
                "score": score, "spatial_times": list(spatial_times), "retrieved_times": list(retrieved_times)}

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

    def state(self) -> dict:
        """Its settings and where its state machine stands, as JSON (what a durable stream saves)."""
        return {name: getattr(self, name) for name in self.SAVED}

    @classmethod
    def from_state(cls, state: dict) -> Watch:
        """The watch `state()` described; a dict without its fields is a ValueError naming them."""
        missing = [name for name in cls.SAVED if name not in state]
        if missing:
            raise ValueError(f"a saved watch lacks the fields {missing}: expected those of Watch.state()")
        return cls(**{name: state[name] for name in cls.SAVED})

    def view(self) -> dict:
        """The watch as the API shows it."""
        return {"id": self.id, "object": "watch", "condition": self.condition, "every_s": self.every_s,
                "cooldown_s": self.cooldown_s, "threshold": self.threshold, "hysteresis": self.hysteresis,
                "active": self.active, "last_score": self.last_score, "last_eval": self.last_eval,
                "evaluations": self.evaluations, "events": self.events, "webhook": self.webhook,
                "webhook_delivered": self.webhook_delivered, "webhook_failed": self.webhook_failed,
                "failures": self.failures, "error": self.error}


def evaluate_due(watches: Iterable[Watch], snapshot, score: Callable[[object, str], float]) -> list[dict]:
    """Score each watch due at the snapshot's stream time with `score(memory_tokens, condition)` and return the events
    they fire, with the snapshot's cited times. `snapshot` is an engine `Snapshot` (None: nothing to score yet)."""
    if snapshot is None:
        return []
    events = []
    for watch in list(watches):
        if not watch.due(snapshot.stream_time):
            continue
        try:
            value = float(score(snapshot.memory.tokens, watch.condition))
        except Exception as exc:  # this watch backs off; the others are scored  # noqa: BLE001
            watch.fail(exc)
            continue
        event = watch.update(snapshot.stream_time, value, snapshot.spatial_times, snapshot.retrieved_times)
        if event is not None:
            events.append(event)
    return events
