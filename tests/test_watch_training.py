"""Watch conversations for training (vstream.train.watch_data): the ground truth of each condition type on a
hand-made timeline, its agreement with what the watch evaluation rewards, the questions' balance, the packed questions'
tokens against the scorer's prompts, the packed attention against each question asked alone, and a world config with
watch conversations that builds batches and trains."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import yaml

from vstream.eval.world_watches import metrics
from vstream.model.loading import load
from vstream.model.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX, prompt_parts
from vstream.model.splice import splice
from vstream.model.yesno import watch_question, yes_no_ids, yes_no_scores_shared
from vstream.synth.world import COLOUR_NAMES, SHAPES, generate_stream, questions_at, split_seeds
from vstream.synth.world.timeline import Event, ObjectTrack, WorldTimeline
from vstream.synth.world.watches import WATCH_TYPES, condition_text, holds, make_watch_tasks
from vstream.train.data import collate
from vstream.train.modules import MemoryQAModule
from vstream.train.watch_data import (
    WatchQuestions,
    pack_questions,
    packed_attention,
    sample_time,
    watch_questions,
)

PARSE = {condition_text(t, c, s): (t, c, s) for t in WATCH_TYPES[:3] for c in COLOUR_NAMES for s in SHAPES}
PARSE[condition_text("scene")] = ("scene", None, None)


def _track(oid, shape, colours, appear, disappear, column):
    return ObjectTrack(oid, shape, colours, appear, disappear, 0.12, column, (0.2 + column / 3, 0.5), (0.0, 0.0))


def hand_timeline() -> WorldTimeline:
    """A red circle on screen from the start, gone at 8.5; a blue square from 3.5 that turns green at 12.5 and goes
    with the scene change at 20.5, which brings a white triangle (on screen to the end, at 30 s)."""
    objects = {0: _track(0, "circle", [(0.0, "red")], 0.0, 8.5, 0),
               1: _track(1, "square", [(3.5, "blue"), (12.5, "green")], 3.5, 20.5, 1),
               2: _track(2, "triangle", [(20.5, "white")], 20.5, None, 2)}
    events = [Event(3.5, "appear", 1, {"colour": "blue", "shape": "square"}),
              Event(8.5, "disappear", 0, {"colour": "red", "shape": "circle"}),
              Event(12.5, "recolour", 1, {"shape": "square", "from": "blue", "to": "green"}),
              Event(20.5, "scene", None, {"from": "gray", "to": "sand", "removed": [1], "added": [2]})]
    return WorldTimeline(7, 30, [(0.0, "gray"), (20.5, "sand")], events, objects)


def truth(stream, condition, times):
    return [holds(stream, *PARSE[condition], float(t)) for t in times]


def test_ground_truth_on_a_hand_made_timeline():
    s = hand_timeline()
    T, F, N = True, False, None
    assert truth(s, "a red circle appears", [0, 5, 9]) == [N, N, N], "on screen from the start: not asked"
    assert truth(s, "a blue square appears", [0, 3, 4, 12, 13, 29]) == [F, F, T, T, F, F]
    assert truth(s, "a green square appears", [12, 13, 20, 21]) == [F, T, T, F], "turning into it is appearing"
    assert truth(s, "a white triangle appears", [20, 21, 29]) == [F, T, T], "a scene change brings it"
    assert truth(s, "the red circle leaves", [0, 8, 9, 29]) == [F, F, T, T], "from the leaving to the end"
    assert truth(s, "the blue square leaves", [3, 12, 13, 29]) == [F, F, N, N], "turned green: it did not leave"
    assert truth(s, "the green square leaves", [12, 20, 21, 29]) == [F, F, T, T], "a scene change takes it"
    assert truth(s, "the white triangle leaves", [21, 29]) == [F, F]
    assert truth(s, "the square turns green", [0, 12, 13, 20, 21]) == [F, F, T, T, F], "while shown in it"
    assert truth(s, "the square turns blue", [3, 4, 12]) == [F, F, F], "blue from its appearance: never turned"
    assert truth(s, "the triangle turns white", [21, 29]) == [F, F]
    assert truth(s, "the background changes", [0, 20, 21, 24, 25, 29]) == [F, F, T, T, F, F], "for 4 s"
    for condition in ("a purple circle appears", "the purple circle leaves", "the circle turns purple"):
        assert truth(s, condition, range(30)) == [F] * 30, "never shown"


def test_ground_truth_as_scores_fires_every_watch_task_once_at_its_event():
    """Scored +3 where a condition holds and -3 where not, the evaluation's tasks trigger exactly at their events
    (delay 0.5 s), with no false alarm; only scene changes that come within 20 s of another are missed (a watch's
    10 s cooldown runs after its trigger and again after its clear)."""
    rows = []
    for seed in split_seeds("test", 40):
        stream = generate_stream(seed)
        times = [float(t) for t in range(stream.duration)]
        for task in make_watch_tasks(stream):
            labels = truth(stream, task.condition, times)
            assert None not in labels, task
            rows.append({"seed": seed, "duration": stream.duration, "type": task.type, "condition": task.condition,
                         "events": list(task.events), "times": times, "scores": [3.0 if x else -3.0 for x in labels]})
    m = metrics(rows, 0.0, 0.5, 10.0)
    for type_ in ("appear", "leave", "recolour"):
        assert (m[type_]["recall"], m[type_]["precision"], m[type_]["delay_p95_s"]) == (1.0, 1.0, 0.5), type_
    assert m["scene"]["false_alarms"] == 0 and m["scene"]["delay_median_s"] == 0.5 and m["scene"]["recall"] > 0.5
    missed = [r for r in rows if r["type"] == "scene" and len(r["events"]) > 1]
    assert missed and all(np.diff(r["events"]).min() < 20 for r in missed if metrics([r], 0.0, 0.5, 10.0)["scene"]
                          ["recall"] < 1)


def test_watch_questions_follow_the_truth_are_balanced_and_hard():
    counts, hard, scene = collections.Counter(), 0, 0
    for seed in split_seeds("train", 60):
        stream = generate_stream(seed)
        rng = np.random.default_rng(seed)
        for _ in range(3):
            t = sample_time(stream, rng)
            assert t == int(t) and 0 <= t < stream.duration
            q = watch_questions(stream, t, rng, 12)
            assert len(q.conditions) == len(set(q.conditions)) == 12
            assert list(q.answers) == [holds(stream, *PARSE[c], t) for c in q.conditions]
            scene += condition_text("scene") in q.conditions
            on_screen = {(o.colour, o.shape) for o in stream.state_at(t).objects}
            for c, a in zip(q.conditions, q.answers):
                type_, colour, shape = PARSE[c]
                counts[type_, a] += 1
                hard += not a and type_ != "scene" and any(colour == x or shape == y for x, y in on_screen)
    assert scene == 180, "the background question every time"
    for type_ in ("appear", "leave"):
        assert 0.35 < counts[type_, True] / (counts[type_, True] + counts[type_, False]) < 0.65, counts
    for type_ in ("recolour", "scene"):
        assert counts[type_, True] > 20, counts
    assert hard > 0.5 * sum(n for (t, a), n in counts.items() if not a and t != "scene"), "mostly hard negatives"


def test_times_drawn_next_to_weighted_kinds_and_false_conditions_capped_per_true_one():
    def tally(near, weights, false_per_true):
        counts, near_kind, sizes = collections.Counter(), collections.Counter(), []
        for seed in split_seeds("train", 60):
            stream = generate_stream(seed)
            rng = np.random.default_rng(seed)
            t = sample_time(stream, rng, near, weights)
            kinds = {e.kind for e in stream.events if abs(e.time - t) < 3}
            near_kind.update(kinds)
            q = watch_questions(stream, t, rng, 24, false_per_true)
            assert list(q.answers) == [holds(stream, *PARSE[c], t) for c in q.conditions]
            per_type = collections.Counter((PARSE[c][0], a) for c, a in zip(q.conditions, q.answers))
            for type_ in ("appear", "leave", "recolour"):
                if false_per_true and per_type[type_, True]:
                    assert per_type[type_, False] <= false_per_true * per_type[type_, True], per_type
            counts.update(per_type)
            sizes.append(len(q.conditions))
        return counts, near_kind, sizes

    plain, plain_near, plain_sizes = tally(0.6, None, 0.0)
    capped, capped_near, capped_sizes = tally(0.9, {"recolour": 8, "scene": 8}, 1.0)
    assert set(plain_sizes) == {24} and 2 <= min(capped_sizes) and max(capped_sizes) <= 24
    assert capped_near["recolour"] + capped_near["scene"] > plain_near["recolour"] + plain_near["scene"]

    def share(counts, type_):
        return counts[type_, True] / (counts[type_, True] + counts[type_, False])
    assert share(capped, "recolour") > 2 * share(plain, "recolour"), (plain, capped)


def test_world_questions_at_one_time_are_those_it_would_ask_then():
    stream = generate_stream(11)
    rng = np.random.default_rng(0)
    assert questions_at(stream, 0, 3, rng) == []
    for t in range(1, stream.duration):
        qas = questions_at(stream, t, 3, rng)
        assert 1 <= len(qas) <= 3 and len({q.question for q in qas}) == len(qas)
        assert all(q.time == t and q.answer in q.choices for q in qas)


def _scorer_segments(template, tokenizer, conditions):
    before, _ = prompt_parts(template, watch_question(conditions[0]), tokenizer)
    return before, [prompt_parts(template, watch_question(c), tokenizer)[1] for c in conditions]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_packed_questions_are_the_scorers_prompts_with_the_answer(which, request):
    if which == "tiny":
        model = load("tiny", device="cpu")
        template, tokenizer = model.cfg.template, model.tokenizer
    else:
        _, tokenizer = request.getfixturevalue("smollm2")
        template = "chatml"
    conditions = ("a red circle appears", "the background changes", "the square turns white")
    ids, labels, segments = pack_questions(template, WatchQuestions(conditions, (True, False, True)), tokenizer)
    before, afters = _scorer_segments(template, tokenizer, conditions)
    n = len(before) + 1
    assert ids[:n].tolist() == [*before, IMAGE_TOKEN_INDEX] and (segments[:n] == 0).all()
    assert (labels[:n] == IGNORE_INDEX).all()
    yes, no = yes_no_ids(tokenizer)
    for i, (after, answer) in enumerate(zip(afters, (True, False, True)), start=1):
        own = (segments == i).nonzero().flatten()
        seg_ids, seg_labels = ids[own].tolist(), labels[own].tolist()
        assert seg_ids[: len(after)] == after, "the scorer's prompt after the memory"
        assert all(x == IGNORE_INDEX for x in seg_labels[: len(after)])
        supervised = [x for x in seg_labels[len(after):] if x != IGNORE_INDEX]
        if not tokenizer.decode(supervised[:1]).strip():  # the tiny tokenizer spells " Yes" as a bare space, "Yes"
            supervised = supervised[1:]
        assert supervised[0] in (yes if answer else no), "the first answer token is one the scorer reads"


def test_packed_questions_score_and_train_as_if_asked_alone():
    """The packed sequence's logits at each question's last prompt token give the scorer's yes/no log-odds of that
    question over the same memory; its loss through the training module equals that of the questions as separate
    single-turn conversations, under SDPA's boolean mask and the eager additive one."""
    torch.manual_seed(0)
    model = load("tiny", device="cpu").float()
    model.eval()
    conditions = ("a red circle appears", "the background changes", "the purple square leaves")
    answers = (True, False, False)
    memory = torch.randn(40, model.cfg.vision.hidden_size)
    with torch.no_grad():
        expected = yes_no_scores_shared(model, memory, list(conditions))
        ids, labels, segments = pack_questions(model.cfg.template, WatchQuestions(conditions, answers), model.tokenizer)
        embeds = splice(ids, model.llm.get_input_embeddings(), model.mm_projector(memory))
        segs = torch.cat([torch.zeros(embeds.shape[0] - len(ids), dtype=torch.long), segments])
        mask, positions = packed_attention([segs], embeds.shape[0], boolean=True)
        logits = model.llm(inputs_embeds=embeds[None], attention_mask=mask, position_ids=positions).logits[0]
        yes, no = yes_no_ids(model.tokenizer)
        lab = torch.cat([torch.full((embeds.shape[0] - len(ids),), IGNORE_INDEX), labels])
        for i, score in enumerate(expected, start=1):
            first = int(((segs == i) & (lab != IGNORE_INDEX)).nonzero()[0]) - 1
            got = torch.logsumexp(logits[first, yes], 0) - torch.logsumexp(logits[first, no], 0)
            assert float(got) == pytest.approx(score, abs=1e-4)

    module = MemoryQAModule(model)
    abstract = torch.randn(6, model.cfg.memory.abstract_size**2, model.cfg.vision.hidden_size)

    def example(ids_labels_segments):
        e = {"rest": memory, "abstract_inputs": abstract, "input_ids": ids_labels_segments[0],
             "labels": ids_labels_segments[1]}
        return e | ({"segments": ids_labels_segments[2]} if len(ids_labels_segments) > 2 else {})

    packed = collate([[example((ids, labels, segments))]], 0)
    alone = collate([[example(pack_questions(model.cfg.template, WatchQuestions((c,), (a,)), model.tokenizer))
                      for c, a in zip(conditions, answers)]], 0)
    with torch.no_grad():
        reference = module(**alone)["loss"]
        assert float(module(**packed)["loss"]) == pytest.approx(float(reference), rel=1e-4)
        model.llm.config._attn_implementation = "eager"
        assert float(module(**packed)["loss"]) == pytest.approx(float(reference), rel=1e-4)


def test_world_config_with_watches_builds_batches_and_trains(tmp_path):
    from vstream.train.config import load_config
    from vstream.train.runner import build, run

    raw = {"stage": "finetune", "model": "tiny", "output_dir": str(tmp_path / "run"), "device": "cpu",
           "data": {"kind": "world", "split": "train", "streams": 4, "max_questions": 1, "watches": 2,
                    "watch_questions": 5, "watch_qa": 2, "frame_size": 64},
           "max_steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.0, "save_steps": 2, "logging_steps": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    module, model, dataset, collate_fn = build(cfg)
    item = dataset[0]
    assert len(item) == 3 and sum("segments" in e for e in item) == 2
    batch = collate_fn([item, dataset[1]])
    assert batch["segments"].shape == batch["input_ids"].shape and int(batch["segments"].max()) in (5, 6, 7)
    loss = module(**batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.mm_projector[0].weight.grad is not None
    out = run(cfg)
    assert (out / "vstream.safetensors").is_file()
    raw["data"]["watch_questions"] = 1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="watch_questions >= 2"):
        load_config(path)
    for bad, match in (({"watch_kind_weights": {"recolor": 2}}, "event kinds of .*'recolour'.*got .*recolor"),
                       ({"watch_near": 1.5}, r"watch_near must lie in \[0, 1\].*got 1.5"),
                       ({"watch_false_per_true": -1}, "watch_false_per_true be >= 0.*-1")):
        raw["data"] |= {"watch_questions": 12, **bad}
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError, match=match):
            load_config(path)
        for key in bad:
            del raw["data"][key]
