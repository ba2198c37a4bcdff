"""Flash-VStream-Qwen on the CPU with tiny random Qwen2-VL / Qwen2.5-VL checkpoints in the Hugging Face layout:
preprocessing against transformers' own image processor, loading with every weight checked, the tower's pre-merger
features against transformers' merged output, prompts and AM-RoPE positions, decoding against an uncached reference,
and the real entry points (`vstream info`, `vstream ask`, the HTTP server)."""

from __future__ import annotations

import json
import re
import warnings

import httpx
import numpy as np
import pytest
import torch

import vstream
from helpers import (AUTH, DEADLINE_S, KEY, free_port, running_server, vstream_cli, vstream_serve, wait_frames,
                     wait_ready)
from vstream.encoder.qwen_preprocess import normalise_frames, patchify_units, resize_frames, small_pass
from vstream.model.processor import StreamProcessor
from vstream.errors import ConfigError
from vstream.memory.flash import FlashMemoryConfig, am_rope_positions
from vstream.model.prompts import prompt_parts
from vstream.synth.clips import write_test_video
from vstream.testing.qwen_checkpoint import hub_name, write_qwen_checkpoint

BACKBONES = {"qwen2_5_vl": "tiny-qwen2.5-vl", "qwen2_vl": "tiny-qwen2-vl"}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def checkpoint(request, tmp_path_factory):
    """(directory, weights by Hub name) of a tiny checkpoint written in the Hub layout."""
    folder = tmp_path_factory.mktemp(request.param)
    return folder, write_qwen_checkpoint(folder, BACKBONES[request.param])


@pytest.fixture(scope="module")
def qwen(checkpoint):
    return vstream.load(str(checkpoint[0]), device="cpu", memory_mode="flash")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_test_video(tmp_path_factory.mktemp("qwen-media") / "clip.mp4", seconds=8, fps=2, size=(160, 120))


def frames(n, size=(120, 160), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(240, 320), (448, 448), (360, 640), (100, 57), (1080, 1920)])
def test_preprocessing_equals_the_hf_image_processor_bit_for_bit(size):
    """A still image is a unit of one frame twice: resize, rescale, normalise and patch order must match exactly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        hf = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=4 * 224 * 224)
    (frame,) = frames(1, size)
    want = hf(images=[frame], return_tensors="pt")
    x = normalise_frames(torch.from_numpy(resize_frames([frame])))
    got = patchify_units(torch.cat([x, x]))
    assert want["image_grid_thw"].tolist() == [[1, x.shape[2] // 14, x.shape[3] // 14]]
    assert torch.equal(got, want["pixel_values"])


def test_patches_of_two_frames_follow_the_tower_layout_literally():
    """Patch (unit, gh, gw) holds (channel, frame, row, column) pixels; patches of one LLM token are consecutive."""
    x = torch.randn(4, 3, 56, 84)  # two units of 4 x 6 patches
    p = patchify_units(x)
    assert p.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    order = [(u, bh * 2 + i, bw * 2 + j) for u in range(2) for bh in range(2) for bw in range(3)
             for i in range(2) for j in range(2)]
    for k, (u, r, c) in enumerate(order):
        want = x[2 * u : 2 * u + 2, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].permute(1, 0, 2, 3)
        assert torch.equal(p[k], want.reshape(-1))


def test_small_pass_pools_and_crops_to_whole_tokens():
    x = torch.randn(2, 3, 336, 588)
    s = small_pass(x)
    assert s.shape == (2, 3, 168, 280)  # 294 -> 280: the centre 10 blocks of 28
    assert torch.allclose(s[0, 0, 0, 0], x[0, 0, :2, 14:16].mean())
    with pytest.raises(ValueError, match="smaller than one 28x28 block"):
        small_pass(torch.randn(1, 3, 28, 28))


# ---------------------------------------------------------------- loading


def test_checkpoint_in_hub_layout_loads_with_every_weight_checked(checkpoint, qwen):
    folder, weights = checkpoint
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    config = json.loads((folder / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"  # the Hub's flat form
    assert any(k.startswith("visual.blocks.0.") for k in weights) and "model.embed_tokens.weight" in weights
    state = qwen.hf.state_dict()
    assert sorted(hub_name(k) for k in state) == sorted(weights)
    assert all(torch.equal(v, weights[hub_name(k)]) for k, v in state.items())
    assert qwen.cfg.backbone == config["model_type"] and qwen.cfg.max_pixels == 112 * 112


def test_a_missing_weight_is_an_error_naming_it(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = checkpoint
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = tmp_path / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="missing_keys"):
        vstream.load(str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="memory_mode must be 'flash'"):
        vstream.load(str(folder), device="cpu", memory_mode="paper")


# ---------------------------------------------------------------- tower, memory, prompt, decoding


def test_pre_merger_features_merge_to_the_towers_own_output(qwen):
    """The memory keeps pre-merger features in patch order; merging them gives what the HF tower outputs."""
    pair = normalise_frames(torch.from_numpy(resize_frames(frames(2, seed=1))))
    small_px = small_pass(pair)
    small, full = qwen.tower.features(pair, small_px)
    visual = qwen.hf.model.visual
    for px, feats in ((pair, full), (small_px, small)):
        grid = torch.tensor([[1, px.shape[2] // 14, px.shape[3] // 14]])
        with torch.no_grad():
            want = visual(patchify_units(px), grid_thw=grid).pooler_output
            got = visual.merger(feats[0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_towers_batched_attention_equals_its_own_forward_in_fewer_calls(qwen, monkeypatch):
    """The tower's attention batched over runs of equal windows and frames (`vision_attention`, installed at load)
    gives transformers' own per-sequence forward's features, with frames of several windows and two frame sizes (the
    two passes) in one call, in fewer attention calls."""
    rng = torch.Generator().manual_seed(3)
    full = torch.randn(6, 3, 224, 336, generator=rng)
    small = small_pass(full)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[0]) or sdpa(*a, **k))
    batched = qwen.tower.features(full, small)
    n_batched, calls[:] = len(calls), []
    blocks = qwen.hf.model.visual.blocks
    forwards = [block.attn.__dict__.pop("forward") for block in blocks]  # transformers' own forward
    try:
        own = qwen.tower.features(full, small)
    finally:
        for block, forward in zip(blocks, forwards):
            block.attn.forward = forward
    assert 0 < n_batched < len(calls) and max(calls) == 1  # its own: one sequence a call
    for got, want in zip(batched, own):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_stream_memory_is_bounded_and_cites_unit_times(qwen):
    """A directory's model runs the spec's 60 + 30 units; a smaller memory here so that 20 units are clustered."""
    qwen.cfg.memory = FlashMemoryConfig(csm_length=6, dam_length=3)
    p = StreamProcessor(qwen)
    p.insert([0.0], frames=frames(1))
    size = p.nbytes
    assert p.snapshot().memory.num_tokens == 0  # a frame waiting for its pair is not in the memory yet
    for start in range(1, 41, 8):
        p.insert([float(t) for t in range(start, start + 8)], frames=frames(8, seed=start))
        assert p.nbytes == size
    read = p.snapshot().memory
    cfg = qwen.cfg.memory
    assert read.frames_seen == 41 and read.csm_units == cfg.csm_length and read.dam_units == cfg.dam_length
    assert read.num_tokens == (6 * read.n_small + 3 * read.n_full) // 4 == p.memory.max_tokens
    assert all(t % 2 == 0 for t in read.retrieved_times.tolist())  # a unit's time is its first frame's
    assert float(read.temporal_weights.sum()) == 20  # 40 paired frames = 20 units
    with pytest.raises(ValueError, match="frames must keep one size: expected 84x112, got 112x112"):
        p.insert([50.0], frames=frames(1, size=(200, 200)))


def test_units_of_several_streams_go_through_the_tower_together_and_equal_each_stream_alone(qwen):
    """Memories sharing a `UnitBatcher` (as the engine's streams do): a round of frames from three streams of two
    frame sizes is encoded in one tower call per size when the memories are read, and every memory then equals one
    fed alone; a stream whose units fail to encode gets the error at its next read, the others go on."""
    from vstream.model.processor import publish_snapshots

    batcher = qwen.unit_batcher()

    def batched():
        memory = qwen.new_memory()
        memory.batcher = batcher
        return memory

    sizes = [(120, 160), (120, 160), (90, 160)]
    together = [StreamProcessor(qwen, new_memory=batched) for _ in sizes]
    alone = [StreamProcessor(qwen) for _ in sizes]
    rounds = 5
    for r in range(rounds):
        times = [float(4 * r + k) for k in range(4)]
        for i, size in enumerate(sizes):
            pictures = frames(4, size=size, seed=10 * i + r)
            together[i].insert(times, frames=pictures, publish=False)
            alone[i].insert(times, frames=pictures)
        publish_snapshots(together)
    assert batcher.units == rounds * 2 * len(sizes) and batcher.calls == rounds * 2  # per round: one call per size
    for mine, its in zip(together, alone):
        a, b = mine.snapshot().memory, its.snapshot().memory
        assert a.frames_seen == b.frames_seen == 4 * rounds and a.counts == b.counts
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.temporal_spans, b.temporal_spans)

    tower, calls = batcher.tower, []
    real = tower.features

    def failing(full, small):  # a unit of blank frames (each channel constant) fails to encode
        calls.append(full.shape[0])
        if any(bool((unit == unit[:, :, :1, :1]).all()) for unit in full.view(-1, 2, *full.shape[1:])):
            raise RuntimeError("bad unit")
        return real(full, small)

    tower.features = failing
    try:
        bad = np.zeros((120, 160, 3), np.uint8)
        for i, pictures in enumerate(([bad, bad], frames(2, seed=7))):
            together[i].insert([100.0, 101.0], frames=pictures, publish=False)
        for _ in range(2):  # at every read: the stream lost units, its lane ends with the error
            with pytest.raises(RuntimeError, match="encoding this stream's frames failed: bad unit"):
                together[0].memory.read()
        assert together[1].memory.read().frames_seen == 4 * rounds + 2 and calls == [4, 2, 2]
    finally:
        tower.features = real


def test_prompt_splices_the_merged_memory_at_am_rope_positions(qwen):
    p = StreamProcessor(qwen)
    p.insert([float(t) for t in range(20)], frames=frames(20, seed=3))
    read = p.snapshot().memory
    embeds, pos = qwen.prompt(read, "What is there?")
    before, after = prompt_parts(qwen.cfg.template, "What is there?", qwen.tokenizer)
    n = read.num_tokens
    assert embeds.shape[1] == pos.shape[2] == len(before) + n + len(after)
    grids = read.extra["grids"]
    mem = am_rope_positions(read, grids["small"], grids["full"], qwen.cfg.seconds_scale, len(before)).float()
    assert torch.equal(pos[:, 0, len(before) : len(before) + n], mem)
    assert torch.equal(pos[:, 0, : len(before)], torch.arange(len(before)).float().expand(3, -1))
    assert torch.equal(pos[:, 0, len(before) + n :], mem.max() + 1 + torch.arange(len(after)).float().expand(3, -1))
    merged = qwen.hf.model.visual.merger(read.tokens)
    torch.testing.assert_close(embeds[0, len(before) : len(before) + n], merged)
    scale = 2.0 if qwen.cfg.backbone == "qwen2_5_vl" else 0.5  # tokens per second; Qwen2-VL: units per second
    assert pos[0, 0, len(before)].item() == pytest.approx(len(before) + scale * read.retrieved_times[0].item())


def test_cached_decoding_equals_an_uncached_reference(qwen):
    """Greedy tokens of the model's cached loop = argmax of a full forward over prompt + tokens so far, each at the
    next position (the slow literal decode)."""
    p = StreamProcessor(qwen)
    p.insert([float(t) for t in range(12)], frames=frames(12, seed=4))
    embeds, pos = qwen.prompt(p.snapshot().memory, "Describe it.")
    got = list(qwen.iter_tokens(embeds, pos, max_new_tokens=6, stop=set()))
    want, e, q = [], embeds, pos
    text, table = qwen.hf.model.language_model, qwen.hf.get_input_embeddings()
    with torch.no_grad():
        for _ in range(6):
            hidden = text(inputs_embeds=e, position_ids=q).last_hidden_state
            token = int(qwen.hf.lm_head(hidden[:, -1]).argmax())
            want.append(token)
            e = torch.cat([e, table(torch.tensor([[token]]))], dim=1)
            q = torch.cat([q, q[:, :, -1:] + 1], dim=2)
    assert got == want


# ---------------------------------------------------------------- entry points


def test_info_reports_the_token_budget_and_state_bytes():
    out = vstream_cli("info", "--model", "flash-vstream-qwen-7b", "--json")
    assert out.returncode == 0, out.stderr
    memory = json.loads(out.stdout)["memory"]
    assert memory["max_tokens"] == 11520 and memory["mode"] == "flash"
    c, bf16 = 1280, 2  # pre-merger width, bytes per value
    tensors = (60 * 256 + 61 * 256 + 61 * 1024) * c * bf16  # centroids, pooled small and full features of 61 units
    small = 60 * 4 + 60 * 3 * 8 + 61 * 8 + 60 * 8 + 8  # weights, spans, pool times, representative slots, free slot
    assert memory["state_bytes"] == tensors + small == 239_209_056


def test_info_of_a_checkpoint_directory_reads_its_pixel_budget(checkpoint):
    out = vstream_cli("info", "--model", str(checkpoint[0]), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["memory"]["max_tokens"] == 60 * 4 + 30 * 16  # spec's units, 112 x 112 frames


def test_ask_answers_through_the_cli(checkpoint, clip):
    out = vstream_cli("ask", str(clip), "What is there?", "And at the start?", "--at", "7", "--at", "3",
                      "--model", str(checkpoint[0]), "--max-new-tokens", "4", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["memory_mode"] == "flash"
    late, early = doc["answers"]
    assert late["frames"] == 8 and early["frames"] == 4  # 1 frame per second: 0..7 s and 0..3 s
    assert late["memory_tokens"] > early["memory_tokens"] > 0 and isinstance(late["text"], str)
    assert max(early["retrieved_times"]) <= 3.0 and max(b for _, b in late["temporal_spans"]) <= 7.0


def test_server_answers_from_a_qwen_stream(qwen, clip):
    from vstream.server import create_app

    app = create_app(qwen, media_root=clip.parent, api_key=KEY, max_streams=2)
    with running_server(app) as base, httpx.Client(base_url=base, headers=AUTH,
                                                   timeout=DEADLINE_S) as client:
        r = client.post("/v1/streams", json={"source": {"type": "file", "path": clip.name}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        view = wait_frames(client, sid, 8)
        assert view["stats"]["memory_tokens"] > 0
        body = {"model": sid, "messages": [{"role": "user", "content": "What is on screen?"}], "max_tokens": 3}
        done = client.post("/v1/chat/completions", json=body)
        assert done.status_code == 200, done.text
        answer = done.json()
        assert answer["usage"]["completion_tokens"] <= 3 and answer["vstream"]["frames"] == 8
        assert answer["vstream"]["retrieved_times"] and answer["vstream"]["spatial_times"] == []
        view = client.get(f"/v1/streams/{sid}/memory").json()  # the memory view: CSM clusters and DAM units
        assert view["tokens"]["total"] == view["tokens"]["retrieved"] + view["tokens"]["temporal"] > 0
        assert [f["time"] for f in view["retrieved"]] == answer["vstream"]["retrieved_times"]
        assert sum(c["weight"] for c in view["temporal"]) == 4 and view["bytes"] > 0  # 8 frames = 4 units
        metrics = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines()
                       if line.startswith("vstream:engine_tower"))  # the units went through the engine's batcher
        units, calls = (float(metrics[f"vstream:engine_tower_{k}_total"]) for k in ("units", "calls"))
        assert units >= 4 and 1 <= calls <= units


def test_answers_from_the_cached_memory_prefix_equal_a_fresh_prefill(qwen):
    """The point-5 design: the memory's KV computed once per snapshot; each question prefills only its own tokens and
    gets the tokens a fresh prefill of the whole prompt gives; the cache returns to the prefix after each answer."""
    from vstream.model.qwen.prefix import MemoryPrefix

    p = StreamProcessor(qwen)
    p.insert([float(t) for t in range(14)], frames=frames(14, seed=5))
    read = p.snapshot().memory
    prefix = MemoryPrefix(qwen)
    prefix.refresh(read)
    assert prefix.length == len(prompt_parts(qwen.cfg.template, "?", qwen.tokenizer)[0]) + read.num_tokens + 1
    for question in ("What is there?", "What moved at the start?"):
        embeds, pos = qwen.prompt(read, question)
        want = list(qwen.iter_tokens(embeds, pos, max_new_tokens=5, stop=set()))
        assert list(prefix.iter_tokens(question, max_new_tokens=5, stop=set())) == want
        assert prefix.cache.get_seq_length() == prefix.length


@pytest.mark.slow
def test_run_answers_questions_from_stdin_with_a_qwen_model(checkpoint, clip):
    out = vstream_cli("run", str(clip), "--model", str(checkpoint[0]), "--device", "cpu", "--speed", "8",
                      "--max-new-tokens", "3", stdin="What is there?\n")
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("[")]) == 1
    last_status = out.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"\[stream +([\d.]+)s \| frames 8 encoded (\d+) dropped (\d+) \| memory (\d+) tokens\]",
                         last_status)
    assert match, last_status
    assert int(match[2]) + int(match[3]) == 8 and 0 < int(match[4]) <= 60 * 4 + 30 * 16


@pytest.mark.slow
def test_vstream_serve_answers_from_a_qwen_checkpoint(checkpoint, clip):
    """`vstream serve --model DIR` in its own process: warm-up, a file stream, a chat completion over HTTP."""
    port = free_port()
    proc = vstream_serve("--model", str(checkpoint[0]), "--port", str(port), "--media-root", str(clip.parent),
                         "--api-key", KEY, "--device", "cpu", "--drain-seconds", "0")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, timeout=120)
        with httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as client:
            r = client.post("/v1/streams", json={"source": {"type": "file", "path": clip.name}})
            assert r.status_code == 201, r.text
            wait_frames(client, r.json()["id"], 8)
            body = {"model": r.json()["id"], "messages": [{"role": "user", "content": "What is it?"}], "max_tokens": 2}
            done = client.post("/v1/chat/completions", json=body)
            assert done.status_code == 200, done.text
            assert done.json()["vstream"]["frames"] == 8 and done.json()["vstream"]["retrieved_times"]
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


def test_engine_prepares_the_memory_prefix_after_a_round_and_answers_from_it(checkpoint):
    """With the prefix cache on, the engine prefills each new snapshot's memory prefix after its round; a question
    then takes the prefix's keys and values into its answer slot and prefills only its own tokens, and its answer
    equals the fresh prefill's."""
    from vstream.engine.scheduler import Engine, EngineConfig

    model = vstream.load(str(checkpoint[0]), device="cpu").enable_prefix_cache(slots=2)
    engine = Engine(model, EngineConfig(round_every_s=0.0), thread=False)
    assert engine.batched
    lane = engine.open(live=False)
    for t, crop in enumerate(model.crop(frames(6, seed=8))):
        lane.put(float(t), crop)
    while lane.counters.encoded < 6:
        engine.step()
    read = lane.snapshot.memory
    prefix = model._prefix_of(read)
    assert prefix is not None and prefix.read is read and read.num_tokens > 0
    snap, request = engine.ask(lane, "What is there?", max_new_tokens=5)
    while request.state != "done":
        engine.step()
    prompts = engine.answers.prompts
    assert (prompts.from_prefix, prompts.full) == (1, 0) and snap.memory is read
    assert request.prompt_len == prefix.length + len(prefix.suffix("What is there?"))
    assert prefix.cache.get_seq_length() == prefix.length  # the prefix's own cache is as it was
    fresh = vstream.load(str(checkpoint[0]), device="cpu")  # no prefix cache: a full prefill
    assert "".join(request) == "".join(fresh.stream_answer(read, "What is there?", max_new_tokens=5))
