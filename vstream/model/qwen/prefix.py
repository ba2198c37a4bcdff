"""Time to first token with an 11.5 K-token memory: the memory's KV cache computed off the question's path.

Every Flash Memory update re-clusters the CSM, so the KV of one snapshot cannot be extended to the next. But within
a snapshot, everything before the question is the same for every question: [system, user turn, <|vision_start|>,
memory, <|vision_end|>]. `MemoryPrefix.refresh(read)` prefills that prefix once (a full prefill: about 260 ms for
11.5 K tokens on an H200) whenever the caller decides (after each update, or every k units, on the engine's idle time);
a question then prefills only its own ~20 tokens against the cached prefix, and its answer's KV is cropped away
afterwards, so the next question starts from the same prefix. Tokens equal those of a fresh prefill of the whole
prompt (tested), since the positions are the same (text after the memory continues from its largest position + 1).

`FlashVStreamQwen.enable_prefix_cache` keeps the prefixes of the latest snapshots; the engine refreshes them after each
round of frames (`prepare_answers`), so a question that comes after that finds its snapshot's prefix ready.

The engine's batched answers (`vstream.model.qwen.batch`) copy a ready prefix's keys and values (`kv`) into their
slot and prefill the question there (`question_inputs`), so any number of questions of one snapshot run at once.

What this module does not do: decide when to refresh (the caller's policy; the cost per stream is one prefill per
refresh), or serve two questions of one prefix at once through its own cache (one answer at a time: `busy`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from vstream.memory.flash import FlashRead
from vstream.model.generate import _check_sampling, _pick, default_stop_ids, stream_text
from vstream.model.prompts import prompt_parts, stop_strings


class MemoryPrefix:
    """The KV cache of one memory snapshot's question-independent prefix, for one model."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.length = 0  # positions in the cache
        self.next_pos: float = 0.0  # position of the first token after the prefix
        self.read: FlashRead | None = None
        self.busy = False  # an answer is using the cache (its KV is cropped away when it ends)

    @torch.inference_mode()
    def refresh(self, read: FlashRead) -> None:
        """Prefill [system, user turn, <|vision_start|>, memory, <|vision_end|>] of `read`."""
        m = self.model
        embeds, positions = m.prompt(read, "?")  # the question's text comes after <|vision_end|>: cut it off
        cut = self._prefix_length(read)
        cache = DynamicCache(config=m.hf.config.get_text_config())
        m.hf.model.language_model(inputs_embeds=embeds[:, :cut], position_ids=positions[:, :, :cut],
                                  past_key_values=cache, use_cache=True)
        self.cache, self.length, self.read = cache, cut, read
        self.next_pos = float(positions[0, 0, cut - 1]) + 1

    def _prefix_length(self, read: FlashRead) -> int:
        before, after = prompt_parts(self.model.cfg.template, "?", self.model.tokenizer)
        end = self.model.hf.config.vision_end_token_id
        if not after or after[0] != end:
            raise ValueError(f"the prompt's text after the memory must start with <|vision_end|> ({end}), got "
                             f"{after[:3]}")
        return len(before) + read.num_tokens + 1

    def suffix(self, question: str) -> list[int]:
        """Token ids of the question's part: what follows <|vision_end|> in the whole prompt."""
        _, after = prompt_parts(self.model.cfg.template, question, self.model.tokenizer)
        return after[1:]

    def question_inputs(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, n], M-RoPE positions [3, 1, n] float32) of the question's part, from the prefix's next position."""
        m = self.model
        ids = torch.tensor([self.suffix(question)], device=m.device)
        pos = (self.next_pos + torch.arange(ids.shape[1], device=m.device, dtype=torch.float32)).expand(3, 1, -1)
        return ids, pos

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values per layer, [1, Hkv, length, Dh] each (views of the cache, not copies)."""
        if self.cache is None:
            raise RuntimeError("refresh(read) must run before the prefix's keys and values are read")
        return [(layer.keys[:, :, : self.length], layer.values[:, :, : self.length]) for layer in self.cache.layers]

    @torch.inference_mode()
    def iter_tokens(self, question: str, max_new_tokens: int, stop: set[int],
                    temperature: float = 0.0) -> Iterator[int]:
        """Tokens of an answer from the cached prefix; the cache is cropped back to the prefix when it ends."""
        if self.cache is None:
            raise RuntimeError("refresh(read) must run before a question is answered from the prefix")
        _check_sampling(max_new_tokens, temperature, 1.0)
        m = self.model
        if self.busy:
            raise RuntimeError("this memory prefix is answering another question: one answer at a time")
        self.busy = True
        ids, pos = self.question_inputs(question)
        try:
            yield from decode(m.hf, {"input_ids": ids}, pos, self.cache, max_new_tokens, temperature, stop)
        finally:
            extra = self.cache.get_seq_length() - self.length
            if extra:
                self.cache.crop(-extra)  # a negative count removes that many positions (transformers 4 and 5)
            self.busy = False

    def stream_answer(self, question: str, max_new_tokens: int | None = None,
                      temperature: float = 0.0) -> Iterator[str]:
        m = self.model
        stop = default_stop_ids(m.hf, m.tokenizer)
        n_new = m.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        yield from stream_text(self.iter_tokens(question, n_new, stop, temperature), m.tokenizer, stop,
                               stop_strings(m.cfg.template))


def decode(hf, first: dict, positions: torch.Tensor, cache, max_new_tokens: int, temperature: float,
           stop: set[int]) -> Iterator[int]:
    """Token ids of an answer from a Qwen2(.5)-VL model `hf`: the first pass over `first` (`input_ids` or
    `inputs_embeds`) at M-RoPE `positions` [3, 1, S] appends to `cache`, then one token at a time at the next
    positions, until a `stop` id or `max_new_tokens` (> 0). One host read per token (the id, to decide whether to
    stop)."""
    text = hf.model.language_model
    out = text(**first, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = hf.lm_head(out.last_hidden_state[:, -1])
    next_pos = positions[:, :, -1:] + 1
    for step in range(max_new_tokens):
        token = _pick(logits, temperature, 1.0, None)
        token_id = int(token)
        yield token_id
        if token_id in stop or step == max_new_tokens - 1:
            return
        out = text(input_ids=token.view(1, 1), position_ids=next_pos, past_key_values=cache, use_cache=True)
        logits = hf.lm_head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
