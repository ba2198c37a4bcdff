"""Standing questions ("watches") on a stream: the state machine that turns a condition's scores into events.

A `Watch` holds a condition ("a purple square appears") and is scored at most every `every_s` seconds of stream time
(the score: `vstream.model.yesno.yes_no_score`, the log-odds of "Yes" against "No", > 0 leaning to yes). It fires
`watch.triggered` when the score rises above `threshold + hysteresis` and `watch.cleared` when it falls below
`threshold - hysteresis`; between the two bands it keeps its state, so a score that hovers around the threshold fires
once. No event fires within `cooldown_s` of stream time of the watch's last event: a crossing inside the cooldown is
held (the state does not change) and fires at the first evaluation after it if the score is still past its band.

`evaluate_due` scores the due watches of one snapshot on the calling thread: call it where the model may run (the
engine thread, through `Engine.call`). This module knows no server: events are plain dicts for whoever delivers them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vstream.errors import UserInputError

TRIGGERED, CLEARED = "watch.triggered", "watch.cleared"


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

    def __post_init__(self):
        for name in ("every_s", "cooldown_s", "hysteresis"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserInputError(f"a watch's {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)):
            raise UserInputError(f"a watch's threshold must be a finite number, got {self.threshold!r}")

    def due(self, stream_time: float) -> bool:
        """Whether the watch is to be evaluated at `stream_time` (at most once every `every_s` of stream time)."""
        if self.last_eval is None:
            return True
        return stream_time > self.last_eval and stream_time - self.last_eval >= self.every_s

    def update(self, stream_time: float, score: float, spatial_times: Iterable[float] = (),
               retrieved_times: Iterable[float] = ()) -> dict | None:
        """Take one evaluation's score; the event it fires (a dict), or None."""
        self.last_eval, self.last_score = stream_time, score
        self.evaluations += 1
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

    def view(self) -> dict:
        """The watch as the API shows it."""
        return {"id": self.id, "object": "watch", "condition": self.condition, "every_s": self.every_s,
                "cooldown_s": self.cooldown_s, "threshold": self.threshold, "hysteresis": self.hysteresis,
                "active": self.active, "last_score": self.last_score, "last_eval": self.last_eval,
                "evaluations": self.evaluations, "events": self.events, "webhook": self.webhook,
                "webhook_delivered": self.webhook_delivered, "webhook_failed": self.webhook_failed}


def evaluate_due(watches: Iterable[Watch], snapshot, score: Callable[[object, str], float]) -> list[dict]:
    """Score each watch due at the snapshot's stream time with `score(memory_tokens, condition)` and return the events
    they fire, with the snapshot's cited times. `snapshot` is an engine `Snapshot` (None: nothing to score yet)."""
    if snapshot is None:
        return []
    events = []
    for watch in list(watches):
        if not watch.due(snapshot.stream_time):
            continue
        value = float(score(snapshot.memory.tokens, watch.condition))
        event = watch.update(snapshot.stream_time, value, snapshot.spatial_times, snapshot.retrieved_times)
        if event is not None:
            events.append(event)
    return events
