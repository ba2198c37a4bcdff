"""A tiny Qwen-style tokenizer for random-weight presets and test checkpoints: byte-level BPE trained in-process on
vstream's tiny corpus, with Qwen2-VL's special tokens (ChatML turns, vision delimiters, image/video pads) at the
first ids (`SPECIALS`, in order). Nothing is downloaded. What this module does not do: load a real Qwen tokenizer
(a checkpoint directory's own `tokenizer.json` is loaded with `AutoTokenizer`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|vision_pad|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<|im_start|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tiny_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 512):
    """Train, save to `out_dir` (a new temporary folder when None) and load back the tiny tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from vstream.model.tokenizers import tiny_corpus

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(tiny_corpus() + ["You are a helpful assistant.", "user", "assistant"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=list(SPECIALS[1:]))
    tok.chat_template = CHAT_TEMPLATE
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vstream-qwen-tokenizer-"))
    tok.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    ids = loaded.convert_tokens_to_ids(list(SPECIALS))
    if ids != list(range(len(SPECIALS))) or len(loaded) != vocab_size:
        raise RuntimeError(f"the tiny Qwen tokenizer has special ids {ids} and {len(loaded)} ids, expected "
                           f"{list(range(len(SPECIALS)))} and {vocab_size}")
    return loaded
