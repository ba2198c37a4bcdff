"""A yes/no score of a condition over a memory snapshot in one prefill, with no decoding (the mechanism of watches).

The condition ("a purple square appears") becomes a yes/no question; the memory is spliced into its prompt as for an
answer, the LLM runs one forward pass over the prompt, and the score is the log-odds of answering "Yes" against "No"
at the first answer position: logsumexp of the logits of the "Yes" tokens minus that of the "No" tokens (> 0: the
model leans to yes). Each side's tokens are the single-token spellings of the word the tokenizer has ("Yes", " Yes",
"yes", " yes"; a bare leading space piece, as SentencePiece puts before a word, is dropped first).

`yes_no_scores` scores several (memory, condition) pairs in one batched forward: the prompts are right-padded, so
each row's causal attention never reaches its padding and its last real position gives the same logits as its own
prefill (up to the rounding of batched products). `yes_no_scores_shared` scores many conditions over one memory: the
prompt up to the end of the memory is the same for all, so it runs once and its KV cache serves each condition's
question; the world's watch evaluation uses it. `score_pairs` takes any list of (memory, condition) pairs (the due
watches of many streams) and runs both: pairs over one memory tensor share its prefix, the others go in right-padded
batches, at most `PROMPTS_PER_FORWARD` prompts a forward; a batch that raises is scored again pair by pair, so a bad
memory (NaN tokens, the wrong width) or a bad condition fails only its own pairs, which get their exception instead of
a score.

What this module does not do (yet): batch the prefill with the engine's other work, share a prefix across streams or
cache the condition's prompt prefix; it is eager transformers forwards, to be run where the model may run (the engine
thread, via `Engine.call`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from vstream.errors import ConfigError, UserInputError
from vstream.model.prompts import IMAGE_TOKEN_INDEX, prompt_parts
from vstream.model.splice import splice

YES_SPELLINGS = ("Yes", " Yes", "yes", " yes", "YES")
NO_SPELLINGS = ("No", " No", "no", " no", "NO")
MAX_CONDITION_CHARS = 500
PROMPTS_PER_FORWARD = 32
"""Most prompts in one forward of `score_pairs` (more pairs run in several): bounds a batch's activations, so that
one evaluation of many streams' watches never builds an unbounded batch."""


def watch_question(condition: str) -> str:
    """The yes/no question asked of the memory for `condition`."""
    text = " ".join(condition.split()).rstrip(".?!")
    if not text:
        raise UserInputError("a watch's condition must hold some text, got an empty string")
    if len(text) > MAX_CONDITION_CHARS:
        raise UserInputError(f"a watch's condition holds at most {MAX_CONDITION_CHARS} characters, got {len(text)}")
    return f"Is it true that {text} in the video? Answer yes or no."


def _single_ids(tokenizer, spellings: tuple[str, ...]) -> set[int]:
    out = set()
    for word in spellings:
        ids = list(tokenizer(word, add_special_tokens=False).input_ids)
        ids = [i for i in ids if tokenizer.decode([i]).strip()]  # drop a bare space piece
        if len(ids) == 1:
            out.add(ids[0])
    return out


def yes_no_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids that spell "Yes" and those that spell "No" as one token; ConfigError when either is absent."""
    yes, no = _single_ids(tokenizer, YES_SPELLINGS), _single_ids(tokenizer, NO_SPELLINGS)
    if not yes or not no:
        missing = [w for w, ids in (("Yes", yes), ("No", no)) if not ids]
        raise ConfigError(f"the tokenizer has no single token for {missing} (tried {YES_SPELLINGS} and "
                          f"{NO_SPELLINGS}); watches score the log-odds of a one-token yes against a one-token no")
    if yes & no:
        raise ConfigError(f"the tokenizer spells yes and no with the same token ids {sorted(yes & no)}")
    return sorted(yes), sorted(no)


def _ids(model) -> list[int]:
    ids = getattr(model, "_yes_no_ids", None)
    if ids is None:
        ids = model._yes_no_ids = yes_no_ids(model.tokenizer)
    return ids


def _log_odds(logits: torch.Tensor, ids, conditions: Sequence[str]) -> list[float]:
    """Log-odds of yes against no per row of `logits` [B, V]; a value that is not finite raises, naming its row's
    condition."""
    yes, no = (torch.tensor(i, device=logits.device) for i in ids)
    scores = (torch.logsumexp(logits[:, yes], 1) - torch.logsumexp(logits[:, no], 1)).tolist()
    for score, condition in zip(scores, conditions):
        if not math.isfinite(score):  # events and the API carry scores as strict JSON numbers
            raise ValueError(f"the yes/no score of {condition!r} is not a finite number: {score}")
    return scores


@torch.inference_mode()
def yes_no_scores(model, pairs: list[tuple[torch.Tensor, str]]) -> list[float]:
    """`yes_no_score` of each (memory tokens [N, D], condition) pair, in one batched forward (right-padded)."""
    if not pairs:
        return []
    ids = _ids(model)
    embeds = [model.prompt_embeds(tokens, watch_question(condition))[0] for tokens, condition in pairs]
    lengths = [e.shape[0] for e in embeds]
    batch = embeds[0].new_zeros(len(embeds), max(lengths), embeds[0].shape[-1])  # [B, S, H]
    for i, e in enumerate(embeds):
        batch[i, : e.shape[0]] = e
    hidden = model.llm.model(inputs_embeds=batch, use_cache=False).last_hidden_state  # [B, S, H]
    last = hidden[torch.arange(len(embeds)), torch.tensor(lengths) - 1]  # [B, H]: no [B, S, V] logits made
    return _log_odds(model.llm.lm_head(last).float(), ids, [c for _, c in pairs])


@torch.inference_mode()
def yes_no_scores_shared(model, memory_tokens: torch.Tensor, conditions: list[str]) -> list[float]:
    """`yes_no_score` of each condition over one memory [N, D]: the prompt up to the end of the memory (the same for
    every condition) runs once and its KV cache serves every condition's remaining tokens, batched (right-padded)."""
    if not conditions:
        return []
    ids = _ids(model)
    parts = [prompt_parts(model.cfg.template, watch_question(c), model.tokenizer) for c in conditions]
    before = parts[0][0]
    if any(p[0] != before for p in parts):
        raise ValueError("the prompt before the memory differs between conditions: expected a template whose "
                         "question comes after the image")
    embed = model.llm.get_input_embeddings()
    vision = model.mm_projector(memory_tokens.to(model.device, model.dtype))  # [N, H]
    prefix = splice([*before, IMAGE_TOKEN_INDEX], embed, vision)[None]  # [1, P, H]
    cache = model.llm.model(inputs_embeds=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(conditions))
    lengths = [len(after) for _, after in parts]
    suffix = torch.full((len(parts), max(lengths)), model.tokenizer.pad_token_id or 0, dtype=torch.long)
    for i, (_, after) in enumerate(parts):
        suffix[i, : len(after)] = torch.tensor(after)
    n = prefix.shape[1]
    positions = torch.arange(n, n + suffix.shape[1], device=model.device)[None].expand(len(parts), -1)
    hidden = model.llm.model(inputs_embeds=embed(suffix.to(model.device)), past_key_values=cache, use_cache=True,
                             position_ids=positions).last_hidden_state  # [B, L, H]
    last = hidden[torch.arange(len(parts)), torch.tensor(lengths) - 1]  # [B, H]
    return _log_odds(model.llm.lm_head(last).float(), ids, conditions)


@torch.inference_mode()
def yes_no_score(model, memory_tokens: torch.Tensor, condition: str) -> float:
    """Log-odds of "Yes" against "No" for `condition` over the memory tokens [N, D] of a snapshot, in one prefill.

    `model` is a `FlashVStream`; its yes/no ids are worked out once and kept on it."""
    ids = _ids(model)
    embeds = model.prompt_embeds(memory_tokens, watch_question(condition))
    logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1:].float()
    return _log_odds(logits, ids, [condition])[0]


def score_pairs(model, pairs: Sequence[tuple[torch.Tensor, str]],
                prompts_per_forward: int = PROMPTS_PER_FORWARD) -> list:
    """The yes/no score of each (memory tokens [N, D], condition) pair, or the exception that scoring it raised (see
    the module docstring): pairs whose tokens are one tensor share its prefix (`yes_no_scores_shared`), the others
    run in right-padded batches (`yes_no_scores`), at most `prompts_per_forward` prompts a forward."""
    if prompts_per_forward < 1:
        raise ValueError(f"prompts_per_forward must be >= 1, got {prompts_per_forward}")
    by_memory: dict[int, list[int]] = {}
    for i, (tokens, _) in enumerate(pairs):
        by_memory.setdefault(id(tokens), []).append(i)  # `pairs` holds every tensor: no id is reused meanwhile
    out: list = [None] * len(pairs)
    singles = []
    for group in by_memory.values():
        if len(group) == 1:
            singles += group
            continue
        tokens = pairs[group[0]][0]
        for chunk in _chunks(group, prompts_per_forward):
            _score_chunk(out, chunk, lambda c, m=tokens: yes_no_scores_shared(model, m, [pairs[i][1] for i in c]))
    for chunk in _chunks(singles, prompts_per_forward):
        _score_chunk(out, chunk, lambda c: yes_no_scores(model, [pairs[i] for i in c]))
    return out


def scorer(model, prompts_per_forward: int = PROMPTS_PER_FORWARD) -> Callable[[Sequence[tuple[torch.Tensor, str]]],
                                                                              list]:
    """`score_pairs` bound to `model`: what `vstream.engine.watches.evaluate_due` scores with."""
    return functools.partial(score_pairs, model, prompts_per_forward=prompts_per_forward)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _score_chunk(out: list, chunk: list[int], score: Callable[[list[int]], list[float]]) -> None:
    """Write `score(chunk)` into `out` at the chunk's indices; when it raises, score each index alone, so that only
    the pairs that fail alone get their exception."""
    try:
        scores = score(chunk)
    except Exception as exc:  # kept as the pair's result: its watch backs off, the others are scored  # noqa: BLE001
        if len(chunk) == 1:
            out[chunk[0]] = exc
            return
        for i in chunk:
            _score_chunk(out, [i], score)
        return
    for i, value in zip(chunk, scores):
        out[i] = value
