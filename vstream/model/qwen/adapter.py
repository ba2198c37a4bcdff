"""LoRA adapters in PEFT's directory layout, merged onto a loaded Qwen2-VL / Qwen2.5-VL model: what the authors'
Flash-VStream-Qwen training writes beside its merged model (`lora_model/`: adapter_config.json and
adapter_model.safetensors).

Their adapter (finetune_flash.py: PEFT LoRA, r 64 and lora_alpha 32 in their training script, bias none) holds
factors for every LLM layer's q/k/v/o/gate/up/down projections and for the vision merger's two linears
(`visual.merger.mlp.0`, `.2`), named `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` with the module names
of transformers 4.45 (`model.layers.N.*`, `visual.*`; this transformers nests them as `model.language_model.*` and
`model.visual.*`). Its `base_model_name_or_path` is a path on the authors' machine (`./ckpt/Qwen2-VL-7B-Instruct`), so
the base directory is the caller's: `vstream.load(base, lora=adapter_directory)`.

`merge_adapter` adds scale * B @ A to each named Linear (scale = lora_alpha / r; lora_alpha / sqrt(r) with
use_rslora) and copies any full tensor the file holds (a `modules_to_save` module, a bias) over the parameter it names.
Names, shapes, the rank and the config's target modules are checked; a mismatch is a `ConfigError` naming what was
expected and what was found. DoRA, per-module ranks or alphas, and fan_in_fan_out are refused.

The authors' save keeps only tensors whose names hold `lora_`, so their adapter carries no `lm_head` although its
config lists it in `modules_to_save` (with `wte`, which Qwen2-VL does not have): the trained head is only in their
merged release. Merging such an adapter keeps the base's head and logs a warning naming what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from vstream.errors import ConfigError, MissingPathError

log = logging.getLogger("vstream.load")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MODULE_PREFIXES = (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                   ("model.", "model.language_model."), ("visual.", "model.visual."))
"""Module name prefix in an adapter (transformers <= 4.51, or this one's own) -> this transformers'; first match."""


def is_adapter(path) -> bool:
    """Whether `path` is a LoRA adapter directory (an adapter config and no model config)."""
    p = Path(str(path))
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_only_error(path) -> ConfigError:
    """The error for loading an adapter directory by itself: it names the base the adapter was made on."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return ConfigError(f"{path} is a LoRA adapter ({ADAPTER_CONFIG}, made on base {base!r}), not a model: load its "
                       f"base directory and merge it: vstream.load('/path/to/base', lora={str(path)!r})")


def ours(module: str) -> str:
    """This transformers' name of an adapter's module name."""
    for theirs, mine in MODULE_PREFIXES:
        if module.startswith(theirs):
            return mine + module[len(theirs):]
    return module


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, the tensors of adapter_model.safetensors), with the config's settings checked."""
    from safetensors.torch import load_file

    if not (path / ADAPTER_CONFIG).is_file():
        raise MissingPathError(f"{path} is not a LoRA adapter directory: expected {path / ADAPTER_CONFIG}")
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type must be 'LORA', found {cfg.get('peft_type')!r}")
    for key in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key} must be off or empty, found {cfg[key]!r}")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        problems.append(f"expected an integer r >= 1 and a number lora_alpha, found {cfg.get('r')!r} and "
                        f"{cfg.get('lora_alpha')!r}")
    if problems:
        raise ConfigError(f"{path / ADAPTER_CONFIG}: " + "; ".join(problems))
    if not (path / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in path.iterdir())
        raise MissingPathError(f"{path}: expected the adapter's weights in {ADAPTER_WEIGHTS}, found {found}")
    return cfg, load_file(str(path / ADAPTER_WEIGHTS))


def _targeted(module: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


def split_tensors(cfg: dict, tensors: dict[str, torch.Tensor], source) -> tuple[dict, dict]:
    """({"<module>.lora_A" / ".lora_B": factor}, {parameter: full tensor}) under this transformers' names."""
    lora, full, odd, untargeted, ranks = {}, {}, [], [], []
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        part = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", name)
        if not key.startswith(PEFT_PREFIX) or (part is None and "lora_" in name):
            odd.append(key)
        elif part is None:
            full[ours(name)] = value
        else:
            module, which = part.groups()
            lora[f"{ours(module)}.{which}"] = value
            if not _targeted(module, cfg.get("target_modules")):
                untargeted.append(module)
            if value.shape[0 if which == "lora_A" else 1] != cfg["r"]:
                ranks.append(f"{key} {tuple(value.shape)}")
    if odd:
        raise ConfigError(f"{source}: expected tensors named {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight "
                          f"(or {PEFT_PREFIX}<parameter>), found {sorted(odd)}")
    if untargeted or ranks:
        raise ConfigError(f"{source}: factors outside target_modules: {sorted(set(untargeted))}; factors not of "
                          f"rank r={cfg['r']}: {sorted(ranks)}")
    return lora, full


def merge_adapter(model, path) -> None:
    """Merge the adapter at `path` into `model.hf` in place; see the module docstring."""
    from vstream.model.loading import merge_lora

    path = Path(path)
    cfg, tensors = read_adapter(path)
    lora, full = split_tensors(cfg, tensors, path)
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    params = dict(model.hf.named_parameters())
    wrong = sorted(f"{n} {tuple(v.shape)}" for n, v in full.items() if n not in params or params[n].shape != v.shape)
    if wrong:
        raise ConfigError(f"{path}: full tensors that name no parameter of this model, or not at its shape: {wrong}")
    with torch.no_grad():
        merge_lora(model.hf, lora, scale, source=str(path))
        for name, value in full.items():
            params[name].copy_(value)
    missing = [m for m in cfg.get("modules_to_save") or () if not any(n.startswith(ours(m) + ".") for n in full)]
    if missing:
        log.warning("%s: modules_to_save lists %s but the adapter holds no weights for them; the base's are kept",
                    path, missing)
    log.info("%s: merged %d LoRA pairs (scale %g) and %d full tensors", path, len(lora) // 2, scale, len(full))
