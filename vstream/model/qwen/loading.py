"""Loading Flash-VStream-Qwen models: a Qwen preset (random weights, the tiny tokenizer) or a local Hugging Face
Qwen2-VL / Qwen2.5-VL directory (config.json, safetensors, tokenizer, preprocessor_config.json) with Flash Memory.

A directory's weights are read by transformers' own loader from the memory-mapped safetensors (it maps the Hub's
names, `model.layers.*` / `visual.*`, to its modules'); every weight must be found with its shape and no file tensor
may be left over, else a `ConfigError` lists them. The frame budget comes from the directory's
preprocessor_config.json (`min_pixels` / `max_pixels`) when it has one, else the spec's default (448 x 448).
Nothing is downloaded: the path must exist locally.

The authors' Flash-VStream-Qwen release (`model_type` flash_vstream_qwen2_vl) loads the same way: its config is read
as the Qwen2-VL config it stands for, its memory fields set the Flash Memory sizes, and its frame budget is capped at
the release's (`vstream.model.qwen.release`). `lora=` merges a PEFT LoRA adapter directory, such as the one their
training writes, into the loaded weights (`vstream.model.qwen.adapter`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from vstream.errors import ConfigError, MissingPathError
from vstream.model.qwen.adapter import adapter_only_error, is_adapter, merge_adapter
from vstream.model.qwen.config import BACKBONES, QWEN_PRESETS, QwenModelConfig, VisionShape, qwen_preset
from vstream.model.qwen.release import RELEASE_MAX_PIXELS, is_release, memory_of, plain_config

log = logging.getLogger("vstream.load")


def is_qwen(path_or_preset) -> bool:
    """Whether `load` should build a Qwen model: a Qwen preset name, a directory whose config.json has a Qwen2-VL /
    Qwen2.5-VL `model_type` or is the Flash-VStream-Qwen release's, or a LoRA adapter directory (which `load` refuses
    with a message naming its base)."""
    name = str(path_or_preset)
    if name in QWEN_PRESETS or is_adapter(name):
        return True
    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") in BACKBONES or is_release(raw)


def read_qwen_config(path_or_preset) -> QwenModelConfig:
    """The config of a Qwen preset or directory (config files only)."""
    name = str(path_or_preset)
    if name in QWEN_PRESETS:
        return qwen_preset(name)
    path = Path(name)
    if is_adapter(path):
        raise adapter_only_error(path)
    raw = json.loads((path / "config.json").read_text())
    release = is_release(raw)
    if release:
        raw, fields = plain_config(raw)
        memory, pca_dim = memory_of(fields, str(path / "config.json"))
    cfg = QwenModelConfig(name=path.name, backbone=raw["model_type"], hf=_nested(raw), dtype="bfloat16")
    if release:
        cfg.memory, cfg.pca_dim = memory, pca_dim
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        size = p.get("size") or {}
        cfg.min_pixels = int(p.get("min_pixels") or size.get("shortest_edge") or cfg.min_pixels)
        cfg.max_pixels = int(p.get("max_pixels") or size.get("longest_edge") or cfg.max_pixels)
    if release:
        cfg.max_pixels = min(cfg.max_pixels, RELEASE_MAX_PIXELS)
    factor = cfg.patch * cfg.merge
    cfg.vision = VisionShape(image_size=max(factor, math.isqrt(cfg.max_pixels) // factor * factor))
    return cfg


def _nested(raw: dict) -> dict:
    """A Hub config.json (text settings at the top level) as {..., text_config, vision_config}; a nested one as is."""
    if "text_config" in raw:
        return raw
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
           "vision_start_token_id", "vision_end_token_id", "vision_token_id")
    top = {k: raw[k] for k in ("model_type", "architectures", "vision_config", "tie_word_embeddings", *ids) if k in raw}
    text = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "vision_config")}
    return top | {"text_config": text}


def _classes(backbone: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    return {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
            "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[backbone]


def hf_config(cfg: QwenModelConfig):
    """The transformers config object of `cfg.hf` (SDPA attention)."""
    config_cls, _ = _classes(cfg.backbone)
    config = config_cls.from_dict(cfg.hf)
    config._attn_implementation = "sdpa"
    return config


def build_random_qwen(cfg: QwenModelConfig, seed: int = 0, device="cpu", dtype=torch.float32, tokenizer=None):
    """A model of `cfg`'s shapes with random weights (transformers' own initialisation under a seeded generator),
    built directly on `device` in `dtype`, and the tiny tokenizer."""
    from vstream.model.qwen.model import FlashVStreamQwen
    from vstream.model.qwen.tokenizer import build_qwen_tiny_tokenizer

    _, model_cls = _classes(cfg.backbone)
    tokenizer = tokenizer if tokenizer is not None else build_qwen_tiny_tokenizer()
    vocab = hf_config(cfg).get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocabulary is {vocab}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            hf = model_cls._from_config(hf_config(cfg), dtype=dtype)
        finally:
            torch.set_default_dtype(default)
    return FlashVStreamQwen(cfg, hf.eval(), tokenizer)


def load_qwen_directory(path: str | Path, device="cpu", dtype=torch.float32):
    """A Hugging Face Qwen2-VL / Qwen2.5-VL directory with Flash Memory; see the module docstring."""
    from transformers import AutoTokenizer

    from vstream.model.qwen.model import FlashVStreamQwen

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingPathError(f"{path} is not a Hugging Face model directory: expected {path / 'config.json'}")
    cfg = read_qwen_config(path)
    _, model_cls = _classes(cfg.backbone)
    hf, info = model_cls.from_pretrained(path, config=hf_config(cfg), dtype=dtype, device_map=str(device),
                                         local_files_only=True, output_loading_info=True, use_safetensors=True)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()) or info.get("error_msgs"):
        raise ConfigError(f"the weights of {path} do not fit its {cfg.backbone} config: {problems} "
                          f"{info.get('error_msgs') or ''}".strip())
    # the config as read here: transformers would otherwise read config.json again, and the release's is not its own
    tokenizer = AutoTokenizer.from_pretrained(path, config=hf_config(cfg), local_files_only=True)
    return FlashVStreamQwen(cfg, hf.eval(), tokenizer)


def load_qwen(path_or_preset, device: torch.device, dtype: torch.dtype | None, seed: int = 0, lora=None):
    """`vstream.load` for Qwen presets and directories: float32 on the CPU unless `dtype` says otherwise; `lora`: a
    LoRA adapter directory merged into the weights."""
    cfg = read_qwen_config(path_or_preset)
    target = dtype or (getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32)
    if str(path_or_preset) in QWEN_PRESETS:
        model = build_random_qwen(cfg, seed=seed, device=device, dtype=target)
    else:
        model = load_qwen_directory(path_or_preset, device=device, dtype=target)
    if lora is not None:
        merge_adapter(model, lora)
    model.cfg.dtype = str(target).removeprefix("torch.")
    log.info("%s: %s, %s on %s", model.cfg.name, model.cfg.backbone, model.cfg.dtype, device)
    return model.eval()
