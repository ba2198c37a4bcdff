"""The model end to end: presets, released-format loading, vstream's own format, offline answers and the CLI."""

import json
import os
import resource

import pytest
import torch
from transformers import CLIPVisionModel

from helpers import vstream_cli
import vstream
from vstream.config import preset
from vstream.model.loading import build_random, read_config, save_pretrained
from vstream.model.vlm import FlashVStream
from vstream.model.prompts import IMAGE_TOKEN_INDEX, build_prompt, tokenizer_image_token
from vstream.synth.clips import write_test_video
from vstream.testing.checkpoint import write_released_checkpoint


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=12, fps=10, seed=1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("ckpt") / "Flash-VStream-tiny", seed=3)


def run_cli(*args, limit_bytes=None):
    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return vstream_cli(*args, timeout=300, preexec_fn=limit)


@pytest.mark.slow
def test_info_reports_681_tokens_without_building_the_7b_model():
    # 6 GiB of address space: enough for Python and torch, far too little for a 7B model's weights
    out = run_cli("info", "--model", "flash-vstream-7b", "--json", limit_bytes=6 << 30)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["memory"]["max_tokens"] == 681
    assert data["memory"]["mode"] == "paper"
    assert data["version"] == vstream.__version__


def test_released_checkpoint_loads_with_every_weight(released):
    model = vstream.load(released)
    assert model.cfg.memory.mode == "official"
    assert model.cfg.memory.max_tokens == 681
    from safetensors.torch import load_file

    index = json.loads((released / "model.safetensors.index.json").read_text())
    written = {}
    for shard in set(index["weight_map"].values()):
        written.update(load_file(str(released / shard)))
    torch.testing.assert_close(model.mm_projector[2].weight, written["model.mm_projector.2.weight"].float())
    torch.testing.assert_close(model.attention_model.q_proj.bias, written["model.attention_model.q_proj.bias"].float())
    torch.testing.assert_close(model.llm.lm_head.weight, written["lm_head.weight"].float())
    torch.testing.assert_close(
        model.llm.model.layers[1].mlp.down_proj.weight, written["model.layers.1.mlp.down_proj.weight"].float()
    )
    # the truncated tower gives the full tower's hidden state at layer -2 (patch tokens)
    full = CLIPVisionModel.from_pretrained(f"{released}-clip").eval()
    full.load_state_dict(
        {k.removeprefix("model.vision_tower.vision_tower.vision_model."): v.float() for k, v in written.items()
         if k.startswith("model.vision_tower.") and not k.endswith("position_ids")}
    )
    pixels = torch.randn(2, 3, 224, 224)
    want = full(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.vision.encode(pixels), want, atol=1e-5, rtol=1e-5)


def test_released_checkpoint_as_bin_with_tower_in_its_directory(tmp_path):
    path = write_released_checkpoint(tmp_path / "ckpt-bin", fmt="bin", vision="directory", shards=1)
    model = vstream.load(path)
    assert model.vision is not None and model.cfg.vision.num_layers_used == 2


def test_missing_tensor_is_named(tmp_path):
    path = write_released_checkpoint(tmp_path / "ckpt", drop=("model.mm_projector.2.bias",))
    with pytest.raises(ValueError, match=r"missing \['model\.mm_projector\.2\.bias'\]"):
        vstream.load(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = write_released_checkpoint(tmp_path / "ckpt", extra={"model.surprise.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \['model\.surprise\.weight'\]"):
        vstream.load(path)


def test_missing_clip_layer_is_named(tmp_path):
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    path = write_released_checkpoint(tmp_path / "ckpt", drop=(key,))
    with pytest.raises(ValueError, match="encoder.layers.1.mlp.fc1.weight"):
        vstream.load(path)


def test_hub_id_without_local_tower_is_refused(tmp_path):
    path = write_released_checkpoint(tmp_path / "ckpt", vision="directory")
    cfg = json.loads((path / "config.json").read_text())
    cfg["mm_vision_tower"] = "someone/clip-not-here"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a local CLIP directory"):
        vstream.load(path)


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        vstream.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither a vstream directory"):
        vstream.load(tmp_path)


def test_prompt_splice_places_memory_at_the_image_token():
    model = build_random(preset("tiny")).eval()
    memory = torch.randn(681, model.cfg.vision.hidden_size)
    ids = tokenizer_image_token(build_prompt("vicuna_v1", "What is it?"), model.tokenizer)
    embeds = model.prompt_embeds(memory, "What is it?")
    i = ids.index(IMAGE_TOKEN_INDEX)
    assert embeds.shape == (1, len(ids) - 1 + 681, model.cfg.llm.hidden_size)
    table = model.llm.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0, :i], table[ids[:i]])
    torch.testing.assert_close(embeds[0, i : i + 681], model.mm_projector(memory))
    torch.testing.assert_close(embeds[0, i + 681 :], table[ids[i + 1 :]])


def test_answer_at_uses_only_frames_up_to_that_time(video):
    model = vstream.load("tiny")
    early = model.answer(str(video), "What is on the screen?", at=3.0)
    assert early.frames == 4 and early.spatial_times == [3.0]
    assert max(b for _, b in early.temporal_spans) <= 3.0
    full = model.answer(str(video), "What is on the screen?")
    assert full.frames == 12 and full.memory_tokens <= 681
    assert isinstance(full.text, str)


@pytest.mark.slow
def test_official_mode_offline_answer_has_the_released_token_count(video, released):
    model = vstream.load(released)
    result = model.answer(str(video), "What happens?", at=5.0)  # 6 frames -> L = 5
    assert result.memory_tokens == 64 + 17 * 5 + 64 * 3


def test_save_pretrained_roundtrip(tmp_path, video):
    model = vstream.load("tiny", seed=7)
    save_pretrained(model, tmp_path / "saved")
    again = vstream.load(tmp_path / "saved")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert read_config(tmp_path / "saved").to_dict() == model.cfg.to_dict()
    q = "What colour is the ball?"
    assert model.answer(str(video), q, at=4).text == again.answer(str(video), q, at=4).text


def test_smollm2_decoder_answers_through_the_splice(video, smollm2):
    """The real SmolLM2 as decoder: with a zeroed projector the memory tokens carry nothing, so a correct splice must
    leave the question intact and the model answers it; the whole pipeline runs from a decoded video."""
    llm, tokenizer = smollm2
    cfg = preset("tiny")
    cfg.template = "chatml"
    model = FlashVStream(cfg, llm, tokenizer, build_random(preset("tiny")).vision).eval()
    with torch.no_grad():
        for p in model.mm_projector.parameters():
            p.zero_()
    result = model.answer(str(video), "What is the capital of France?", max_new_tokens=16)
    assert result.frames == 12 and result.memory_tokens == 12 + 12 * 16 + 3 * 64 + 64  # paper mode, 12 frames
    assert "Paris" in result.text


@pytest.mark.slow
def test_cli_ask_with_released_checkpoint(video, released):
    out = run_cli("ask", str(video), "What is in the video?", "--model", str(released), "--at", "6", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["memory_mode"] == "official"
    (answer,) = data["answers"]
    assert answer["frames"] == 7 and answer["at"] == 6.0
    assert answer["memory_tokens"] == 64 + 17 * 6 + 64 * 3
    assert "text" in answer and answer["spatial_times"] == [6.0]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"this is not a video, just text\n" * 20, "not a readable video"),
        (os.urandom(4096), "not a readable video"),
    ],
)
@pytest.mark.slow
def test_cli_ask_bad_input_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "input.mp4"
    if content is not None:
        path.write_bytes(content)
    out = run_cli("ask", str(path), "What?")
    assert out.returncode == 2
    *progress, error = out.stderr.splitlines()  # the file is opened once the model has loaded, its stages shown
    assert error.startswith("error: ") and message in error
    assert all(line.startswith("demo: ") for line in progress) and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_rejects_negative_at(video):
    out = run_cli("ask", str(video), "What?", "--at", "-1")
    assert out.returncode == 2 and "--at must be" in out.stderr


def test_snapshots_in_one_pass_equal_separate_answers(video, released):
    for model in (vstream.load("tiny"), vstream.load(released)):
        snaps = list(model.memory_snapshots(str(video), [2.0, 7.5, None]))
        assert [s.frames_seen for s in snaps] == [3, 8, 12]
        for at, snap in zip([2.0, 7.5, None], snaps):
            alone = next(model.memory_snapshots(str(video), [at]))
            if model.cfg.memory.mode == "paper":  # official mode draws random numbers: compare shapes and times only
                torch.testing.assert_close(snap.tokens, alone.tokens)
            assert snap.num_tokens == alone.num_tokens and snap.spatial_times.tolist() == alone.spatial_times.tolist()
    with pytest.raises(ValueError, match="must increase"):
        next(model.memory_snapshots(str(video), [5.0, 2.0]))


@pytest.mark.slow
def test_load_turns_the_fast_path_on_when_asked_and_keeps_long_answers_on_the_eager_path():
    plain = vstream.load("tiny")
    assert plain.static_answerer is None and not plain.vision.fused  # the CPU default: the eager path
    fast = vstream.load("tiny", eager=False)
    assert fast.static_answerer is not None and fast.vision.fused
    memory = plain.memory_from_features(torch.randn(30, 256, plain.cfg.vision.hidden_size))
    question = "What is happening?"
    assert fast.answer_from(memory, question, max_new_tokens=24).text == plain.answer_from(memory, question,
                                                                                          max_new_tokens=24).text
    # an answer longer than the static cache holds runs on the eager path, with the eager path's result
    long = fast.static_answerer.decoder.max_seq_len
    assert fast.static_answerer.answer(memory.tokens, question, long) is None
    assert fast.answer_from(memory, question, max_new_tokens=long).text == plain.answer_from(memory, question,
                                                                                            max_new_tokens=long).text
