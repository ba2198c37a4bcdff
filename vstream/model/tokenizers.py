"""Tokenizers built offline for random-weight presets and tests, and loading a tokenizer folder.

Both builders train a BPE SentencePiece model on a fixed embedded English corpus (`tiny_corpus`), deterministically
(one training thread) and without the network, write the files a Vicuna checkpoint ships (`tokenizer.model`,
`tokenizer_config.json`, `special_tokens_map.json`; unk 0, bos 1, eos 2, no pad) and load them back with transformers.

- `build_tiny_tokenizer`: the stand-in tokenizer of the random-weight presets. It has exactly `vocab_size` ids, and
  every id but unk, bos and eos decodes to non-empty text on its own, anywhere in a stream, so a random model shows
  text for each token it samples. Hence no byte-fallback tokens (a lone byte shows nothing until its character is
  complete), no dummy prefix (its decoder strips the first space of an answer, so a first "▁" would show nothing) and
  no "<" (the start of the stop string "</s>", held back until it is known not to be one). The trained pieces are
  padded to `vocab_size` with made-up words ("▁baba", "▁babe", ...), so a random model's answer reads as words.
  Printable ASCII and "\\n" tokenise to pieces; any other character (and "<") is dropped, as transformers builds a
  LLaMA tokenizer's BPE with byte fallback and no unk, and the stand-in has no bytes to fall back to.
- `build_vicuna_style_tokenizer`: Vicuna's behaviour in 512 ids (byte fallback, identity normalisation, the "▁" dummy
  prefix), for tests of prompt tokenisation and of streaming byte tokens. Like Vicuna's, a chunk that starts with
  "\\n" tokenises to "▁", "<0x0A>", ...

This module does not build prompts (see `prompts.py`) and does not download anything.
"""

from __future__ import annotations

import io
import itertools
import json
import string
import tempfile
from pathlib import Path

from vstream.errors import MissingPathError
from vstream.model.prompts import VICUNA_SYSTEM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt")
_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# Pieces trained on the corpus (it holds up to 1,129): the tiny preset's whole vocabulary, so every stand-in from 512
# ids up tokenises text alike, and larger ones differ only in their made-up words.
_TRAINED_PIECES = 512
# Characters the stand-in tokenises to pieces of their own: printable ASCII and "\n", less "<" (see the docstring),
# the space ("▁" stands for it) and the other control whitespace.
_STANDIN_CHARS = "".join(sorted(set(string.printable) - set("< \t\r\x0b\x0c")))

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
    """The stand-in tokenizer of random-weight presets: `vocab_size` ids, each but unk, bos and eos visible text.

    The first min(`vocab_size`, 512) ids are trained on `tiny_corpus()`, the rest are made-up words.
    With `out_dir=None` the files go to a new temporary folder (left in place: the tokenizer refers to it).
    """
    trained = _train_sentencepiece(min(vocab_size, _TRAINED_PIECES), vicuna=False)
    config = _tokenizer_config() | {"add_prefix_space": False}
    tokenizer = _write_and_load(out_dir, _pad_with_words(trained, vocab_size), config)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"the tiny tokenizer has {len(tokenizer)} ids, expected {vocab_size}")
    return tokenizer


def build_vicuna_style_tokenizer(out_dir: str | Path | None = None):
    """A 512-id tokenizer that tokenises and decodes like Vicuna's (byte fallback, "▁" dummy prefix; pad = unk).

    With `out_dir=None` the files go to a new temporary folder (left in place: the tokenizer refers to it).
    """
    model = _train_sentencepiece(_TRAINED_PIECES, vicuna=True)
    return _write_and_load(out_dir, model, _tokenizer_config())


def _write_and_load(out_dir: str | Path | None, model: bytes, config: dict):
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vstream-tiny-tokenizer-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2) + "\n")
    return load_tokenizer(folder)


def _train_sentencepiece(vocab_size: int, *, vicuna: bool) -> bytes:
    """Serialised SentencePiece BPE model trained on `tiny_corpus()`, like Vicuna's or as the stand-in."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # every required character occurs in the text: a SentencePiece build may abort on one that never does
        sentence_iterator=iter(tiny_corpus() if vicuna else [*tiny_corpus(), _STANDIN_CHARS]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # LLaMA's settings: no normalisation, keep spaces as written, split digits.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        # and Vicuna's byte fallback, "▁" dummy prefix and pieces of spaces only ("▁▁"), each of which can leave a
        # streamed token without visible text (see the module docstring); the stand-in names its characters instead.
        byte_fallback=vicuna,
        add_dummy_prefix=vicuna,
        allow_whitespace_only_pieces=vicuna,
        required_chars="" if vicuna else _STANDIN_CHARS,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _pad_with_words(model: bytes, vocab_size: int) -> bytes:
    """`model` with made-up words appended (scored below every trained piece) until it has `vocab_size` pieces."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model)
    known = {piece.piece for piece in proto.pieces}
    score = min(piece.score for piece in proto.pieces)
    new = (word for word in _made_up_words() if word not in known)
    for word in itertools.islice(new, max(0, vocab_size - len(proto.pieces))):
        score -= 1.0
        proto.pieces.add(piece=word, score=score, type=spm_pb2.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def _made_up_words():
    """Made-up words "▁baba", "▁babe", ...: all of two consonant-vowel syllables, then of three, and so on."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for length in itertools.count(2):
        for word in itertools.product(syllables, repeat=length):
            yield "▁" + "".join(word)


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
        raise MissingPathError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        found = sorted(p.name for p in folder.iterdir())
        raise MissingPathError(f"{folder} holds none of the tokenizer files {list(TOKENIZER_FILES)}; it holds {found}")
    # use_fast=False follows the official code (transformers 5 ignores it and always builds the tokenizers backend).
    use_fast = not (folder / "tokenizer.model").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=use_fast)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
