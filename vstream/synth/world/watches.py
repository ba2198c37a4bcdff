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

This module does not score a model (`vstream.eval.world_watches` does) and draws no frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vstream.synth.world.render import COLOUR_NAMES, SHAPES
from vstream.synth.world.timeline import WorldTimeline

WATCH_TYPES = ("appear", "leave", "recolour", "scene")
"""Condition types of the watch tasks."""


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
    tasks = [WatchTask("appear", f"a {c} {s} appears", (t,)) for (c, s), t in sorted(_appearances(stream).items())]
    tasks += [WatchTask("leave", f"the {c} {s} leaves", (t,)) for (c, s), t in sorted(_leavings(stream).items())]
    tasks += [WatchTask("recolour", f"the {s} turns {c}", (t,)) for (c, s), t in sorted(_recolourings(stream).items())]
    scenes = tuple(e.time for e in stream.events if e.kind == "scene")
    if scenes:
        tasks.append(WatchTask("scene", "the background changes", scenes))
    never = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in shown]
    for i in rng.permutation(len(never))[:negatives]:
        c, s = never[i]
        tasks.append(WatchTask("appear", f"a {c} {s} appears", ()))
    for i in rng.permutation(len(never))[:negatives]:
        c, s = never[i]
        tasks.append(WatchTask("recolour", f"the {s} turns {c}", ()))
    staying = sorted((o.colours[-1][1], o.shape) for o in stream.objects.values() if o.disappear is None)
    for c, s in staying[:negatives]:  # on screen to the end, in its last colour
        tasks.append(WatchTask("leave", f"the {c} {s} leaves", ()))
    return tasks
