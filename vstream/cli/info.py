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


def _emit(data: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            typer.echo(f"{key}: {value}")
