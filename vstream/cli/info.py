"""`vstream info`: what a model is made of, read from its config alone (no weights are built or read)."""

from __future__ import annotations

import json

import typer

from vstream import __version__
from vstream.cli.options import DEFAULT_MODEL, JsonOpt, ModelOpt


def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False) -> None:
    """Version, memory configuration and maximum memory tokens of a model (reads its config only)."""
    from vstream.model.loading import read_config

    cfg = read_config(model)
    if cfg.memory.mode == "flash":
        _emit(_flash_info(cfg), as_json)
        return
    m = cfg.memory
    _emit(
        {
            "version": __version__,
            "model": cfg.name,
            "memory": {
                "mode": m.mode,
                "spatial": {"length": m.spatial_length, "size": m.spatial_size},
                "temporal": {"length": m.temporal_length, "size": m.temporal_size},
                "abstract": {"length": m.abstract_length, "size": m.abstract_size},
                "retrieved": {"length": m.retrieved_length, "size": m.spatial_size},
                "buffer_length": m.buffer_length,
                "update_ratio": m.update_ratio,
                "attention_dim": m.attention_dim,
                "max_tokens": m.max_tokens,
            },
            "vision": {"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                       "hidden_size": cfg.vision.hidden_size, "select_layer": cfg.vision.select_layer},
            "llm": {"hidden_size": cfg.llm.hidden_size, "layers": cfg.llm.num_hidden_layers},
            "projector": cfg.projector_type,
            "template": cfg.template,
            "sample_fps": cfg.sample_fps,
        },
        as_json,
    )


def _flash_info(cfg) -> dict:
    """A Flash-VStream-Qwen model: Flash Memory sizes, its token budget and one stream's state bytes."""
    m = cfg.memory
    small, full = cfg.unit_patches()
    return {
        "version": __version__,
        "model": cfg.name,
        "backbone": cfg.backbone,
        "memory": {
            "mode": "flash",
            "csm": {"units": m.csm_length, "tokens_per_unit": small // cfg.merge**2},
            "dam": {"units": m.dam_length, "tokens_per_unit": full // cfg.merge**2},
            "kmeans_iters": m.kmeans_iters,
            "max_tokens": cfg.max_tokens,
            "state_bytes": cfg.state_bytes(),
            "state_dtype": cfg.dtype,
        },
        "frames": {"max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels, "square_side": cfg.vision.image_size,
                   "frames_per_unit": cfg.vision_hf.get("temporal_patch_size", 2)},
        "llm": {"hidden_size": cfg.text_hf["hidden_size"], "layers": cfg.text_hf["num_hidden_layers"]},
        "template": cfg.template,
        "sample_fps": cfg.sample_fps,
    }


def _emit(data: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")
