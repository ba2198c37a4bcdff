"""The demo's watch (`vstream demo --watch`): one standing question set on the demo's stream, "tell me when" its first
new object appears, scored on the engine thread at most once per second of stream time while the stream plays, each
trigger reported with how long after the ground-truth event it came.

`choose` picks the condition from the world's watch tasks (`vstream.synth.world.watches`); `WatchLoop` is a thread
that evaluates it like the server's watcher does (`evaluate_due` through `Engine.call`, the server's `Watch` state
machine). This module prints nothing: it hands each trigger to a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vstream.engine.watches import TRIGGERED, Watch, evaluate_due
from vstream.model.yesno import scorer
from vstream.synth.world.timeline import WorldTimeline
from vstream.synth.world.watches import WatchTask, make_watch_tasks


THRESHOLDS: dict[str, float] = {}
"""The watch threshold per model name where it is not the server's default, 0. The demo model was trained on watch
questions (docs/demo-model/training.md, step 6), so 0 is its threshold too (docs/watches/)."""


def threshold_for(model: str) -> float:
    return THRESHOLDS.get(model, 0.0)


def choose(stream: WorldTimeline) -> WatchTask | None:
    """The stream's earliest appearance after its start ("a red circle appears"), or None when it has none."""
    tasks = [t for t in make_watch_tasks(stream) if t.type == "appear" and t.events]
    return min(tasks, key=lambda t: t.events[0], default=None)


class WatchLoop:
    """A thread that evaluates `watch` on the session's newest snapshot whenever it is due, until `stop`; each
    trigger goes to `on_trigger(dict)` with the task's event time and the delay from it."""

    def __init__(self, session, model, task: WatchTask, on_trigger: Callable[[dict], None], threshold: float = 0.0):
        self.session, self.model, self.task, self.on_trigger = session, model, task, on_trigger
        self.watch = Watch(task.condition, every_s=1.0, cooldown_s=10.0, threshold=threshold)
        self.triggers: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vstream-demo-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Evaluate once more on the final memory, then end the thread."""
        self._stop.set()
        self._thread.join(60)
        self._evaluate()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._evaluate()

    def _evaluate(self) -> None:
        snap = self.session.snapshot()
        if snap is None or not self.watch.due(snap.stream_time):
            return
        score = scorer(self.model)
        events = self.session.engine.call(lambda: evaluate_due([self.watch], snap, score)).result(300)
        for event in events:
            if event["type"] != TRIGGERED:
                continue
            happened = [e for e in self.task.events if e <= event["stream_time"]]
            row = {"time": event["stream_time"], "condition": event["condition"], "score": event["score"],
                   "event_time": happened[-1] if happened else None,
                   "delay_s": event["stream_time"] - happened[-1] if happened else None}
            self.triggers.append(row)
            self.on_trigger(row)
