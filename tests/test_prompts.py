"""Templates, the Vicuna-style tokenizer, chunk-wise prompt tokenisation and training-example masking."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vstream.config import preset
from vstream.model.prompts import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    build_prompt,
    build_training_example,
    stop_strings,
    tokenizer_image_token,
)
from vstream.model.tokenizers import build_vicuna_style_tokenizer, load_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)


def plain_ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- templates


def test_vicuna_prompt_is_the_official_text():
    prompt = build_prompt("vicuna_v1", "What colour is the ball?")
    assert prompt == SYSTEM + " USER: <image>\nWhat colour is the ball? ASSISTANT:"


def test_vicuna_history_and_system_extra():
    prompt = build_prompt("vicuna_v1", "And now?", system_extra="Be brief.", history=[("Where is it?", "On the left.")])
    assert prompt == (
        SYSTEM + " Be brief. USER: <image>\nWhere is it? ASSISTANT: On the left.</s>USER: And now? ASSISTANT:"
    )


def test_image_token_is_moved_to_the_front_of_the_first_turn():
    moved = build_prompt("vicuna_v1", "What colour is the ball?\n<image>")
    assert moved == build_prompt("vicuna_v1", "What colour is the ball?")
    with pytest.raises(ValueError, match="first user turn"):
        build_prompt("vicuna_v1", "again <image>", history=[("q", "a")])


def test_prompt_without_image():
    assert build_prompt("vicuna_v1", "Hi?", image=False) == SYSTEM + " USER: Hi? ASSISTANT:"


def test_chatml_prompt():
    prompt = build_prompt("chatml", "What is shown?", system_extra="Answer briefly.")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face Answer briefly."
        "<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_history = build_prompt("chatml", "Q2", history=[("Q1", "A1")], image=False)
    tail = "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    assert with_history.endswith(tail)
    assert stop_strings("chatml") == ("<|im_end|>",)


def test_plain_prompt_is_the_image_alone():
    assert build_prompt("plain", "") == "<image>"
    assert stop_strings("plain") == ("\n",)
    with pytest.raises(ValueError, match="takes only the image"):
        build_prompt("plain", "Describe the video.")
    with pytest.raises(ValueError, match="no system prompt"):
        build_prompt("plain", "", system_extra="x")


def test_unknown_template_lists_known_ones():
    with pytest.raises(KeyError, match="chatml.*plain.*vicuna_v1"):
        build_prompt("llama_2", "q")
    with pytest.raises(KeyError):
        stop_strings("nope")


def test_templates_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEMPLATES["vicuna_v1"].system = "x"


# ---------------------------------------------------------------- Vicuna-style tokenizer


def test_vicuna_style_tokenizer_files_and_settings(tok, tmp_path):
    folder = tmp_path / "tk"
    again = build_vicuna_style_tokenizer(folder)
    assert {p.name for p in folder.iterdir()} == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["pad_token"] is None
    assert len(again) == len(tok) <= preset("tiny").llm.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.padding_side == "right" and tok.model_max_length == 2048
    # Deterministic training: the same model file every time.
    build_vicuna_style_tokenizer(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()


def test_vicuna_style_tokenizer_round_trips_text(tok):
    for text in ["The red ball jumps up.", "USER: What colour? ASSISTANT: é 日本 42"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_newline_chunk_starts_with_prefix_space_then_byte(tok):
    # Like Vicuna's [29871, 13]: the dummy-prefix "▁" alone, then the byte-fallback newline.
    tokens = tok.convert_ids_to_tokens(tok("\nWhat colour is the ball?").input_ids)
    assert tokens[:3] == ["<s>", "▁", "<0x0A>"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="none of the tokenizer files.*weights.bin"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- tokenizer_image_token


def test_tokenizer_image_token_one_image(tok):
    prompt = build_prompt("vicuna_v1", "What colour is the ball?")
    before, after = prompt.split("<image>")
    ids = tokenizer_image_token(prompt, tok)
    expected = [tok.bos_token_id, *plain_ids(tok, before), IMAGE_TOKEN_INDEX, *plain_ids(tok, after)]
    assert ids == expected
    assert ids.count(tok.bos_token_id) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[at + 1 : at + 3]) == ["▁", "<0x0A>"]
    assert at == len(tok(before).input_ids)


def test_tokenizer_image_token_zero_and_two_images(tok):
    text = "A red ball."
    assert tokenizer_image_token(text, tok) == tok(text).input_ids
    ids = tokenizer_image_token("<image>\nfirst<image>\nsecond", tok)
    expected = [
        tok.bos_token_id,
        IMAGE_TOKEN_INDEX,
        *plain_ids(tok, "\nfirst"),
        IMAGE_TOKEN_INDEX,
        *plain_ids(tok, "\nsecond"),
    ]
    assert ids == expected
    assert tokenizer_image_token("<image>", tok) == [tok.bos_token_id, IMAGE_TOKEN_INDEX]


# ---------------------------------------------------------------- training examples


def conversation(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def supervised(ids, labels):
    return [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]


def test_vicuna_masking_one_turn(tok):
    ids, labels = build_training_example("vicuna_v1", conversation("<image>\nWhat colour is it?", "It is red."), tok)
    prompt = build_prompt("vicuna_v1", "What colour is it?")
    n_prompt = len(tokenizer_image_token(prompt, tok))
    assert ids == tokenizer_image_token(prompt + " It is red.</s>", tok)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    # The official rule: instruction = len(tok("...ASSISTANT: ")) - 2 tokens after the BOS.
    official_instruction = len(tokenizer_image_token(prompt + " ", tok)) - 2
    assert n_prompt == 1 + official_instruction


def test_vicuna_masking_two_turns(tok):
    conv = conversation("What colour is the ball?\n<image>", "The ball is red.", "Does it move?", "Yes, it jumps up.")
    ids, labels = build_training_example("vicuna_v1", conv, tok)
    assert len(ids) == len(labels) and IMAGE_TOKEN_INDEX in ids
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX and labels[0] == IGNORE_INDEX
    assert tok.decode(supervised(ids, labels)) == "The ball is red.</s> Yes, it jumps up.</s>"
    second_question = tokenizer_image_token(
        build_prompt("vicuna_v1", "Does it move?", history=[("What colour is the ball?", "The ball is red.")]), tok
    )
    assert ids[: len(second_question)] == second_question
    assert labels[len(second_question) :] == ids[len(second_question) :]


def test_plain_masks_the_image_part(tok):
    ids, labels = build_training_example("plain", conversation("<image>\nDescribe the video.", "A red ball."), tok)
    assert ids == [tok.bos_token_id, IMAGE_TOKEN_INDEX, *plain_ids(tok, "A red ball.\n")]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]
    with pytest.raises(ValueError, match="needs '<image>'"):
        build_training_example("plain", conversation("Describe.", "A red ball."), tok)


def test_mismatch_masks_the_whole_sample(tok):
    # A template whose answer glues onto the instruction ("th" + "e" -> "▁the"), so the pieces do not split cleanly.
    glued = dataclasses.replace(TEMPLATES["vicuna_v1"], assistant_prefix="ASSISTANT: th", answer_format="e {text}</s>")
    with pytest.warns(UserWarning, match="tokenization mismatch"):
        ids, labels = build_training_example(glued, conversation("Which ball?", "ball is red."), tok)
    assert labels == [IGNORE_INDEX] * len(ids)


def test_training_conversation_errors(tok):
    with pytest.raises(ValueError, match="even, non-zero"):
        build_training_example("vicuna_v1", conversation("q"), tok)
    bad_roles = [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]
    with pytest.raises(ValueError, match=r"\('human', 'gpt'\), got \('gpt', 'human'\)"):
        build_training_example("vicuna_v1", bad_roles, tok)


def test_splice_puts_the_memory_in_the_placeholders_place_and_names_both_counts():
    import torch

    from vstream.model.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from vstream.model.splice import splice

    embed = torch.nn.Embedding(10, 4)
    memory = torch.randn(3, 4)
    ids = [1, 2, IMAGE_TOKEN_INDEX, 5]
    out = splice(ids, embed, memory)
    expected = torch.cat([embed(torch.tensor([1, 2])), memory, embed(torch.tensor([5]))])
    assert torch.equal(out, expected)
    out, labels = splice(torch.tensor(ids), embed, memory, labels=torch.tensor([7, 8, 9, 6]))
    assert torch.equal(out, expected) and labels.tolist() == [7, 8, *[IGNORE_INDEX] * 3, 6]
    with pytest.raises(ValueError, match="holds 2 <image> placeholders for the memory's 3 tokens"):
        splice([IMAGE_TOKEN_INDEX, 1, IMAGE_TOKEN_INDEX], embed, memory)
    with pytest.raises(ValueError, match="holds 0 <image> placeholders"):
        splice([1, 2], embed, memory)
    with pytest.raises(ValueError, match=r"must be \[N, 4\].*got \[3, 5\]"):
        splice(ids, embed, torch.randn(3, 5))
