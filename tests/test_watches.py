"""Watches (standing questions): the state machine with scripted scores, the yes/no score of a condition computed
by the tiny model in one prefill from a real stream's snapshot, and the evaluation of many streams' watches in
batched forwards (recent part first, escalated near the band) against each watch scored alone."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import nan_memory
from vstream.engine import StreamSession
from vstream.engine.watches import (CLEARED, ESCALATED, FAILED, FULL, RECENT, TRIGGERED, Watch, evaluate_due,
                                    evaluate_streams, pairwise, recent_tokens)
from vstream.errors import ConfigError, UserInputError
from vstream.model.yesno import score_pairs, scorer, watch_question, yes_no_ids, yes_no_score
from vstream.sources import file_source
from vstream.synth.clips import write_test_video


def run(watch: Watch, scores: list[tuple[float, float]]) -> list[tuple[str, float]]:
    """Feed (stream_time, score) pairs to the watch where due; the (type, stream_time) of each event it fires."""
    out = []
    for t, score in scores:
        if watch.due(t):
            event = watch.update(t, score, [t], [])
            if event is not None:
                assert event["watch_id"] == watch.id and event["score"] == score and event["spatial_times"] == [t]
                out.append((event["type"], t))
    return out


def test_triggers_once_above_the_band_and_clears_below_it():
    w = Watch("a purple square appears", every_s=1.0, cooldown_s=0.0, threshold=0.0, hysteresis=0.5)
    scores = [(0, -2.0), (1, 0.4), (2, 0.6), (3, 0.2), (4, -0.4), (5, 3.0), (6, -0.6), (7, -3.0), (8, 0.9)]
    assert run(w, scores) == [(TRIGGERED, 2), (CLEARED, 6), (TRIGGERED, 8)]


def test_a_score_hovering_at_the_threshold_fires_once():
    w = Watch("x", every_s=0.5, cooldown_s=0.0, hysteresis=0.5)
    scores = [(i * 0.5, 0.6 if i % 2 else 0.45) for i in range(20)]
    assert run(w, scores) == [(TRIGGERED, 0.5)]


def test_cooldown_holds_events_then_fires_if_still_past_the_band():
    w = Watch("x", every_s=1.0, cooldown_s=5.0, hysteresis=0.1)
    scores = [(0, 1.0), (1, -1.0), (2, -1.0), (3, 1.0), (4, -1.0), (5, -1.0), (6, -1.0)]
    assert run(w, scores) == [(TRIGGERED, 0), (CLEARED, 5)]


def test_evaluated_at_most_every_every_s_of_stream_time():
    w = Watch("x", every_s=2.0, cooldown_s=0.0)
    seen = [t for t in [0.0, 0.5, 1.9, 2.0, 2.1, 3.9, 4.0, 4.0] if w.due(t) and w.update(t, 0.0) is None]
    assert seen == [0.0, 2.0, 4.0] and w.evaluations == 3


@pytest.mark.parametrize("field,value", [("every_s", -1.0), ("cooldown_s", math.nan), ("hysteresis", math.inf),
                                         ("threshold", math.nan), ("escalate_margin", -0.5)])
def test_bad_watch_settings_name_the_field(field, value):
    with pytest.raises(UserInputError, match=field):
        Watch("x", **{field: value})


def test_yes_no_ids_need_single_tokens(model):
    yes, no = yes_no_ids(model.tokenizer)
    assert yes and no and not set(yes) & set(no)

    class NoWords:
        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

        def decode(self, ids):
            return "".join(map(chr, ids))

    with pytest.raises(ConfigError, match="no single token"):
        yes_no_ids(NoWords())
    with pytest.raises(UserInputError, match="empty"):
        watch_question("  ")


def test_the_tiny_model_scores_a_condition_from_a_real_snapshot(model, tmp_path):
    path = write_test_video(tmp_path / "clip.mp4", seconds=3, fps=5)
    with StreamSession(model) as session:
        session.start(file_source(path, fps=model.cfg.sample_fps), live=False)
        assert session.wait(60)
        snap = session.snapshot()
        score = yes_no_score(model, snap.memory.tokens, "a purple square appears")
        assert isinstance(score, float) and math.isfinite(score)
        again = yes_no_score(model, snap.memory.tokens, "a purple square appears")
        assert again == pytest.approx(score, abs=1e-4)  # one deterministic prefill
        w = Watch("a purple square appears", threshold=-1e9)
        events = evaluate_due([w], snap, scorer(model))
        assert [e["type"] for e in events] == [TRIGGERED]
        assert events[0]["stream_time"] == snap.stream_time and events[0]["spatial_times"] == list(snap.spatial_times)


def test_a_score_that_is_not_a_number_is_refused_not_sent(tmp_path):
    """A broken LLM (NaN weights) gives no NaN score to events or the API: the score raises, naming the value."""
    import torch

    import vstream

    broken = vstream.load("tiny")
    with torch.no_grad():
        broken.llm.lm_head.weight.fill_(float("nan"))
    tokens = torch.zeros(4, broken.cfg.vision.hidden_size)
    with pytest.raises(ValueError, match="not a finite number: nan"):
        yes_no_score(broken, tokens, "a purple square appears")


def test_a_failing_score_backs_its_watch_off_and_spares_the_others(model, tmp_path):
    """A score that raises marks only its watch (error named, failures counted), which is then not due for 1 s, 2 s,
    4 s... of wall time; the other watches are scored; the next good score clears the failure."""
    import time

    path = write_test_video(tmp_path / "clip.mp4", seconds=2, fps=5)
    with StreamSession(model) as session:
        session.start(file_source(path, fps=model.cfg.sample_fps), live=False)
        assert session.wait(60)
        snap = session.snapshot()
    broken = {"on": True}

    def score(tokens, condition):
        if condition == "broken" and broken["on"]:
            raise RuntimeError("the scorer is down")
        return yes_no_score(model, tokens, condition)

    bad, good = Watch("broken", threshold=-1e9), Watch("fine", threshold=-1e9)
    t0 = time.monotonic()
    assert [e["watch_id"] for e in evaluate_due([bad, good], snap, pairwise(score))] == [good.id]
    assert bad.failures == 1 and bad.error == "RuntimeError: the scorer is down" and bad.evaluations == 0
    assert bad.view()["error"] == bad.error
    assert not bad.due(snap.stream_time, now=t0 + 0.5) and bad.due(snap.stream_time, now=bad.retry_at)
    waits = []
    for _ in range(7):  # failures 2..8 in a row
        now = bad.retry_at
        bad.fail(RuntimeError("the scorer is down"), now=now)
        waits.append(bad.retry_at - now)
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    broken["on"] = False
    bad.retry_at = 0.0
    assert [e["watch_id"] for e in evaluate_due([bad], snap, pairwise(score))] == [bad.id]
    assert (bad.failures, bad.error, bad.evaluations) == (0, None, 1)


def test_batched_scores_equal_one_prefill_each(model, tmp_path):
    """`yes_no_scores` (right-padded batch, prompts of different lengths) against `yes_no_score` per pair."""
    from vstream.model.yesno import yes_no_scores, yes_no_scores_shared

    path = write_test_video(tmp_path / "clip.mp4", seconds=3, fps=5)
    mems = list(model.memory_snapshots(str(path), [0.0, 2.0]))
    pairs = [(mems[0].tokens, "a purple square appears"), (mems[1].tokens, "the background changes to a much "
             "darker shade of blue than before"), (mems[1].tokens, "x")]
    batched = yes_no_scores(model, pairs)
    single = [yes_no_score(model, tokens, condition) for tokens, condition in pairs]
    assert batched == pytest.approx(single, abs=1e-4) and len(set(single)) == 3
    assert yes_no_scores(model, []) == []
    conditions = [c for _, c in pairs]
    shared = yes_no_scores_shared(model, mems[1].tokens, conditions)
    assert shared == pytest.approx([yes_no_score(model, mems[1].tokens, c) for c in conditions], abs=1e-4)


def stream_snapshots(model, tmp_path, seconds: list[float]) -> list:
    """The last snapshot of a real stream of a clip of each length (each clip drawn from its own seed)."""
    out = []
    for i, length in enumerate(seconds):
        path = write_test_video(tmp_path / f"clip{i}.mp4", seconds=length, fps=5, seed=i)
        with StreamSession(model) as session:
            session.start(file_source(path, fps=model.cfg.sample_fps), live=False)
            assert session.wait(60)
            out.append(session.snapshot())
    return out


def test_the_recent_part_is_the_spatial_tokens_when_the_memory_has_more():
    from vstream.memory import MemoryRead, without

    counts = {"abstract": 2, "temporal": 3, "retrieved": 1, "spatial": 4}
    times = torch.zeros(0, dtype=torch.float64)
    memory = MemoryRead(torch.arange(10.0)[:, None], counts, times, times, torch.zeros(0, 3), torch.zeros(0), 5)
    assert recent_tokens(memory).flatten().tolist() == [6.0, 7.0, 8.0, 9.0]
    assert recent_tokens(without(memory, ["abstract", "temporal", "retrieved"])) is None  # all of it is recent
    assert recent_tokens(dataclasses.replace(memory, counts={"retrieved": 6, "temporal": 4})) is None  # no STAR parts


def test_score_pairs_shares_a_memory_batches_the_others_and_isolates_a_bad_one(model, tmp_path):
    a, b, c = (s.memory.tokens for s in stream_snapshots(model, tmp_path, [2, 3, 4]))
    nan = torch.full_like(a, math.nan)
    pairs = [(a, "a red circle"), (b, "something moves"), (a, "a blue square"), (nan, "y"), (c, "the scene changes"),
             (a, "z")]
    # a's three share a prefix (2 + 1); b, nan | c in padded batches
    got = score_pairs(model, pairs, prompts_per_forward=2)
    assert isinstance(got[3], ValueError) and "not a finite number" in str(got[3])
    good = [i for i in range(len(pairs)) if i != 3]
    assert [got[i] for i in good] == pytest.approx([yes_no_score(model, *pairs[i]) for i in good], abs=1e-4)
    wide = torch.zeros(5, a.shape[1] + 1)  # a memory of the wrong width
    got = score_pairs(model, [(wide, "x"), (b, "x"), (wide, "y")])
    assert isinstance(got[0], RuntimeError) and isinstance(got[2], RuntimeError)
    assert got[1] == pytest.approx(yes_no_score(model, b, "x"), abs=1e-4)
    assert score_pairs(model, []) == []
    with pytest.raises(ValueError, match="prompts_per_forward must be >= 1, got 0"):
        score_pairs(model, pairs, prompts_per_forward=0)


def _watches(model, snap, plan: list[tuple[str, str]]) -> list[Watch]:
    """Watches of `snap` set around their conditions' recent scores: "cheap" far below it (decided by the recent
    part: it triggers), "near" at it (escalated), "full" with no cheap pass."""
    recent = recent_tokens(snap.memory)
    out = []
    for condition, kind in plan:
        r = yes_no_score(model, recent, condition) if math.isfinite(recent.sum()) else 0.0
        threshold = r - 5.0 if kind == "cheap" else r
        out.append(Watch(condition, threshold=threshold, cooldown_s=0.0,
                         escalate_margin=None if kind == "full" else 2.0))
    return out


def test_many_streams_in_two_batched_calls_fire_the_events_of_each_watch_scored_alone(model, tmp_path):
    """Four streams (one with a NaN memory), seven watches: the recent parts of all in one scorer call, the full
    memories in a second; events, scores and counters as when each watch is scored alone in its own prefill, and
    only the broken stream's watches fail."""
    snaps = stream_snapshots(model, tmp_path, [2, 3, 4])
    snaps.append(nan_memory(snaps[0]))
    plans = [[("a red circle", "cheap"), ("a blue square", "near"), ("the scene changes", "full")],
             [("something moves", "near")], [("a green disc", "cheap")], [("x", "cheap"), ("y", "full")]]
    batched = [_watches(model, snap, plan) for snap, plan in zip(snaps, plans)]
    alone = [[Watch.from_state(w.state()) for w in ws] for ws in batched]  # the same watches, ids included
    calls = []

    def counted(pairs):
        calls.append(len(pairs))
        return score_pairs(model, pairs, prompts_per_forward=2)

    events, counts = evaluate_streams(list(zip(snaps, batched)), counted)
    assert calls == [5, 4]  # recent: 2 + 1 + 1 + 1 (the broken one's "x"); full: 2 + 1 + 1 (its "y")
    assert counts == {RECENT: 2, ESCALATED: 2, FULL: 1, FAILED: 2}
    single = pairwise(lambda tokens, condition: yes_no_score(model, tokens, condition))
    expected = [[e for w in ws for e in evaluate_due([w], snap, single)] for snap, ws in zip(snaps, alone)]
    assert [len(e) for e in events] == [len(e) for e in expected] and events[3] == []
    for got, want in zip(sum(events, []), sum(expected, [])):
        assert got.pop("score") == pytest.approx(want.pop("score"), abs=1e-4) and got == want
    assert [e["scored_on"] for e in events[0][:1] + events[2]] == ["recent", "recent"]  # both cheap ones trigger
    for w, a in zip(sum(batched, []), sum(alone, [])):
        view, view_alone = w.view(), a.view()
        score, score_alone = view.pop("last_score"), view_alone.pop("last_score")
        assert view == view_alone and (score is None) == (score_alone is None)
        assert score is None or score == pytest.approx(score_alone, abs=1e-4)
    cheap, near, full = batched[0]
    assert (cheap.cheap_evaluations, near.escalated_evaluations, full.evaluations) == (1, 1, 1)
    assert full.cheap_evaluations == full.escalated_evaluations == 0
    assert near.last_score == pytest.approx(yes_no_score(model, snaps[0].memory.tokens, near.condition), abs=1e-4)
    assert all(w.failures == 1 and "not a finite number" in w.error for w in batched[3])


def test_a_state_saved_before_the_cheap_score_loads_with_its_defaults():
    w = Watch("a red circle", escalate_margin=1.5, cheap_evaluations=3)
    assert Watch.from_state(w.state()).state() == w.state()
    old = {k: v for k, v in w.state().items() if k not in Watch.ADDED}
    back = Watch.from_state(old)
    assert (back.escalate_margin, back.cheap_evaluations, back.id) == (None, 0, w.id)
