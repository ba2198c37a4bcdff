"""Watch tasks of the procedural world and their evaluation: each task's event times checked against what the world
shows at the whole seconds around them (not against the events they were derived from); the trigger matching and
metrics on scripted scores; `vstream world-eval --watches` end to end with the tiny model on one stream."""

from __future__ import annotations

import json
import math

import pytest

from helpers import vstream_cli
from vstream.eval.world_watches import calibrate, match, metrics, replay
from vstream.synth.world import generate_stream
from vstream.synth.world.watches import WATCH_TYPES, make_watch_tasks

SEEDS = range(2_000_000, 2_000_040)


def shown(stream, t: float) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in stream.state_at(t).objects}


def holds(stream, task, t: float) -> bool:
    """Whether the world at time t shows what the task's condition names as having happened by then."""
    words = task.condition.split()
    if task.type == "appear":  # "a <colour> <shape> appears"
        return (words[1], words[2]) in shown(stream, t)
    if task.type == "leave":  # "the <colour> <shape> leaves": the object is gone
        return (words[1], words[2]) not in shown(stream, t)
    if task.type == "recolour":  # "the <shape> turns <colour>"
        return (words[3], words[1]) in shown(stream, t)
    raise AssertionError(task)


def test_event_times_are_where_the_world_changes():
    kinds = set()
    for seed in SEEDS:
        stream = generate_stream(seed)
        for task in make_watch_tasks(stream):
            kinds.add((task.type, bool(task.events)))
            for e in task.events:
                before, after = math.floor(e), math.ceil(e)
                assert e % 1 == 0.5 and after < stream.duration
                if task.type == "scene":
                    assert stream.background_at(before) != stream.background_at(after), (seed, task)
                else:
                    assert not holds(stream, task, before) and holds(stream, task, after), (seed, task, e)
            if not task.events and task.type != "leave":
                assert not any(holds(stream, task, k) for k in range(stream.duration)), (seed, task)
            if not task.events and task.type == "leave":
                assert not holds(stream, task, stream.duration - 1), (seed, task)
    assert kinds == {(t, True) for t in WATCH_TYPES} | {("appear", False), ("leave", False), ("recolour", False)}


def test_tasks_are_the_same_for_the_same_stream():
    stream = generate_stream(2_000_003)
    assert make_watch_tasks(stream) == make_watch_tasks(generate_stream(2_000_003))


def row(events, scores, duration=3600):
    return {"seed": 0, "duration": duration, "type": "appear", "condition": "a red circle appears",
            "events": events, "times": [float(t) for t in range(len(scores))], "scores": scores}


def test_replay_runs_the_servers_state_machine():
    r = row([], [-1, -1, 2, 2, -2, 3, 3, -3])
    assert replay(r, 0.0, 0.5, 0.0) == [2.0, 5.0]
    assert replay(r, 0.0, 0.5, 10.0) == [2.0], "the cooldown holds the second trigger"


def test_matching_delays_and_false_alarms():
    assert match([2.5, 20.5], [1.0, 3.0, 4.0, 40.0], 10.0) == ([0.5], 3)
    assert match([2.5, 5.5], [6.0, 7.0], 10.0) == ([3.5, 1.5], 0), "each trigger takes the earliest open event"
    m = metrics([row([2.5], [-3, -3, -3, 3, 3] + [-3] * 3595), row([], [3] * 3600)], 0.0, 0.5, 10.0)
    overall = m["overall"]
    assert (overall["events"], overall["caught"], overall["triggers"], overall["false_alarms"]) == (1, 1, 2, 1)
    assert overall["recall"] == 1.0 and overall["precision"] == 0.5 and overall["delay_median_s"] == 0.5
    assert overall["false_alarms_per_hour"] == pytest.approx(0.5) and set(m) == {"appear", "overall"}
    rows = [row([2.5], [-3, -3, -3, 3, 3]), row([], [1, 1, 1, 1, 1])]
    tuned = calibrate(rows, 0.5, 10.0)
    assert 0.5 <= tuned < 2.5, "above 1 - 0.5, below the true trigger's 3 - 0.5"
    assert metrics(rows, tuned, 0.5, 10.0)["overall"]["precision"] == 1.0
    assert metrics(rows, -1.0, 0.5, 10.0)["overall"]["precision"] == 0.5
    late = metrics([row([2.5], [-3, -3, -3, 3]), row([2.5], [-3, -3, -3, -3, 3])], 0.0, 0.5, 10.0)["overall"]
    assert late["delay_median_s"] == 1.0 and late["delay_p95_s"] == 1.5  # nearest rank (interpolated: 1.45)


def test_world_eval_watches_with_the_tiny_model(tmp_path):
    out = tmp_path / "w"
    r = vstream_cli("world-eval", "--watches", "--model", "tiny", "--streams", "1",
                    "--out", str(out), "--device", "cpu", timeout=600)
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "watches.json").read_text())
    tasks = make_watch_tasks(generate_stream(2_000_000))
    assert [x["condition"] for x in results["rows"]] == [t.condition for t in tasks]
    assert all(len(x["scores"]) == len(x["times"]) == 60 or len(x["scores"]) == len(x["times"])
               for x in results["rows"])
    assert results["metrics"]["overall"]["tasks"] == len(tasks) and "calibrated" not in results
    report = (out / "watches.md").read_text()
    assert "| overall |" in report and "world-eval --watches" in report
    assert (out / "watches.png").stat().st_size > 5_000
    again = vstream_cli("world-eval", "--watches", "--from-results", str(out / "watches.json"), "--out",
                        str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "watches.md").read_text() == report


def test_cross_validation_scores_each_stream_at_thresholds_picked_on_the_others():
    from vstream.eval.world_watches import cross_validated

    def on(seed, events, scores, type_="appear"):
        return row(events, scores) | {"seed": seed, "type": type_}

    rows = [on(1, [2.5], [0, 0, 0, 3, 3]), on(1, [], [1.5] * 5), on(2, [2.5], [0, 0, 0, 3, 3]), on(2, [], [1.5] * 5),
            on(1, [1.5], [0, 0, 3, 3, 3], "scene"), on(2, [1.5], [0, 0, 3, 3, 3], "scene")]
    cv = cross_validated(rows, 0.5, 10.0)
    assert set(cv["thresholds"]) == {1, 2} and 1.0 <= cv["thresholds"][1]["appear"] < 2.5
    assert cv["metrics"]["appear"]["precision"] == 1.0 and cv["metrics"]["appear"]["recall"] == 1.0
    assert cv["metrics"]["scene"]["caught"] == 2 and cv["metrics"]["overall"]["false_alarms"] == 0
    json.dumps(cv)
