"""How a Flash-VStream-Qwen model's questions go into the slots of the engine's batched answers (`BatchAnswerer`).

A slot gets a question's whole prompt, [system, user turn, <|vision_start|>, memory, <|vision_end|>, question,
assistant turn], with no prefix shared between slots (the system prompt is a few tokens; the memory differs per
snapshot). Two ways in, the same two the model's own `stream_answer` takes, so that a batched answer gets the tokens
of the eager one:

- the snapshot's memory prefix is cached and idle (`FlashVStreamQwen.enable_prefix_cache`, refreshed by the engine
  after each round): its keys and values are copied into the slot, and only the question's tokens are prefilled, at
  the positions `MemoryPrefix` gives them;
- else the whole prompt is prefilled, in chunks, at the M-RoPE positions `FlashVStreamQwen.prompt` gives it (the
  memory's visual tokens at their AM-RoPE times, text after them from their largest position + 1).

Either way the prompt ends with text, so the slot decodes at one position per token (see `vstream.model.batch_decode`).

What this module does not do: run the model, schedule requests (`vstream.model.batch_answer`), or refresh prefixes.
"""

from __future__ import annotations

import torch

from vstream.memory.flash import FlashRead
from vstream.model.batch_answer import SlotPrompt
from vstream.model.prompts import prompt_parts


class QwenPrompts:
    """A `BatchAnswerer`'s prompts for a `FlashVStreamQwen`; counts which way each came in (`from_prefix`, `full`)."""

    def __init__(self, model):
        self.model = model
        self.from_prefix = 0  # prompts that took a cached memory prefix's keys and values
        self.full = 0  # prompts prefilled whole

    def prefix(self) -> list[int]:
        """Token ids every slot shares: none (see the module docstring)."""
        return []

    def max_seq_len(self) -> int:
        """A slot's positions: a full memory + room for the template and the question + the longest default answer."""
        m = self.model
        limit = m.hf.config.get_text_config().max_position_embeddings
        return min(m.cfg.max_tokens + 256 + m.cfg.max_new_tokens, limit)

    def positions(self, memory_tokens: torch.Tensor, question: str, memory) -> int:
        """How many cache positions the prompt takes (whichever way it comes in)."""
        read = _flash_read(memory)
        before, after = prompt_parts(self.model.cfg.template, question, self.model.tokenizer)
        if not after:
            raise ValueError(f"a prompt must end with text after the memory, the {self.model.cfg.template!r} template "
                             f"puts nothing there")
        return len(before) + read.num_tokens + len(after)

    @torch.inference_mode()
    def build(self, memory_tokens: torch.Tensor, question: str, memory) -> SlotPrompt:
        """The prompt as it goes into a slot: the cached prefix's keys and values and the question's embeddings, or
        the whole prompt's embeddings; with their M-RoPE positions [3, S]."""
        m, read = self.model, _flash_read(memory)
        prefix = m._prefix_of(read)
        if prefix is not None:
            ids, positions = prefix.question_inputs(question)
            self.from_prefix += 1
            return SlotPrompt(m.hf.get_input_embeddings()(ids), positions[:, 0], kv=prefix.kv())
        embeds, positions = m.prompt(read, question)
        self.full += 1
        return SlotPrompt(embeds, positions[:, 0])


def _flash_read(memory) -> FlashRead:
    if not isinstance(memory, FlashRead):
        raise TypeError(f"a Qwen model answers from a FlashRead (tokens with their AM-RoPE times), got "
                        f"{type(memory).__name__}")
    return memory
