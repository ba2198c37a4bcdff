"""CLIP preprocessing parity with transformers, and the truncated vision tower and its loading (tiny random weights)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from vstream.config import VisionConfig, preset
from vstream.encoder.preprocess import preprocess_frames, resized_size, to_rgb
from vstream.encoder.clip_weights import load_clip_directory, load_clip_weights
from vstream.encoder.tower import VisionTower, clip_config


@pytest.fixture(scope="module")
def processor():
    cfg = VisionConfig()
    return CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        do_convert_rgb=True,
    )


def _noise(height, width, channels=3, seed=0):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _opaque_rgba(height, width):
    rgba = _noise(height, width, 4, seed=5)
    rgba[..., 3] = 255
    return rgba


# (ours, what transformers gets): same pixels; transformers reads 2-D gray only as a PIL image
PARITY_CASES = {
    "landscape 640x360": (_noise(360, 640), _noise(360, 640)),
    "portrait 97x161": (_noise(161, 97, seed=1), _noise(161, 97, seed=1)),
    "smaller than 224": (_noise(100, 150, seed=2), _noise(100, 150, seed=2)),
    "square 300": (_noise(300, 300, seed=3), _noise(300, 300, seed=3)),
    "exact 224 x 500": (_noise(224, 500, seed=6), _noise(224, 500, seed=6)),
    "gray": (_noise(120, 200, None, seed=4), PIL.Image.fromarray(_noise(120, 200, None, seed=4))),
    "gray HxWx1": (_noise(120, 200, 1, seed=4), PIL.Image.fromarray(_noise(120, 200, None, seed=4))),
    "rgba (opaque)": (_opaque_rgba(250, 180), _opaque_rgba(250, 180)),
    "PIL RGB": (PIL.Image.fromarray(_noise(256, 341, seed=7)), PIL.Image.fromarray(_noise(256, 341, seed=7))),
    "PIL palette": (PIL.Image.fromarray(_noise(90, 90, seed=8)).convert("P"),) * 2,
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_preprocess_matches_transformers(processor, case):
    ours_in, theirs_in = PARITY_CASES[case]
    ours = preprocess_frames([ours_in], VisionConfig())
    theirs = processor(images=[theirs_in], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-5


def test_preprocess_batches_mixed_sizes(processor):
    frames = [case[0] for case in PARITY_CASES.values()]
    ours = preprocess_frames(frames, VisionConfig())
    assert ours.shape == (len(frames), 3, 224, 224)
    single = torch.cat([preprocess_frames([f], VisionConfig()) for f in frames])
    assert torch.equal(ours, single)


def test_resized_size_floors_the_long_edge():
    assert resized_size(360, 640, 224) == (224, 398)  # 398.2
    assert resized_size(161, 97, 224) == (371, 224)  # 371.8
    assert resized_size(300, 300, 224) == (224, 224)
    assert resized_size(100, 150, 224) == (224, 336)


def test_to_rgb_accepts_gray_and_drops_alpha():
    gray = _noise(4, 5, None)
    assert (to_rgb(gray) == gray[..., None]).all() and to_rgb(gray).shape == (4, 5, 3)
    rgba = _noise(4, 5, 4)
    rgba[..., 3] = 0  # fully transparent: the colour is kept, not composited onto white
    assert (to_rgb(rgba) == rgba[..., :3]).all()
    assert (to_rgb(PIL.Image.fromarray(rgba)) == rgba[..., :3]).all()
    assert to_rgb(PIL.Image.fromarray(gray).convert("1")).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 5, 3), np.float32), "dtype float32"),
        (np.zeros((4, 5, 3), np.uint16), "dtype uint16"),
        (np.zeros((4, 5, 2), np.uint8), r"shape \(4, 5, 2\)"),
        (np.zeros((2, 4, 5, 3), np.uint8), r"shape \(2, 4, 5, 3\)"),
        (np.zeros((0, 5, 3), np.uint8), r"shape \(0, 5, 3\)"),
        (PIL.Image.fromarray(np.zeros((4, 5), np.uint16)), "mode 'I;16'"),
        (PIL.Image.fromarray(np.zeros((4, 5), np.float32)), "mode 'F'"),
    ],
)
def test_to_rgb_rejects_what_it_cannot_convert_exactly(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb(bad)


def _full_tower(cfg: VisionConfig, seed=0) -> CLIPVisionModel:
    """Full-depth random CLIP vision model of `cfg`, with non-trivial LayerNorms."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _reference(model: CLIPVisionModel, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1, 2])
def test_truncated_tower_equals_full_depth_hidden_state(select_layer):
    cfg = dataclasses.replace(preset("tiny").vision, select_layer=select_layer)
    full = _full_tower(cfg)
    tower = VisionTower(cfg)
    assert len(tower.clip.encoder.layers) == cfg.num_layers_used
    unused = load_clip_weights(tower, {"vision_model." + k: v for k, v in full.state_dict().items()}, "vision_model.")
    skipped = ("post_layernorm.",) + tuple(f"encoder.layers.{i}." for i in range(cfg.num_layers_used, 3))
    assert unused == sorted("vision_model." + k for k in full.state_dict() if k.startswith(skipped))
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    out = tower(pixels)
    assert out.shape == (3, cfg.grid**2, cfg.hidden_size)
    torch.testing.assert_close(out, _reference(full, pixels, select_layer), atol=1e-5, rtol=0)


def test_last_layer_has_no_post_layernorm():
    cfg = dataclasses.replace(preset("tiny").vision, select_layer=-1)
    full = _full_tower(cfg)
    tower = VisionTower(cfg)
    load_clip_weights(tower, full.state_dict(), "")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        last = full(pixel_values=pixels).last_hidden_state[:, 1:]
        normed = full.post_layernorm(last)
    torch.testing.assert_close(tower(pixels), last, atol=1e-5, rtol=0)
    assert not torch.allclose(tower(pixels), normed, atol=1e-3)


def test_tower_is_frozen_and_encode_batches():
    cfg = preset("tiny").vision
    tower = VisionTower(cfg)
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert not any("post_layernorm" in k for k in tower.state_dict())
    assert all(k.startswith("clip.") for k in tower.state_dict())
    pixels = torch.randn(5, 3, 224, 224, dtype=torch.float64)
    out = tower.encode(pixels, frames_per_call=2)
    assert out.shape == (5, tower.num_tokens, cfg.hidden_size) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, tower(pixels.float()), atol=1e-5, rtol=0)
    assert tower.nbytes == sum(p.numel() * 4 for p in tower.parameters())
    with pytest.raises(ValueError, match=r"expected pixel values \[n, 3, 224, 224\], got \[1, 3, 112, 112\]"):
        tower(torch.zeros(1, 3, 112, 112))


def test_meta_build_loads_and_runs():
    cfg = preset("tiny").vision
    full = _full_tower(cfg)
    tower = VisionTower(cfg, device="meta")
    load_clip_weights(tower, full.state_dict(), "")
    assert not any(t.is_meta for t in [*tower.parameters(), *tower.buffers()])
    assert not any(p.requires_grad for p in tower.parameters())
    pixels = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(tower.encode(pixels), _reference(full, pixels, -2), atol=1e-5, rtol=0)


def test_load_errors_name_the_keys():
    cfg = preset("tiny").vision
    tower = VisionTower(cfg)
    state = dict(_full_tower(cfg).state_dict())
    missing = {k: v for k, v in state.items() if k != "pre_layrnorm.bias"}
    with pytest.raises(ValueError, match=r"missing 1 \['pre_layrnorm.bias'\]; unexpected 0"):
        load_clip_weights(tower, missing, "")
    extra = state | {"encoder.layers.0.extra": torch.zeros(1), "encoder.layers.7.mlp.fc1.weight": torch.zeros(1)}
    names = r"\['encoder.layers.0.extra', 'encoder.layers.7.mlp.fc1.weight'\]"  # block 7 is past the full depth 3
    with pytest.raises(ValueError, match=r"unexpected 2 " + names):
        load_clip_weights(tower, extra, "")
    wrong = state | {"pre_layrnorm.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"pre_layrnorm.bias: checkpoint shape \[7\], tower expects \[32\]"):
        load_clip_weights(tower, wrong, "")
    with pytest.raises(ValueError, match="no key starts with prefix 'vision_model.'"):
        load_clip_weights(tower, state, "vision_model.")


TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    vocab_size=99,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _tiny_hf_vision_config() -> CLIPVisionConfig:
    return clip_config(preset("tiny").vision)


def _check_directory_tower(tower: VisionTower, vision: CLIPVisionModel, select_layer=-2):
    assert tower.cfg.select_layer == select_layer and tower.cfg.num_hidden_layers == 3 and tower.cfg.hidden_size == 32
    pixels = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(tower.encode(pixels), _reference(vision.eval(), pixels, select_layer), atol=1e-5, rtol=0)


def test_load_clip_directory_vision_model_safetensors(tmp_path):
    torch.manual_seed(0)
    vision = CLIPVisionModel(_tiny_hf_vision_config())
    vision.save_pretrained(tmp_path)
    _check_directory_tower(load_clip_directory(tmp_path), vision)
    cfg = dataclasses.replace(preset("tiny").vision, select_layer=1, hidden_size=999)
    tower = load_clip_directory(tmp_path, cfg)
    assert tower.cfg.hidden_size == 32  # the directory's architecture wins; select_layer is the caller's
    _check_directory_tower(tower, vision, select_layer=1)


def test_load_clip_directory_full_clip_model_sharded(tmp_path):
    torch.manual_seed(1)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=_tiny_hf_vision_config().to_dict(), projection_dim=16)
    model = CLIPModel(config)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _check_directory_tower(load_clip_directory(tmp_path), model.vision_model)


def test_load_clip_directory_pytorch_bin(tmp_path):
    torch.manual_seed(2)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=_tiny_hf_vision_config().to_dict(), projection_dim=16)
    model = CLIPModel(config)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    # old checkpoints also carry the position-id buffer
    ids = torch.arange(257).expand(1, -1)
    state = model.state_dict() | {f"{part}.embeddings.position_ids": ids for part in ("vision_model", "text_model")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    _check_directory_tower(load_clip_directory(tmp_path), model.vision_model)


def test_load_clip_directory_needs_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: expected a local CLIP directory.*nothing is download"):
        load_clip_directory("openai/clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_clip_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(FileNotFoundError, match=r"expected model.safetensors.*found \['config.json'\]"):
        load_clip_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="expected model_type 'clip' or 'clip_vision_model', got 'llama'"):
        load_clip_directory(tmp_path)
