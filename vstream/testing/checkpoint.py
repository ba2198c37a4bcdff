"""Write a tiny random checkpoint in the exact released `IVGSZ/Flash-VStream-7b` layout, for tests and examples.

Same file names (sharded safetensors with an index, or `.bin`), same `config.json` keys (`model_type: "vstream"`, the
`mm_*`, `compress_*` and `video_*` keys), same weight names (`model.layers.*`, `model.mm_projector.*`,
`model.attention_model.*`, `model.vision_tower.vision_tower.vision_model.*` for a full-depth CLIP tower, the legacy
`rotary_emb.inv_freq` and `position_ids` buffers), stored in bfloat16, and a Vicuna-style SentencePiece tokenizer.
Only the sizes are tiny (the `tiny` preset's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from vstream.config import ModelConfig, preset
from vstream.encoder.tower import clip_config
from vstream.memory import AbstractAttention
from vstream.model.loading import OFFICIAL_VISION_PREFIX as VISION_PREFIX
from vstream.model.tokenizers import build_vicuna_style_tokenizer
from vstream.model.vlm import build_projector


def released_config(cfg: ModelConfig, vision_tower: str, vocab_size: int) -> dict:
    """config.json as the released checkpoint writes it, with `cfg`'s sizes."""
    m, lm = cfg.memory, cfg.llm
    return {
        "_name_or_path": "./checkpoints-finetune/vstream-tiny", "architectures": ["VStreamLlamaForCausalLM"],
        "model_type": "vstream", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
        "initializer_range": 0.02, "max_position_embeddings": lm.max_position_embeddings,
        "num_attention_heads": lm.num_attention_heads, "num_hidden_layers": lm.num_hidden_layers,
        "num_key_value_heads": lm.num_key_value_heads, "pretraining_tp": 1, "rms_norm_eps": lm.rms_norm_eps,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.31.0",
        "use_cache": True, "vocab_size": vocab_size,
        "compress_Turing_memory_size": m.abstract_size, "compress_Turing_update_ratio": m.update_ratio,
        "compress_long_memory_size": m.temporal_size, "compress_size": m.spatial_size, "compress_type": "mean",
        "freeze_mm_mlp_adapter": False, "freeze_mm_vision_resampler": False, "image_aspect_ratio": "pad",
        "mm_hidden_size": cfg.vision.hidden_size, "mm_projector_lr": None, "mm_projector_type": cfg.projector_type,
        "mm_resampler_type": None, "mm_use_4_vision_tokens": False, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": cfg.vision.select_layer, "mm_vision_tower": vision_tower,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False, "use_mm_proj": True, "video_max_frames": 26,
        "video_long_memory_length": m.temporal_length, "video_Turing_memory_length": m.abstract_length,
        "video_short_memory_length": 10, "video_current_memory_length": m.spatial_length,
        "video_sample_type": "weighted_kmeans",
    }


def released_weights(cfg: ModelConfig, vocab_size: int,
                     seed: int = 0) -> tuple[dict[str, torch.Tensor], CLIPVisionModel]:
    """Random weights under the released names (float32; the writer stores bfloat16), and the full CLIP tower."""
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(**(cfg.llm.to_hf() | {"vocab_size": vocab_size})))
    clip = CLIPVisionModel(clip_config(cfg.vision))
    projector = build_projector(cfg.projector_type, cfg.vision.hidden_size, cfg.llm.hidden_size)
    attention = AbstractAttention(cfg.vision.hidden_size, cfg.memory.attention_dim)
    out = dict(llm.state_dict())
    out.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    out.update({f"model.attention_model.{k}": v for k, v in attention.state_dict().items()})
    # transformers 5 names CLIP vision weights without the `vision_model.` level the released names have
    out.update({f"{VISION_PREFIX}{k.removeprefix('vision_model.')}": v for k, v in clip.state_dict().items()})
    # buffers that transformers 4.31 saved and later versions compute instead
    out[f"{VISION_PREFIX}embeddings.position_ids"] = torch.arange(cfg.vision.grid**2 + 1)[None]
    head_dim = cfg.llm.hidden_size // cfg.llm.num_attention_heads
    for i in range(cfg.llm.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (
            1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    return out, clip


def write_released_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    vision: str = "inside",
    fmt: str = "safetensors",
    shards: int = 2,
    drop: tuple[str, ...] = (),
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint to `path` and return it.

    vision: `inside` (CLIP weights in the checkpoint; `mm_vision_tower` names a local CLIP dir written beside it),
    `directory` (CLIP weights only in that local dir). `drop` removes weights by name and `extra` adds some, to test
    the loader's errors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = preset("tiny")
    tokenizer = build_vicuna_style_tokenizer(out_dir=path)
    vocab = cfg.llm.vocab_size
    weights, clip = released_weights(cfg, vocab, seed)
    clip_dir = path.parent / f"{path.name}-clip"
    clip.save_pretrained(clip_dir)
    if vision == "directory":
        weights = {k: v for k, v in weights.items() if not k.startswith("model.vision_tower.")}
    elif vision != "inside":
        raise ValueError(f"vision must be 'inside' or 'directory', got {vision!r}")
    for key in drop:
        if key not in weights:
            raise KeyError(f"cannot drop {key!r}: not a released weight name")
        del weights[key]
    weights.update(extra or {})
    weights = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    (path / "config.json").write_text(json.dumps(released_config(cfg, str(clip_dir.resolve()), vocab), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    _write_shards(path, weights, fmt, shards)
    assert len(tokenizer) <= vocab
    return path


def _write_shards(path: Path, weights: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    names = sorted(weights)
    ext, stem = {"safetensors": ("safetensors", "model"), "bin": ("bin", "pytorch_model")}[fmt]
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        part = {k: weights[k] for k in group}
        (save_file(part, str(path / file), metadata={"format": "pt"}) if fmt == "safetensors"
         else torch.save(part, path / file))
        weight_map.update({k: file for k in group})
    if shards > 1:
        total = sum(v.numel() * v.element_size() for v in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
