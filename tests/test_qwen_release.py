"""The authors' Flash-VStream-Qwen release layout and their LoRA adapters, with tiny random checkpoints on the CPU:
every weight checked, the memory fields honoured (or refused, naming what was expected and found), answers through the
engine equal to those of the same weights in the plain Hugging Face layout, and an adapter merged onto a base
directory weight by weight."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import httpx
import numpy as np
import pytest
import torch

import vstream
from helpers import DEADLINE_S, free_port, vstream_cli, vstream_serve, wait_ready, wait_until
from vstream.errors import ConfigError, MissingPathError
from vstream.eval.play import play
from vstream.model.loading import read_config
from vstream.model.processor import StreamProcessor
from vstream.model.qwen.adapter import merge_adapter
from vstream.model.qwen.release import RELEASE_MEMORY, release_fields
from vstream.sources import open_source
from vstream.synth.clips import write_test_video
from vstream.testing.qwen_checkpoint import hub_name, write_qwen_checkpoint
from vstream.testing.qwen_release import release_config, write_release_adapter, write_release_checkpoint

FIELDS = {"flash_memory_temporal_length": 10, "flash_memory_temporal_method": "kmeans_ordered",
          "flash_memory_temporal_poolsize": 2, "flash_memory_temporal_pca_dim": 16,
          "flash_memory_spatial_length": 4, "flash_memory_spatial_method": "klarge_retrieve"}
"""A release's memory fields other than the tiny preset's: 5 CSM clusters and 2 DAM units."""


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(directory, weights by Hub name as stored in bfloat16) of a tiny release with `FIELDS`."""
    folder = tmp_path_factory.mktemp("release")
    return folder, write_release_checkpoint(folder, memory_fields=FIELDS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(directory, weights by Hub name) of a tiny plain Qwen2-VL checkpoint: an adapter's base."""
    folder = tmp_path_factory.mktemp("base")
    return folder, write_qwen_checkpoint(folder, "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    return folder, write_release_adapter(folder, rank=4, alpha=2.0)


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(n)]


def config_only(folder, **kwargs):
    """A release directory with its config.json only (enough for `read_config`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(release_config(**kwargs)))
    return folder


def engine_answer(model, question="What is there?", n=16):
    """(the memory read, the answer's text) of a lane fed `n` frames, answered by the engine."""
    from vstream.engine.scheduler import Engine, EngineConfig

    engine = Engine(model, EngineConfig(round_every_s=0.0), thread=False)
    lane = engine.open(live=False, queue_size=n)  # no engine thread: the queue holds every frame
    for t, crop in enumerate(model.crop(frames(n, seed=7))):
        lane.put(float(t), crop)
    while lane.counters.encoded < n:
        engine.step()
    snap, request = engine.ask(lane, question, max_new_tokens=5)
    while request.state != "done":
        engine.step()
    return snap.memory, "".join(request)


# ---------------------------------------------------------------- the merged release


def test_release_directory_loads_with_every_weight_checked_and_its_memory_fields(release):
    folder, weights = release
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
        "chat_template.json", "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "flash_vstream_qwen2_vl" and config["architectures"] == ["FlashVStreamQwen2VLModel"]
    assert config["rope_scaling"]["type"] == "default" and "text_config" not in config
    assert "patch_size" not in config["vision_config"] and config["vision_config"]["flash_memory_config"] == FIELDS
    model = vstream.load(str(folder), device="cpu")
    state = model.hf.state_dict()
    assert sorted(hub_name(k) for k in state) == sorted(weights)
    assert all(torch.equal(v, weights[hub_name(k)].float()) for k, v in state.items())  # bf16 file, float32 model
    cfg = model.cfg
    assert (cfg.backbone, cfg.memory.csm_length, cfg.memory.dam_length, cfg.pca_dim) == ("qwen2_vl", 5, 2, 16)
    assert cfg.vision_hf["patch_size"] == 14 and cfg.vision_hf["hidden_act"] == "quick_gelu"  # defaults filled in
    assert cfg.max_pixels == 112 * 112 and release_fields(cfg.memory, cfg.pca_dim) == FIELDS


def test_release_answers_through_the_engine_as_the_plain_layout_of_the_same_weights(tmp_path):
    """The same float32 weights in the release layout and the Hub's plain one give the same memory and answer; the
    memory runs the release's sizes (5 CSM clusters, 2 DAM units over 8 units)."""
    write_release_checkpoint(tmp_path / "release", dtype=torch.float32, memory_fields=FIELDS)
    write_qwen_checkpoint(tmp_path / "plain", "tiny-qwen2-vl")
    released = vstream.load(str(tmp_path / "release"), device="cpu")
    plain = vstream.load(str(tmp_path / "plain"), device="cpu")
    plain.cfg.memory = copy.deepcopy(released.cfg.memory)
    read, text = engine_answer(released)
    want_read, want_text = engine_answer(plain)
    assert (read.frames_seen, read.csm_units, read.dam_units) == (16, 5, 2)
    assert read.num_tokens == (5 * read.n_small + 2 * read.n_full) // 4
    assert torch.equal(read.tokens, want_read.tokens) and text == want_text and isinstance(text, str)


def test_a_release_config_at_7b_shapes_reads_as_the_spec_s_memory(tmp_path):
    """The 7B release's config (vision section: differences only) with Qwen2-VL's preprocessor defaults: the tower's
    shapes come from the defaults, the memory from its fields, the frame budget is the release's 448 x 448."""
    folder = config_only(tmp_path / "7b", preset="flash-vstream-qwen-7b")
    vision = json.loads((folder / "config.json").read_text())["vision_config"]
    assert sorted(vision) == ["flash_memory_config", "in_chans", "model_type", "spatial_patch_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    cfg, preset = read_config(folder), read_config("flash-vstream-qwen-7b")
    assert cfg.backbone == "qwen2_vl" and cfg.feature_dim == 1280 and cfg.max_pixels == 4 * 224 * 224
    assert (cfg.memory.csm_length, cfg.memory.dam_length, cfg.pca_dim) == (60, 30, 32)
    assert cfg.max_tokens == 11520 and cfg.state_bytes() == preset.state_bytes()
    prefixed = {f"flash_memory_{k}": v for k, v in RELEASE_MEMORY.items()}
    assert release_fields(preset.memory, preset.pca_dim) == prefixed == vision["flash_memory_config"]
    (folder / "config.json").write_text(json.dumps(release_config("flash-vstream-qwen-7b", memory_fields={})))
    assert (read_config(folder).memory.csm_length, read_config(folder).pca_dim) == (60, 32)  # missing: defaults


@pytest.mark.parametrize("fields, message", [
    ({"flash_memory_temporal_method": "torchpca_kmeans_ordered"},
     "temporal_method is 'torchpca_kmeans_ordered'; vstream runs the release's 'kmeans_ordered' only"),
    ({"flash_memory_spatial_method": "sample"}, "spatial_method is 'sample'; vstream runs the release's"),
    ({"flash_memory_temporal_poolsize": 1}, "temporal_poolsize is 1; vstream runs the release's 2 only"),
    ({"flash_memory_temporal_length": 11}, r"found 11 and 60"),
    ({"flash_memory_spatial_length": 122}, r"spatial_length in \[0, temporal_length\], found 120 and 122"),
    ({"flash_memory_temporal_pca_dim": 0}, "temporal_pca_dim must be at least 1, found 0"),
    ({"flash_memory_temporal_length": "120"}, "temporal_length must be an integer, found '120'"),
    ({"flash_memory_mode": "ragged"}, r"does not know: \['flash_memory_mode'\]"),
])
def test_memory_fields_vstream_cannot_run_are_refused_naming_them(tmp_path, fields, message):
    folder = config_only(tmp_path / "bad", memory_fields=fields)
    with pytest.raises(ConfigError, match=message):
        read_config(folder)
    with pytest.raises(ConfigError, match=message):
        vstream.load(str(folder), device="cpu")


# ---------------------------------------------------------------- LoRA adapters


def test_an_adapter_merges_onto_a_base_directory_weight_by_weight(base, adapter, caplog):
    (folder, weights), (adapter_dir, factors) = base, adapter
    with caplog.at_level(logging.WARNING, logger="vstream.load"):
        model = vstream.load(str(folder), device="cpu", lora=str(adapter_dir))
    assert "['wte', 'lm_head']" in caplog.text  # listed in modules_to_save, not saved: the base's head stays
    merged = 0
    for name, value in model.hf.state_dict().items():
        hub = hub_name(name)
        module = hub.removesuffix(".weight")
        if f"{module}.lora_A" in factors:
            a, b = factors[f"{module}.lora_A"], factors[f"{module}.lora_B"]
            torch.testing.assert_close(value, weights[hub] + 0.5 * (b @ a), rtol=0, atol=1e-6)  # alpha 2 / r 4
            assert not torch.equal(value, weights[hub])
            merged += 1
        else:
            assert torch.equal(value, weights[hub]), hub
    assert merged == len(factors) // 2 == 2 * 7 + 2  # 2 layers x 7 projections, the merger's two linears
    p = StreamProcessor(model)
    p.insert([float(t) for t in range(6)], frames=frames(6, seed=2))
    snap, pieces = p.ask("What is there?", max_new_tokens=4)
    assert snap.memory.num_tokens > 0 and isinstance("".join(pieces), str)


@pytest.mark.slow
def test_ask_with_lora_answers_as_the_merged_model_and_refuses_a_model_it_cannot_merge_into(base, adapter, tmp_path):
    (folder, _), (adapter_dir, _) = base, adapter
    video = write_test_video(tmp_path / "clip.mp4", seconds=4, fps=2, size=(160, 120))
    args = ("ask", str(video), "What is there?", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "4",
            "--json")
    merged = vstream_cli(*args, "--lora", str(adapter_dir))
    plain = vstream_cli(*args)
    assert merged.returncode == plain.returncode == 0, merged.stderr + plain.stderr
    answer = json.loads(merged.stdout)["answers"][0]
    model = vstream.load(str(folder), device="cpu", lora=str(adapter_dir))
    frames, _ = open_source(str(video), fps=model.cfg.sample_fps)
    expected = next(iter(play(model, frames, [(None, "What is there?")], max_new_tokens=4))).answer
    assert answer["text"] == expected.text != json.loads(plain.stdout)["answers"][0]["text"], answer
    wrong = vstream_cli(*args[:4], "tiny", *args[5:], "--lora", str(adapter_dir))
    served = vstream_cli("serve", "--model", "tiny", "--device", "cpu", "--port", str(free_port()), "--lora",
                         str(adapter_dir))  # the adapter reaches the server's load, which refuses it before serving
    for out in (wrong, served):
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "lora= merges a LoRA adapter into a Qwen2-VL" in out.stderr


def test_an_adapter_directory_alone_names_its_base_and_lora_needs_a_qwen_model(adapter):
    adapter_dir, _ = adapter
    with pytest.raises(ConfigError, match=r"LoRA adapter .*'\./ckpt/Qwen2-VL-7B-Instruct'.*lora="):
        vstream.load(str(adapter_dir), device="cpu")
    with pytest.raises(ConfigError, match="lora= merges a LoRA adapter into a Qwen2-VL"):
        vstream.load("tiny", device="cpu", lora=str(adapter_dir))


def edit(adapter_dir, tmp_path, config=None, tensors=None):
    """A copy of the adapter with its config updated by `config` and `tensors` added to its file."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text()) | (config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(adapter_dir / "adapter_model.safetensors")) | (tensors or {}),
              str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("change, error, message", [
    ({"config": {"target_modules": ["q_proj"]}}, ConfigError, r"factors outside target_modules: \['model\.layers"),
    ({"config": {"r": 8}}, ConfigError, r"not of rank r=8"),
    ({"config": {"use_dora": True}}, ConfigError, "use_dora must be off or empty, found True"),
    ({"config": {"peft_type": "IA3"}}, ConfigError, "peft_type must be 'LORA', found 'IA3'"),
    ({"tensors": {"base_model.model.model.layers.0.mlp.up_proj.lora_embedding_A": torch.zeros(4, 8)}}, ConfigError,
     r"expected tensors named base_model\.model\.<module>\.lora_A\.weight"),
    ({"config": {"target_modules": ".*"},
      "tensors": {"base_model.model.model.layers.5.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                  "base_model.model.model.layers.5.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}}, ConfigError,
     "which the LLM does not have"),
    ({"tensors": {"base_model.model.lm_head.weight": torch.zeros(3, 3)}}, ConfigError,
     r"not at its shape: \['lm_head\.weight \(3, 3\)'\]"),
])
def test_an_adapter_that_does_not_fit_is_refused_naming_what_was_found(adapter, tmp_path, change, error, message):
    model = vstream.load("tiny-qwen2-vl", device="cpu")
    with pytest.raises(error, match=message):
        merge_adapter(model, edit(adapter[0], tmp_path, **change))


def test_an_adapter_without_its_weights_file_lists_what_it_found(adapter, tmp_path):
    (tmp_path / "adapter_config.json").write_bytes((adapter[0] / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    model = vstream.load("tiny-qwen2-vl", device="cpu")
    with pytest.raises(MissingPathError, match=r"adapter_model\.safetensors, found \['adapter_config\.json', "
                                               r"'adapter_model\.bin'\]"):
        merge_adapter(model, tmp_path)


def test_a_full_tensor_in_the_adapter_replaces_the_parameter_it_names(adapter, tmp_path):
    """What PEFT saves for a `modules_to_save` module (here the head) is copied over the base's, and no warning is
    left for it."""
    model = vstream.load("tiny-qwen2-vl", device="cpu")
    head = torch.randn_like(model.hf.lm_head.weight)
    merge_adapter(model, edit(adapter[0], tmp_path, config={"modules_to_save": ["lm_head"]},
                              tensors={"base_model.model.lm_head.weight": head}))
    assert torch.equal(model.hf.lm_head.weight, head)


@pytest.mark.slow
def test_serve_with_lora_answers_as_the_merged_model(base, adapter, tmp_path):
    """`vstream serve --lora`: a file stream played to its end and asked over the OpenAI API gets the answer the
    merged model gives offline over the same frames, which is not the base model's."""
    (folder, _), (adapter_dir, _) = base, adapter
    video = write_test_video(tmp_path / "clip.mp4", seconds=4, fps=2, size=(160, 120))
    question = "What is there?"
    answers = {}
    for name, lora in (("merged", str(adapter_dir)), ("base", None)):
        model = vstream.load(str(folder), device="cpu", lora=lora)
        frames, _ = open_source(str(video), fps=model.cfg.sample_fps)
        answers[name] = next(iter(play(model, frames, [(None, question)], max_new_tokens=4))).answer.text
    assert answers["merged"] != answers["base"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = vstream_serve("--model", str(folder), "--lora", str(adapter_dir), "--device", "cpu", "--port", str(port),
                         "--media-root", str(tmp_path), "--drain-seconds", "0")
    try:
        wait_ready(proc, base_url)
        with httpx.Client(base_url=base_url, timeout=DEADLINE_S) as client:
            made = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}})
            assert made.status_code == 201, made.text
            sid = made.json()["id"]
            wait_until(lambda: client.get(f"/v1/streams/{sid}").json()["state"] == "finished",
                       "the file stream played to its end")
            done = client.post("/v1/chat/completions", json={
                "model": sid, "messages": [{"role": "user", "content": question}], "max_tokens": 4})
            assert done.status_code == 200, done.text
            assert done.json()["choices"][0]["message"]["content"] == answers["merged"]
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


@pytest.mark.slow
def test_eval_with_lora_predicts_as_the_merged_model(base, adapter, tmp_path):
    """An eval run with `lora` loads the adapter onto its model directory: its predictions are the merged model's,
    not the base model's."""
    from vstream.eval.datasets import load_benchmark
    from vstream.eval.runner import RunConfig, run_predictions

    (folder, _), (adapter_dir, _) = base, adapter
    (tmp_path / "videos").mkdir()
    write_test_video(tmp_path / "videos" / "v0.mp4", seconds=4, fps=2, size=(160, 120))
    records = [{"video_id": "v0", "question": "What is there?", "id": f"q{t}", "answer": "a square",
                **({"time": t} if t else {})} for t in (2, None)]
    (tmp_path / "test_qa.json").write_text(json.dumps(records))
    bench = load_benchmark("open", tmp_path)
    cfg = RunConfig(benchmark="open", mode="offline", model=str(folder), max_new_tokens=4, lora=str(adapter_dir))
    loaded = run_predictions(bench, cfg, tmp_path / "lora")  # the runner loads the model and its adapter
    merged = run_predictions(bench, cfg, tmp_path / "merged",
                             model=vstream.load(str(folder), device="cpu", lora=str(adapter_dir)))
    plain = run_predictions(bench, dataclasses.replace(cfg, lora=None), tmp_path / "plain")
    preds = [{r["id"]: r["pred"] for r in records} for records in (loaded, merged, plain)]
    assert preds[0] == preds[1] != preds[2] and set(preds[0]) == {"q2", "qNone"}
