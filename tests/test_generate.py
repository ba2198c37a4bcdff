"""Generation from embeddings: parity with `llm.generate`, stopping, incremental detokenisation, real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vstream.config import preset
from vstream.model.generate import (
    IncrementalDetokenizer,
    default_stop_ids,
    generate_text,
    iter_tokens,
    stream_generate,
)
from vstream.model.prompts import build_prompt, stop_strings, tokenizer_image_token
from vstream.model.smollm2 import CACHE_SUBDIR, default_cache_dir, load_smollm2, smollm2_path


@pytest.fixture(scope="module")
def tiny_llm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**preset("tiny").llm.to_hf())).eval()


def prompt_ids(template, question, tokenizer):
    return torch.tensor([tokenizer_image_token(build_prompt(template, question, image=False), tokenizer)])


def embed(llm, ids):
    with torch.inference_mode():
        return llm.get_input_embeddings()(ids)


def hf_greedy(llm, ids, max_new_tokens):
    out = llm.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


# ---------------------------------------------------------------- tiny random model


def test_greedy_parity_with_hf_generate(tiny_llm, tok):
    ids = prompt_ids("vicuna_v1", "What colour is the ball?", tok)
    expected = hf_greedy(tiny_llm, ids, 48)
    stops = default_stop_ids(tiny_llm, tok)
    got = list(iter_tokens(tiny_llm, embed(tiny_llm, ids), max_new_tokens=48, stop_token_ids=stops))
    assert got == expected
    text = generate_text(tiny_llm, embed(tiny_llm, ids), tok, max_new_tokens=48)
    assert text == tok.decode([t for t in expected if t != tok.eos_token_id])


def test_max_new_tokens_is_respected(tiny_llm, tok):
    emb = embed(tiny_llm, prompt_ids("vicuna_v1", "Where is the box?", tok))
    assert len(list(iter_tokens(tiny_llm, emb, max_new_tokens=7))) == 7
    assert list(iter_tokens(tiny_llm, emb, max_new_tokens=0)) == []
    assert generate_text(tiny_llm, emb, tok, max_new_tokens=0) == ""
    seven = list(iter_tokens(tiny_llm, emb, max_new_tokens=7))
    assert generate_text(tiny_llm, emb, tok, max_new_tokens=7, stop_token_ids=()) == tok.decode(seven)


def test_stop_token_id_ends_the_answer(tiny_llm, tok):
    emb = embed(tiny_llm, prompt_ids("vicuna_v1", "Where is the box?", tok))
    greedy = list(iter_tokens(tiny_llm, emb, max_new_tokens=12))
    # The first step from 3 on whose token was not produced before, so that it cannot stop earlier.
    stop_at = next(i for i, t in enumerate(greedy) if i >= 3 and greedy.index(t) == i)
    tokens = list(iter_tokens(tiny_llm, emb, max_new_tokens=12, stop_token_ids=[greedy[stop_at]]))
    assert tokens == greedy[: stop_at + 1]  # the stop id is yielded last
    text = generate_text(tiny_llm, emb, tok, max_new_tokens=12, stop_token_ids=[greedy[stop_at]])
    assert text == tok.decode(greedy[:stop_at])


def test_stop_string_ends_the_answer_and_is_not_yielded(tiny_llm, tok):
    emb = embed(tiny_llm, prompt_ids("vicuna_v1", "What colour is the ball?", tok))
    full = generate_text(tiny_llm, emb, tok, max_new_tokens=40)
    # A 3-character ASCII piece of the greedy answer, at its first occurrence, from character 5 on.
    stop = next(s for i in range(5, len(full)) if (s := full[i : i + 3]).isascii() and full.find(s) == i)
    pieces = list(stream_generate(tiny_llm, emb, tok, max_new_tokens=40, stop_strings=[stop]))
    assert "".join(pieces) == full[: full.find(stop)]
    assert all(pieces)


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(tiny_llm, tok):
    emb = embed(tiny_llm, prompt_ids("vicuna_v1", "Where is the box?", tok))
    greedy = list(iter_tokens(tiny_llm, emb, max_new_tokens=10))

    def sample(seed, **kw):
        return list(iter_tokens(tiny_llm, emb, max_new_tokens=10, generator=torch.Generator().manual_seed(seed), **kw))

    assert sample(3, temperature=1.0) == sample(3, temperature=1.0)
    assert sample(3, temperature=1.0) != greedy
    assert sample(4, temperature=1.0, top_p=1e-6) == greedy


def test_inference_mode_does_not_leak_into_the_caller(tiny_llm, tok):
    emb = embed(tiny_llm, prompt_ids("vicuna_v1", "Where is the box?", tok))
    stream = stream_generate(tiny_llm, emb, tok, max_new_tokens=10)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    stream.close()


def test_bad_arguments_name_expected_and_actual(tiny_llm, tok):
    with pytest.raises(ValueError, match=r"must be \[1, S, 64\], got \[1, 3\]"):
        list(iter_tokens(tiny_llm, torch.zeros(1, 3), max_new_tokens=2))
    emb = torch.zeros(1, 3, 64)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        list(iter_tokens(tiny_llm, emb, max_new_tokens=2, temperature=-1.0))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        list(iter_tokens(tiny_llm, emb, max_new_tokens=2, top_p=0.0))
    with pytest.raises(ValueError, match="must be torch.float32 on cpu .*, got torch.float16 on cpu"):
        list(iter_tokens(tiny_llm, emb.half(), max_new_tokens=2))


# ---------------------------------------------------------------- incremental detokenisation


def push_all(detok, ids):
    return [detok.push(i) for i in ids]


def test_multibyte_character_is_held_back_until_complete(tok):
    ids = tok("é ok", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[1:3] == ["<0xC3>", "<0xA9>"]  # byte fallback: é is two byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = push_all(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.finish() == "é ok" == tok.decode(ids)
    lone = IncrementalDetokenizer(tok)
    assert push_all(lone, tok.convert_tokens_to_ids(["▁red", "<0xC3>"])) == ["red", ""]
    assert lone.finish() == "\ufffd"  # an unfinished sequence at the end is shown, not dropped


def test_byte_run_that_turns_invalid_is_not_streamed_early(tok):
    # The decoder renders a whole byte run as "\ufffd"s once it is invalid UTF-8, changing "A" after the fact.
    ids = tok.convert_tokens_to_ids(["▁red", "<0x41>", "<0xC3>", "▁ball"])
    assert tok.decode(ids[:2]) == "redA"
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(push_all(detok, ids)) + detok.finish()
    assert streamed == tok.decode(ids) == "red\ufffd\ufffd ball"


def test_stop_string_spanning_tokens(tok):
    ids = tok("The red ball jumps up.", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, stop_strings=["ball j"])
    deltas = push_all(detok, ids[: ids.index(tok.convert_tokens_to_ids("▁jumps")) + 1])
    assert "".join(deltas) == "The red " and detok.stopped
    assert "ball" not in "".join(deltas)


# ---------------------------------------------------------------- SmolLM2 (real weights, offline)


def test_smollm2_path_and_cache(smollm2):
    assert smollm2_path().is_file()
    cache = default_cache_dir()
    assert (cache / CACHE_SUBDIR / "model.safetensors").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{CACHE_SUBDIR}-")]  # no half-written temp folder


def test_smollm2_incomplete_cache_is_refused(tmp_path):
    (tmp_path / CACHE_SUBDIR).mkdir()
    with pytest.raises(FileExistsError, match="lacks some of"):
        load_smollm2(cache_dir=tmp_path)


def test_chatml_matches_smollm2_chat_template(smollm2):
    _, tokenizer = smollm2
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert build_prompt("chatml", question, image=False) == expected


def test_smollm2_answers_paris_with_parity(smollm2):
    llm, tokenizer = smollm2
    ids = prompt_ids("chatml", "What is the capital of France?", tokenizer)
    expected = hf_greedy(llm, ids, 24)
    emb = embed(llm, ids)
    assert list(iter_tokens(llm, emb, max_new_tokens=24, stop_token_ids=default_stop_ids(llm, tokenizer))) == expected
    pieces = list(stream_generate(llm, emb, tokenizer, max_new_tokens=24, stop_strings=stop_strings("chatml")))
    answer = "".join(pieces)
    assert "Paris" in answer and len(pieces) > 1
    assert answer == tokenizer.decode(expected, skip_special_tokens=True)


def test_smollm2_multibyte_hold_back(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer("日本 é", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = push_all(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.finish() == "日本 é"
