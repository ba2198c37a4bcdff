"""The evaluation loop under its three clocks, with PyAV-written videos and the tiny random model: offline and simulated
time give the same memories and answers (also from feature files); live, questions are asked at their wall-clock
moments from what a real pushed source has delivered by then."""

import threading
import time

import pytest
import torch

from vstream.eval.features import encode_video
from vstream.eval.play import SimulatedClock, WallClock, play
from vstream.sources import PushSource, file_source
from vstream.synth.clips import write_test_video
from vstream.video import iter_frames

QUESTIONS = [(0.0, "What is there first?"), (2.5, "What is on screen?"), (5.0, "And now?"), (None, "What happened?")]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("play") / "v.mp4"
    write_test_video(path, seconds=7, fps=4, size=(64, 48), seed=3)
    return path


def played(model, source, clock):
    return list(play(model, source, QUESTIONS, clock, frames_per_call=3, max_new_tokens=5))


def test_offline_and_simulated_time_give_equal_memories_and_answers(model, video):
    fps = model.cfg.sample_fps
    offline = played(model, file_source(str(video), fps=fps), None)
    simulated = played(model, file_source(str(video), fps=fps), SimulatedClock())
    assert [p.snapshot.frames for p in offline] == [1, 3, 6, 7]
    for a, b in zip(offline, simulated):
        assert torch.equal(a.snapshot.memory.tokens, b.snapshot.memory.tokens)
        assert a.snapshot.spatial_times == b.snapshot.spatial_times
        assert a.answer.text == b.answer.text and a.answer.frames == b.answer.frames
        assert a.answer.timings["answer_s"] > 0 and b.frames_dropped == 0
    features, times = encode_video(model, video, frames_per_call=4)
    from_features = played(model, zip(times, features), SimulatedClock())
    for a, b in zip(offline, from_features):
        torch.testing.assert_close(a.snapshot.memory.tokens, b.snapshot.memory.tokens)
        assert a.answer.text == b.answer.text


def test_question_times_must_increase(model, video):
    with pytest.raises(ValueError, match="must increase"):
        next(play(model, file_source(str(video)), [(None, "a"), (1.0, "b")]))


def test_live_answers_at_wall_clock_moments_from_a_pushed_source(model, video):
    speed = 4.0
    frames = list(iter_frames(video, fps=model.cfg.sample_fps))
    pushed = PushSource()
    start = threading.Event()

    def push() -> None:  # a camera's pace: each frame at its moment on the wall clock (speed x real time)
        start.wait()
        t0 = time.monotonic()
        for t, frame in frames:
            time.sleep(max(0.0, t0 + t / speed - time.monotonic()))
            pushed.push(t, frame)
        pushed.close()

    def source():  # the camera starts when the stream is first read, as the wall clock does
        start.set()
        yield from pushed

    threading.Thread(target=push, daemon=True).start()
    got = list(play(model, source(), QUESTIONS, WallClock(speed, timeout=60), frames_per_call=2, max_new_tokens=4))
    for (t, _), p in zip(QUESTIONS, got):
        if t is not None:
            assert p.asked_wall_s >= t / speed - 0.01  # never before its moment
            assert p.snapshot.stream_time <= t + 1 / speed  # from what had arrived by then (one frame of slack)
        assert p.answer.frames == p.snapshot.frames >= 1 and "memory_build_s" not in p.answer.timings
    last = got[-1]
    assert last.snapshot.frames + last.frames_dropped == len(frames) == 7
    assert last.snapshot.stream_time == frames[-1][0]
