"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints in the exact Hugging Face Hub layout, for tests.

`write_qwen_checkpoint(dir, preset)` writes what a Hub snapshot of Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct holds,
at a tiny preset's shapes: a flat config.json (text settings at the top level, `vision_config` nested,
`rope_scaling` with `mrope_section`), weights under the Hub's names (`model.embed_tokens.weight`, `model.layers.N.*`,
`model.norm.weight`, `visual.*`, `lm_head.weight`) in safetensors shards with their index, generation_config.json,
the tiny Qwen-style tokenizer's files with its chat template, and preprocessor_config.json. It returns the weights by
Hub name, so a test can check every loaded weight against the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vstream.encoder.qwen_preprocess import QWEN_MEAN, QWEN_STD
from vstream.model.qwen.config import qwen_preset
from vstream.model.qwen.tokenizer import build_qwen_tiny_tokenizer

# module name prefix (transformers >= 4.52) -> Hub name prefix; the first match wins
HUB_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head.", "lm_head."))


def hub_name(module_name: str) -> str:
    for ours, hub in HUB_PREFIXES:
        if module_name.startswith(ours):
            return hub + module_name[len(ours):]
    raise KeyError(f"no Hub name for {module_name!r}: expected a prefix in {[p for p, _ in HUB_PREFIXES]}")


def hub_config(preset: str) -> dict:
    """The preset's config.json in the Hub's flat form."""
    cfg = qwen_preset(preset)
    text = dict(cfg.hf["text_config"])
    top = {k: v for k, v in cfg.hf.items() if k != "text_config"}
    vision = dict(top.pop("vision_config"))
    vision["in_chans"] = vision.pop("in_channels", 3)
    return {**top, **text, "model_type": cfg.backbone, "vision_config": vision, "torch_dtype": "float32",
            "use_cache": True}


def write_qwen_checkpoint(directory: str | Path, preset: str = "tiny-qwen2.5-vl", seed: int = 0,
                          shards: int = 2) -> dict[str, torch.Tensor]:
    """Write the checkpoint (see the module docstring) -> {Hub name: tensor} as written."""
    from vstream.model.qwen.loading import build_random_qwen

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tiny_tokenizer(out)
    model = build_random_qwen(qwen_preset(preset), seed=seed, tokenizer=tokenizer)
    weights = {hub_name(k): v.detach().clone().contiguous() for k, v in model.hf.state_dict().items()}
    _write_shards(out, weights, shards)
    (out / "config.json").write_text(json.dumps(hub_config(preset), indent=2) + "\n")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [eos, 0], "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    cfg = qwen_preset(preset)
    processor = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": list(QWEN_MEAN), "image_std": list(QWEN_STD),
                 "image_processor_type": "Qwen2VLImageProcessor",
                 "processor_class": "Qwen2_5_VLProcessor" if cfg.backbone == "qwen2_5_vl" else "Qwen2VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return weights


def _write_shards(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(weights[k].numel() * weights[k].element_size() for k in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
