"""Watch tasks on a world stream: standing conditions ("tell me when a red circle appears") with the stream times at
which each one happens, from the timeline's ground truth (`make_watch_tasks`).

Condition types, and when each happens:
- `appear`: "a <colour> <shape> appears": when an object of that colour and shape comes on screen (it appears, a
  scene change brings it, or another object turns into it), not counting objects on screen from the start;
- `leave`: "the <colour> <shape> leaves": when that object goes (it disappears or a scene change takes it);
- `recolour`: "the <shape> turns <colour>": when an object of that shape takes that colour;
- `scene`: "the background changes": at every scene change (several times in a stream).
Each stream also gets conditions of the first three types that never happen in it (a pair never shown, a colour no
object of the shape takes), so false alarms are counted on conditions with nothing to find.

Every event falls at k + 0.5 s (see `timeline`), so the first frame sampled at 1 fps that shows it is at k + 1. A
stream's (colour, shape) pair belongs to one object at most, so each condition but `scene` happens at most once.

`holds(stream, type, colour, shape, t)` says whether a condition is true at stream time t, the answer a model's watch
should give (a watch training target): yes from its event for as long as what happened stays so, so that a watch at
threshold 0 fires once at each event (the first frame after it) and at no other time, which is what
`vstream.eval.world_watches` rewards:
- `appear`: while an object of that colour and shape is on screen, from its appearance (a pair on screen from the
  start is undefined, None: the evaluator never asks about it);
- `leave`: from when that object went, for the rest of the stream (undefined once the object took another colour:
  it did not go, and the evaluator asks about an object under the colour it left in);
- `recolour`: while the object that turned that colour is on screen in it (an object shown in that colour from its
  start never turned it: no);
- `scene`: for `SCENE_WINDOW_S` seconds after each scene change, so that the watch can clear between changes.
A pair never shown is no for all three object types.

This module does not score a model (`vstream.eval.world_watches` does) and draws no frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vstream.synth.world.render import COLOUR_NAMES, SHAPES
from vstream.synth.world.timeline import WorldTimeline

WATCH_TYPES = ("appear", "leave", "recolour", "scene")
"""Condition types of the watch tasks."""
SCENE_WINDOW_S = 4.0
"""How long after a scene change "the background changes" holds (`holds`)."""


def condition_text(type_: str, colour: str | None = None, shape: str | None = None) -> str:
    """A condition of the type as the watch tasks phrase it: "a red circle appears", "the red circle leaves", "the
    circle turns red", "the background changes"."""
    if type_ == "scene":
        return "the background changes"
    if type_ not in WATCH_TYPES or colour not in COLOUR_NAMES or shape not in SHAPES:
        raise ValueError(f"no {type_!r} condition of colour {colour!r} and shape {shape!r}")
    return {"appear": f"a {colour} {shape} appears", "leave": f"the {colour} {shape} leaves",
            "recolour": f"the {shape} turns {colour}"}[type_]


@dataclass(frozen=True)
class WatchTask:
    """A condition to watch on one stream, its type and the stream times (s) at which it happens (empty: never)."""

    type: str
    condition: str
    events: tuple[float, ...]


def _appearances(stream: WorldTimeline) -> dict[tuple[str, str], float]:
    """(colour, shape) -> the first time after 0 that an object of that colour and shape is on screen."""
    out: dict[tuple[str, str], float] = {}
    for o in stream.objects.values():
        for since, colour in o.colours:
            start = max(since, o.appear)
            if start > 0 and (o.disappear is None or start < o.disappear):
                out.setdefault((colour, o.shape), start)
    return out


def _leavings(stream: WorldTimeline) -> dict[tuple[str, str], float]:
    """(colour at the time, shape) -> when that object left the screen."""
    return {(o.colour_at(o.disappear - 1e-6), o.shape): o.disappear for o in stream.objects.values()
            if o.disappear is not None}


def _recolourings(stream: WorldTimeline) -> dict[tuple[str, str], float]:
    """(new colour, shape) -> when an object of that shape turned that colour."""
    return {(e.details["to"], e.details["shape"]): e.time for e in stream.events if e.kind == "recolour"}


def make_watch_tasks(stream: WorldTimeline, negatives: int = 1, seed: int | None = None) -> list[WatchTask]:
    """Every condition of the stream that happens (one per appearance, leaving and recolouring, one for the scene
    changes when there are any) and `negatives` conditions per type (but `scene`) that never happen; same stream and
    seed, same tasks."""
    rng = np.random.default_rng([stream.seed, 2] if seed is None else seed)
    shown = {(c, o.shape) for o in stream.objects.values() for _, c in o.colours}
    tasks = [WatchTask(kind, condition_text(kind, c, s), (t,))
             for kind, times in (("appear", _appearances(stream)), ("leave", _leavings(stream)),
                                 ("recolour", _recolourings(stream)))
             for (c, s), t in sorted(times.items())]
    scenes = tuple(e.time for e in stream.events if e.kind == "scene")
    if scenes:
        tasks.append(WatchTask("scene", condition_text("scene"), scenes))
    never = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in shown]
    for i in rng.permutation(len(never))[:negatives]:
        c, s = never[i]
        tasks.append(WatchTask("appear", condition_text("appear", c, s), ()))
    for i in rng.permutation(len(never))[:negatives]:
        c, s = never[i]
        tasks.append(WatchTask("recolour", condition_text("recolour", c, s), ()))
    staying = sorted((o.colours[-1][1], o.shape) for o in stream.objects.values() if o.disappear is None)
    for c, s in staying[:negatives]:  # on screen to the end, in its last colour
        tasks.append(WatchTask("leave", condition_text("leave", c, s), ()))
    return tasks


def _shown_span(stream: WorldTimeline, colour: str, shape: str) -> tuple[float, float, str, str] | None:
    """(from, until, how it began, how it ended) of the one stretch the pair is on screen, or None if never:
    began "start" (on screen at 0), "appear" or "recolour"; ended "leave", "recolour" or "end"."""
    for o in stream.objects.values():
        if o.shape != shape:
            continue
        for i, (since, c) in enumerate(o.colours):
            if c != colour:
                continue
            start = max(since, o.appear)
            began = "start" if start == 0 else "recolour" if since > o.appear else "appear"
            if i + 1 < len(o.colours):
                return start, o.colours[i + 1][0], began, "recolour"
            if o.disappear is not None:
                return start, o.disappear, began, "leave"
            return start, float("inf"), began, "end"
    return None


def holds(stream: WorldTimeline, type_: str, colour: str | None, shape: str | None, t: float) -> bool | None:
    """Whether the condition of the type holds at stream time t, or None where it is undefined (see the module
    docstring)."""
    if type_ == "scene":
        return any(e.time <= t < e.time + SCENE_WINDOW_S for e in stream.events if e.kind == "scene")
    condition_text(type_, colour, shape)  # a known type, colour and shape
    span = _shown_span(stream, colour, shape)
    if span is None:
        return False
    start, until, began, ended = span
    if type_ == "appear":
        return None if began == "start" else start <= t < until
    if type_ == "leave":
        if ended == "recolour":
            return False if t < until else None
        return ended == "leave" and t >= until
    return began == "recolour" and start <= t < until
