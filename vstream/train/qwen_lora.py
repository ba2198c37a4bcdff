"""LoRA on a Flash-VStream-Qwen model's LLM, the paper's recipe: the vision tower and the merger frozen, LoRA deltas on
the LLM's attention projections, each example's memory built by the same streaming code that answers (a
`StreamProcessor` over the example's frames, Flash Memory included), the question asked at the example's end and the
loss taken on the answer's tokens (with its closing <|im_end|>), at the positions inference gives them.

    add_lora(model, rank=8)
    losses = train_lora(model, [QwenExample(frames, times, "What moved?", "The red ball.")], steps=20)
    factors = lora_factors(model)   # {"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}, for merge_lora

What this module does not do: read data files, shard across processes, save checkpoints (the factors are the caller's
to save; `vstream.model.loading.merge_lora` adds them to a loaded LLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vstream.model.processor import StreamProcessor
from vstream.memory.flash import FlashRead

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class QwenExample:
    """One training conversation: the frames up to the question (RGB uint8, one size) with their stream times."""

    frames: list[np.ndarray]
    times: list[float]
    question: str
    answer: str


def add_lora(model, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = TARGETS) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters (B = 0 at start, so the model is unchanged) into the LLM's `targets` and freeze every
    other weight -> the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    text = model.hf.model.language_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)), text)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"no LoRA adapter was injected: the LLM has no module named one of {targets}")
    model.lora_scale = alpha / rank
    return trainable


@torch.no_grad()
def example_memory(model, example: QwenExample) -> FlashRead:
    """The memory the question sees: the example's frames through the streaming processor."""
    processor = StreamProcessor(model)
    processor.insert(example.times, frames=example.frames)
    return processor.snapshot().memory


def answer_loss(model, memory: FlashRead, question: str, answer: str) -> torch.Tensor:
    """Mean next-token cross-entropy of `answer` + <|im_end|> after the question's prompt."""
    ids = model.tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    target = torch.tensor(ids, device=model.device)
    embeds, pos = model.prompt(memory, question)
    n, p = target.shape[0], embeds.shape[1]
    embeds = torch.cat([embeds, model.hf.get_input_embeddings()(target)[None]], dim=1)
    pos = torch.cat([pos, pos[:, :, -1:] + 1 + torch.arange(n, device=pos.device, dtype=pos.dtype)], dim=2)
    hidden = model.hf.model.language_model(inputs_embeds=embeds, position_ids=pos).last_hidden_state
    logits = model.hf.lm_head(hidden[0, p - 1 : p - 1 + n])  # the position before each answer token predicts it
    return F.cross_entropy(logits.float(), target)


def train_lora(model, examples: list[QwenExample], steps: int, lr: float = 1e-3) -> list[float]:
    """`steps` AdamW steps over the examples in turn (one example a step) -> the loss of each step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: call add_lora first")
    memories = [example_memory(model, ex) for ex in examples]  # the tower is frozen: built once
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        i = step % len(examples)
        loss = answer_loss(model, memories[i], examples[i].question, examples[i].answer)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def lora_factors(model) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}, module names relative to the LLM's text model."""
    out = {}
    for name, module in model.hf.model.language_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name + ".lora_A"] = module.lora_A["default"].weight.detach().clone()
            out[name + ".lora_B"] = module.lora_B["default"].weight.detach().clone()
    return out
