"""Conversation templates, the `<image>` placeholder, and prompt tokenisation with the official chunk-wise rule.

What this module does:
- `TEMPLATES`: `vicuna_v1` (the released Flash-VStream model), `plain` (stage-1 pretraining) `chatml` (SmolLM2) and
  `qwen_vl` (Qwen2-VL / Qwen2.5-VL).
- `build_prompt`: the text of an inference prompt, with the `<image>` placeholder at the front of the first user turn.
- `tokenizer_image_token`: token ids of a prompt, with `IMAGE_TOKEN_INDEX` (-200) where each `<image>` was.
- `prompt_parts`: an inference prompt's ids before and after its one `<image>` (where the memory is spliced).
- `build_training_example`: (input_ids, labels) with the instruction tokens masked, for training.

What it does not do: it never touches embeddings or the memory (the splice replaces -200 with memory tokens elsewhere),
and it does not pad or truncate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from vstream.errors import ConfigError, DataError, UnknownNameError, UserInputError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text. `{text}` / `{system}` are the placeholders of the format strings.

    The text of a conversation is `system_format`, then per turn `user_format` + `assistant_prefix` + `answer_format`,
    with `turn_gap` between a completed answer and the next user turn. An inference prompt ends with `assistant_prefix`.
    In training, only the `answer_format` parts are supervised.
    """

    name: str
    system: str
    """Default system prompt ("" = the template has none)."""
    system_format: str
    """Opens the text; holds `{system}`."""
    user_format: str
    """One user turn; holds `{text}`."""
    assistant_prefix: str
    """Opens the assistant's turn; an inference prompt ends with it."""
    answer_format: str
    """A completed answer, terminator included; holds `{text}`. The supervised part in training."""
    turn_gap: str
    """Between a completed answer and the next user turn (not supervised)."""
    image_prefix: str
    """Put at the front of the first user turn when the prompt carries the image."""
    stop: tuple[str, ...]
    """Strings that end an answer at inference."""
    takes_question: bool = True
    """False for `plain`: the official stage-1 preprocessing keeps only the image in the user turn."""


TEMPLATES: dict[str, Template] = {
    # Official `conv_vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>").
    "vicuna_v1": Template(
        name="vicuna_v1",
        system=VICUNA_SYSTEM,
        system_format="{system} ",
        user_format="USER: {text} ",
        assistant_prefix="ASSISTANT:",
        answer_format=" {text}</s>",
        turn_gap="",
        image_prefix=IMAGE_TOKEN + "\n",
        stop=("</s>",),
    ),
    # Official `conv_llava_plain`, as `preprocess_plain` uses it: "<image>" + caption + "\n".
    "plain": Template(
        name="plain",
        system="",
        system_format="",
        user_format="{text}",
        assistant_prefix="",
        answer_format="{text}\n",
        turn_gap="",
        image_prefix=IMAGE_TOKEN,
        stop=("\n",),
        takes_question=False,
    ),
    # SmolLM2-Instruct's chat template (its default system prompt), with the image at the front of the user turn.
    "chatml": Template(
        name="chatml",
        system=SMOLLM_SYSTEM,
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{text}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_format="{text}<|im_end|>",
        turn_gap="\n",
        image_prefix=IMAGE_TOKEN + "\n",
        stop=("<|im_end|>",),
    ),
    # Qwen2-VL / Qwen2.5-VL: ChatML with the memory between <|vision_start|> and <|vision_end|> (vstream.model.qwen)
    "qwen_vl": Template(
        name="qwen_vl",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{text}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_format="{text}<|im_end|>",
        turn_gap="\n",
        image_prefix="<|vision_start|>" + IMAGE_TOKEN + "<|vision_end|>",
        stop=("<|im_end|>",),
    ),
}


def get_template(name: str | Template) -> Template:
    """The named template (a `Template` passes through)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise UnknownNameError(f"unknown conversation template {name!r}; known templates: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def stop_strings(template_name: str) -> tuple[str, ...]:
    """Strings that end an answer for this template."""
    return get_template(template_name).stop


def build_prompt(
    template_name: str | Template,
    question: str,
    system_extra: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    *,
    image: bool = True,
) -> str:
    """Text of an inference prompt: earlier (question, answer) turns, then `question`, ending with the assistant prefix.

    `system_extra` is appended to the system prompt after a space (the official eval's `sample['system']`). With
    `image`, `<image>` goes at the front of the first user turn followed by "\\n" (official `preprocess_multimodal`);
    a `<image>` already in that turn is moved there.
    """
    template = get_template(template_name)
    turns = [*history, (question, None)]
    return "".join(text for text, _ in _segments(template, turns, system_extra, image))


def _segments(
    template: Template, turns: Sequence[tuple[str, str | None]], system_extra: str | None, image: bool
) -> list[tuple[str, bool]]:
    """The conversation as (text, supervised) pieces; only the last turn may lack an answer."""
    pieces: list[tuple[str, bool]] = []
    system = _system_text(template, system_extra)
    if system:
        pieces.append((template.system_format.format(system=system), False))
    for i, (question, answer) in enumerate(turns):
        question = _user_text(template, question, first=i == 0, image=image)
        gap = template.turn_gap if i else ""
        pieces.append((gap + template.user_format.format(text=question) + template.assistant_prefix, False))
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError(f"turn {i} of {len(turns)} has no answer; only the last turn may be open")
            continue
        if IMAGE_TOKEN in answer:
            raise DataError(f"answer of turn {i} contains {IMAGE_TOKEN!r}: {answer!r}")
        pieces.append((template.answer_format.format(text=answer), True))
    return pieces


def _system_text(template: Template, system_extra: str | None) -> str:
    if system_extra is None:
        return template.system
    if not template.system_format:
        raise ValueError(f"template {template.name!r} has no system prompt to extend with {system_extra!r}")
    return f"{template.system} {system_extra}" if template.system else system_extra


def _user_text(template: Template, question: str, *, first: bool, image: bool) -> str:
    """A user turn's text, with the image placeholder at the front of the first turn."""
    if not template.takes_question:
        if question.replace(IMAGE_TOKEN, "").strip():
            raise UserInputError(f"template {template.name!r} takes only the image, got question {question!r}")
        question = ""
    if IMAGE_TOKEN in question:
        if not (first and image):
            raise UserInputError(f"{IMAGE_TOKEN!r} may only be in the first user turn of an image prompt, "
                                 f"got {question!r}")
        if question.count(IMAGE_TOKEN) != 1:
            raise UserInputError(f"expected one {IMAGE_TOKEN!r} in the first user turn, "
                                 f"got {question.count(IMAGE_TOKEN)}")
        question = question.replace(IMAGE_TOKEN, "").strip()
    return template.image_prefix + question if first and image else question


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before every text (the BOS, or nothing). Tokenizers that append tokens are refused."""
    with_special = list(tokenizer("a").input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    cut = len(with_special) - len(plain)
    if cut < 0 or with_special[cut:] != plain:
        raise ConfigError(
            f"tokenizer adds special tokens after the text ({with_special} for 'a' vs {plain} without special tokens); "
            "prompts need a tokenizer that adds at most a prefix such as BOS (add_eos_token=False)"
        )
    return with_special[:cut]


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """Token ids of `prompt` with `IMAGE_TOKEN_INDEX` at each `<image>` (official `tokenizer_image_token` semantics).

    The prompt is split on `<image>` and each chunk is tokenised on its own, with the tokenizer's BOS; the first chunk
    keeps its BOS and later chunks drop theirs. A tokenizer that adds no BOS (SmolLM2's) simply concatenates.
    """
    prefix = _special_prefix(tokenizer)
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        tokens = list(tokenizer(chunk).input_ids)
        if tokens[: len(prefix)] != prefix:
            raise ValueError(f"chunk {chunk!r} tokenised to {tokens}, which does not start with the prefix {prefix}")
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
            tokens = tokens[len(prefix) :]
        ids.extend(tokens)
    return ids


def prompt_parts(template: str | Template, question: str, tokenizer,
                 system_extra: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the question's inference prompt before and after its single `<image>` placeholder."""
    ids = tokenizer_image_token(build_prompt(template, question, system_extra=system_extra), tokenizer)
    where = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(where) != 1:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_TOKEN_INDEX} image placeholder, found {len(where)}")
    return ids[: where[0]], ids[where[0] + 1 :]


def build_training_example(
    template_name: str | Template, conversations: Sequence[dict], tokenizer
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one LLaVA-format conversation; labels are `IGNORE_INDEX` outside the answers.

    `conversations` alternates `{"from": "human", "value": ...}` and `{"from": "gpt", "value": ...}`. Supervised:
    each answer with its terminator (`vicuna_v1`: " {answer}</s>"; `plain`: caption + "\\n"). Masked: the BOS, the
    system prompt, the user turns, the role tags and the image. As in the official `preprocess_v1`, when the pieces do
    not tokenise to the same ids as the whole text, the whole sample is masked and a warning names the mismatch.

    Where the official code counts tokens of each round separately (which breaks for non-legacy tokenizers, whose
    rounds after the first lose their prefix space), this tokenises the whole text once and finds each piece's token
    boundary by tokenising the text up to the piece's end; both give the same labels when the tokenisation splits there.
    """
    template = get_template(template_name)
    turns = _turns(conversations)
    image = any(IMAGE_TOKEN in question for question, _ in turns)
    if not template.takes_question:
        if not image:
            raise DataError(f"template {template.name!r} needs {IMAGE_TOKEN!r} in the first human message")
        # Official `preprocess_plain`: the human message is replaced by the image alone.
        turns = [(IMAGE_TOKEN, answer) for _, answer in turns]
    pieces = _merge_pieces(_segments(template, turns, None, image=image))
    text = "".join(piece for piece, _ in pieces)
    input_ids = tokenizer_image_token(text, tokenizer)
    labels = [IGNORE_INDEX] * len(input_ids)
    start, end_char = 0, 0
    for piece, supervised in pieces:
        end_char += len(piece)
        prefix_ids = tokenizer_image_token(text[:end_char], tokenizer)
        end = len(prefix_ids)
        if prefix_ids != input_ids[:end]:
            warnings.warn(
                f"tokenization mismatch: the text up to character {end_char} does not tokenise to a prefix of the "
                f"{len(input_ids)} ids of the whole sample (piece {piece!r}); the whole sample is masked",
                stacklevel=2,
            )
            return input_ids, [IGNORE_INDEX] * len(input_ids)
        if supervised:
            labels[start:end] = input_ids[start:end]
        start = end
    return input_ids, labels


def _merge_pieces(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring pieces with the same supervision, so that boundaries fall only where the mask changes."""
    merged: list[tuple[str, bool]] = []
    for text, supervised in pieces:
        if merged and merged[-1][1] == supervised:
            text = merged.pop()[0] + text
        merged.append((text, supervised))
    return merged


def _turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA conversation list, which must alternate human / gpt."""
    if not conversations or len(conversations) % 2:
        raise DataError(f"expected an even, non-zero number of messages (human, gpt, ...), got {len(conversations)}")
    turns = []
    for i in range(0, len(conversations), 2):
        roles = (conversations[i].get("from"), conversations[i + 1].get("from"))
        if roles != ("human", "gpt"):
            raise DataError(f"messages {i} and {i + 1} must come from ('human', 'gpt'), got {roles}")
        turns.append((conversations[i]["value"], conversations[i + 1]["value"]))
    return turns


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "TEMPLATES",
    "Template",
    "build_prompt",
    "build_training_example",
    "get_template",
    "prompt_parts",
    "stop_strings",
    "tokenizer_image_token",
]
