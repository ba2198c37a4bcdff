"""A procedural streaming world: seeded streams of coloured shapes, their events, frames and questions.

A stream is a timeline. One to three filled shapes (circle, square, triangle in six colours) move slowly over a plain
background; objects appear and disappear, change colour (`recolour`), and a `scene` change swaps the background and
every object at once. Every event falls at k + 0.5 s, so a frame sampled at an integer second never shows a transition
and the frame at time t shows the state at t. `generate_stream(seed)` builds the timeline from the seed alone;
`render` and `label_map` draw one `Scene`; `make_questions` asks questions whose answers follow from the frames sampled
at 1 fps up to the question time, each type designed to need one part of the memory (spatial, temporal, abstract,
retrieved); `write_dataset` writes a split as videos, timelines, LLaVA training records and VStream-QA test records.

Within a stream a (colour, shape) pair belongs to at most one object ever, and objects on screen at once differ in
colour and in shape, so "the red circle" names one object. Each object moves inside its own third of the frame (a
column chosen when it appears), so objects never overlap and each is fully visible.

This module does not decode video and knows nothing about models, tokenizers or prompts.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vstream.errors import UserInputError
from vstream.synth.clips import write_video

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
}
"""RGB of each object colour; the order gives the colour index of `label_map`."""
SHAPES = ("circle", "square", "triangle")
"""Object shapes; the order gives the shape index of `label_map`."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (115, 115, 115),
    "sand": (200, 175, 130),
    "teal": (20, 110, 115),
    "night": (20, 25, 60),
}
"""RGB of each scene background."""
QUESTION_TYPES = ("spatial", "temporal", "abstract", "retrieved")
"""Question types, each named by the memory part it is designed to need."""
SPLIT_SEEDS = {"train": range(0, 1_000_000), "val": range(1_000_000, 1_100_000), "test": range(2_000_000, 2_100_000)}
"""Disjoint seed ranges of the dataset splits."""

MIN_DURATION = 10
"""Shortest stream, in seconds."""
SIZE_RANGE = (0.10, 0.16)
"""Object size (radius or half-side) as a fraction of the frame side."""
SPEED_RANGE = (0.01, 0.04)
"""Object speed in frame sides per second."""
MAX_PAIRS = 15
"""Most (colour, shape) pairs one stream uses, so some are left to ask about with the answer "no"."""

_COLOURS = tuple(OBJECT_COLOURS)
_NUMBERS = ("zero", "one", "two", "three")
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


@dataclass(frozen=True)
class SceneObject:
    """An object as drawn at one moment: centre (x, y) and size as fractions of the frame side."""

    id: int
    shape: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """What the world shows at `time`: the background and the visible objects (by id)."""

    time: float
    background: str
    objects: tuple[SceneObject, ...]


@dataclass
class Stream:
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
        """The ground-truth timeline as JSON-able data (`Stream.from_dict` reads it back)."""
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
    def from_dict(cls, data: dict) -> Stream:
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


def generate_stream(seed: int, duration: int | None = None) -> Stream:
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

    def build(self) -> Stream | None:
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
        return Stream(self.seed, self.duration, self.backgrounds, self.events, self.objects)

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
        pairs = [(c, s) for c in _COLOURS for s in SHAPES
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
            free = [c for c in _COLOURS if c not in colours_on and (c, o.shape) not in self.used]
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


# ----------------------------------------------------------------------------------------------------------- rendering


def label_of(colour: str, shape: str) -> int:
    """The `label_map` value of a (colour, shape) pair: 1 + colour_index * len(SHAPES) + shape_index."""
    return 1 + _COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def label_name(label: int) -> tuple[str, str]:
    """The (colour, shape) pair of a non-zero `label_map` value."""
    if not 1 <= label <= len(_COLOURS) * len(SHAPES):
        raise ValueError(f"label must be in [1, {len(_COLOURS) * len(SHAPES)}], got {label}")
    return _COLOURS[(label - 1) // len(SHAPES)], SHAPES[(label - 1) % len(SHAPES)]


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """RGB frame [size, size, 3] uint8 of a scene: its label map looked up in the background's palette."""
    return np.take(_palette(scene.background), label_map(scene, size), axis=0)


@functools.lru_cache(maxsize=None)
def _palette(background: str) -> np.ndarray:
    """RGB of each label value [1 + len(OBJECT_COLOURS) * len(SHAPES), 3] uint8, label 0 = the background."""
    palette = np.empty((1 + len(_COLOURS) * len(SHAPES), 3), np.uint8)
    palette[0] = BACKGROUNDS[background]
    palette[1:] = np.repeat(np.array(list(OBJECT_COLOURS.values()), np.uint8), len(SHAPES), axis=0)
    palette.flags.writeable = False
    return palette


def label_map(scene: Scene, size: int = 128) -> np.ndarray:
    """Per-pixel labels [size, size] int16: 0 = background, else `label_of(colour, shape)` of the object there."""
    labels = np.zeros((_checked_size(size), size), np.int16)
    for o in scene.objects:
        rows, cols, mask = _object_mask(o, size)
        labels[rows, cols][mask] = label_of(o.colour, o.shape)
    return labels


def _checked_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise UserInputError(f"frame size must be an integer >= 8 pixels, got {size!r}")
    return int(size)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> np.ndarray:
    return (np.arange(size) + 0.5) / size  # [size], fraction of the frame side


def _object_mask(o: SceneObject, size: int) -> tuple[slice, slice, np.ndarray]:
    """The object's bounding box in pixels and its mask inside the box [h, w] bool."""
    centres = _pixel_centres(size)
    i0, i1 = max(0, math.floor((o.y - o.size) * size)), min(size, math.ceil((o.y + o.size) * size) + 1)
    j0, j1 = max(0, math.floor((o.x - o.size) * size)), min(size, math.ceil((o.x + o.size) * size) + 1)
    u = centres[j0:j1][None, :] - o.x  # [1, w]
    v = centres[i0:i1][:, None] - o.y  # [h, 1]
    s = o.size
    if o.shape == "circle":
        mask = u * u + v * v <= s * s
    elif o.shape == "square":
        mask = (np.abs(u) <= s) & (np.abs(v) <= s)
    else:  # triangle: apex at the top centre, base along the bottom of the box
        mask = (v <= s) & (np.abs(u) <= (v + s) / 2)
    return slice(i0, i1), slice(j0, j1), mask


def write_stream_video(stream: Stream, path: str | Path, fps: float = 4.0, size: int = 128) -> Path:
    """Encode the stream's frames at `fps` as H.264 (yuv420p, so `size` must be even). Returns the path."""
    if _checked_size(size) % 2:
        raise UserInputError(f"H.264 yuv420p needs an even frame size, got {size}")
    return write_video(path, (frame for _, frame in stream.frames(fps, size)), fps=fps)


# ----------------------------------------------------------------------------------------------------------- questions


@dataclass
class QA:
    """A question asked at `time` (an integer second), answerable from the frames sampled at 0, 1, ..., time."""

    time: float
    type: str  # one of QUESTION_TYPES
    question: str
    answer: str  # short, lower case, from `choices`
    choices: list[str] | None = field(default=None)


class _Facts:
    """What the frames sampled at integer seconds show; every answer is computed from these, not from events."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.background = [stream.background_at(k) for k in range(stream.duration)]
        self.shown = [{o.id: o.colour for o in stream.state_at(k).objects} for k in range(stream.duration)]
        self.first: dict[int, int] = {}  # object id -> first frame showing it
        for k, shown in enumerate(self.shown):
            for oid in shown:
                self.first.setdefault(oid, k)
        self.used = {(c, o.shape) for o in stream.objects.values() for _, c in o.colours}
        self._cache: dict[int, dict[str, dict[str, list]]] = {}

    def colours_until(self, oid: int, t: int) -> list[tuple[str, int]]:
        """(colour, frames showing it) of an object in the frames 0..t, in order."""
        runs: list[tuple[str, int]] = []
        for k in range(t + 1):
            colour = self.shown[k].get(oid)
            if colour is None:
                continue
            if runs and runs[-1][0] == colour:
                runs[-1] = (colour, runs[-1][1] + 1)
            else:
                runs.append((colour, 1))
        return runs

    def candidates(self, t: int) -> dict[str, dict[str, list[tuple[str, str, list[str]]]]]:
        """type -> subtype -> [(question, answer, choices)] answerable at integer time t >= 1."""
        if t not in self._cache:
            self._cache[t] = {"spatial": self._spatial(t), "temporal": self._temporal(t),
                              "abstract": self._abstract(t), "retrieved": self._retrieved(t)}
        return self._cache[t]

    def _shape(self, oid: int) -> str:
        return self.stream.objects[oid].shape

    def _spatial(self, t: int) -> dict[str, list]:
        now, before = self.shown[t], self.shown[t - 1]
        stable = [oid for oid, colour in now.items() if before.get(oid) == colour]  # same object, same colour at t-1
        out: dict[str, list] = {"shape_of_colour": [], "colour_of_shape": [], "count": []}
        for oid in stable:
            shape, colour = self._shape(oid), now[oid]
            out["shape_of_colour"].append((f"What shape is the {colour} object?", shape, list(SHAPES)))
            out["colour_of_shape"].append((f"What colour is the {shape}?", colour, list(_COLOURS)))
        if set(now) == set(before):
            out["count"].append(("How many objects are on the screen?", _NUMBERS[len(now)], list(_NUMBERS[1:])))
        return out

    def _temporal(self, t: int) -> dict[str, list]:
        # objects first seen before t that kept one colour through frame t, named by that colour
        named = {oid: f"{runs[0][0]} {self._shape(oid)}" for oid, k in self.first.items()
                 if k < t and len(runs := self.colours_until(oid, t)) == 1}
        first = []
        for a in named:
            for b in named:
                if a != b and self.first[b] - self.first[a] >= 3:  # a appeared first, at least 3 s earlier
                    answer = named[a]
                    first.append((f"Which appeared first, the {named[a]} or the {named[b]}?", answer, [named[a], named[b]]))
                    first.append((f"Which appeared first, the {named[b]} or the {named[a]}?", answer, [named[b], named[a]]))
        changes = sum(self.background[k] != self.background[k - 1] for k in range(1, t + 1))
        count = [("How many times has the scene changed?", _NUMBERS[changes], list(_NUMBERS))]
        return {"first": first, "scene_count": count}

    def _abstract(self, t: int) -> dict[str, list]:
        seen = {(c, self._shape(oid)) for k in range(t + 1) for oid, c in self.shown[k].items()}
        never = [(c, s) for c in _COLOURS for s in SHAPES if (c, s) not in self.used]
        yes_no = ["yes", "no"]
        out: dict[str, list] = {
            "seen_yes": [(f"Has a {c} {s} appeared?", "yes", yes_no) for c, s in sorted(seen)],
            "seen_no": [(f"Has a {c} {s} appeared?", "no", yes_no) for c, s in never],
            "start_background": [],
        }
        if self.background[t] != self.background[0] or len(set(self.background[: t + 1])) > 1:
            out["start_background"].append(
                ("What was the background at the start?", self.background[0], list(BACKGROUNDS)))
        return out

    def _retrieved(self, t: int) -> dict[str, list]:
        seen = [oid for oid, k in self.first.items() if k <= t]
        old_colour, appear_background = [], []
        for oid in seen:
            shape, runs = self._shape(oid), self.colours_until(oid, t)
            if len(runs) == 2 and runs[0][1] >= 3:
                unique = all(self._shape(other) != shape for other in seen if other != oid)
                name = shape if unique else f"{runs[1][0]} {shape}"
                old_colour.append((f"What colour was the {name} before it changed colour?", runs[0][0],
                                   list(_COLOURS)))
            if self.first[oid] < t:
                appear_background.append((f"What was the background when the {runs[0][0]} {shape} appeared?",
                                           self.background[self.first[oid]], list(BACKGROUNDS)))
        return {"old_colour": old_colour, "appear_background": appear_background}


def make_questions(stream: Stream, seed: int | None = None) -> list[QA]:
    """8..12 questions spread over the stream, types in turn (balanced), sorted by time; same stream and seed, same
    questions. `seed` defaults to one derived from the stream's seed."""
    rng = np.random.default_rng([stream.seed, 1] if seed is None else seed)
    facts = _Facts(stream)
    first, last = 2, stream.duration - 1
    n = int(rng.integers(8, 13))
    types = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(n)]
    rng.shuffle(types)
    edges = np.linspace(first, last + 1, n + 1)
    everywhere = range(first, last + 1)
    asked: set[str] = set()
    asked_at: set[tuple[float, str]] = set()
    out = []
    for i, kind in enumerate(types):
        window = range(math.ceil(edges[i]), math.ceil(edges[i + 1]))
        fallback = [(kind, everywhere)] + [(other, window) for other in QUESTION_TYPES if other != kind]
        for qtype, times in [(kind, window)] + fallback:
            qa = _pick(rng, facts, qtype, times, asked, asked_at)
            if qa is not None:
                out.append(qa)
                asked.add(qa.question)
                asked_at.add((qa.time, qa.question))
                break
    return sorted(out, key=lambda qa: qa.time)


def _pick(rng: np.random.Generator, facts: _Facts, qtype: str, times: range, asked: set[str],
          asked_at: set[tuple[float, str]]) -> QA | None:
    """A random question of `qtype` at one of `times`: a subtype uniformly among those possible, then a question,
    preferring texts not asked yet in this stream."""
    fresh: dict[str, list] = {}
    repeated: dict[str, list] = {}
    for t in times:
        for subtype, items in facts.candidates(t)[qtype].items():
            for question, answer, choices in items:
                if (float(t), question) in asked_at:
                    continue
                pool = repeated if question in asked else fresh
                pool.setdefault(subtype, []).append(QA(float(t), qtype, question, answer, choices))
    pool = fresh or repeated
    if not pool:
        return None
    subtypes = sorted(pool)
    items = pool[subtypes[int(rng.integers(len(subtypes)))]]
    return items[int(rng.integers(len(items)))]


# -------------------------------------------------------------------------------------------------------------- splits


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds `start` .. `start + n - 1` of a split's range in SPLIT_SEEDS."""
    if split not in SPLIT_SEEDS:
        raise UserInputError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    seeds = SPLIT_SEEDS[split]
    if n < 0 or start < 0 or start + n > len(seeds):
        raise UserInputError(f"split {split!r} has {len(seeds)} seeds: expected 0 <= start and "
                             f"start + n <= {len(seeds)}, got start {start}, n {n}")
    return list(seeds[start : start + n])


def write_dataset(
    out_dir: str | Path, split: str, n_streams: int, fps: float = 4.0, size: int = 128, start: int = 0,
    on_stream: Callable[[int], None] | None = None,
) -> dict:
    """Write streams `start` .. `start + n_streams - 1` of a split to `out_dir`: `videos/{seed}.mp4` (H.264 at `fps`),
    `timelines/{seed}.json` (`Stream.to_dict()` plus its questions), `llava.json` (LLaVA training records) and
    `test_qa.json` (VStream-QA records). Calls `on_stream(seed)` after each stream. Returns the counts."""
    seeds = split_seeds(split, n_streams, start)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "timelines").mkdir(parents=True, exist_ok=True)
    llava, test_qa, by_type, seconds = [], [], Counter(), 0
    for seed in seeds:
        stream = generate_stream(seed)
        questions = make_questions(stream)
        video = f"videos/{seed}.mp4"
        write_stream_video(stream, out / video, fps=fps, size=size)
        timeline = stream.to_dict() | {"questions": [asdict(qa) for qa in questions]}
        (out / "timelines" / f"{seed}.json").write_text(json.dumps(timeline))
        for i, qa in enumerate(questions):
            qid = f"{seed}-{i}"
            llava.append({"id": qid, "video": video, "time": qa.time, "question_type": qa.type, "conversations": [
                {"from": "human", "value": "<image>\n" + qa.question}, {"from": "gpt", "value": qa.answer}]})
            test_qa.append({"video_id": f"{seed}.mp4", "question": qa.question, "id": qid, "answer": qa.answer,
                            "answer_type": qa.type, "time": qa.time, "duration": stream.duration})
            by_type[qa.type] += 1
        seconds += stream.duration
        if on_stream is not None:
            on_stream(seed)
    (out / "llava.json").write_text(json.dumps(llava, indent=1))
    (out / "test_qa.json").write_text(json.dumps(test_qa, indent=1))
    return {"split": split, "streams": len(seeds), "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "seconds": seconds, "questions": len(llava), "by_type": dict(sorted(by_type.items()))}
