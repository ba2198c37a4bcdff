"""Tiny random checkpoints in the layout of the authors' Flash-VStream-Qwen release, and LoRA adapters as their training
writes them, for tests (what the release holds: `vstream.model.qwen.release`; their adapter: `.adapter`).

`write_release_checkpoint(dir, preset)` writes a tiny Qwen2-VL preset's random weights under the Hub names in
safetensors shards with their index (bfloat16 unless told otherwise), config.json as transformers 4.45 saves the
authors' config class (flat; `model_type` flash_vstream_qwen2_vl; `architectures` FlashVStreamQwen2VLModel; M-RoPE as
`type` default with `mrope_section`; a `vision_config` holding only what differs from the 7B defaults, the Hub's
extra keys and `flash_memory_config`), generation_config.json, the tiny tokenizer's files with the chat template also
in tokenizer_config.json and chat_template.json, and preprocessor_config.json naming the authors' processor classes.
It returns the weights by Hub name as stored.

`write_release_adapter(dir, preset)` writes adapter_config.json and adapter_model.safetensors as PEFT saves the
authors' LoRA: factors for every LLM projection and the merger's two linears under `base_model.model.` names, the
config's full target list, and `modules_to_save` listed without its tensors. It returns the factors by (Hub) module
name, `<module>.lora_A` / `.lora_B`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from vstream.encoder.qwen_preprocess import QWEN_MEAN, QWEN_STD
from vstream.model.qwen.config import QWEN2_VL_7B_VISION, qwen_preset
from vstream.model.qwen.release import RELEASE_ARCHITECTURE, RELEASE_MODEL_TYPE, release_fields
from vstream.model.qwen.tokenizer import build_qwen_tiny_tokenizer
from vstream.testing.qwen_checkpoint import _write_shards, hub_config, hub_name

BASE = "./ckpt/Qwen2-VL-7B-Instruct"  # where the authors' scripts keep the base model
PROJECTIONS = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj")
MERGER = ("model.visual.merger.mlp.0", "model.visual.merger.mlp.2")


def release_config(preset: str = "tiny-qwen2-vl", memory_fields: dict | None = None) -> dict:
    """config.json of a release at the preset's shapes; `memory_fields` replaces its `flash_memory_config`."""
    cfg = qwen_preset(preset)
    if cfg.backbone != "qwen2_vl":
        raise ValueError(f"the release is Qwen2-VL; {preset!r} is {cfg.backbone}")
    flat = hub_config(preset)
    vision = {k: v for k, v in flat.pop("vision_config").items() if QWEN2_VL_7B_VISION.get(k) != v}
    vision |= {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14,
               "flash_memory_config": release_fields(cfg.memory, cfg.pca_dim) if memory_fields is None
               else memory_fields}
    mrope = flat["rope_scaling"]["mrope_section"]
    flat.pop("pad_token_id", None)
    return {"_name_or_path": BASE, **flat, "architectures": [RELEASE_ARCHITECTURE], "model_type": RELEASE_MODEL_TYPE,
            "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "max_window_layers": flat["num_hidden_layers"], "sliding_window": 32768, "use_sliding_window": False,
            "rope_scaling": {"mrope_section": mrope, "rope_type": "default", "type": "default"},
            "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "vision_config": vision}


def write_release_checkpoint(directory: str | Path, preset: str = "tiny-qwen2-vl", seed: int = 0, shards: int = 2,
                             dtype: torch.dtype = torch.bfloat16,
                             memory_fields: dict | None = None) -> dict[str, torch.Tensor]:
    """Write the checkpoint (see the module docstring) -> {Hub name: tensor} as written."""
    from vstream.model.qwen.loading import build_random_qwen

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tiny_tokenizer(out)
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").unlink()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text()) | {"chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=4))
    model = build_random_qwen(qwen_preset(preset), seed=seed, tokenizer=tokenizer)
    weights = {hub_name(k): v.detach().to(dtype).contiguous() for k, v in model.hf.state_dict().items()}
    _write_shards(out, weights, shards)
    (out / "config.json").write_text(json.dumps(release_config(preset, memory_fields), indent=2, sort_keys=True))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [eos, 0], "pad_token_id": 0, "transformers_version": "4.45.0"}, indent=2))
    cfg = qwen_preset(preset)
    processor = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": list(QWEN_MEAN), "image_std": list(QWEN_STD),
                 "image_processor_type": "FlashVStreamQwen2VLImageProcessor", "max_pixels": cfg.max_pixels,
                 "merge_size": 2, "min_pixels": cfg.min_pixels, "patch_size": 14,
                 "processor_class": "FlashVStreamQwen2VLProcessor", "resample": 3,
                 "rescale_factor": 1 / 255, "size": {"max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels},
                 "temporal_patch_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True))
    return weights


def adapter_config(targets: list[str], rank: int, alpha: float) -> dict:
    """adapter_config.json as PEFT writes the authors' LoRA config."""
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": BASE, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
            "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
            "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": ["wte", "lm_head"], "peft_type": "LORA", "r": rank, "rank_pattern": {},
            "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": False}


def write_release_adapter(directory: str | Path, preset: str = "tiny-qwen2-vl", seed: int = 1, rank: int = 4,
                          alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """Write the adapter (see the module docstring) -> {"<Hub module name>.lora_A" / ".lora_B": factor}."""
    from vstream.model.qwen.loading import build_random_qwen

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = build_random_qwen(qwen_preset(preset), seed=0)
    linears = {hub_name(n): m.weight.shape for n, m in model.hf.named_modules()
               if isinstance(m, torch.nn.Linear) and (PROJECTIONS.fullmatch(n) or n in MERGER)}
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (rows, cols) in sorted(linears.items()):
        factors[f"{name}.lora_A"] = torch.randn(rank, cols, generator=gen) / cols**0.5
        factors[f"{name}.lora_B"] = torch.randn(rows, rank, generator=gen) * 0.05
    tensors = {f"base_model.model.{k}.weight": v for k, v in factors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(sorted(linears), rank, alpha), indent=2))
    return factors
