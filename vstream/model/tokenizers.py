"""Tokenizers: a tiny Vicuna-style SentencePiece tokenizer trained in-process, and loading a tokenizer folder.

`build_tiny_tokenizer` trains a byte-fallback BPE SentencePiece model (unk 0, bos 1, eos 2, no pad; identity
normalisation and a dummy prefix, like LLaMA's) on a fixed embedded English corpus, writes the files a Vicuna checkpoint
ships (`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`) and loads them back with transformers.
It is deterministic (one training thread), needs no network, and its vocabulary fits the `tiny` preset's LLM (512).
Like Vicuna's, a chunk that starts with "\\n" tokenises to "▁", "<0x0A>", ...

This module does not build prompts (see `prompts.py`) and does not download anything.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from vstream.model.prompts import VICUNA_SYSTEM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")
_SHAPES = ("circle", "square", "triangle", "ball", "box", "star", "cube", "ring")
_MOTIONS = (
    "moves to the left",
    "moves to the right",
    "jumps up",
    "falls down",
    "spins around",
    "stops in the middle",
    "bounces off the wall",
    "slides slowly",
    "appears at the top",
    "disappears behind the box",
)
_SCENES = (
    "The video shows a small room with a wooden table.",
    "A man walks into the kitchen and opens the door.",
    "A woman is cooking dinner while music plays.",
    "Two children are playing football in the park.",
    "The camera follows a dog running on the beach.",
    "A car drives along a road at night.",
    "Someone is writing on a white board.",
    "The person picks up a cup and drinks some water.",
    "It is raining and the street is wet.",
    "A bird flies over the green trees.",
    "The frame is dark at the start and bright at the end.",
    "People are talking in a busy market.",
    "A cat sleeps on the sofa next to a lamp.",
    "The video was recorded from a moving train.",
    "At the end of the clip the lights go out.",
    "What is the man holding in his hand?",
    "Where does the woman put the bag?",
    "How many people are in the room?",
    "Why did the dog start running?",
    "What happens after the door opens?",
    "Describe the video in detail.",
    "Answer the question using a single word or phrase.",
    "Yes, the man is smiling.",
    "No, there is nobody in the picture.",
    "The answer is three.",
)


def tiny_corpus() -> list[str]:
    """The fixed training corpus: a few hundred short sentences about videos, colours, shapes and motion."""
    lines = [VICUNA_SYSTEM, *_SCENES]
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            motion = _MOTIONS[(i + j) % len(_MOTIONS)]
            lines.append(f"The {colour} {shape} {motion} in the video.")
            lines.append(f"USER: What colour is the {shape}? ASSISTANT: The {shape} is {colour}.")
        lines.append(f"In frame {i + 1} a {colour} object {_MOTIONS[i % len(_MOTIONS)]}.")
    for k, motion in enumerate(_MOTIONS):
        lines.append(f"USER: What does the {_SHAPES[k % len(_SHAPES)]} do? ASSISTANT: It {motion}.")
        lines.append(f"After {k + 2} seconds the shape {motion} and then stops.")
    return lines


def build_tiny_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512):
    """Train the tiny SentencePiece tokenizer, write a Vicuna-style folder, load it (pad = unk, as in training).

    With `out_dir=None` the files go to a new temporary folder (left in place: the tokenizer refers to it).
    """
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vstream-tiny-tokenizer-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2) + "\n")
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"the tiny tokenizer has {len(tokenizer)} tokens, more than the requested {vocab_size}")
    return tokenizer


def _train_sentencepiece(vocab_size: int) -> bytes:
    """Serialised SentencePiece BPE model trained on `tiny_corpus()`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # LLaMA's settings: no normalisation, keep spaces as written, add the "▁" dummy prefix, split digits.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _tokenizer_config() -> dict:
    """`tokenizer_config.json` of a Vicuna-v1.5-style checkpoint, with Flash-VStream's 2048-token limit."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **_SPECIAL,
        "pad_token": None,
    }


def load_tokenizer(path: str | Path):
    """Tokenizer of a checkpoint folder; `pad_token` defaults to the unk token, as the official training sets it."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder} holds none of the tokenizer files {list(TOKENIZER_FILES)}; it holds {found}")
    # use_fast=False follows the official code (transformers 5 ignores it and always builds the tokenizers backend).
    use_fast = not (folder / "tokenizer.model").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=use_fast)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
