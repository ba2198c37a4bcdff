"""Token-by-token generation from prompt embeddings with any Hugging Face causal LM, streaming text as it comes.

- `iter_tokens`: prefill once with `inputs_embeds` into a `DynamicCache`, then one token per step fed as `input_ids`;
  greedy by default, or temperature / top-p sampling. It knows nothing about text.
- `stream_generate`: decodes those tokens incrementally and yields only new text, holding back a tail that may still
  change (an incomplete UTF-8 sequence, "\\ufffd"; a run of byte-fallback tokens) or that may begin a stop string; it
  stops at a stop token id or a stop string (which is not yielded). `generate_text` joins the stream.

What this module does not do: build prompts or embeddings (the caller splices memory tokens in before calling), batch
several prompts, or use `llm.generate`. The one host sync per token is the read of the new token id, which decides
whether to stop. This is the eager reference path; `vstream.model.static_decode` is the static-cache, graph-replayed
one, and `stream_text` turns either's tokens into text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import DynamicCache

from vstream.errors import UserInputError

_INCOMPLETE = "\ufffd"  # what a byte-fallback decoder shows for an unfinished UTF-8 sequence


def default_stop_ids(llm, tokenizer) -> set[int]:
    """End-of-sequence ids of the tokenizer and of `llm.generation_config` (an int, a list, or None)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return ids


def iter_tokens(
    llm,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids; a sampled stop id is yielded last (so callers see why it ended).

    inputs_embeds: [1, S, H] in the LLM's embedding dtype and device.
    """
    _check_embeds(llm, inputs_embeds)
    _check_sampling(max_new_tokens, temperature, top_p)
    if max_new_tokens == 0:
        return
    stop = {int(i) for i in stop_token_ids}
    cache = DynamicCache(config=llm.config)
    logits = _prefill(llm, inputs_embeds, cache)  # [1, V]
    for step in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)  # [1]
        token_id = int(token)  # the one host sync per token: it decides whether to stop
        yield token_id
        if token_id in stop or step == max_new_tokens - 1:
            return
        logits = _decode_step(llm, token, cache)


@torch.inference_mode()
def _prefill(llm, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
    out = llm(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@torch.inference_mode()
def _decode_step(llm, token: torch.Tensor, cache) -> torch.Tensor:
    out = llm(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


@torch.inference_mode()
def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token [1] from logits [1, V]: argmax when temperature is 0, else a top-p sample at that temperature."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest head of the sorted list whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [1, 1]
        return order.gather(-1, choice).view(1)
    return torch.multinomial(probs, 1, generator=generator).view(1)


def _check_embeds(llm, inputs_embeds: torch.Tensor) -> None:
    weight = llm.get_input_embeddings().weight
    hidden = weight.shape[1]
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1 or inputs_embeds.shape[2] != hidden:
        raise ValueError(f"inputs_embeds must be [1, S, {hidden}], got {list(inputs_embeds.shape)}")
    if inputs_embeds.shape[1] == 0:
        raise ValueError("inputs_embeds holds no positions (S = 0)")
    if inputs_embeds.dtype != weight.dtype or inputs_embeds.device != weight.device:
        raise ValueError(
            f"inputs_embeds must be {weight.dtype} on {weight.device} like the LLM's embeddings, "
            f"got {inputs_embeds.dtype} on {inputs_embeds.device}"
        )


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise UserInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0.0:
        raise UserInputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserInputError(f"top_p must be in (0, 1], got {top_p}")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Each `push` decodes the whole id list and returns the part of the text not returned before, minus a tail that may
    still change: trailing "\\ufffd" (an unfinished UTF-8 sequence), the text of a trailing run of byte-fallback tokens
    (`<0xNN>`: the tokenizers decoder turns a whole run into "\\ufffd"s when a later byte makes it invalid UTF-8), and
    any suffix that begins a stop string. Once a stop string appears, the text before it is returned and `stopped`
    becomes True. `finish` returns the held-back tail.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {self.stop_strings}")
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.byte_run = 0  # byte-fallback tokens at the end of `ids`
        self.text = ""  # everything returned so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            raise RuntimeError("push after a stop string was found")
        self.ids.append(token_id)
        self.byte_run = self.byte_run + 1 if _is_byte_token(self.tokenizer, token_id) else 0
        full = self._decode(self.ids)
        cut = self._stop_position(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held_back(full)])

    def finish(self) -> str:
        """The rest of the text once generation has ended (a stop string never completed is not one)."""
        if self.stopped or not self.ids:
            return ""
        return self._emit(self._decode(self.ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):
            raise RuntimeError(f"decoded text {upto!r} no longer starts with the text already streamed {self.text!r}")
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _stop_position(self, full: str) -> int | None:
        hits = [i for s in self.stop_strings if (i := full.find(s)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Characters at the end of `full` that may still change or turn out to begin a stop string."""
        incomplete = len(full) - len(full.rstrip(_INCOMPLETE))
        byte_tail = len(full) - len(self._decode(self.ids[: -self.byte_run])) if self.byte_run else 0
        partial_stop = max(
            (n for s in self.stop_strings for n in range(1, len(s)) if full.endswith(s[:n])),
            default=0,
        )
        return max(incomplete, byte_tail, partial_stop)


def _is_byte_token(tokenizer, token_id: int) -> bool:
    """True for SentencePiece byte-fallback tokens, spelled `<0xNN>`."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    return isinstance(token, str) and len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def stream_generate(
    llm,
    inputs_embeds: torch.Tensor,
    tokenizer,
    *,
    max_new_tokens: int,
    stop_token_ids: Iterable[int] = (),
    stop_strings: Iterable[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield the answer's text in non-empty pieces as tokens are produced (see the module docstring).

    Stops at any of `stop_token_ids` or the end-of-sequence ids of the tokenizer and `llm.generation_config`
    (never decoded), at the first stop string (not yielded), or after `max_new_tokens` tokens.
    """
    stop_ids = default_stop_ids(llm, tokenizer) | {int(i) for i in stop_token_ids}
    tokens = iter_tokens(
        llm,
        inputs_embeds,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_ids,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
    )
    yield from stream_text(tokens, tokenizer, stop_ids, stop_strings)


def stream_text(tokens: Iterator[int], tokenizer, stop_ids: set[int],
                stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """Text pieces of a token stream (any token source: the eager `iter_tokens` or the fast path): ends before a stop
    id, at the first stop string (not yielded), or when the tokens end; closes `tokens` when done."""
    detok = IncrementalDetokenizer(tokenizer, stop_strings)
    try:
        for token_id in tokens:
            if token_id in stop_ids:
                break
            delta = detok.push(token_id)
            if delta:
                yield delta
            if detok.stopped:
                return
        tail = detok.finish()
        if tail:
            yield tail
    finally:
        tokens.close()


def generate_text(llm, inputs_embeds: torch.Tensor, tokenizer, **kwargs) -> str:
    """The whole answer as one string; same arguments as `stream_generate`."""
    return "".join(stream_generate(llm, inputs_embeds, tokenizer, **kwargs))
