"""Configuration of Flash-VStream-Qwen models (Qwen2-VL / Qwen2.5-VL backbone + Flash Memory) and their presets.

`QwenModelConfig.hf` is the backbone's Hugging Face `config.json` as a dict (text and vision sections, token ids):
the shapes of a preset, or what a checkpoint directory holds. Presets carry random weights and the tiny Qwen-style
tokenizer (`vstream.model.qwen.tokenizer`), so their special token ids are that tokenizer's. Building a config never
builds a model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vstream.errors import ConfigError, UnknownNameError
from vstream.memory.flash import FlashMemoryConfig, flash_state_bytes

BACKBONES = ("qwen2_vl", "qwen2_5_vl")
# ids of the tiny tokenizer's special tokens (vstream.model.qwen.tokenizer.SPECIALS, in order)
TINY_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "vision_start_token_id": 3,
            "vision_end_token_id": 4, "image_token_id": 5, "video_token_id": 6}


@dataclass
class VisionShape:
    """What the rest of vstream reads of the vision side (`image_size`: the side of the server's warm-up frame)."""

    image_size: int = 448
    """Side of a square frame at the pixel budget."""


@dataclass
class QwenModelConfig:
    """A Flash-VStream-Qwen model: backbone config, Flash Memory, frame budget and answer defaults."""

    name: str = "flash-vstream-qwen-7b"
    """Preset or checkpoint name, shown by `vstream info`."""
    backbone: str = "qwen2_vl"
    """`qwen2_vl` or `qwen2_5_vl` (the `model_type` of the Hugging Face config)."""
    hf: dict = field(default_factory=dict)
    """The backbone's Hugging Face config (config.json as a dict)."""
    memory: FlashMemoryConfig = field(default_factory=FlashMemoryConfig)
    """Flash Memory sizes."""
    min_pixels: int = 56 * 56
    """Smallest frame after resizing (pixels)."""
    max_pixels: int = 4 * 224 * 224
    """Full-resolution pass budget: 448 x 448 -> 32 x 32 patches -> 256 tokens per unit."""
    small_pool: int = 2
    """The small pass averages pixels `small_pool` x `small_pool` (448 -> 224: 64 tokens per unit)."""
    sample_fps: float = 1.0
    """Frames per second taken from a video; two consecutive frames make one unit."""
    max_new_tokens: int = 256
    """Default answer length limit."""
    dtype: str = "bfloat16"
    """Parameter dtype on CUDA (the CPU runs float32)."""
    template: str = "qwen_vl"
    """Conversation template (`vstream.model.prompts.TEMPLATES`)."""
    vision: VisionShape = field(default_factory=VisionShape)
    """The square frame side at the budget (read by the server's warm-up)."""
    pca_dim: int = 32
    """The release's `flash_memory_temporal_pca_dim`, kept as read. It changes nothing: the release's temporal method
    (`kmeans_ordered`) clusters the full small-pass features; see `vstream.model.qwen.release`."""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")

    @property
    def vision_hf(self) -> dict:
        return self.hf["vision_config"]

    @property
    def text_hf(self) -> dict:
        return self.hf.get("text_config") or self.hf

    @property
    def feature_dim(self) -> int:
        """Width C of the tower's pre-merger features."""
        v = self.vision_hf
        return v["embed_dim"] if self.backbone == "qwen2_vl" else v["hidden_size"]

    @property
    def patch(self) -> int:
        return self.vision_hf.get("patch_size", 14)

    @property
    def merge(self) -> int:
        return self.vision_hf.get("spatial_merge_size", 2)

    @property
    def seconds_scale(self) -> float:
        """AM-RoPE temporal positions per second: Qwen2.5-VL's tokens_per_second (absolute time); Qwen2-VL counts
        units (2 frames at `sample_fps`)."""
        if self.backbone == "qwen2_5_vl":
            return float(self.vision_hf.get("tokens_per_second", 2))
        return self.sample_fps / self.vision_hf.get("temporal_patch_size", 2)

    def unit_patches(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(small, full) pre-merger features per unit for frames of height x width (default: the square budget)."""
        from vstream.encoder.qwen_preprocess import smart_resize

        factor = self.patch * self.merge
        side = self.vision.image_size
        h, w = smart_resize(height or side, width or side, factor, self.min_pixels, self.max_pixels)
        hs, ws = (h // self.small_pool) // factor * factor, (w // self.small_pool) // factor * factor
        return (hs // self.patch) * (ws // self.patch), (h // self.patch) * (w // self.patch)

    @property
    def max_tokens(self) -> int:
        """LLM tokens of a full memory for square frames at the budget (11,520 at the defaults)."""
        small, full = self.unit_patches()
        m = self.memory
        return (m.csm_length * small + m.dam_length * full) // self.merge**2

    def state_bytes(self, dtype: str | None = None) -> int:
        """Bytes of one stream's Flash Memory state for square frames at the budget, in `dtype` (default: `dtype`)."""
        import torch

        small, full = self.unit_patches()
        return flash_state_bytes(self.memory, self.feature_dim, small, full, getattr(torch, dtype or self.dtype))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(vocab, hidden, inter, layers, heads, kv, mrope, max_pos=32768) -> dict:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": max_pos,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope}}


def _hf(model_type: str, text: dict, vision: dict, ids: dict) -> dict:
    text = text | {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {"model_type": model_type, "architectures": [_ARCH[model_type]], "text_config": text,
            "vision_config": vision, "tie_word_embeddings": False, **ids}


_ARCH = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
# Qwen2-VL-7B's vision tower: also the defaults of transformers' Qwen2-VL vision config, which a saved config.json
# may leave out (see vstream.model.qwen.release)
QWEN2_VL_7B_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                       "hidden_act": "quick_gelu"}
_QWEN25_VL_7B_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                        "in_channels": 3, "hidden_act": "silu", "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
_TEXT_7B = _text(152064, 3584, 18944, 28, 28, 4, [16, 24, 24], 128000)
_TINY_TEXT = _text(512, 64, 128, 2, 4, 2, [2, 3, 3], 4096)
_TINY_MEMORY = FlashMemoryConfig(csm_length=6, dam_length=3)
_TINY_PIXELS = {"max_pixels": 112 * 112, "min_pixels": 56 * 56, "vision": VisionShape(image_size=112)}

QWEN_PRESETS: dict[str, QwenModelConfig] = {
    # Flash-VStream-Qwen: Qwen2-VL-7B shapes, the spec's defaults (60 CSM + 30 DAM units, 11,520 tokens).
    "flash-vstream-qwen-7b": QwenModelConfig(
        name="flash-vstream-qwen-7b", backbone="qwen2_vl", hf=_hf("qwen2_vl", _TEXT_7B, QWEN2_VL_7B_VISION, TINY_IDS)),
    # The same memory on Qwen2.5-VL-7B shapes (window attention ViT, absolute-time M-RoPE).
    "qwen2.5-vl-7b-flash": QwenModelConfig(
        name="qwen2.5-vl-7b-flash", backbone="qwen2_5_vl",
        hf=_hf("qwen2_5_vl", _TEXT_7B, _QWEN25_VL_7B_VISION, TINY_IDS)),
    # Tiny random models for tests: 112 x 112 frames (8 x 8 patches full, 4 x 4 small), 6 CSM + 3 DAM units.
    "tiny-qwen2-vl": QwenModelConfig(
        name="tiny-qwen2-vl", backbone="qwen2_vl", memory=copy.deepcopy(_TINY_MEMORY), max_new_tokens=24,
        dtype="float32", **copy.deepcopy(_TINY_PIXELS),
        hf=_hf("qwen2_vl", _TINY_TEXT, {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4,
                                        "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                                        "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "quick_gelu"},
               TINY_IDS)),
    "tiny-qwen2.5-vl": QwenModelConfig(
        name="tiny-qwen2.5-vl", backbone="qwen2_5_vl", memory=copy.deepcopy(_TINY_MEMORY), max_new_tokens=24,
        dtype="float32", **copy.deepcopy(_TINY_PIXELS),
        hf=_hf("qwen2_5_vl", _TINY_TEXT, {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                                          "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                                          "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "silu",
                                          "window_size": 56, "fullatt_block_indexes": [1, 3],
                                          "tokens_per_second": 2}, TINY_IDS)),
}


def qwen_preset(name: str) -> QwenModelConfig:
    """A fresh copy of the named Qwen preset."""
    if name not in QWEN_PRESETS:
        raise UnknownNameError(f"unknown Qwen preset {name!r}; known: {sorted(QWEN_PRESETS)}")
    return copy.deepcopy(QWEN_PRESETS[name])
