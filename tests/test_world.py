"""The procedural streaming world (vstream.synth.world): determinism by seed, the timeline rules, answers recomputed
from the rendered frames alone, and the written video and dataset files."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from helpers import vstream_cli
from vstream.synth import world
from vstream.synth.world import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    QUESTION_TYPES,
    SHAPES,
    WorldTimeline,
    generate_stream,
    label_map,
    label_name,
    make_questions,
    render,
    split_seeds,
    write_dataset,
    write_stream_video,
)
from vstream.video import read_frames

NUMBERS = ["zero", "one", "two", "three"]


def test_same_seed_same_stream_frames_and_questions():
    a, b = generate_stream(7), generate_stream(7)
    assert a.to_dict() == b.to_dict()
    for (ta, fa), (tb, fb) in zip(a.frames(fps=2.0, size=64), b.frames(fps=2.0, size=64), strict=True):
        assert ta == tb and np.array_equal(fa, fb)
    assert make_questions(a) == make_questions(b)
    assert make_questions(a, seed=3) == make_questions(b, seed=3) != make_questions(a)


def test_different_seeds_differ():
    streams = [generate_stream(s) for s in range(6)]
    timelines = [json.dumps(s.to_dict()["events"]) for s in streams]
    assert len(set(timelines)) == 6
    questions = [tuple((q.time, q.question) for q in make_questions(s)) for s in streams]
    assert len(set(questions)) == 6
    assert not np.array_equal(render(streams[0].state_at(0)), render(streams[1].state_at(0)))


def test_timeline_round_trips_through_json():
    stream = generate_stream(11)
    again = WorldTimeline.from_dict(json.loads(json.dumps(stream.to_dict())))
    assert again.to_dict() == stream.to_dict()
    for t in np.arange(0, stream.duration, 0.5):
        assert again.state_at(t) == stream.state_at(t)


def _check_events(stream):
    kinds = Counter(e.kind for e in stream.events)
    assert set(kinds) <= {"appear", "disappear", "recolour", "scene"}
    assert 0 <= kinds["scene"] <= 3 and 1 <= kinds["recolour"] <= 3
    times = [e.time for e in stream.events]
    assert all(t - 0.5 == int(t) and 0 < t < stream.duration for t in times)
    assert all(b - a >= 2 for a, b in zip(times, times[1:])), times
    assert len(stream.backgrounds) == kinds["scene"] + 1
    for (_, before), (_, after) in zip(stream.backgrounds, stream.backgrounds[1:]):
        assert before != after


def _check_objects(stream):
    pairs = [(c, o.shape) for o in stream.objects.values() for _, c in o.colours]
    assert len(pairs) == len(set(pairs)), "a (colour, shape) pair was used by two objects"
    assert len(pairs) < len(OBJECT_COLOURS) * len(SHAPES)  # some pair is never used
    for o in stream.objects.values():
        assert world.SIZE_RANGE[0] <= o.size <= world.SIZE_RANGE[1]
        assert np.hypot(*o.velocity) <= world.SPEED_RANGE[1] + 1e-12
        assert o.appear == 0 or o.appear - 0.5 == int(o.appear)


def _check_scene(scene, size=96):
    objects = scene.objects
    assert 1 <= len(objects) <= 3, scene
    assert len({o.colour for o in objects}) == len(objects) and len({o.shape for o in objects}) == len(objects)
    labels = label_map(scene, size)
    for o in objects:
        assert o.size <= o.x <= 1 - o.size and o.size <= o.y <= 1 - o.size, o
        area = {"circle": np.pi, "square": 4.0, "triangle": 2.0}[o.shape] * (o.size * size) ** 2
        drawn = int((labels == world.label_of(o.colour, o.shape)).sum())
        assert abs(drawn - area) < 0.12 * area, (o, drawn, area)  # whole shape drawn: inside the frame, not covered


def test_rules_hold_over_many_seeds():
    for seed in range(200):
        stream = generate_stream(seed)
        assert 24 <= stream.duration <= 48
        _check_events(stream)
        _check_objects(stream)
        assert 1 <= len(stream.state_at(0).objects) <= 2
        for t in np.arange(0, stream.duration, 0.25):
            scene = stream.state_at(t)
            if t == int(t):
                _check_scene(scene)
            else:
                assert 1 <= len(scene.objects) <= 3
                assert len({o.colour for o in scene.objects}) == len({o.shape for o in scene.objects}) == len(
                    scene.objects)


def test_state_follows_events():
    stream = generate_stream(5)
    for e in stream.events:
        before, after = stream.state_at(e.time - 0.5), stream.state_at(e.time)
        ids_before, ids_after = {o.id for o in before.objects}, {o.id for o in after.objects}
        if e.kind == "appear":
            assert ids_after == ids_before | {e.object}
        elif e.kind == "disappear":
            assert ids_after == ids_before - {e.object}
        elif e.kind == "recolour":
            colours = {o.id: o.colour for o in after.objects}
            assert colours[e.object] == e.details["to"] != e.details["from"]
        else:
            assert after.background == e.details["to"] != before.background
            assert ids_after == set(e.details["added"]) and not ids_after & ids_before


def test_render_matches_label_map():
    stream = generate_stream(3)
    lookup = {world.label_of(c, s): rgb for c, rgb in OBJECT_COLOURS.items() for s in SHAPES}
    for t in range(0, stream.duration, 4):
        scene = stream.state_at(t)
        frame, labels = render(scene, 128), label_map(scene, 128)
        assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
        assert labels.shape == (128, 128) and labels.dtype == np.int16
        assert (frame[labels == 0] == BACKGROUNDS[scene.background]).all()
        for label in np.unique(labels[labels > 0]):
            assert (frame[labels == label] == lookup[int(label)]).all()


# --- answers recomputed from the frames sampled at integer seconds, without the timeline -----------------------------


def _observe(stream, size=64):
    """Per integer second: the (colour, shape) pairs drawn (from the label map) and the background (from the pixels)."""
    by_rgb = {rgb: name for name, rgb in BACKGROUNDS.items()}
    pairs, backgrounds = [], []
    for k in range(stream.duration):
        scene = stream.state_at(k)
        labels, frame = label_map(scene, size), render(scene, size)
        pairs.append({label_name(int(v)) for v in np.unique(labels[labels > 0])})
        backgrounds.append(by_rgb[tuple(int(x) for x in frame[labels == 0][0])])
    return pairs, backgrounds


def _first(pairs, pair):
    return next(k for k, p in enumerate(pairs) if pair in p)


def _answer_from_frames(question, t, pairs, backgrounds):
    """The answer to `question` at time t from the observed frames only; asserts it is unambiguous."""
    now, before = pairs[t], pairs[t - 1]
    seen = set().union(*pairs[: t + 1])
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (pair,) = [p for p in now if p[0] == m[1]]
        assert pair in before
        return pair[1]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (pair,) = [p for p in now if p[1] == m[1]]
        assert pair in before
        return pair[0]
    if question == "How many objects are on the screen?":
        return NUMBERS[len(now)]
    if m := re.fullmatch(r"Which appeared first, the (\w+) (\w+) or the (\w+) (\w+)\?", question):
        a, b = (m[1], m[2]), (m[3], m[4])
        ka, kb = _first(pairs, a), _first(pairs, b)
        assert ka < t and kb < t and abs(ka - kb) >= 3
        return " ".join(a if ka < kb else b)
    if question == "How many times has the scene changed?":
        return NUMBERS[sum(backgrounds[k] != backgrounds[k - 1] for k in range(1, t + 1))]
    if m := re.fullmatch(r"Has a (\w+) (\w+) appeared\?", question):
        return "yes" if (m[1], m[2]) in seen else "no"
    if question == "What was the background at the start?":
        assert len(set(backgrounds[: t + 1])) > 1
        return backgrounds[0]
    if m := re.fullmatch(r"What colour was the (\w+) before it changed colour\?", question):
        colours = sorted({p for p in seen if p[1] == m[1]}, key=lambda p: _first(pairs, p))
        assert len(colours) == 2  # one object of that shape so far, seen in two colours
        assert sum(colours[0] in p for p in pairs[: t + 1]) >= 3
        return colours[0][0]
    if m := re.fullmatch(r"What colour was the (\w+) (\w+) before it changed colour\?", question):
        new = (m[1], m[2])
        k = _first(pairs, new)
        (old,) = [p for p in pairs[k - 1] if p[1] == new[1]]
        assert old not in pairs[k] and sum(old in p for p in pairs[:k]) >= 3
        return old[0]
    if m := re.fullmatch(r"What was the background when the (\w+) (\w+) appeared\?", question):
        k = _first(pairs, (m[1], m[2]))
        assert k < t
        return backgrounds[k]
    raise AssertionError(f"unknown question: {question}")


def test_answers_follow_from_the_frames():
    types = Counter()
    for seed in range(60):
        stream = generate_stream(seed)
        pairs, backgrounds = _observe(stream)
        questions = make_questions(stream)
        assert 8 <= len(questions) <= 12
        assert len({(q.time, q.question) for q in questions}) == len(questions)
        for q in questions:
            assert q.time == int(q.time) and 1 <= q.time <= stream.duration - 1
            assert q.type in QUESTION_TYPES and q.answer in q.choices and q.answer == q.answer.lower()
            assert _answer_from_frames(q.question, int(q.time), pairs, backgrounds) == q.answer, (seed, q)
            types[q.type] += 1
    total = sum(types.values())
    assert all(0.15 < types[t] / total < 0.35 for t in QUESTION_TYPES), types


def test_yes_no_answers_are_balanced():
    answers = Counter(q.answer for s in range(100) for q in make_questions(generate_stream(s))
                      if q.question.startswith("Has a"))
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6, answers


# --- files ----------------------------------------------------------------------------------------------------------


def test_written_video_decodes_to_the_rendered_frames(tmp_path):
    stream = generate_stream(21, duration=12)
    path = write_stream_video(stream, tmp_path / "s.mp4", fps=4.0, size=128)
    times, frames = read_frames(path, fps=1.0)
    assert times == pytest.approx(list(range(12)), abs=1e-3)
    for t, frame in zip(times, frames):
        expected = render(stream.state_at(round(t)), 128).astype(np.int16)
        assert np.abs(frame.astype(np.int16) - expected).mean() < 1.5, t  # the next second differs by ~1-12


def test_write_dataset_files(tmp_path):
    counts = write_dataset(tmp_path, "val", 2, fps=2.0, size=64, start=5)
    seeds = split_seeds("val", 2, start=5)
    assert seeds == [1_000_005, 1_000_006]
    assert counts["streams"] == 2 and counts["questions"] == sum(counts["by_type"].values())
    llava = json.loads((tmp_path / "llava.json").read_text())
    test_qa = json.loads((tmp_path / "test_qa.json").read_text())
    assert len(llava) == len(test_qa) == counts["questions"]
    for record, qa in zip(llava, test_qa):
        seed = int(record["id"].split("-")[0])
        assert seed in seeds and (tmp_path / record["video"]).is_file()
        assert record["video"] == f"videos/{seed}.mp4" and record["question_type"] in QUESTION_TYPES
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        timeline = json.loads((tmp_path / "timelines" / f"{seed}.json").read_text())
        assert set(qa) == {"video_id", "question", "id", "answer", "answer_type", "time", "duration"}
        assert qa["video_id"] == f"{seed}.mp4" and qa["id"] == record["id"] and qa["answer"] == gpt["value"]
        assert qa["question"] == human["value"].removeprefix("<image>\n") and qa["time"] == record["time"]
        assert qa["duration"] == timeline["duration"] and qa["answer_type"] == record["question_type"]
        assert {"question": qa["question"], "answer": qa["answer"], "time": qa["time"]}.items() <= {
            k: v for q in timeline["questions"] if q["question"] == qa["question"] and q["time"] == qa["time"]
            for k, v in q.items()}.items()
    assert WorldTimeline.from_dict(timeline).to_dict() == generate_stream(seeds[-1]).to_dict()


@pytest.mark.slow
def test_synth_command_writes_a_split(tmp_path):
    def synth(*args):
        return vstream_cli("synth", *args, timeout=120)

    done = synth(str(tmp_path / "out"), "--split", "test", "--streams", "2", "--fps", "2", "--size", "64")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 streams (seeds 2000000..2000001" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "videos").iterdir()) == ["2000000.mp4", "2000001.mp4"]
    records = json.loads((tmp_path / "out" / "test_qa.json").read_text())
    assert {r["video_id"] for r in records} == {"2000000.mp4", "2000001.mp4"}
    for args, message in [(["--split", "dev"], "--split must be one of train, val, test, got 'dev'"),
                          (["--size", "65"], "--size must be an even number of pixels >= 16, got 65"),
                          (["--streams", "2", "--start", "99999"], "expected 0 <= start and start + n <= 100000")]:
        failed = synth(str(tmp_path / "bad"), *args)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: generate_stream(-1), "seed must be an integer >= 0, got -1"),
        (lambda: generate_stream(1, duration=5), "duration must be an integer number of seconds >= 10, got 5"),
        (lambda: render(generate_stream(1).state_at(0), size=4), "frame size must be an integer >= 8 pixels, got 4"),
        (lambda: split_seeds("dev", 1), "split must be one of ['test', 'train', 'val'], got 'dev'"),
        (lambda: split_seeds("val", 5, start=99_999), "expected 0 <= start and start + n <= 100000"),
        (lambda: label_name(0), "label must be in [1, 18], got 0"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
