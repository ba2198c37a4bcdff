"""Random-weight presets show text for every token: their stand-in tokenizer decodes each id a random model can sample
(all but unk, bos and eos) to visible text, alone and through the incremental detokenizer that answers stream through,
so a client sees a piece for each generated token, the first one included."""

from __future__ import annotations

import pytest
import torch

import vstream
from vstream.config import preset
from vstream.model.generate import IncrementalDetokenizer, default_stop_ids, iter_tokens
from vstream.model.loading import build_random
from vstream.model.prompts import stop_strings
from vstream.model.tokenizers import build_tiny_tokenizer, load_tokenizer

QUESTION = "What colour is the ball?"


@pytest.fixture(scope="module")
def tiny():
    return vstream.load("tiny", device="cpu")


@pytest.fixture(scope="module")
def tokenizer_7b():
    return build_tiny_tokenizer(vocab_size=preset("flash-vstream-7b").llm.vocab_size)


def assert_every_sampleable_id_shows_text(tokenizer, vocab_size: int, template: str) -> None:
    assert len(tokenizer) == vocab_size
    special = set(tokenizer.all_special_ids)
    sampleable = [i for i in range(vocab_size) if i not in special]
    assert len(sampleable) == vocab_size - 3  # unk, bos, eos (pad is unk)
    blank, whitespace, unstreamed = [], set(), []
    for i in sampleable:
        text = tokenizer.decode([i])
        if not text or "\ufffd" in text:
            blank.append((i, text))
        elif not text.strip():
            whitespace.add(text)
        # as the first token of an answer, then after a token (itself: a random model often repeats one)
        detok = IncrementalDetokenizer(tokenizer, stop_strings(template))
        if not (detok.push(i) and detok.push(i)):
            unstreamed.append(i)
    assert blank == [] and unstreamed == []
    assert whitespace == {" ", "\n"}  # the space and newline pieces: shown, though not visible


def test_every_sampleable_id_of_the_tiny_preset_shows_text(tiny):
    assert_every_sampleable_id_shows_text(tiny.tokenizer, tiny.cfg.llm.vocab_size, tiny.cfg.template)


def test_every_sampleable_id_of_the_7b_stand_in_shows_text(tokenizer_7b):
    cfg = preset("flash-vstream-7b")
    assert_every_sampleable_id_shows_text(tokenizer_7b, cfg.llm.vocab_size, cfg.template)


def test_the_7b_stand_in_tokenises_text_as_the_tiny_one_does(tiny, tokenizer_7b):
    # The trained pieces are the same; the 7B's extra ids are made-up words after them.
    assert tokenizer_7b.convert_ids_to_tokens(range(512)) == tiny.tokenizer.convert_ids_to_tokens(range(512))
    prompt = "A chat between a curious user and an artificial intelligence assistant. USER: \nWhat is it? ASSISTANT:"
    assert tokenizer_7b(prompt).input_ids == tiny.tokenizer(prompt).input_ids


def test_the_random_7b_preset_gets_a_tokenizer_for_its_whole_vocabulary():
    with torch.device("meta"):  # shapes only: no 7B weights are made
        model = build_random(preset("flash-vstream-7b"))
    assert len(model.tokenizer) == model.cfg.llm.vocab_size


def test_the_stand_in_is_deterministic_and_round_trips_ascii(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path / "a", vocab_size=1000)
    build_tiny_tokenizer(tmp_path / "b", vocab_size=1000)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 0)
    text = "USER: What colour is the ball?\nASSISTANT: It's red, #42 {x} ~ [y] & (z)!"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path / "saved")  # as a random model's save_pretrained writes it
    again = load_tokenizer(tmp_path / "saved")
    assert [again.decode([i]) for i in range(3, 1000)] == [tokenizer.decode([i]) for i in range(3, 1000)]


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (1.0, 1), (1.0, 2)])
def test_a_random_tiny_model_streams_a_piece_for_every_token(tiny, temperature, seed):
    torch.manual_seed(seed)
    memory = tiny.new_memory()
    grid, dim = tiny.cfg.vision.grid, tiny.cfg.vision.hidden_size
    for t in range(4):
        memory.update(torch.randn(1, grid * grid, dim), torch.tensor([float(t)], dtype=torch.float64))
    snapshot = memory.read()
    torch.manual_seed(seed)  # sampling draws from the global generator
    pieces = list(tiny.stream_answer(snapshot, QUESTION, temperature=temperature))
    # the same tokens again, without text
    with torch.inference_mode():
        embeds = tiny.prompt_embeds(snapshot.tokens, QUESTION)
    stops = default_stop_ids(tiny.llm, tiny.tokenizer)
    torch.manual_seed(seed)
    tokens = list(iter_tokens(tiny.llm, embeds, max_new_tokens=tiny.cfg.max_new_tokens, stop_token_ids=stops,
                              temperature=temperature))
    shown = [t for t in tokens if t not in stops]
    assert shown, f"the answer stopped at once: {tokens}"
    assert pieces == [tiny.tokenizer.decode([t]) for t in shown]
    assert all(piece.strip() or piece in (" ", "\n") for piece in pieces)
