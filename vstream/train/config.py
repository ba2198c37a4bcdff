"""Training configuration: one YAML file per run (see `configs/`), read into these dataclasses.

Stages (the paper's recipe, plus a stage for towers trained from scratch):
- `vision`: the vision tower alone, supervised per patch by a procedural world's label maps (only for the world's small
  towers; a CLIP tower is used as released).
- `projector` (paper stage 1): the projector and the abstract-memory attention; LLM and tower frozen; `plain` template.
- `finetune` (paper stage 2): everything but the vision tower (the LLM in full, or LoRA deltas when `lora.rank > 0`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vstream.errors import ConfigError, MissingPathError

STAGES = ("vision", "projector", "finetune")


@dataclass
class DataConfig:
    kind: str = "world"
    """`world`: streams of the procedural world made on the fly; `llava`: a LLaVA-format JSON list."""
    task: str = "qa"
    """World only: `qa` (its question/answer pairs) or `captions` (what is on screen, for the `projector` stage)."""
    split: str = "train"
    """World only: which seed range (train / val / test)."""
    start: int = 0
    """World only: first seed index in the split."""
    streams: int = 1000
    """World only: number of streams (one dataset item per stream)."""
    frame_size: int = 128
    """World only: rendered frame side in pixels (the tower's preprocessing resizes it)."""
    augment: bool = True
    """World only: codec-like chroma subsampling and pixel noise on rendered frames."""
    inventory: int = 0
    """World `qa` only: extra training conversations per stream asking which objects have appeared so far, in order
    (a dense target for reading the temporal memory; never part of the evaluation)."""
    watches: int = 0
    """World `qa` only: extra watch conversations per stream, each at its own time: `watch_questions` yes/no
    questions asked as a watch asks them over that one memory, answered from the world's ground truth
    (`vstream.train.watch_data`)."""
    watch_questions: int = 12
    """Questions of one watch conversation (one of them "the background changes"; at least 2)."""
    watch_near: float = 0.6
    """How often a watch conversation's time sits next to an event of the stream (`watch_data.sample_time`)."""
    watch_kind_weights: dict[str, float] = field(default_factory=dict)
    """Weights of the event kinds ("appear", "disappear", "recolour", "scene") when a time is drawn next to an event;
    a kind not named weighs 1 (empty: every kind of the stream equally)."""
    watch_false_per_true: float = 0.0
    """> 0: at most this many false conditions per true one of each object type, and no filling of free places
    (`watch_data.watch_questions`); 0: half true where there are enough, free places filled with false ones."""
    watch_qa: int = 0
    """The world's own questions asked at each watch conversation's time, packed with its questions over the same
    memory (a few tokens each, where a conversation of its own costs a whole memory)."""
    max_questions: int = 12
    """Most conversations taken from one stream pass (one memory snapshot each)."""
    json: str = ""
    """LLaVA only: the JSON list of records."""
    root: str = ""
    """LLaVA only: folder that `video` / `image` paths are relative to."""
    features: str = ""
    """LLaVA only: folder of pre-extracted features (`{"feature": [T, tokens, D]}` at 1 fps, video extension ->
    .safetensors)."""


@dataclass
class LoraConfig:
    rank: int = 0
    """0 = no LoRA (the `finetune` stage then trains the LLM in full)."""
    alpha: float = 16.0
    """LoRA scale numerator: the deltas are multiplied by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input while training."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj"])
    """Names of the LLM's Linear modules that get LoRA deltas."""


@dataclass
class TrainConfig:
    stage: str
    """vision | projector | finetune."""
    model: str
    """Preset name or vstream model directory to start from."""
    output_dir: str
    """Checkpoints (`checkpoint-N/`), logs, and the final model (`model/`)."""
    init: str = ""
    """A vstream model directory whose non-LLM weights (and LoRA) replace the starting model's (e.g. the last stage)."""
    data: DataConfig = field(default_factory=DataConfig)
    """What to train on (see `DataConfig`)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA deltas on the LLM in the `finetune` stage (see `LoraConfig`; rank 0 = none)."""
    template: str | None = None
    """Conversation template; default: `plain` for the projector stage, the model's own otherwise."""
    max_steps: int = 100
    """Optimizer steps to run (the world datasets are sized from it)."""
    batch_size: int = 4
    """Dataset items per device and step (a world item is one stream with several conversations)."""
    grad_accum: int = 1
    """Steps whose gradients add up before each optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of `max_steps` spent warming the learning rate up from 0."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up (a transformers `lr_scheduler_type`: cosine, linear, constant, ...)."""
    bf16: bool = False
    """bfloat16 mixed precision (ignored on the CPU)."""
    gradient_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass: less memory, more time."""
    workers: int = 0
    """DataLoader worker processes (each builds memories on the CPU with the frozen tower)."""
    save_steps: int = 100
    """Save a `checkpoint-N` every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many `checkpoint-N` folders (the oldest go)."""
    logging_steps: int = 10
    """Log the loss and learning rate every this many steps."""
    seed: int = 0
    """Seed of the starting model's random weights (a preset) and of the trainer (data order, dropout)."""
    deepspeed: str | None = None
    """Path of a DeepSpeed JSON config (ZeRO stage 0-3), or None."""
    device: str = "auto"
    """auto | cpu | cuda."""
    resume: bool = False
    """Continue from the newest `checkpoint-N` in output_dir."""
    skip_seen_data: bool = True
    """On resume, skip the batches the checkpoint has already seen (False: start the data afresh, e.g. with a new
    `data.start`, instead of re-making skipped items)."""
    time_limit_s: float = 0.0
    """Stop (then save and export as at the last step) once training has run this long; 0 = no limit."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.data.kind not in ("world", "llava"):
            raise ConfigError(f"data.kind must be 'world' or 'llava', got {self.data.kind!r}")
        if self.data.kind == "llava" and not self.data.json:
            raise ConfigError("data.kind 'llava' needs data.json (the LLaVA JSON list)")
        if self.data.watches < 0 or (self.data.watches and self.data.watch_questions < 2):
            raise ConfigError(f"data.watches must be >= 0 and data.watch_questions >= 2, got {self.data.watches} and "
                              f"{self.data.watch_questions}")
        if not 0 <= self.data.watch_near <= 1 or self.data.watch_false_per_true < 0:
            raise ConfigError(f"data.watch_near must lie in [0, 1] and data.watch_false_per_true be >= 0, got "
                              f"{self.data.watch_near} and {self.data.watch_false_per_true}")
        kinds = {"appear", "disappear", "recolour", "scene"}
        if set(self.data.watch_kind_weights) - kinds or any(v < 0 for v in self.data.watch_kind_weights.values()):
            raise ConfigError(f"data.watch_kind_weights must map event kinds of {sorted(kinds)} to weights >= 0, got "
                              f"{self.data.watch_kind_weights}")
        if self.stage == "vision" and self.data.kind != "world":
            raise ConfigError("the vision stage learns from the world's label maps: data.kind must be 'world'")

    @property
    def prompt_template(self) -> str | None:
        return self.template or ("plain" if self.stage == "projector" else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a YAML training config; `overrides` (top-level keys) win over the file. Unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"training config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of training settings, got {type(raw).__name__}")
    raw |= {k: v for k, v in overrides.items() if v is not None}
    return from_dict(raw, source=str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What the YAML parser found and where (line and column from 1), in one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def from_dict(raw: dict, source: str = "the config") -> TrainConfig:
    sections = {"data": DataConfig, "lora": LoraConfig}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown training settings {unknown}; known: {sorted(known)}")
    kwargs = dict(raw)
    for key, cls in sections.items():
        if key in kwargs:
            sub_known = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(kwargs[key]) - sub_known)
            if bad:
                raise ConfigError(f"{source}: unknown keys {bad} in {key!r}; known: {sorted(sub_known)}")
            kwargs[key] = cls(**kwargs[key])
    missing = [k for k in ("stage", "model", "output_dir") if k not in kwargs]
    if missing:
        raise ConfigError(f"{source}: missing required settings {missing}")
    return TrainConfig(**kwargs)
