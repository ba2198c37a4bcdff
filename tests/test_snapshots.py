"""Durable snapshots without a server: the engine's `call` and a lane's state taken on its thread, the processor's
state round trip, and the on-disk format (atomic writes, one current snapshot, checksums, identities)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from vstream.engine import Engine, StreamSession
from vstream.engine import snapshots
from vstream.model.processor import StreamProcessor
from vstream.synth.clips import moving_shapes

SID = "str_00112233445566aa"


@pytest.fixture(scope="module")
def frames():
    return [(i * 0.5, f) for i, f in enumerate(moving_shapes(12, seed=3, fps=2))]


def _fed(model, frames, n) -> StreamProcessor:
    processor = StreamProcessor(model)
    processor.insert([t for t, _ in frames[:n]], frames=[f for _, f in frames[:n]])
    return processor


def test_engine_call_runs_on_the_engine_thread(model):
    engine = Engine(model)
    assert engine.call(lambda: threading.current_thread().name).result(10) == "vstream-engine"
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0).result(10)
    driven = Engine(model, thread=False)
    future = driven.call(lambda: 42)
    assert not future.done() and driven.step() and future.result(0) == 42
    engine.shutdown()


def test_processor_state_round_trip_continues_the_stream(model, frames):
    whole = _fed(model, frames, len(frames))
    first = _fed(model, frames, 7)
    state = first.state_dict()
    restored = StreamProcessor(model)
    restored.load_state_dict(state)
    assert restored.frames == 7 and restored.stream_time == frames[6][0]
    assert snapshots.tensors_equal(restored.memory.state_dict()["tensors"], state["memory"]["tensors"])
    snap = restored.snapshot()
    assert snap.frames == 7 and snap.version == state["version"] + 1
    assert torch.equal(snap.memory.tokens, first.snapshot().memory.tokens)
    rest = frames[7:]
    restored.insert([t for t, _ in rest], frames=[f for _, f in rest])
    assert snapshots.tensors_equal(restored.memory.state_dict()["tensors"], whole.memory.state_dict()["tensors"])
    with pytest.raises(ValueError, match="time order"):
        restored.insert([0.0], frames=[frames[0][1]])


def test_the_state_of_a_stream_with_no_frame_yet_round_trips(model, frames):
    """A stream saved before its first frame (a cluster saves new streams at once) loads and then takes frames."""
    state = StreamProcessor(model).state_dict()
    assert (state["frames"], state["stream_time"]) == (0, None)
    restored = StreamProcessor(model)
    restored.load_state_dict(state)
    assert restored.frames == 0 and restored.snapshot() is None
    restored.insert([frames[0][0]], frames=[frames[0][1]])
    assert restored.frames == 1 and restored.stream_time == frames[0][0]


def test_lane_state_is_taken_and_restored_on_the_engine_thread(model, frames):
    with StreamSession(model) as session:
        for t, frame in frames[:5]:
            session.lane.put(t, model.crop([frame])[0])
        session.wait_for_frames(5, timeout=30)
        state = session.lane.state_dict()
    with StreamSession(model) as again:
        again.lane.load_state_dict(state)
        assert again.snapshot() is not None and again.snapshot().frames == 5
        assert again.ask("What is on the screen?", max_new_tokens=2).frames == 5


def test_write_read_one_current_snapshot(model, frames, tmp_path):
    ident = snapshots.identity(model)
    snapshots.write(tmp_path, SID, _fed(model, frames, 3).state_dict(), ident, {"source": {"type": "push"}})
    folder = tmp_path / SID
    (folder / ".memory-00000009.safetensors.123.tmp").write_bytes(b"half")  # a kill -9 during a write
    snapshots.write(tmp_path, SID, _fed(model, frames, 6).state_dict(), ident, {"source": {"type": "push"}})
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "memory-00000002.safetensors"]
    snap = snapshots.read(tmp_path, SID, ident)
    assert snap.state["frames"] == 6 and snap.meta == {"source": {"type": "push"}}
    assert snapshots.tensors_equal(snap.state["memory"]["tensors"],
                                   _fed(model, frames, 6).memory.state_dict()["tensors"])
    assert snapshots.stream_ids(tmp_path) == [SID]
    snapshots.remove(tmp_path, SID)
    assert not folder.exists() and snapshots.stream_ids(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_tensors", "bad_json", "no_manifest"])
def test_a_damaged_snapshot_is_refused(model, frames, tmp_path, damage):
    ident = snapshots.identity(model)
    snapshots.write(tmp_path, SID, _fed(model, frames, 4).state_dict(), ident, {})
    folder = tmp_path / SID
    tensors = next(folder.glob("*.safetensors"))
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[-100] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "no_tensors":
        tensors.unlink()
    elif damage == "bad_json":
        (folder / "manifest.json").write_text('{"format": "vstream.stream-snap')
    else:
        (folder / "manifest.json").unlink()
    expected = {"truncate": "checksum mismatch", "flip": "checksum mismatch", "no_tensors": "missing",
                "bad_json": "expected a JSON manifest", "no_manifest": "no manifest"}[damage]
    with pytest.raises(snapshots.CorruptSnapshot, match=expected):
        snapshots.read(tmp_path, SID, ident)


def test_another_configuration_is_refused_naming_both(model, frames, tmp_path):
    ident = snapshots.identity(model)
    snapshots.write(tmp_path, SID, _fed(model, frames, 2).state_dict(), ident, {})
    other = json.loads(json.dumps(ident))
    other["memory"]["temporal_length"] += 1
    with pytest.raises(snapshots.IncompatibleSnapshot) as caught:
        snapshots.read(tmp_path, SID, other)
    message = str(caught.value)
    assert message.count("model 'tiny'") == 2, message
    assert "memory.temporal_length=25" in message and "memory.temporal_length=26" in message, message
