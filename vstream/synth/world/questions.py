"""Questions about a world stream: `make_questions` asks `WorldQuestion`s whose answers follow from the frames sampled
at 1 fps up to the question time, each type designed to need one part of the memory (spatial, temporal, abstract,
retrieved).

Answers are computed from what the sampled frames show (`_Facts`), never from the events, so a question about a
change between two samples cannot be asked.

This module does not draw frames or write files; it knows nothing about models, tokenizers or prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vstream.synth.world.render import BACKGROUNDS, COLOUR_NAMES, SHAPES
from vstream.synth.world.timeline import WorldTimeline

QUESTION_TYPES = ("spatial", "temporal", "abstract", "retrieved")
"""Question types, each named by the memory part it is designed to need."""
_NUMBERS = ("zero", "one", "two", "three")


@dataclass
class WorldQuestion:
    """A question asked at `time` (an integer second), answerable from the frames sampled at 0, 1, ..., time."""

    time: float
    type: str  # one of QUESTION_TYPES
    question: str
    answer: str  # short, lower case, from `choices`
    choices: list[str] | None = field(default=None)


class _Facts:
    """What the frames sampled at integer seconds show; every answer is computed from these, not from events."""

    def __init__(self, stream: WorldTimeline):
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
            out["colour_of_shape"].append((f"What colour is the {shape}?", colour, list(COLOUR_NAMES)))
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
                    first.append((f"Which appeared first, the {named[a]} or the {named[b]}?", answer,
                                  [named[a], named[b]]))
                    first.append((f"Which appeared first, the {named[b]} or the {named[a]}?", answer,
                                  [named[b], named[a]]))
        changes = sum(self.background[k] != self.background[k - 1] for k in range(1, t + 1))
        count = [("How many times has the scene changed?", _NUMBERS[changes], list(_NUMBERS))]
        return {"first": first, "scene_count": count}

    def _abstract(self, t: int) -> dict[str, list]:
        seen = {(c, self._shape(oid)) for k in range(t + 1) for oid, c in self.shown[k].items()}
        never = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in self.used]
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
                                   list(COLOUR_NAMES)))
            if self.first[oid] < t:
                appear_background.append((f"What was the background when the {runs[0][0]} {shape} appeared?",
                                           self.background[self.first[oid]], list(BACKGROUNDS)))
        return {"old_colour": old_colour, "appear_background": appear_background}


def make_questions(stream: WorldTimeline, seed: int | None = None) -> list[WorldQuestion]:
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


def questions_at(stream: WorldTimeline, t: int, n: int, rng: np.random.Generator) -> list[WorldQuestion]:
    """Up to `n` different questions answerable at the integer time t (none before 1 s), the types in a random order
    and in turn, each drawn as `make_questions` draws one."""
    if t < 1:
        return []
    facts, out, asked = _Facts(stream), [], set()
    types = [str(x) for x in rng.permutation(QUESTION_TYPES)]
    while len(out) < n and types:
        qtype = types.pop(0)
        qa = _pick(rng, facts, qtype, range(t, t + 1), asked, set())
        if qa is not None and qa.question not in asked:
            out.append(qa)
            asked.add(qa.question)
            types.append(qtype)
    return out


def _pick(rng: np.random.Generator, facts: _Facts, qtype: str, times: range, asked: set[str],
          asked_at: set[tuple[float, str]]) -> WorldQuestion | None:
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
                pool.setdefault(subtype, []).append(WorldQuestion(float(t), qtype, question, answer, choices))
    pool = fresh or repeated
    if not pool:
        return None
    subtypes = sorted(pool)
    items = pool[subtypes[int(rng.integers(len(subtypes)))]]
    return items[int(rng.integers(len(items)))]

