"""The authors' Flash-VStream-Qwen release format (`zhang9302002/Flash-VStream-Qwen-7b` on the Hugging Face Hub), read
into a plain Qwen2-VL config and vstream's Flash Memory sizes.

What a release directory holds follows from the authors' code (IVGSZ/Flash-VStream, folder `Flash-VStream-Qwen/`):
their training merges its LoRA factors into Qwen2-VL-7B-Instruct and saves the whole model with transformers 4.45,
and their evaluation and real-time scripts load that directory as a full model. So:

- the weights are Qwen2-VL's, under Qwen2-VL's own names (`model.*`, `visual.*`, `lm_head.weight`) in safetensors
  shards with their index: the memory has no parameters, nothing else is stored;
- config.json is Qwen2-VL's flat config with `model_type` `flash_vstream_qwen2_vl`, `architectures`
  `["FlashVStreamQwen2VLModel"]`, M-RoPE written the way transformers 4.45 rewrites it (`rope_scaling` with `type`
  `default` and `mrope_section`), and a `vision_config` that holds only what differs from the 7B defaults (transformers
  saves differences), the Hub's extra keys, and `flash_memory_config`: six fields, each prefixed `flash_memory_`:
  `temporal_length` (frames, 120), `temporal_method` (`kmeans_ordered`), `temporal_poolsize` (2), `temporal_pca_dim`
  (32), `spatial_length` (frames, 60) and `spatial_method` (`klarge_retrieve`);
- their processor's preprocessor_config.json, Qwen2-VL's tokenizer files, chat_template.json, generation_config.json.

`plain_config` turns that config.json into a Qwen2-VL one (vision defaults filled in, the memory fields taken out) and
`memory_of` turns the memory fields into a `FlashMemoryConfig`: lengths in frames become 2-frame units (120 frames ->
60 CSM clusters, 60 -> 30 DAM units). A missing field takes the release's default, as the authors' loaders do. vstream
runs the release's own methods only (`kmeans_ordered`, `klarge_retrieve`, poolsize 2: the small pass pools 2 x 2);
another value, an odd or out-of-range length, or an unknown field is a `ConfigError` naming what was expected and what
was found.

`temporal_pca_dim` is kept (`QwenModelConfig.pca_dim`) and changes nothing. The authors' memory stores the configured
value but never reads it: `kmeans_ordered` clusters the full small-pass features, and only two optional methods
(`pca_kmeans_ordered`, `torchpca_kmeans_ordered`) project features onto 32 principal directions, with their own
default, not the configured value.

The release runs videos at 4 x 224 x 224 pixels a frame at most (its scripts pass `max_pixels` with each video, while
the saved preprocessor_config.json keeps Qwen2-VL's much larger image default), so a release directory's budget is
capped there (`RELEASE_MAX_PIXELS`). A LoRA adapter beside the release is `vstream.model.qwen.adapter`'s.
"""

from __future__ import annotations

import copy

from vstream.errors import ConfigError
from vstream.memory.flash import FlashMemoryConfig
from vstream.model.qwen.config import QWEN2_VL_7B_VISION

RELEASE_MODEL_TYPE = "flash_vstream_qwen2_vl"
RELEASE_ARCHITECTURE = "FlashVStreamQwen2VLModel"
RELEASE_MAX_PIXELS = 4 * 224 * 224
FIELD_PREFIX = "flash_memory_"
RELEASE_MEMORY = {"temporal_length": 120, "temporal_method": "kmeans_ordered", "temporal_poolsize": 2,
                  "temporal_pca_dim": 32, "spatial_length": 60, "spatial_method": "klarge_retrieve"}
"""The release's memory fields (names without `flash_memory_`) and their defaults."""
ONE_VALUE = ("temporal_method", "temporal_poolsize", "spatial_method")
"""Fields vstream runs at the release's default only."""


def is_release(raw: dict) -> bool:
    """Whether a config.json (as a dict) is the release's."""
    return raw.get("model_type") == RELEASE_MODEL_TYPE


def plain_config(raw: dict) -> tuple[dict, dict]:
    """(the Qwen2-VL config.json it stands for, its `flash_memory_config`) of a release config.json."""
    out = copy.deepcopy(raw)
    vision = dict(out.get("vision_config") or {})
    fields = vision.pop("flash_memory_config", None) or {}
    vision.pop("model_type", None)  # the release writes "qwen2_vl" here; the vision config's own type differs
    out["vision_config"] = QWEN2_VL_7B_VISION | vision
    out["model_type"] = "qwen2_vl"
    out["architectures"] = ["Qwen2VLForConditionalGeneration"]
    rope = out.get("rope_scaling")
    if isinstance(rope, dict) and "mrope_section" in rope:  # 4.45's `default` + mrope_section is the Hub's `mrope`
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_type"} | {"type": "mrope"}
    return out, fields


def memory_of(fields: dict, source: str) -> tuple[FlashMemoryConfig, int]:
    """(Flash Memory sizes, pca_dim) of a release's `flash_memory_config`; see the module docstring."""
    if not isinstance(fields, dict):
        raise ConfigError(f"{source}: flash_memory_config must be an object, found {fields!r}")
    unknown = sorted(k for k in fields if k.removeprefix(FIELD_PREFIX) not in RELEASE_MEMORY
                     or not k.startswith(FIELD_PREFIX))
    if unknown:
        raise ConfigError(f"{source}: flash_memory_config has fields vstream does not know: {unknown}; expected "
                          f"some of {[FIELD_PREFIX + k for k in RELEASE_MEMORY]}")
    f = RELEASE_MEMORY | {k.removeprefix(FIELD_PREFIX): v for k, v in fields.items()}
    for key in ONE_VALUE:
        if f[key] != RELEASE_MEMORY[key]:
            raise ConfigError(f"{source}: {FIELD_PREFIX}{key} is {f[key]!r}; vstream runs the release's "
                              f"{RELEASE_MEMORY[key]!r} only")
    for key in ("temporal_length", "spatial_length", "temporal_pca_dim"):
        if isinstance(f[key], bool) or not isinstance(f[key], int):
            raise ConfigError(f"{source}: {FIELD_PREFIX}{key} must be an integer, found {f[key]!r}")
    t, s = f["temporal_length"], f["spatial_length"]
    if t < 2 or t % 2 or s < 0 or s % 2 or s > t:
        raise ConfigError(f"{source}: the memory lengths count frames, two to a unit: expected an even "
                          f"{FIELD_PREFIX}temporal_length of at least 2 and an even {FIELD_PREFIX}spatial_length in "
                          f"[0, temporal_length], found {t} and {s}")
    if f["temporal_pca_dim"] < 1:
        raise ConfigError(f"{source}: {FIELD_PREFIX}temporal_pca_dim must be at least 1, found "
                          f"{f['temporal_pca_dim']}")
    return FlashMemoryConfig(csm_length=t // 2, dam_length=s // 2), f["temporal_pca_dim"]


def release_fields(memory: FlashMemoryConfig, pca_dim: int) -> dict:
    """The release's `flash_memory_config` for these sizes: what `memory_of` reads back to them."""
    f = RELEASE_MEMORY | {"temporal_length": 2 * memory.csm_length, "spatial_length": 2 * memory.dam_length,
                          "temporal_pca_dim": pca_dim}
    return {FIELD_PREFIX + k: v for k, v in f.items()}
