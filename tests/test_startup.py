"""Start-up: models built on the meta device get every weight once, in place (random presets drawn on their device,
checkpoints read from memory-mapped files), deterministically, with one progress line per stage on stderr."""

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import vstream
from vstream.config import VisionConfig, preset
from vstream.encoder.tower import VisionTower, clip_config
from vstream.model.loading import (
    OFFICIAL_PREFIXES, OFFICIAL_VISION_PREFIX, build_random, random_values, save_pretrained, show_progress,
)
from vstream.model.vlm import FlashVStream
from vstream.testing.checkpoint import write_released_checkpoint
from vstream.weights import meta_names


@pytest.fixture
def progress():
    """Progress lines on stderr for one test, as the CLI shows them; the logger is left as it was."""
    logger = logging.getLogger("vstream.load")
    handlers, level = list(logger.handlers), logger.level
    show_progress()
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _tensors(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True)) | dict(model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_preset_is_drawn_in_place_on_the_device_in_the_dtype(dtype):
    model = vstream.load("tiny", device="cpu", dtype=dtype)
    assert meta_names(model) == []
    for name, t in _tensors(model).items():
        assert t.device.type == "cpu", name
        if name.endswith("inv_freq"):  # RoPE frequencies stay float32 whatever the weights' dtype
            assert t.dtype == torch.float32, name
        elif t.is_floating_point():
            assert t.dtype == dtype and torch.isfinite(t).all(), name
    assert model.cfg.dtype == str(dtype).removeprefix("torch.")
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.mm_projector.parameters())


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = vstream.load("tiny", seed=4), vstream.load("tiny", seed=4), vstream.load("tiny", seed=5)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    differ = [n for n, t in a.state_dict().items() if t.is_floating_point() and not torch.equal(t, c.state_dict()[n])]
    assert "llm.model.embed_tokens.weight" in differ and "vision.clip.encoder.layers.0.mlp.fc1.weight" in differ


def test_random_values_have_the_spread_of_freshly_built_modules():
    """The tower's draws follow transformers' CLIP initialisation and the LLM's its initializer_range, measured on
    tensors large enough (>= 65 k values) for a 5 % tolerance."""
    cfg = preset("tiny")
    cfg.vision = VisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**cfg.llm.to_hf()))
        model = FlashVStream(cfg, llm, None, VisionTower(cfg.vision))
    values = random_values(model, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    fresh = CLIPVisionModel(clip_config(cfg.vision, num_layers=cfg.vision.num_layers_used)).state_dict()
    for name in ("embeddings.patch_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight",
                 "encoder.layers.1.self_attn.out_proj.weight", "encoder.layers.0.mlp.fc1.weight",
                 "encoder.layers.1.mlp.fc2.weight"):
        ours = values["vision.clip." + name]
        assert ours.std().item() == pytest.approx(fresh[name].std().item(), rel=0.05), name
    class_embedding = values["vision.clip.embeddings.class_embedding"]  # 256 values: a wider tolerance
    assert class_embedding.std().item() == pytest.approx(256**-0.5, rel=0.15)
    assert values["vision.clip.pre_layrnorm.weight"].eq(1).all() and values["vision.clip.pre_layrnorm.bias"].eq(0).all()
    assert values["llm.model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert values["llm.model.norm.weight"].eq(1).all()
    bound = 1 / cfg.vision.hidden_size**0.5  # nn.Linear's own uniform(+-1/sqrt(fan_in))
    first = values["mm_projector.0.weight"]
    assert first.abs().max().item() <= bound and first.abs().max().item() > 0.9 * bound


def test_saved_directory_loads_exactly_the_saved_tensors(tmp_path):
    model = vstream.load("tiny", seed=7)
    save_pretrained(model, tmp_path / "saved")
    again = vstream.load(tmp_path / "saved")
    assert meta_names(again) == []
    saved = model.state_dict()
    assert again.state_dict().keys() == saved.keys()
    for name, t in again.state_dict().items():
        assert t.dtype == saved[name].dtype and torch.equal(t, saved[name]), name
    half = vstream.load(tmp_path / "saved", dtype="bfloat16")
    for name, t in half.state_dict().items():
        assert torch.equal(t, saved[name].to(t.dtype)), name


def test_released_directory_loads_exactly_its_tensors(tmp_path):
    path = write_released_checkpoint(tmp_path / "ckpt", seed=2)
    written = {}
    for shard in path.glob("*.safetensors"):
        written |= load_file(str(shard))
    model = vstream.load(path, dtype="bfloat16")  # the checkpoint's own dtype: no rounding anywhere
    assert meta_names(model) == []
    ours, compared = model.state_dict(), set()
    for key, value in written.items():
        if key.startswith(OFFICIAL_VISION_PREFIX):
            name = "vision.clip." + key.removeprefix(OFFICIAL_VISION_PREFIX)
        else:
            name = next(new + key[len(old):] for old, new in OFFICIAL_PREFIXES if key.startswith(old))
        if name in ours:  # the skipped tower block, post_layernorm and the legacy buffers are not part of the model
            assert torch.equal(ours[name], value), key
            compared.add(name)
    assert compared == ours.keys()


def test_progress_lines_go_to_stderr_one_per_stage(progress, capsys, caplog):
    caplog.set_level(logging.INFO, logger="vstream.load")
    vstream.load("tiny", device="cpu")
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["config", "modules", "weights", "ready"]
    assert lines[0].startswith("tiny: config ") and "preset, float32 on cpu" in lines[0]
    assert "random, seed 0:" in lines[2] and " s (" in lines[2]
    stages = {r.stage: r.seconds for r in caplog.records if hasattr(r, "stage")}
    assert list(stages) == ["config", "modules", "weights", "ready"] and all(s >= 0 for s in stages.values())
    assert stages["ready"] >= stages["weights"]


def test_a_library_load_prints_nothing(capsys):
    logger = logging.getLogger("vstream.load")
    handlers, level = list(logger.handlers), logger.level
    logger.handlers[:] = []  # as in a program that never configured logging
    logger.setLevel(logging.NOTSET)
    try:
        vstream.load("tiny", device="cpu")
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
    assert capsys.readouterr() == ("", "")


def test_demo_json_stays_json_with_progress_shown(progress, monkeypatch, capsys):
    from vstream.cli import main

    monkeypatch.setattr(sys, "argv", ["vstream", "demo", "--model", "tiny", "--seed", "3", "--speed", "200",
                                      "--questions", "1", "--json"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    assert (exit_.value.code or 0) == 0, out.err
    assert json.loads(out.out)["model"] == "tiny"
    assert "tiny: weights " in out.err


def test_bench_models_are_drawn_on_the_default_device_and_dtype():
    """`build_random` without a device or dtype follows torch's defaults, as `vstream.bench` builds its models."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_random(preset("tiny"))
    finally:
        torch.set_default_dtype(default)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert meta_names(model) == []
