"""A yes/no score of a condition over a memory snapshot in one prefill, with no decoding (the mechanism of watches).

The condition ("a purple square appears") becomes a yes/no question; the memory is spliced into its prompt as for an
answer, the LLM runs one forward pass over the prompt, and the score is the log-odds of answering "Yes" against "No"
at the first answer position: logsumexp of the logits of the "Yes" tokens minus that of the "No" tokens (> 0: the
model leans to yes). Each side's tokens are the single-token spellings of the word the tokenizer has ("Yes", " Yes",
"yes", " yes"; a bare leading space piece, as SentencePiece puts before a word, is dropped first).

What this module does not do (yet): batch the prefill with the engine's other work or cache the condition's prompt
prefix; it is one eager transformers forward per score, to be run where the model may run (the engine thread, via
`Engine.call`). Batching it into the engine's batched prefill is the next step.
"""

from __future__ import annotations

import math

import torch

from vstream.errors import ConfigError, UserInputError

YES_SPELLINGS = ("Yes", " Yes", "yes", " yes", "YES")
NO_SPELLINGS = ("No", " No", "no", " no", "NO")
MAX_CONDITION_CHARS = 500


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


@torch.inference_mode()
def yes_no_score(model, memory_tokens: torch.Tensor, condition: str) -> float:
    """Log-odds of "Yes" against "No" for `condition` over the memory tokens [N, D] of a snapshot, in one prefill.

    `model` is a `FlashVStream`; its yes/no ids are worked out once and kept on it."""
    ids = getattr(model, "_yes_no_ids", None)
    if ids is None:
        ids = model._yes_no_ids = yes_no_ids(model.tokenizer)
    embeds = model.prompt_embeds(memory_tokens, watch_question(condition))
    logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()
    yes, no = (torch.tensor(i, device=logits.device) for i in ids)
    score = float(torch.logsumexp(logits[yes], 0) - torch.logsumexp(logits[no], 0))
    if not math.isfinite(score):  # events and the API carry scores as strict JSON numbers
        raise ValueError(f"the yes/no score of {condition!r} is not a finite number: {score}")
    return score
