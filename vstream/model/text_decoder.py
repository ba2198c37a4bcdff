"""The parts of a transformers causal LM that the batched decoder runs, found in one place: a LLaMA model's, or a
Qwen2-VL / Qwen2.5-VL model's text model (with M-RoPE positions).

This module only finds modules and checks that a model is one the batched decoder can run; it computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class TextDecoder:
    """The parts of a transformers model that `BatchDecoder` runs: its decoder layers, final norm, token embeddings,
    head and rotary module, and the text model's config."""

    config: object
    layers: list
    norm: nn.Module
    embed: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    mrope: bool
    """The rotary module takes M-RoPE positions [3, B, S] (Qwen); else RoPE positions are cache positions (LLaMA)."""

    @staticmethod
    def of(llm) -> "TextDecoder":
        """A `LlamaForCausalLM`'s parts, or those of a Qwen2-VL / Qwen2.5-VL model's text model (its `lm_head` is the
        outer model's); ValueError for another model, or a Qwen model with sliding-window layers."""
        model_type = getattr(llm.config, "model_type", None)
        if model_type == "llama":
            m = llm.model
            return TextDecoder(llm.config, list(m.layers), m.norm, m.embed_tokens, llm.lm_head, m.rotary_emb, False)
        if model_type in QWEN_TYPES:
            text, cfg = llm.model.language_model, llm.config.get_text_config()
            kinds = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
            if kinds != ["full_attention"]:
                raise ValueError(f"batched decoding runs full attention only, the model's layers are {kinds}")
            return TextDecoder(cfg, list(text.layers), text.norm, text.embed_tokens, llm.lm_head, text.rotary_emb,
                               True)
        raise ValueError(f"batched decoding needs a LLaMA or a Qwen2-VL / Qwen2.5-VL model, got model_type "
                         f"{model_type!r}")


def batchable(llm) -> bool:
    """Whether `BatchDecoder` runs this model (`TextDecoder.of` finds its parts)."""
    try:
        TextDecoder.of(llm)
    except ValueError:
        return False
    return True
