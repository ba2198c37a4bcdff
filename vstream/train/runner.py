"""`vstream train`: build the model and data of a `TrainConfig`, freeze by stage, run the Hugging Face Trainer.

Checkpoints (`output_dir/checkpoint-N/`) hold only the trained tensors (`trainable.safetensors`) plus the Trainer's
optimizer, scheduler and RNG states, so a checkpoint of a model around a frozen 7B LLM stays small and `resume: true`
continues exactly where the newest one stopped. At the end the model is written as a vstream directory
(`output_dir/model/`) that `vstream ask --model` and the next stage's `init` read. Distributed runs (torchrun or
accelerate; NCCL on GPUs, gloo on CPUs; DeepSpeed ZeRO through `deepspeed:`) are the Trainer's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import time

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from vstream.errors import ConfigError, MissingPathError
from vstream.model.loading import OWN_WEIGHTS, load, load_own_weights, save_pretrained
from vstream.train.config import TrainConfig
from vstream.train.data import LlavaDataset, SnapshotBuilder, collate
from vstream.train.modules import MemoryQAModule, TowerPretrainModule

TRAINABLE = "trainable.safetensors"


def build(cfg: TrainConfig):
    """(module to train, model, dataset, collate_fn) for the config."""
    model = load(cfg.model, dtype=torch.float32, seed=cfg.seed)
    model.train()
    init_lora = (apply_init(model, Path(cfg.init), merge=not (cfg.stage == "finetune" and cfg.lora.rank > 0))
                 if cfg.init else None)
    model.requires_grad_(False)
    if cfg.stage == "vision":
        from vstream.train.world_data import FRAME_CLASSES, PATCH_CLASSES, WorldFrameDataset

        model.vision.requires_grad_(True)
        module = TowerPretrainModule(model.vision, PATCH_CLASSES, FRAME_CLASSES)
        dataset = WorldFrameDataset(cfg.data, model.cfg,
                                    samples=cfg.max_steps * cfg.batch_size * cfg.grad_accum * _world_size())
        return module, model, dataset, None
    template = cfg.prompt_template or model.cfg.template
    tower = _frozen_copy(model.vision)
    builder = SnapshotBuilder(model.cfg, tower)
    if cfg.data.kind == "world":
        from vstream.train.world_data import WorldQADataset

        dataset = WorldQADataset(cfg.data, model.cfg, builder, template, model.tokenizer)
    else:
        dataset = LlavaDataset(cfg.data, builder, template, model.tokenizer)
    model.mm_projector.requires_grad_(True)
    for name in ("q_proj", "k_proj"):  # the only attention weights either update rule uses
        getattr(model.attention_model, name).requires_grad_(True)
    if cfg.stage == "finetune":
        if cfg.lora.rank > 0:
            from peft import LoraConfig, get_peft_model

            peft_cfg = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                  target_modules=list(cfg.lora.targets), bias="none")
            model.llm = get_peft_model(model.llm, peft_cfg)
            if init_lora:  # continue the init model's adapters (same rank and targets) rather than stacking new ones
                load_lora_factors(model.llm, init_lora, cfg.lora.rank, source=cfg.init)
        else:
            model.llm.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.enable_input_require_grads()
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    return MemoryQAModule(model), model, dataset, _Collate(pad)


class _Collate:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate(items, self.pad_id)


def _frozen_copy(tower):
    import copy

    tower = copy.deepcopy(tower).float().eval()
    tower.requires_grad_(False)
    return tower


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def apply_init(model, path: Path, merge: bool = True) -> dict[str, torch.Tensor]:
    """Load the non-LLM weights of a vstream directory (a previous stage's `model/`) into `model`. Its LoRA factors
    are merged into the LLM (`merge`), or returned for adapters of the same shape to continue from."""
    if not (path / OWN_WEIGHTS).is_file():
        raise MissingPathError(f"init {str(path)!r} holds no {OWN_WEIGHTS} (expected a vstream model directory)")
    return load_own_weights(model, path, merge=merge)


def load_lora_factors(peft_model, lora: dict[str, torch.Tensor], rank: int, source) -> None:
    """Copy saved factors ({"<module>.lora_A"/"lora_B": tensor}) into the peft adapters; every adapter must get one."""
    modules = dict(peft_model.base_model.model.named_modules())
    targets = {n for n, m in modules.items() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    saved = {k.rsplit(".", 1)[0] for k in lora}
    if saved != targets:
        raise ConfigError(f"init {source}: its LoRA modules {sorted(saved - targets)[:3]}... do not match the "
                          f"adapters {sorted(targets - saved)[:3]}... (same rank and targets are needed to continue "
                          "them)")
    with torch.no_grad():
        for name in targets:
            a, b = lora[name + ".lora_A"], lora[name + ".lora_B"]
            if a.shape[0] != rank:
                raise ConfigError(f"init {source}: LoRA rank {a.shape[0]} differs from lora.rank {rank}")
            modules[name].lora_A["default"].weight.copy_(a)
            modules[name].lora_B["default"].weight.copy_(b)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def run(cfg: TrainConfig) -> Path:
    """Train; returns the directory of the final model (the tower alone is saved for the vision stage, in a full
    model directory whose other weights are those of the starting model)."""
    module, model, dataset, collate_fn = build(cfg)
    out = Path(cfg.output_dir)
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup_ratio * cfg.max_steps), lr_scheduler_type=cfg.scheduler,
        bf16=cfg.bf16 and not use_cpu,
        dataloader_num_workers=cfg.workers, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, seed=cfg.seed, deepspeed=cfg.deepspeed, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and _world_size() > 1 else None, report_to="none", remove_unused_columns=False,
        dataloader_persistent_workers=cfg.workers > 0, ignore_data_skip=not cfg.skip_seen_data,
        ddp_find_unused_parameters=False,
    )
    trainer = VStreamTrainer(model=module, args=args, train_dataset=dataset, data_collator=collate_fn)
    if cfg.time_limit_s > 0:
        trainer.add_callback(_TimeLimit(cfg.time_limit_s))
    resume = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise MissingPathError(f"resume: true, but {out} holds no checkpoint-N folder to continue from")
    trainer.train(resume_from_checkpoint=resume)
    final = out / "model"
    if trainer.is_world_process_zero():
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        export(model, final, cfg)
    if torch.distributed.is_initialized():  # every process waits for the export, then all leave the group together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def export(model, directory: Path, cfg: TrainConfig) -> Path:
    """Write the trained model as a vstream directory. LoRA deltas over a LLM that is not stored with the model
    (`llm_weights`) are kept as factors; otherwise they are merged into the stored LLM."""
    lora = None
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):  # a peft model
        if model.cfg.llm_weights:
            lora = lora_factors(llm)
            model.cfg.lora_rank, model.cfg.lora_alpha = cfg.lora.rank, cfg.lora.alpha
            model.llm = llm.get_base_model()
        else:
            model.llm = llm.merge_and_unload()
    try:
        model.eval()
        return save_pretrained(model, directory, lora=lora)
    finally:
        model.llm = llm


def lora_factors(peft_model) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]} with module names relative to the base LLM."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            # fp16 halves what ships with the model; the deltas are merged in float32 at load time
            out[name + ".lora_A"] = module.lora_A["default"].weight.detach().half().cpu()
            out[name + ".lora_B"] = module.lora_B["default"].weight.detach().half().cpu()
    return out


class _TimeLimit(TrainerCallback):
    """End training after `seconds` of steps (the Trainer then saves as at its last step)."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


class VStreamTrainer(Trainer):
    """Checkpoints hold the trained tensors only; resuming loads them back (strictly)."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(self.model), str(output_dir / TRAINABLE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        module = model or self.model
        file = Path(resume_from_checkpoint) / TRAINABLE
        if not file.is_file():
            raise MissingPathError(f"checkpoint {resume_from_checkpoint} holds no {TRAINABLE}")
        state = load_file(str(file))
        expected = {n for n, p in module.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise ConfigError(
                f"checkpoint {resume_from_checkpoint} does not match the trained parameters: missing "
                f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
            )
        module.load_state_dict(state, strict=False)
