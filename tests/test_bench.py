"""The benchmarks run end to end on the CPU with the tiny presets (so they cannot rot), those that need CUDA say so in
one line, every option is checked before anything loads, and the fast path they measure gives the eager path's
results: the same greedy tokens, the same tower features up to rounding."""

import json

import pytest
import torch

from helpers import vstream_cli
from vstream.config import VisionConfig
from vstream.encoder.tower import VisionTower
from vstream.model.static_decode import StaticLlama
from vstream.model.generate import generate_text, iter_tokens


def cli(*args):
    out = vstream_cli("bench", *args, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def check_environment(env):
    assert env["device"].startswith("cpu") and env["dtype"] == "float32" and env["model"] == "tiny"
    assert env["torch"] == torch.__version__ and env["transformers"]
    assert env["fused_kernels"] is False  # the fused kernels need CUDA (or Triton's interpreter)


@pytest.mark.slow
def test_bench_memory_tiny():
    r = json.loads(cli("memory", "--lengths", "30,60", "--repeats", "3", "--json").stdout)
    check_environment(r["environment"])
    rows = r["paper"]
    assert [row["frames_seen"] for row in rows] == [35, 65]  # each length + 2 warm-up + 3 timed updates
    assert all(row["update"]["count"] == 3 and row["update"]["median_ms"] > 0 for row in rows)
    assert rows[0]["state_bytes"] == rows[1]["state_bytes"] and rows[1]["tokens"] == 681
    assert r["official"]["update"]["count"] >= 20 and set(r["official"]["buffer_copy"]) == {"cpu_T100", "cpu_T1000",
                                                                                           "cpu_T3600"}


@pytest.mark.slow
def test_bench_encode_tiny():
    r = json.loads(cli("encode", "--batches", "1,3", "--repeats", "2", "--json").stdout)
    check_environment(r["environment"])
    assert r["relative_error_fast_vs_reference"] < 1e-5
    assert [row["batch"] for row in r["batches"]] == [1, 3]
    for row in r["batches"]:
        assert {"fast", "truncated_eager", "hf_full_hidden_states"} <= set(row) and row["fast"]["fps"] > 0


@pytest.mark.slow
def test_bench_answer_tiny():
    r = json.loads(cli("answer", "--new-tokens", "6", "--anchor-tokens", "4", "--repeats", "2", "--compile-anchor",
                       "--json").stdout)
    check_environment(r["environment"])
    assert r["environment"]["prompt_tokens"] == 745
    assert r["fast"]["first_token"]["count"] == 2 and r["fast"]["decode_step"]["median_ms"] > 0
    assert r["fast"]["first_answer_after_load_ms"] > 0
    a = r["anchors"]
    assert a["eager_tokens"] == a["fast_tokens"] and a["greedy_tokens_equal_prefix"] == 4
    static = a["hf_static_compile"]  # transformers compiles only on CUDA; on the CPU this times its static cache
    assert "error" not in static and static["tokens"] == 4 and static["ms_per_token_second_call"] > 0


@pytest.mark.slow
def test_bench_streams_tiny():
    r = json.loads(cli("streams", "--counts", "2", "--seconds", "2", "--question-interval", "1",
                       "--max-new-tokens", "3", "--json").stdout)
    check_environment(r["environment"])
    run = r["runs"][0]
    assert run["streams"] == 2 and run["answered"] == run["questions"] == 4
    assert run["frames"] == run["frames_expected"] == 4 and run["first_token"]["p95_ms"] > 0


@pytest.mark.slow
def test_bench_text_output_names_device_and_versions():
    out = cli("encode", "--batches", "1", "--repeats", "1").stdout
    assert "tiny on cpu" in out and f"torch {torch.__version__}" in out and "fps" in out


@pytest.mark.slow
def test_bench_all_writes_each_part_after_one_load(tmp_path):
    out = cli("all", "--preset", "tiny", "--device", "cpu", "--parts", "memory,ceilings", "--lengths", "10",
              "--out", str(tmp_path)).stdout
    r = json.loads((tmp_path / "all.json").read_text())
    assert set(r) == {"load", "memory"} and "ceilings" not in out  # the ceilings need CUDA
    check_environment(r["memory"]["environment"])
    assert r["memory"]["paper"][0]["tokens"] == 681 and r["memory"]["wall_s"] > 0
    assert not (tmp_path / "profile.txt").exists()


@pytest.mark.slow
def test_bench_qwen_tiny():
    r = json.loads(cli("qwen", "--preset", "tiny-qwen2.5-vl", "--device", "cpu", "--units", "10,30", "--streams", "1,2",
                       "--repeats", "1", "--decode-tokens", "4", "--batches", "1,2").stdout)
    assert r["preset"] == "tiny-qwen2.5-vl" and r["device"] == "cpu" and r["dtype"] == "torch.float32"
    memory = r["memory"]
    assert memory["10"]["state_bytes"] == memory["30"]["state_bytes"] == r["state_bytes_config"]  # flat
    assert memory["30"]["update_ms"] > 0 and memory["syncs_in_update"] == "not checked (CPU)"
    assert [row["frames"] for row in r["ingest"].values()] == [2, 4]
    answer = r["answer"]
    assert answer["memory_tokens"] == r["max_tokens"] and answer["decode_tokens"] == 4
    assert answer["ttft_cached_prefix_ms"] > 0 and answer["ttft_fresh_prefill_ms"] > 0
    engine = r["engine_answer"]  # the path the product answers on
    assert engine["memory_tokens"] == r["max_tokens"] and engine["ttft_cached_prefix_ms"] > 0
    assert {k: v["steps"] for k, v in engine["decode"].items()} == {"1": 4, "2": 4}


@pytest.mark.slow
def test_bench_decode_tiny():
    r = json.loads(cli("decode", "--preset", "tiny", "--device", "cpu", "--batches", "1,3", "--prompt", "40", "--seq",
                       "64", "--repeats", "3").stdout)
    check_environment(r["env"])
    assert r["prompt_tokens"] == 40 and r["max_seq_len"] == 64 and set(r["batched"]) == {"1", "3"}
    three = r["batched"]["3"]
    assert three["median_ms"] > 0 and three["per_answer_ms"] == pytest.approx(three["median_ms"] / 3)
    assert r["ratio_to_smallest_batch"]["1"] == 1.0


@pytest.mark.slow
def test_bench_startup_tiny_in_fresh_processes():
    r = json.loads(cli("startup", "--model", "tiny", "--device", "cpu", "--repeats", "2").stdout)
    assert r["host_cpus"] >= 1 and len(r["runs"]) == 1
    run = r["runs"][0]
    assert run["model"] == "tiny" and run["device"] == "cpu" and run["param_dtype"] == "float32"
    assert run["repeats"] == 2 and len(run["load_s_all"]) == 2 and run["load_s"] in run["load_s_all"]
    assert {"config", "modules", "weights", "ready"} <= set(run["stages"])
    assert 0 < run["import_s"] < run["to_ready_s"] < run["process_s"]
    out = vstream_cli("bench", "startup", "--model", "nope", "--device", "cpu", timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: loading 'nope' in a fresh process was refused: ")
    assert len(out.stderr.splitlines()) == 1


@pytest.mark.slow
def test_bench_demo_paths_agree_on_the_cpu():
    """The tiny preset stands in for the demo model (minutes on the CPU): on the CPU the paths must agree."""
    r = json.loads(cli("demo-paths", "--model", "tiny", "--device", "cpu", "--streams", "1").stdout)
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["streams"] == 1 and r["questions"] > 0
    assert r["fused"] is False and r["differing"] == []
    assert r["same_text"] == {"fast_vs_eager": 1.0, "kernel_vs_loop_memory": 1.0}
    assert set(r["accuracy"]) == set(r["answer_ms_median"]) == {"fast_kernel_memory", "eager_kernel_memory",
                                                                "eager_loop_memory"}


@pytest.mark.ray
@pytest.mark.slow
def test_bench_cluster_one_replica_answers_and_ingests():
    r = json.loads(cli("cluster", "--replicas", "1", "--streams", "1", "--clients", "1", "--seconds", "1",
                       "--max-tokens", "2").stdout)
    assert r["options"] == {"replicas": "1", "streams": 1, "clients": 1, "seconds": 1.0, "max_tokens": 2,
                            "threads": 1, "model": "tiny"}
    [run] = r["runs"]
    assert run["replicas"] == 1 and sum(run["streams_per_replica"].values()) == 1 and r["ratios"] == {}
    assert run["questions"]["answers"] > 0 and set(run["questions"]["statuses"]) == {"200"}
    assert run["frames"]["sent"] > 0 and run["directory"]["route_calls_per_s"] > 0


def test_bench_all_rejects_unknown_parts():
    out = vstream_cli("bench", "all", "--preset", "tiny", "--parts", "memory,warp", timeout=120)
    assert out.returncode == 2 and "--parts must name some of ceilings,answer" in out.stderr


def test_bench_rejects_bad_options():
    out = vstream_cli("bench", "memory", "--preset", "nope", timeout=120)
    assert out.returncode == 2 and "--preset must be one of" in out.stderr


NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # what a machine without CUDA looks like to torch, on any machine
CUDA_ONLY = ["pages", "profile"]


@pytest.mark.parametrize("command", CUDA_ONLY)
def test_cuda_only_benchmarks_say_so_in_one_line_without_cuda(command):
    out = vstream_cli("bench", command, timeout=120, env=NO_CUDA)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: `vstream bench {command}` needs a CUDA device, and torch sees none here\n"


@pytest.mark.parametrize("args, message", [
    (["pages", "--streams", "64,0"], "--streams must hold integers >= 1, got '64,0'"),
    (["pages", "--streams", "64 256"], "--streams must be comma-separated integers, got '64 256'"),
    (["pages", "--rounds", "0"], "--rounds must be an integer >= 1, got 0"),
    (["profile", "--updates", "0"], "--updates must be an integer >= 1, got 0"),
    (["decode", "--prompt", "1000"], "--seq must hold --prompt + 3 warm-up steps + --repeats positions (1053), "
                                     "got 1024"),
    (["decode", "--batches", "1,x"], "--batches must be comma-separated integers, got '1,x'"),
    (["cluster", "--replicas", "2,0"], "--replicas must hold integers >= 1, got '2,0'"),
    (["cluster", "--seconds", "0"], "--seconds must be > 0, got 0"),
    (["demo-paths", "--streams", "0"], "--streams must be an integer >= 1, got 0"),
    (["demo-paths", "--dtype", "fp16"], "--dtype must be one of float32, float16, bfloat16, got 'fp16'"),
    (["qwen", "--units", "100,10"], "--units must increase from one count to the next, got '100,10'"),
    (["qwen", "--dtype", "half"], "--dtype must be one of float32, float16, bfloat16, got 'half'"),
    (["qwen", "--preset", "tiny"], "--preset must be one of ['flash-vstream-qwen-7b', 'qwen2.5-vl-7b-flash', "
                                   "'tiny-qwen2-vl', 'tiny-qwen2.5-vl'], got 'tiny'"),
])
def test_bench_options_are_checked_before_anything_runs(args, message):
    out = vstream_cli("bench", *args, timeout=120, env=NO_CUDA)
    assert out.returncode == 2 and out.stderr == f"error: {message}\n"


# ---------------------------------------------------------------- the fast path equals the eager path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_decoder_gives_the_eager_greedy_tokens_and_logits(model, seed):
    llm = model.llm
    dec = StaticLlama(llm, max_seq_len=400)
    torch.manual_seed(seed)
    embeds = torch.randn(1, 50 + 60 * seed, llm.config.hidden_size) * 0.5
    eager = list(iter_tokens(llm, embeds, max_new_tokens=40))
    assert list(dec.iter_tokens(embeds, max_new_tokens=40)) == eager
    with torch.inference_mode():  # a prefix prefilled first, then the rest from its position
        dec.prefill(embeds[:, :17], 0)
        logits = dec.prefill(embeds[:, 17:], 17)
        ref = llm(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert list(dec.iter_tokens(embeds[:, 17:], 17, max_new_tokens=40)) == eager


def test_fast_answers_equal_eager_answers(model):
    memory = model.memory_from_features(torch.randn(30, 256, model.cfg.vision.hidden_size))
    questions = ["What is happening?", "Which colours appeared?", "What is happening?"]
    eager = [model.answer_from(memory, q, max_new_tokens=20).text for q in questions]
    try:
        model.use_static_decoder(max_seq_len=1024)
        fast = [model.answer_from(memory, q, max_new_tokens=20).text for q in questions]
        assert model.static_answerer.decoder.prefix  # the system prompt stayed cached across answers
    finally:
        model.static_answerer = None
    assert fast == eager


def test_fast_decoder_sampling_and_limits(model):
    llm = model.llm
    dec = StaticLlama(llm, max_seq_len=64)
    embeds = torch.randn(1, 20, llm.config.hidden_size)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = list(dec.iter_tokens(embeds, max_new_tokens=10, temperature=0.8, generator=g1))
    b = list(iter_tokens(llm, embeds, max_new_tokens=10, temperature=0.8, generator=g2))
    assert a == b
    with pytest.raises(ValueError, match="needs 69 positions, the KV cache holds 64"):
        list(dec.iter_tokens(embeds, max_new_tokens=50))
    assert generate_text(llm, embeds, model.tokenizer, max_new_tokens=5) == generate_text(
        llm, embeds, model.tokenizer, max_new_tokens=5)


def test_fast_tower_equals_the_transformers_tower():
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(0)
    tower = VisionTower(cfg)
    for p in tower.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(3, 3, 224, 224)
    ref = tower.encode(x)
    got = tower.use_fused().encode(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_every_report_uses_the_nearest_rank_percentile():
    from vstream.bench import summary
    from vstream.engine.scheduler import LatencyWindow
    from vstream.stats import percentile

    values = [float(v) for v in range(1, 21)]  # 20 samples: p95 is the 19th, p50 the 10th
    assert percentile(values, 0.95) == 19.0 and percentile(values, 0.5) == 10.0 and percentile(values, 1.0) == 20.0
    assert percentile([5.0], 0.95) == 5.0
    window = LatencyWindow()
    for v in values:
        window.add(v / 1000)
    assert window.summary()["p95_ms"] == pytest.approx(19.0) and window.summary()["p50_ms"] == pytest.approx(10.0)
    assert summary(values)["p95_ms"] == 19.0
    assert summary([float(v) for v in range(1, 31)])["p95_ms"] == 29.0  # ceil(28.5): the rounded rank gave 28
    with pytest.raises(ValueError, match="at least one value"):
        percentile([], 0.5)


def test_recent_values_keep_only_their_window_and_say_none_when_quiet():
    from vstream.stats import RecentValues

    now = [0.0]
    recent = RecentValues(window_s=60, clock=lambda: now[0])
    assert recent.percentile(0.95) is None
    for v in range(1, 21):
        recent.add(float(v))
    assert recent.percentile(0.95) == 19.0
    now[0] = 30.0
    recent.add(100.0)
    assert recent.percentile(1.0) == 100.0 and recent.percentile(0.5) == 11.0  # 21 values: the 11th
    now[0] = 61.0  # the first twenty left the window, the last one is 31 s old
    assert recent.percentile(0.5) == 100.0
    now[0] = 91.0
    assert recent.percentile(0.95) is None
    with pytest.raises(ValueError, match="window_s > 0"):
        RecentValues(window_s=0)
