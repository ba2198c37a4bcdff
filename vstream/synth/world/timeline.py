"""The timeline of a world stream: objects that appear, move, change colour and disappear, and scene changes, drawn
from a seed alone (`generate_stream`).

Every event falls at k + 0.5 s, so a frame sampled at an integer second never shows a transition and the frame at
time t shows the state at t. Within a stream a (colour, shape) pair belongs to at most one object ever, and objects on
screen at once differ in colour and in shape, so "the red circle" names one object. Each object moves inside its own
third of the frame (a column chosen when it appears), so objects never overlap and each is fully visible.

This module does not ask questions (`questions`) or write files (`dataset`); it draws frames only through `render`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from vstream.errors import UserInputError
from vstream.synth.world.render import BACKGROUNDS, COLOUR_NAMES, SHAPES, Scene, SceneObject, render

MIN_DURATION = 10
"""Shortest stream, in seconds."""
SIZE_RANGE = (0.10, 0.16)
"""Object size (radius or half-side) as a fraction of the frame side."""
SPEED_RANGE = (0.01, 0.04)
"""Object speed in frame sides per second."""
MAX_PAIRS = 15
"""Most (colour, shape) pairs one stream uses, so some are left to ask about with the answer "no"."""
_FIRST_EVENT = 2.5  # the first state holds for frames 0, 1, 2
_END_MARGIN = 2.5  # the last state holds for at least two sampled frames


@dataclass(frozen=True)
class Event:
    """One change of the world at `time` (k + 0.5 s): appear | disappear | recolour | scene."""

    time: float
    kind: str
    object: int | None  # None for scene changes
    details: dict


@dataclass
class ObjectTrack:
    """One object over its life: shape, colours over time, appear/disappear times and straight-line motion."""

    id: int
    shape: str
    colours: list[tuple[float, str]]  # (from time, colour), the first at `appear`
    appear: float
    disappear: float | None  # None: on screen until the end
    size: float  # radius or half-side, fraction of the frame side
    column: int  # third of the frame the object moves in: 0 left, 1 middle, 2 right
    start: tuple[float, float]  # centre (x, y) at `appear`, in [0, 1]
    velocity: tuple[float, float]  # frame sides per second, reflected at the column's edges

    def visible_at(self, t: float) -> bool:
        return self.appear <= t and (self.disappear is None or t < self.disappear)

    def colour_at(self, t: float) -> str:
        return [c for since, c in self.colours if since <= t][-1]

    def centre_at(self, t: float) -> tuple[float, float]:
        x_lo, x_hi = self.column / 3 + self.size, (self.column + 1) / 3 - self.size
        y_lo, y_hi = self.size, 1 - self.size
        dt = t - self.appear
        x = x_lo + _fold(self.start[0] - x_lo + self.velocity[0] * dt, x_hi - x_lo)
        y = y_lo + _fold(self.start[1] - y_lo + self.velocity[1] * dt, y_hi - y_lo)
        return x, y



@dataclass
class WorldTimeline:
    """A generated stream: its seed, duration (s), background timeline, events and objects."""

    seed: int
    duration: int
    backgrounds: list[tuple[float, str]]  # (from time, background), the first at 0
    events: list[Event]
    objects: dict[int, ObjectTrack]

    def background_at(self, t: float) -> str:
        return [b for since, b in self.backgrounds if since <= t][-1]

    def state_at(self, t: float) -> Scene:
        shown = []
        for o in self.objects.values():
            if o.visible_at(t):
                x, y = o.centre_at(t)
                shown.append(SceneObject(o.id, o.shape, o.colour_at(t), x, y, o.size))
        return Scene(float(t), self.background_at(t), tuple(shown))

    def frames(self, fps: float = 1.0, size: int = 128) -> Iterator[tuple[float, np.ndarray]]:
        """Yield (t, RGB frame [size, size, 3] uint8) for t = k / fps, 0 <= t < duration."""
        if not fps > 0:
            raise UserInputError(f"fps must be > 0, got {fps}")
        k = 0
        while (t := k / fps) < self.duration:
            yield t, render(self.state_at(t), size)
            k += 1

    def to_dict(self) -> dict:
        """The ground-truth timeline as JSON-able data (`WorldTimeline.from_dict` reads it back)."""
        return {
            "seed": self.seed,
            "duration": self.duration,
            "backgrounds": [{"time": t, "background": b} for t, b in self.backgrounds],
            "events": [asdict(e) for e in self.events],
            "objects": [
                asdict(o) | {"colours": [{"time": t, "colour": c} for t, c in o.colours]} for o in self.objects.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> WorldTimeline:
        objects = {}
        for o in data["objects"]:
            colours = [(c["time"], c["colour"]) for c in o["colours"]]
            objects[o["id"]] = ObjectTrack(**(o | {"colours": colours, "start": tuple(o["start"]),
                                                   "velocity": tuple(o["velocity"])}))
        return cls(
            seed=data["seed"],
            duration=data["duration"],
            backgrounds=[(b["time"], b["background"]) for b in data["backgrounds"]],
            events=[Event(**e) for e in data["events"]],
            objects=objects,
        )


def _fold(position: float, span: float) -> float:
    """Fold an unbounded coordinate into [0, span], reflecting at both ends."""
    if span <= 0:
        return 0.0
    folded = position % (2 * span)
    return span - abs(folded - span)


# ---------------------------------------------------------------------------------------------------------- generation


def generate_stream(seed: int, duration: int | None = None) -> WorldTimeline:
    """The stream of `seed` (same seed and duration, same stream). `duration` in whole seconds, default 24..48."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    if duration is None:
        duration = int(rng.integers(24, 49))
    elif isinstance(duration, bool) or not isinstance(duration, (int, np.integer)) or duration < MIN_DURATION:
        raise UserInputError(f"duration must be an integer number of seconds >= {MIN_DURATION}, got {duration!r}")
    for _ in range(1000):  # rejection sampling: a draw that breaks a rule is drawn again from the same generator
        stream = _Builder(rng, int(seed), int(duration)).build()
        if stream is not None:
            return stream
    raise RuntimeError(f"no valid stream for seed {seed}, duration {duration} after 1000 draws")


class _Builder:
    """Draws one candidate timeline; `build` returns None when the draw cannot keep the rules."""

    def __init__(self, rng: np.random.Generator, seed: int, duration: int):
        self.rng, self.seed, self.duration = rng, seed, duration
        self.objects: dict[int, ObjectTrack] = {}
        self.on_screen: list[int] = []
        self.recoloured: set[int] = set()
        self.used: set[tuple[str, str]] = set()
        self.events: list[Event] = []
        self.background = self._pick(list(BACKGROUNDS))
        self.backgrounds = [(0.0, self.background)]

    def build(self) -> WorldTimeline | None:
        times = self._event_times()
        n_scene, n_recolour = int(self.rng.integers(0, 4)), int(self.rng.integers(1, 4))
        if n_scene + n_recolour > len(times):
            return None
        kinds = ["change"] * len(times)
        picked = self.rng.permutation(len(times))[: n_scene + n_recolour]
        for i in picked[:n_scene]:
            kinds[i] = "scene"
        for i in picked[n_scene:]:
            kinds[i] = "recolour"
        for _ in range(int(self.rng.integers(1, 3))):
            self._spawn(0.0)
        steps = {"scene": self._scene, "recolour": self._recolour, "change": self._change}
        for t, kind in zip(times, kinds):
            if not steps[kind](t):
                return None
        return WorldTimeline(self.seed, self.duration, self.backgrounds, self.events, self.objects)

    def _event_times(self) -> list[float]:
        times, t = [], _FIRST_EVENT + float(self.rng.integers(0, 2))
        while t <= self.duration - _END_MARGIN:
            times.append(t)
            t += float(self.rng.integers(2, 6))
        return times

    def _pick(self, options: list):
        return options[int(self.rng.integers(len(options)))]

    def _spawn(self, t: float) -> int | None:
        shown = [self.objects[i] for i in self.on_screen]
        colours_on = {o.colour_at(t) for o in shown}
        shapes_on = {o.shape for o in shown}
        pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES
                 if c not in colours_on and s not in shapes_on and (c, s) not in self.used]
        columns = [c for c in range(3) if c not in {o.column for o in shown}]
        if not pairs or not columns or len(self.used) >= MAX_PAIRS:
            return None
        colour, shape = self._pick(pairs)
        column = self._pick(columns)
        size = float(self.rng.uniform(*SIZE_RANGE))
        x = float(self.rng.uniform(column / 3 + size, (column + 1) / 3 - size))
        y = float(self.rng.uniform(size, 1 - size))
        speed, angle = float(self.rng.uniform(*SPEED_RANGE)), float(self.rng.uniform(0, 2 * math.pi))
        oid = len(self.objects)
        self.objects[oid] = ObjectTrack(oid, shape, [(t, colour)], t, None, size, column, (x, y),
                                        (speed * math.cos(angle), speed * math.sin(angle)))
        self.used.add((colour, shape))
        self.on_screen.append(oid)
        return oid

    def _remove(self, oid: int, t: float) -> None:
        self.objects[oid].disappear = t
        self.on_screen.remove(oid)

    def _change(self, t: float) -> bool:
        """An appear or a disappear, keeping 1..3 objects on screen."""
        n = len(self.on_screen)
        if n < 3 and (n == 1 or self.rng.random() < 0.5):
            oid = self._spawn(t)
            if oid is not None:
                o = self.objects[oid]
                self.events.append(Event(t, "appear", oid, {"colour": o.colour_at(t), "shape": o.shape}))
                return True
        if n == 1:
            return False
        oid = self._pick(self.on_screen)
        o = self.objects[oid]
        self._remove(oid, t)
        self.events.append(Event(t, "disappear", oid, {"colour": o.colour_at(t), "shape": o.shape}))
        return True

    def _recolour(self, t: float) -> bool:
        colours_on = {self.objects[i].colour_at(t) for i in self.on_screen}
        options = {}
        for oid in self.on_screen:
            o = self.objects[oid]
            free = [c for c in COLOUR_NAMES if c not in colours_on and (c, o.shape) not in self.used]
            if oid not in self.recoloured and free and len(self.used) < MAX_PAIRS:
                options[oid] = free
        if not options:
            return False
        # Prefer an object whose old colour was sampled at least 3 times, so it can be asked about later.
        long_shown = [i for i in options if math.floor(t) - math.ceil(self.objects[i].appear) + 1 >= 3]
        oid = self._pick(long_shown or list(options))
        o, new = self.objects[oid], self._pick(options[oid])
        old = o.colour_at(t)
        o.colours.append((t, new))
        self.used.add((new, o.shape))
        self.recoloured.add(oid)
        self.events.append(Event(t, "recolour", oid, {"shape": o.shape, "from": old, "to": new}))
        return True

    def _scene(self, t: float) -> bool:
        new = self._pick([b for b in BACKGROUNDS if b != self.background])
        removed = list(self.on_screen)
        for oid in removed:
            self._remove(oid, t)
        added = [oid for oid in (self._spawn(t) for _ in range(int(self.rng.integers(1, 3)))) if oid is not None]
        if not added:
            return False
        self.events.append(Event(t, "scene", None, {"from": self.background, "to": new, "removed": removed,
                                                    "added": added}))
        self.background = new
        self.backgrounds.append((t, new))
        return True

