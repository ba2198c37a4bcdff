"""Training: the memory the trainer builds equals the streaming memory; the stages run, save, resume and learn, also in
two processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vstream.config import preset
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.memory.star import abstract_slots
from vstream.model.loading import load
from vstream.synth.clips import write_test_video
from vstream.train.config import from_dict, load_config
from vstream.train.data import SnapshotBuilder


def _memory_cfg():
    cfg = preset("tiny").memory
    cfg.abstract_length, cfg.temporal_length, cfg.buffer_length = 4, 5, 12
    cfg.spatial_size, cfg.temporal_size = 2, 1
    return cfg


def test_abstract_slots_equal_the_streaming_memory_for_a_batch_of_streams():
    torch.manual_seed(0)
    cfg, d = _memory_cfg(), 16
    attention = AbstractAttention(d, 8)
    lengths = [2, 4, 9, 15]
    streams = [torch.randn(n, 16, d) for n in lengths]
    inputs = torch.zeros(len(lengths), max(lengths), 1, d)
    expected = []
    for i, feats in enumerate(streams):
        memory = PaperStarMemory(cfg, d, attention, grid=4)
        for f in range(feats.shape[0]):
            memory.update(feats[f : f + 1], [float(f)])
        inputs[i, : lengths[i]] = feats.mean(1, keepdim=True)
        expected.append(memory.read().tokens[: memory.counts()["abstract"]])
    slots = abstract_slots(attention, inputs, lengths, cfg)
    for i, n in enumerate(lengths):
        got = slots[i].flatten(0, 1)[: min(n, cfg.abstract_length)]
        torch.testing.assert_close(got, expected[i], rtol=1e-5, atol=1e-6)


def test_abstract_slots_carry_gradients_to_the_attention():
    cfg, d = _memory_cfg(), 16
    attention = AbstractAttention(d, 8)
    inputs = torch.randn(2, 8, 1, d)
    abstract_slots(attention, inputs, [8, 6], cfg).square().sum().backward()
    assert attention.q_proj.weight.grad.abs().sum() > 0 and attention.k_proj.weight.grad.abs().sum() > 0


def test_training_batch_rebuilds_the_inference_memory_and_prompt(tmp_path):
    """The trainer's spliced embeddings equal `prompt_embeds` of the streaming memory (same attention weights)."""
    model = load("tiny")
    builder = SnapshotBuilder(model.cfg, model.vision)
    builder.attention.load_state_dict(model.attention_model.state_dict())
    frames = [torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy() for _ in range(30)]
    times = [float(i) for i in range(30)]
    features = builder.encode(frames)
    [(rest, abs_inputs)] = builder.snapshots(features, times, [27.0])
    memory = model.memory_from_features(features[:28], times[:28])
    slots = abstract_slots(model.attention_model, abs_inputs[None], [abs_inputs.shape[0]], model.cfg.memory)[0]
    n_abs = memory.counts["abstract"]
    torch.testing.assert_close(torch.cat([slots.flatten(0, 1)[:n_abs], rest]), memory.tokens, rtol=1e-5, atol=1e-5)


def test_training_snapshots_are_the_stream_processors_snapshots():
    """A training sample's memory is what streaming builds: the builder's snapshots at any times, asked in any order,
    equal the snapshots of a `StreamProcessor` fed the same frames (same attention weights), token for token."""
    from vstream.model.processor import StreamProcessor
    from vstream.errors import DataError

    model = load("tiny")
    builder = SnapshotBuilder(model.cfg, model.vision)
    builder.attention.load_state_dict(model.attention_model.state_dict())
    rng = torch.Generator().manual_seed(1)
    frames = [torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8, generator=rng).numpy() for _ in range(14)]
    times = [0.5 * i for i in range(14)]
    at = [5.2, 0.0, 6.5, 2.0]
    built = builder.snapshots(builder.encode(frames), times, at)
    processor = StreamProcessor(model)
    for t, (rest, abs_inputs) in sorted(zip(at, built), key=lambda pair: pair[0]):
        seen = [i for i, s in enumerate(times) if s <= t and i >= processor.frames]
        processor.insert([times[i] for i in seen], frames=[frames[i] for i in seen])
        snap = processor.snapshot()
        assert abs_inputs.shape[0] == snap.frames == int(t / 0.5) + 1
        assert torch.equal(rest, snap.memory.tokens[snap.memory.counts["abstract"]:])
    with pytest.raises(DataError, match="before the first frame"):
        builder.snapshots(builder.encode(frames[:2]), [1.0, 2.0], [0.5])


def _tiny_llava(tmp_path: Path, n: int = 4) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    records = []
    for i in range(n):
        write_test_video(videos / f"v{i}.mp4", seconds=4, fps=4, size=(64, 48), seed=i)
        records.append({
            "id": f"r{i}", "video": f"videos/v{i}.mp4", "time": 2.5,
            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                              {"from": "gpt", "value": "shapes"}],
        })
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"},
                                                    {"from": "gpt", "value": "hello"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _config(tmp_path: Path, data: Path, **extra) -> Path:
    raw = {
        "stage": "finetune", "model": "tiny", "output_dir": str(tmp_path / "run"),
        "data": {"kind": "llava", "json": str(data)}, "max_steps": 6, "batch_size": 2, "lr": 3e-3,
        "warmup_ratio": 0.0, "scheduler": "constant", "save_steps": 3, "logging_steps": 1, "device": "cpu",
    } | extra
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="unknown training settings \\['bogus'\\]"):
        from_dict({"stage": "finetune", "model": "tiny", "output_dir": "x", "bogus": 1})
    with pytest.raises(ValueError, match="stage must be one of"):
        from_dict({"stage": "warmup", "model": "tiny", "output_dir": "x"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def _run_cli(args, nproc: int = 1, timeout: float = 240):
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vstream", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "vstream", *args]  # standalone: a free local port for the rendezvous, never a fixed one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_process_training_learns_and_resumes(tmp_path):
    data = _tiny_llava(tmp_path)
    config = _config(tmp_path, data)
    _run_cli(["train", "--config", str(config)], nproc=2)
    run = tmp_path / "run"
    history = [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert len(history) == 6 and history[-1] < history[0], history
    assert (run / "checkpoint-6" / "trainable.safetensors").is_file()
    model = load(run / "model")  # the exported model loads and answers
    assert isinstance(model.answer(str(tmp_path / "videos" / "v0.mp4"), "What is shown?", max_new_tokens=3).text, str)
    # resume: continue from checkpoint-6 up to step 9; the log goes on from step 7
    _run_cli(["train", "--config", str(config), "--max-steps", "9", "--resume"], nproc=1)
    state = json.loads((run / "checkpoint-9" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 9 and steps == list(range(1, 10)), steps


def test_projector_stage_trains_only_projector_and_attention(tmp_path):
    from vstream.train.runner import build

    cfg = load_config(_config(tmp_path, _tiny_llava(tmp_path, n=2), stage="projector"))
    module, model, dataset, collate_fn = build(cfg)
    trained = {n.split(".")[1] for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {"mm_projector", "attention_model"}
    batch = collate_fn([dataset[0], dataset[1]])
    loss = module(**batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.mm_projector[0].weight.grad is not None
