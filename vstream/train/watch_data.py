"""Watch conversations: yes/no questions asked as a watch asks them, over one memory snapshot of a world stream.

A watch scores a condition as the log-odds of "Yes" against "No" at the end of its prompt, the single-turn question
`vstream.model.yesno.watch_question(condition)` right after the memory (`prompt_parts` of the model's template). To
train that score, a watch conversation takes a stream time t and several conditions of the world's watch types
(`vstream.synth.world.watches`), each answered "Yes" or "No" by `holds(..., t)`, the ground truth a watch should follow.

Several questions share one memory in one training sequence (`pack_questions`, which also takes the world's own
questions asked at the same time, `PackedQuestions`): the part before the memory and the memory come once, then each
question's own prompt tokens and answer. `segments` numbers the parts (0 the shared one,
i the i-th question), so that the trainer lets each question attend to the shared part and its own tokens only, at
the positions it would have alone: every question is trained exactly as the scorer asks it, at the cost of its own
tokens (~30) rather than of a whole memory (~700).

Which questions (`watch_questions`): each of the three object types gets its share of the questions, about half of them
true at t where there are enough true ones and no more false than true ones otherwise (the freed places go to the
other types' true conditions, then to false ones), the false ones drawn mostly from pairs on screen or seen by t or
sharing a colour or shape with one (the same shape in another colour, the same colour on another shape, an object on
screen that has not left, a colour an object had from its start); "the background changes" is asked every time. Most
conversations sit at a frame next to an event (most of them the first frame that shows it), the others anywhere
(`sample_time`).

This module draws no frames and builds no memory (`vstream.train.world_data` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vstream.errors import DataError
from vstream.model.prompts import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, build_training_example, prompt_parts
from vstream.model.yesno import watch_question
from vstream.synth.world.render import COLOUR_NAMES, SHAPES
from vstream.synth.world.timeline import WorldTimeline
from vstream.synth.world.watches import condition_text, holds

OBJECT_TYPES = ("appear", "leave", "recolour")
YES, NO = "Yes", "No"


@dataclass(frozen=True)
class PackedQuestions:
    """Single-turn questions over one memory, each with its answer, to train in one sequence (`pack_questions`)."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]

    def __add__(self, other: PackedQuestions) -> PackedQuestions:
        return PackedQuestions(self.questions + other.questions, self.answers + other.answers)


@dataclass(frozen=True)
class WatchQuestions:
    """Conditions to ask over one memory, each with its answer (True: "Yes")."""

    conditions: tuple[str, ...]
    answers: tuple[bool, ...]

    def packed(self) -> PackedQuestions:
        """The conditions as the watch scorer asks them (`watch_question`), answered "Yes" or "No"."""
        return PackedQuestions(tuple(watch_question(c) for c in self.conditions),
                               tuple(YES if a else NO for a in self.answers))


def sample_time(stream: WorldTimeline, rng: np.random.Generator, near: float = 0.6,
                kind_weights: Mapping[str, float] | None = None) -> float:
    """A whole second of the stream: with probability `near`, next to an event (an event kind of the stream first,
    drawn in proportion to `kind_weights`, 1 for a kind it does not name, so that the rarer recolourings and scene
    changes come as often as the others or more; the last frame before it one time in three, else the first frame
    showing it or, 40 % of those times, one of the next two), else any frame."""
    kinds = sorted({e.kind for e in stream.events})
    if kinds and rng.random() < near:
        if kind_weights:
            weights = np.asarray([kind_weights.get(k, 1.0) for k in kinds], dtype=np.float64)
            kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        else:
            kind = kinds[int(rng.integers(len(kinds)))]
        events = [e.time for e in stream.events if e.kind == kind]
        event = events[int(rng.integers(len(events)))]
        if rng.random() < 1 / 3:
            return float(np.floor(event))
        return float(min(np.ceil(event) + (rng.integers(1, 3) if rng.random() < 0.4 else 0), stream.duration - 1))
    return float(rng.integers(stream.duration))


def watch_questions(stream: WorldTimeline, t: float, rng: np.random.Generator, n: int,
                    false_per_true: float = 0.0) -> WatchQuestions:
    """`n` >= 2 conditions over the memory at t with their ground truth (see the module docstring), in random order.
    `false_per_true` > 0 caps each object type's false conditions at that many per true one (at least one false one
    is asked; a type with no true one gets ceil(false_per_true) false ones) and leaves places empty rather than fill
    them: fewer questions, but no type is taught mostly "No" (its share of "Yes" at least 1 / (1 + false_per_true)
    wherever it has true conditions)."""
    if n < 2:
        raise ValueError(f"a watch conversation asks at least 2 questions, got {n}")
    seen = {(o.colour, o.shape) for k in range(int(t) + 1) for o in stream.state_at(float(k)).objects}
    colours, shapes = {c for c, _ in seen}, {s for _, s in seen}
    picked: list[tuple[str, bool]] = [(condition_text("scene"), bool(holds(stream, "scene", None, None, t)))]
    quotas = np.full(len(OBJECT_TYPES), (n - 1) // len(OBJECT_TYPES))
    quotas[rng.permutation(len(OBJECT_TYPES))[: (n - 1) % len(OBJECT_TYPES)]] += 1
    spare_yes: list[str] = []
    spare_no: list[tuple[str, float]] = []
    for type_, quota in zip(OBJECT_TYPES, quotas.tolist()):
        yes, no = [], []
        for c in COLOUR_NAMES:
            for s in SHAPES:
                truth = holds(stream, type_, c, s, t)
                if truth is not None:
                    weight = 4.0 if (c, s) in seen else 2.0 if c in colours or s in shapes else 1.0
                    (yes.append(condition_text(type_, c, s)) if truth
                     else no.append((condition_text(type_, c, s), weight)))
        yes = [yes[i] for i in rng.permutation(len(yes))]
        no = _weighted_order(no, rng)
        n_yes = min(len(yes), quota // 2 + int(rng.integers(2)) * (quota % 2))
        n_no = min(len(no), quota - n_yes, max(n_yes, 1))  # no more false than true ones, if few true ones at t
        if false_per_true > 0:
            n_yes = min(len(yes), max(1, round(quota / (1 + false_per_true))))
            n_no = min(len(no), quota - n_yes, math.ceil(false_per_true * max(n_yes, 1)))
        picked += [(c, True) for c in yes[:n_yes]] + [(c, False) for c, _ in no[:n_no]]
        spare_yes += yes[n_yes:]
        spare_no += no[n_no:]
    if false_per_true <= 0:  # the free places: the types' other true conditions first, then false ones
        picked += [(spare_yes[i], True) for i in rng.permutation(len(spare_yes))[: n - len(picked)]]
        picked += [(c, False) for c, _ in _weighted_order(spare_no, rng)[: n - len(picked)]]
    order = rng.permutation(len(picked))
    return WatchQuestions(tuple(picked[i][0] for i in order), tuple(picked[i][1] for i in order))


def _weighted_order(items: list[tuple[str, float]], rng: np.random.Generator) -> list[tuple[str, float]]:
    """The (item, weight) pairs in a random order where heavier ones tend to come first."""
    if not items:
        return []
    p = np.asarray([w for _, w in items]) / sum(w for _, w in items)
    return [items[i] for i in rng.choice(len(items), len(items), replace=False, p=p)]


def pack_questions(template: str, questions: PackedQuestions | WatchQuestions,
                   tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, segments) of the questions over one memory (see the module docstring): the ids before the
    memory and its `IMAGE_TOKEN_INDEX` once (segment 0), then per question (segment i from 1) the ids after the memory
    of its prompt and its supervised answer. Each question's prompt ids are checked equal to its inference prompt's
    (`prompt_parts`, which the watch scorer asks)."""
    if isinstance(questions, WatchQuestions):
        questions = questions.packed()
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    for i, (question, answer) in enumerate(zip(questions.questions, questions.answers), start=1):
        before, after = prompt_parts(template, question, tokenizer)
        one_ids, one_labels = build_training_example(
            template, [{"from": "human", "value": IMAGE_TOKEN + "\n" + question},
                       {"from": "gpt", "value": answer}], tokenizer)
        cut = len(before) + 1
        if one_ids[:cut + len(after)] != [*before, IMAGE_TOKEN_INDEX, *after] or all(x < 0 for x in one_labels):
            raise DataError(f"the training tokens of {question!r} do not start with its prompt's tokens (the "
                            "answer merged with the prompt's last tokens)")
        if not ids:
            ids, labels, segments = list(one_ids[:cut]), list(one_labels[:cut]), [0] * cut
        elif ids[:cut] != one_ids[:cut]:
            raise DataError("the prompts differ before the memory: expected the question after the image")
        ids += one_ids[cut:]
        labels += one_labels[cut:]
        segments += [i] * (len(one_ids) - cut)
    if not ids:
        raise DataError("packed questions need at least one question")
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(segments)


def packed_attention(segments: Sequence[torch.Tensor], length: int, boolean: bool,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask [B, 1, L, L], position ids [B, L]) of a right-padded batch of sequences with these segment ids
    (one per token; the zeros must come first): a token attends causally to segment 0 and to its own segment, and a
    token of segment i > 0 sits at the position it would have right after segment 0. Padding attends to itself only.
    `boolean`: True where attention is allowed (SDPA); else 0 there and the dtype's lowest value elsewhere (eager)."""
    seg = torch.full((len(segments), length), -1, dtype=torch.long)
    positions = torch.zeros(len(segments), length, dtype=torch.long)
    for b, s in enumerate(segments):
        n, shared = len(s), int((s == 0).sum())
        if bool((s[:shared] != 0).any()) or bool((s[shared:] <= 0).any()):
            raise ValueError(f"segment ids must be 0 first, then > 0, got {s.tolist()}")
        seg[b, :n] = s
        pos = torch.arange(n)
        for value in s[shared:].unique():
            where = (s == value).nonzero().flatten()
            pos[where] = shared + torch.arange(len(where))
        positions[b, :n] = pos
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q)) | torch.eye(length, dtype=torch.bool)
    mask = allowed[:, None]
    if not boolean:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask, positions
