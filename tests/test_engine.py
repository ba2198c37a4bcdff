"""The stream session: ingestion goes on while answers are generated, the drop policy, consistent snapshots, errors.
Every wait is bounded."""

import threading
import time

import numpy as np
import pytest
import torch

import vstream
from vstream.engine import Engine, EngineConfig, FrameQueue, StreamSession
from vstream.sources import PushSource, file_source, replay_source
from vstream.synth.clips import moving_shapes, write_test_video, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("engine") / "clip.mp4", seconds=10, fps=10, seed=2)


def slowed(model, seconds):
    """The same model with `seconds` added to each encoder call (a stand-in for a slow device)."""
    real = model.encode_crops

    def encode_crops(crops, frames_per_call=32, graphs=None):
        time.sleep(seconds)
        return real(crops, frames_per_call, graphs)

    model.encode_crops = encode_crops
    return model


def test_frames_are_ingested_while_an_answer_is_generated(model):
    source = PushSource()
    frames = list(moving_shapes(400, 64, 48, seed=1))
    stop = threading.Event()
    with StreamSession(model, queue_size=4, frames_per_round=1).start(source, live=True) as session:
        def pusher():
            for i, frame in enumerate(frames):
                if stop.is_set():
                    return
                source.push(i * 0.1, frame)
                time.sleep(0.01)

        pushing = threading.Thread(target=pusher, daemon=True)
        pushing.start()
        session.wait_for_frames(3, timeout=30)
        _, pieces = session.ask_stream("Describe everything that happened.", max_new_tokens=400)
        first = next(pieces)
        at_first = session.counters.encoded
        rest = list(pieces)
        at_end = session.counters.encoded
        stop.set()
        pushing.join(timeout=10)
        source.close()
    assert len(rest) > 50, "the answer was too short to overlap with ingestion"
    assert at_end > at_first, f"no frame was encoded during generation ({at_first} -> {at_end})"
    assert isinstance(first, str)


def test_slow_encoder_drops_frames_from_a_live_source_and_none_from_a_file(clip):
    slow = slowed(vstream.load("tiny"), 0.05)
    source = replay_source(str(clip), fps=5, speed=20)
    with StreamSession(slow, queue_size=2, frames_per_round=1).start(source, live=True) as s:
        assert s.wait(timeout=60)
    live = s.stats()
    assert live["frames_received"] == 50 and live["frames_dropped"] > 0
    assert live["frames_encoded"] + live["frames_dropped"] == 50
    with StreamSession(slow, queue_size=2, frames_per_round=1).start(file_source(str(clip), fps=5), live=False) as s:
        assert s.wait(timeout=60)
    offline = s.stats()
    assert offline["frames_dropped"] == 0 and offline["frames_encoded"] == 50 and offline["error"] is None


def test_snapshots_are_consistent_under_concurrent_questions(model, clip):
    errors, seen = [], []
    with StreamSession(model, queue_size=4, frames_per_round=2).start(file_source(str(clip), fps=10), live=False) as s:
        s.wait_for_frames(1, timeout=30)

        def asker():
            try:
                for _ in range(8):
                    snap = s.snapshot()
                    answer = s.ask("What is there?", max_new_tokens=3)
                    mem = snap.memory
                    assert mem.frames_seen == snap.frames
                    assert mem.num_tokens == sum(mem.counts.values()) == mem.tokens.shape[0]
                    assert abs(float(mem.temporal_weights.sum()) - snap.frames) < 1e-3
                    assert mem.spatial_times.tolist() == [snap.stream_time]
                    assert answer.frames >= snap.frames
                    seen.append(snap.version)
            except Exception as exc:  # collected and re-raised on the main thread  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=asker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert s.wait(timeout=60)
    assert not errors, errors[0]
    assert len(seen) == 32 and s.stats()["frames_encoded"] == 100
    assert s.stats()["latency"]["first_token"]["count"] == 32


def test_a_file_that_breaks_mid_stream_ends_the_session_with_its_error_and_keeps_the_memory(model, tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(60))
    full = write_video(tmp_path / "full.mp4", frames, fps=10, options={"preset": "ultrafast"})
    data = bytearray(full.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 40_000] = rng.bytes(40_000)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with StreamSession(model).start(file_source(str(bad), fps=10), live=False) as s:
        assert s.wait(timeout=60)
    assert s.error is not None and "bad.mp4" in str(s.error)
    assert 0 < s.counters.encoded < 60
    assert s.ask("What was there?", max_new_tokens=2).frames == s.counters.encoded


def test_bad_questions_and_early_questions_are_clear_errors(model):
    source = PushSource()
    with StreamSession(model).start(source, live=True) as s:
        with pytest.raises(RuntimeError, match="no frame has been ingested yet"):
            s.ask("Anything?")
        source.push(0.0, np.zeros((32, 32, 3), np.uint8))
        s.wait_for_frames(1, timeout=30)
        with pytest.raises(ValueError, match="question is empty"):
            s.ask("   ")
        with pytest.raises(ValueError, match="frame times must increase"):
            source.push(0.0, np.zeros((32, 32, 3), np.uint8))
        source.close()
        assert s.wait(timeout=30)


def test_missing_file_source_ends_the_session_with_a_clear_error(model, tmp_path):
    with StreamSession(model).start(file_source(str(tmp_path / "nope.mp4")), live=False) as s:
        assert s.wait(timeout=30)
    assert "does not exist" in str(s.error)
    with pytest.raises(RuntimeError, match="ended before any frame"):
        s.wait_for_frames(1, timeout=5)


def test_frame_queue_drop_oldest_and_backpressure():
    q = FrameQueue(2)
    assert q.put(1, drop_oldest=True) == 0 and q.put(2, drop_oldest=True) == 0
    assert q.put(3, drop_oldest=True) == 1
    assert q.get_batch(5, timeout=0.1) == [2, 3]
    q.put(4, drop_oldest=False)
    q.put(5, drop_oldest=False)
    with pytest.raises(TimeoutError, match="stayed full"):
        q.put(6, drop_oldest=False, timeout=0.05)
    assert q.get_batch(1, timeout=0.1) == [4]
    assert q.get_batch(1, timeout=0.1) == [5] and q.get_batch(1, timeout=0.05) == []


def test_replay_paces_by_stream_time(clip):
    start = time.monotonic()
    times = [t for t, _ in replay_source(str(clip), fps=2, speed=10, until=4.0)]
    elapsed = time.monotonic() - start
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert elapsed >= 0.4 - 0.02  # 4 s of stream at 10x


def test_variable_frame_rate_file_is_sampled_by_timestamp_in_a_session(model, tmp_path):
    # 20 frames at irregular times; at 1 fps, sample k is the first frame at or after k s (each frame serves one sample)
    stamps = [0.0, 0.3, 0.35, 1.2, 1.25, 1.3, 2.9, 2.95, 3.0, 3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 4.6, 5.5, 5.9, 6.0, 6.1]
    path = write_video(tmp_path / "vfr.mkv", moving_shapes(len(stamps), 64, 48, seed=3), codec="ffv1",
                       pix_fmt="yuv420p", timestamps=stamps)
    with StreamSession(model).start(file_source(str(path), fps=1), live=False) as s:
        assert s.wait(timeout=30)
    snap = s.snapshot()
    assert snap.frames == 7 and snap.stream_time == 6.0
    spans = snap.memory.temporal_spans[:, 0].tolist()
    assert sorted(spans) == [0.0, 1.2, 2.9, 3.0, 4.6, 5.5, 6.0]


def _crop(model, seed: int = 0) -> np.ndarray:
    size = model.cfg.vision.image_size
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def test_rounds_of_frames_and_answer_steps_take_turns(model):
    """Frames that arrive while answers decode go in within a few iterations (round_every_s=0: as soon as the answers
    had twice the last round's time), between decode steps; with a long round_every_s they wait for it, while the
    answers go on."""
    engine = Engine(model, EngineConfig(round_every_s=0.0), thread=False)
    lane = engine.open(live=False)
    lane.put(0.0, _crop(model))
    assert engine.step() and lane.snapshot.frames == 1
    requests = [engine.ask(lane, "What is happening?", max_new_tokens=40)[1] for _ in range(3)]
    for k in range(6):
        lane.put(1.0 + k, _crop(model, k))
    for _ in range(20):  # each iteration: one decode step, and a round when it is due
        engine.step()
        if lane.counters.encoded == 7:
            break
    assert lane.counters.encoded == 7 and lane.snapshot.frames == 7
    assert all(r.state != "done" for r in requests)
    while engine.step():
        pass
    assert all(r.state == "done" and r.finish_reason in ("stop", "length") for r in requests)

    patient = Engine(model, EngineConfig(round_every_s=3600.0), thread=False)
    lane = patient.open(live=False)
    lane.put(0.0, _crop(model))
    patient.step()
    request = patient.ask(lane, "What is happening?", max_new_tokens=12)[1]
    lane.put(1.0, _crop(model, 1))
    for _ in range(3):
        patient.step()
    assert lane.counters.encoded == 1 and request.state != "done"  # the frame waits for the round's turn
    while request.state != "done":
        patient.step()
    patient.step()  # no answer pending: the round runs at once
    assert lane.counters.encoded == 2


def test_a_failing_stream_leaves_the_other_streams_and_answers_running(model):
    engine = Engine(model, thread=False)
    good, bad = engine.open(live=False), engine.open(live=False)
    good.put(0.0, _crop(model))
    engine.step()
    request = engine.ask(good, "What is happening?", max_new_tokens=6)[1]

    def broken(*args, **kwargs):
        raise RuntimeError("injected memory fault")

    bad.processor.insert = broken
    for k in range(3):
        good.put(1.0 + k, _crop(model, k))
        bad.put(1.0 + k, _crop(model, k))
    while engine.step():
        pass
    assert bad.done.is_set() and "injected memory fault" in str(bad.error) and bad not in engine.lanes
    assert good.error is None and good.counters.encoded == 4 and not good.done.is_set()
    assert request.finish_reason in ("stop", "length") and request.error is None


def test_engine_config_names_a_bad_knob():
    with pytest.raises(ValueError, match="answer_slots must be >= 1, got 0"):
        EngineConfig(answer_slots=0)
    with pytest.raises(ValueError, match="round_every_s must be >= 0"):
        EngineConfig(round_every_s=-1)


def test_a_file_lanes_frame_that_waits_is_counted_once(model):
    engine = Engine(model, thread=False)
    lane = engine.open(queue_size=1, live=False)
    lane.put(0.0, _crop(model))
    with pytest.raises(TimeoutError, match="stayed full"):
        lane.put(1.0, _crop(model), timeout=0.01)  # the reader tries again after this
    engine.step()
    lane.put(1.0, _crop(model), timeout=0.01)
    engine.step()
    assert (lane.counters.received, lane.counters.encoded, lane.counters.dropped) == (2, 2, 0)


def test_an_answer_iteration_that_fails_ends_its_answers_and_the_engine_goes_on(model):
    engine = Engine(model, thread=False)
    lane = engine.open(live=False)
    lane.put(0.0, _crop(model))
    engine.step()
    decoder = engine.answers.decoder

    def broken(*args, **kwargs):
        raise RuntimeError("injected device fault")

    decoder.prefill = broken
    failed = [engine.ask(lane, "What is happening?", max_new_tokens=4)[1] for _ in range(2)]
    engine.step()
    del decoder.prefill  # the class's method again
    for request in failed:
        assert request.finish_reason == "error"
        with pytest.raises(RuntimeError, match="injected device fault"):
            request.text()
    assert engine.answers.pending == 0 and engine.answers.cache.free_slots == decoder.max_batch
    after = engine.ask(lane, "What is happening?", max_new_tokens=4)[1]
    while engine.step():
        pass
    assert after.finish_reason in ("stop", "length") and after.error is None


def test_an_answer_longer_than_a_slot_goes_the_eager_way(model):
    engine = Engine(model, thread=False)
    lane = engine.open(live=False)
    lane.put(0.0, _crop(model))
    engine.step()
    n_new = engine.answers.decoder.max_seq_len  # more positions than any slot holds
    snap, request = engine.ask(lane, "Describe everything.", max_new_tokens=n_new)
    assert engine.eager.pending == 1 and engine.answers.pending == 0
    while engine.step():
        pass
    eager = "".join(model.stream_answer(snap.memory, "Describe everything.", max_new_tokens=n_new))
    assert request.finish_reason == "stop" and request.text() == eager


def test_memories_sharing_pages_equal_each_stream_processed_alone(model):
    """Six streams on pages of four memories (two pages): a round's steady updates of a page run as one batched
    update, and every stream's memory equals the same frames through a processor of its own."""
    from vstream.engine import StreamProcessor

    engine = Engine(model, EngineConfig(memory_page=4, frames_per_round=5), thread=False)
    frames = list(moving_shapes(60, 64, 48, seed=3))
    lanes = [engine.open(queue_size=64, frames_per_round=2, live=False) for _ in range(6)]
    alone = [StreamProcessor(model) for _ in lanes]
    counts = [20 + 3 * i for i in range(6)]
    for i, lane in enumerate(lanes):
        for t in range(counts[i]):
            lane.put(float(t), model.crop([frames[(t * (i + 1)) % 60]])[0])
            alone[i].insert([float(t)], frames=[frames[(t * (i + 1)) % 60]])
        lane.end()
    while any(not lane.done.is_set() for lane in lanes):
        engine.step()
    assert len(engine.pages) == 2 and engine.stats()["memory_page_updates"] > 0
    for lane, processor, n in zip(lanes, alone, counts):
        assert lane.error is None and lane.counters.encoded == n and lane.snapshot.frames == n
        torch.testing.assert_close(lane.snapshot.memory.tokens, processor.snapshot().memory.tokens,
                                   atol=1e-5, rtol=1e-4)
        assert lane.snapshot.spatial_times == processor.snapshot().spatial_times
        assert lane.snapshot.retrieved_times == processor.snapshot().retrieved_times
    assert all(not p.members for p in engine.pages)  # every ended lane gave its row back


def test_answer_slots_fit_the_kv_budget(model):
    """`slot_kv_bytes` is what a slot's KV cache takes (the cache the answerer allocates), and `kv_slots` keeps the
    slots within the budget: the wanted count when it fits, fewer when not, never none."""
    from vstream.engine.scheduler import kv_slots, slot_kv_bytes
    from vstream.model.batch_answer import BatchAnswerer

    cache = BatchAnswerer(model, max_batch=2).cache
    per_slot = slot_kv_bytes(model)
    assert per_slot * 2 == (cache.k.numel() + cache.v.numel()) * cache.k.element_size()
    assert kv_slots(32, per_slot, 100 * per_slot, 0.5) == 32
    assert kv_slots(32, per_slot, 20 * per_slot, 0.5) == 10
    assert kv_slots(32, per_slot, per_slot, 0.5) == 1
    with pytest.raises(ValueError, match=r"kv_fraction must be in \(0, 1\], got 0"):
        EngineConfig(kv_fraction=0)
