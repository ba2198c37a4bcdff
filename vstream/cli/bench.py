"""`vstream bench {memory,encode,answer,streams,profile,all,stream,serve}`: benchmarks that print what they ran on and
their medians/p95. `all` runs the in-process ones with one model load for a GPU lease (what benchmarks/gpu.sh calls,
with `profile`: the memory update's kernels); `serve` is the load generator against a server (`vstream.loadgen`); the
others run in process. The benchmarks of many streams at once are in `bench_scale`, those of other models (Qwen, the
demo model, load time) in `bench_models`.

`--preset` picks the model shape (random weights): `tiny` runs on the CPU in seconds, `flash-vstream-7b` is the released
model's shape (CLIP ViT-L/14, a 7B LLaMA) and wants a GPU. The fast path (fused tower, CUDA graphs, static KV cache)
is enabled for every benchmark but `stream`, which runs the streaming engine as `vstream.load` builds it.

The measurements are `vstream.bench` and `vstream.loadgen`; this module checks the options and prints the tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import (BENCH_DEFAULT_PRESET, DeviceOpt, JsonOpt, ModelOpt, comma_ints, cuda_device_option,
                                 known_preset, positive_ints, resolve_device_option)
from vstream.errors import UserInputError

PresetOpt = Annotated[str, typer.Option("--preset", help="Preset of the model shape (random weights).")]


def _model(preset: str, device: str):
    from vstream.bench import load_bench_model
    from vstream.config import PRESETS

    known_preset(preset, PRESETS)
    device = str(resolve_device_option(device))
    model, built, warm = load_bench_model(preset, device)
    return model, {"build_s": round(built, 2), "fast_path_warmup_s": round(warm, 2)}


def _header(env: dict, extra: dict) -> None:
    fused = f"fused Triton {env['triton']} kernels" if env["fused_kernels"] else "no fused kernels"
    typer.echo(f"{env['model']} on {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
               f"{env['dtype']}, {fused}; {env['date']}; " + ", ".join(f"{k} {v}" for k, v in extra.items()))


def _stat(s: dict) -> str:
    return f"median {s['median_ms']:.3f} ms, p95 {s['p95_ms']:.3f} ms" if s.get("count") else "-"


def bench_memory(
    preset: PresetOpt = BENCH_DEFAULT_PRESET,
    device: DeviceOpt = "auto",
    lengths: Annotated[str, typer.Option(help="Stream lengths in frames, comma-separated.")] = "100,1000",
    repeats: Annotated[int, typer.Option(help="Timed one-frame updates per length.")] = 50,
    cuda_graph: Annotated[bool, typer.Option(
        help="On a GPU, replay the steady update from a CUDA graph (--no-cuda-graph: time the eager update).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Per-frame STAR memory update and the model's device memory at growing stream lengths; official anchors."""
    from vstream.bench import memory_benchmark

    model, load = _model(preset, device)
    r = memory_benchmark(model, lengths=comma_ints(lengths, "lengths"), repeats=repeats,
                         cuda_graph=cuda_graph) | {"load": load}
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    _header(r["environment"], {"cuda graph": r["environment"]["cuda_graph"]} | load)
    for row in r["paper"]:
        typer.echo(f"  {row['frames_seen']:>7} frames: update {_stat(row['update'])}; state {row['state_bytes']:,} B; "
                   f"answer {row['answer_ms']} ms; {row['memory'] or ''}")
    off = r["official"]
    typer.echo(f"  official update: {_stat(off['update'])}")
    for name, s in off["buffer_copy"].items():
        typer.echo(f"  growing buffer copy {name}: {_stat(s)}")


def bench_encode(
    preset: PresetOpt = BENCH_DEFAULT_PRESET,
    device: DeviceOpt = "auto",
    batches: Annotated[str, typer.Option(help="Frames per call of the tower (batch sizes), comma-separated.")] = "1,8",
    repeats: Annotated[int, typer.Option(help="Timed calls per frame count.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Vision tower frames/s: fast path, truncated transformers tower, full tower at hidden state -2 (anchor)."""
    from vstream.bench import encode_benchmark

    model, load = _model(preset, device)
    r = encode_benchmark(model, frame_counts=comma_ints(batches, "batches"), repeats=repeats) | {"load": load}
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    env = r["environment"]
    _header(env, {"GFLOP/frame": env["tower_gflop_per_frame"], "graphs": env["graph_batch_sizes"]} | load)
    typer.echo(f"  fast vs reference relative error {r['relative_error_fast_vs_reference']:.2e}")
    for row in r["batches"]:
        cells = "; ".join(f"{k} {v['fps']:.1f} fps ({_stat(v)})" for k, v in row.items() if k != "batch")
        typer.echo(f"  batch {row['batch']:>4}: {cells}")


def bench_answer(
    preset: PresetOpt = BENCH_DEFAULT_PRESET,
    device: DeviceOpt = "auto",
    prompt_tokens: Annotated[int, typer.Option(
        help="Prompt length in positions (memory + template + question).")] = 745,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded by the fast path.")] = 32,
    anchor_tokens: Annotated[int, typer.Option(help="Tokens decoded by the eager path and transformers generate.")] = 8,
    repeats: Annotated[int, typer.Option(help="Timed repeats.")] = 5,
    compile_anchor: Annotated[bool, typer.Option(
        help="Also time transformers generate with its static cache (compiles at the first call: tens of "
             "seconds).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Question -> first token and decode ms/token: fast path, eager path and transformers generate (anchors)."""
    from vstream.bench import answer_benchmark

    model, load = _model(preset, device)
    r = answer_benchmark(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats,
                         anchor_tokens=anchor_tokens, compile_anchor=compile_anchor) | {"load": load}
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    env, f, a = r["environment"], r["fast"], r["anchors"]
    _header(env, {"prompt": env["prompt_tokens"], "KV cache": env["kv_cache_positions"]} | load)
    typer.echo(f"  fast: first token {_stat(f['first_token'])} "
               f"(no prefix cache: {_stat(f['first_token_no_prefix_cache'])}); "
               f"the first answer after load {f['first_answer_after_load_ms']} ms")
    typer.echo(f"  fast: decode step {_stat(f['decode_step'])}; "
               f"{f['generate_ms_per_token']} ms/token over {f['new_tokens']}")
    typer.echo(f"  transformers prefill {_stat(a['hf_prefill_sdpa'])}; eager {a['eager_ms_per_token']} ms/token; "
               f"generate {a['hf_generate_ms_per_token']} ms/token")
    typer.echo(f"  greedy tokens equal for the first {a['greedy_tokens_equal_prefix']} of {a['tokens']}")
    if "hf_static_compile" in a:
        c = a["hf_static_compile"]
        typer.echo(f"  transformers static-cache generate: {c['error']}" if "error" in c else
                   f"  transformers static-cache generate (compiled on CUDA): first call {c['first_call_s']} s, then "
                   f"{c['ms_per_token_second_call']} ms/token")


def bench_streams(
    preset: PresetOpt = BENCH_DEFAULT_PRESET,
    device: DeviceOpt = "auto",
    counts: Annotated[str, typer.Option(help="Numbers of live streams, comma-separated.")] = "2",
    seconds: Annotated[float, typer.Option(help="Wall-clock seconds per run.")] = 3.0,
    question_interval: Annotated[float, typer.Option(help="Seconds between a stream's questions.")] = 1.5,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length.")] = 4,
    as_json: JsonOpt = False,
) -> None:
    """N live 1-fps streams on the engine, in process, each asking questions: time to first token, frames kept up."""
    from vstream.bench import streams_benchmark

    if seconds <= 0 or question_interval <= 0:
        raise UserInputError(f"--seconds and --question-interval must be > 0, got {seconds} and {question_interval}")
    model, load = _model(preset, device)
    r = streams_benchmark(model, counts=comma_ints(counts, "counts"), seconds=seconds,
                          question_interval=question_interval, max_new_tokens=max_new_tokens) | {"load": load}
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    _header(r["environment"], load)
    for row in r["runs"]:
        typer.echo(f"  {row['streams']:>3} streams: first token {_stat(row['first_token'])} "
                   f"({row['answered']}/{row['questions']} answered); {row['frames']}/{row['frames_expected']} "
                   f"frames ingested, {row['frames_dropped']} dropped")


def bench_profile(
    device: DeviceOpt = "cuda",
    updates: Annotated[int, typer.Option(help="Memory updates profiled from the CUDA graph, then eagerly.")] = 50,
) -> None:
    """torch.profiler tables (CUDA) of the steady memory update in the released shapes (fp16): graph replays, then
    eager updates; which kernels the update's time goes to."""
    positive_ints(updates=updates)
    where = cuda_device_option(device, "bench profile")
    from vstream.bench.profile import memory_profile_tables

    for name, table in memory_profile_tables(where, updates).items():
        typer.echo(f"== {name}")
        typer.echo(table)


ALL_PARTS = ("ceilings", "answer", "encode", "memory", "streams", "profile")


def _all_runs(model, lengths, counts, seconds) -> dict:
    """The in-process benchmarks of `bench all`, with the figures BENCHMARKS.md reports."""
    from vstream import bench

    return {
        "answer": lambda: bench.answer_benchmark(model, new_tokens=128, repeats=20, anchor_tokens=128,
                                                 compile_anchor=True),
        "encode": lambda: bench.encode_benchmark(model, frame_counts=(1, 8, 64, 256), repeats=20),
        "memory": lambda: bench.memory_benchmark(model, lengths=lengths, repeats=200),
        "streams": lambda: bench.streams_benchmark(model, counts=counts, seconds=seconds, warm_frames=27),
    }


def bench_all(
    preset: Annotated[str, typer.Option("--preset", help="Preset of the model shape (random weights).")
                      ] = "flash-vstream-7b",
    device: DeviceOpt = "cuda",
    out: Annotated[Path, typer.Option(help="Folder for all.json and profile.txt.")] = Path("bench-out"),
    parts: Annotated[str, typer.Option(help=f"Parts, comma-separated, of {','.join(ALL_PARTS)}.")
                     ] = ",".join(ALL_PARTS),
    lengths: Annotated[str, typer.Option(help="Memory: stream lengths in frames.")] = "100,1000,10000,100000",
    counts: Annotated[str, typer.Option(help="Streams: numbers of live streams.")] = "16,32,64",
    seconds: Annotated[float, typer.Option(help="Streams: wall-clock seconds per run.")] = 20.0,
) -> None:
    """Every benchmark in one process with one model load (a GPU lease): ceilings, answer, encode, memory, streams
    and a profile; all.json is rewritten after each part, a part's error is kept in it and the others still run."""
    wanted = [p for p in parts.split(",") if p]
    if not wanted or set(wanted) - set(ALL_PARTS):
        raise UserInputError(f"--parts must name some of {','.join(ALL_PARTS)}, got {parts!r}")
    from vstream import bench

    model, load = _model(preset, device)
    out.mkdir(parents=True, exist_ok=True)
    results = {"load": load | {"tower_warmup_s": model.vision.warmup_s,
                               "decode_warmup_s": model.static_answerer.warmup_s,
                               "memory": bench.gpu_memory(model.device)}}
    if "ceilings" in wanted and model.device.type == "cuda":
        results["ceilings"] = bench.ceilings(model.device)
    typer.echo(json.dumps(results))
    for part, run in _all_runs(model, comma_ints(lengths, "lengths"), comma_ints(counts, "counts"), seconds).items():
        if part in wanted:
            t0 = time.perf_counter()
            try:
                results[part] = run()
            except Exception as exc:  # keep the other parts' numbers; the error is reported in the output  # noqa: BLE001
                results[part] = {"error": repr(exc)}
            results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
            (out / "all.json").write_text(json.dumps(results, indent=1))
            typer.echo(f"{part} {json.dumps(results[part])[:3000]}")
    if "profile" in wanted and model.device.type == "cuda":
        (out / "profile.txt").write_text(bench.profile_tables(model))


def bench_stream(
    source: Annotated[Optional[str], typer.Option(help="Video file (default: a generated one).")] = None,
    seconds: Annotated[int, typer.Option(help="Length of the generated video.")] = 60,
    speed: Annotated[float, typer.Option(help="Live replay speed (source rate = sample fps x speed).")] = 10.0,
    questions: Annotated[int, typer.Option(help="Questions asked during live ingestion.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length per question.")] = 16,
    model: ModelOpt = BENCH_DEFAULT_PRESET,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Ingest throughput, drop rate at a given source rate, time to first token and answer latency under ingestion."""
    import vstream
    from vstream.bench import stream_benchmark

    result = stream_benchmark(vstream.load(model, device=device), source=source, seconds=seconds, speed=speed,
                              questions=questions, max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    env, off, live = result["environment"], result["offline"], result["live"]
    typer.echo(f"{env['model']} ({env['memory_mode']}) on {env['device']}, torch {env['torch']}, {env['dtype']}")
    typer.echo(f"offline ingest: {off['frames']} frames in {off['seconds']:.2f} s = {off['ingest_fps']:.1f} frames/s")
    typer.echo(f"live at {live['source_fps']:g} frames/s: {live['frames_dropped']}/{live['frames_received']} dropped "
               f"({live['drop_rate']:.1%})")
    for stage, s in live["latency"].items():
        if s["count"]:
            typer.echo(f"  {stage:>13}: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, max {s['max_ms']:.1f} ms "
                       f"({s['count']})")


def _frame_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise UserInputError(f"--frame-size must be WIDTHxHEIGHT in pixels, e.g. 640x480, got {text!r}") from None
    if min(size) < 16:
        raise UserInputError(f"--frame-size must be at least 16x16, got {text!r}")
    return size


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")


def bench_serve(
    url: Annotated[Optional[str], typer.Option(help="A running server (http://HOST:PORT); none: start one.")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Bearer key of the server (a local one is given it).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Local server's model (default: tiny).")] = None,
    device: DeviceOpt = "auto",
    streams: Annotated[int, typer.Option(help="Push streams, one realtime socket each.")] = 2,
    fps: Annotated[float, typer.Option(help="Frames per second sent on each stream.")] = 1.0,
    seconds: Annotated[float, typer.Option(help="Seconds of load (questions), after the warm-up.")] = 20.0,
    question_every: Annotated[float, typer.Option(help="Seconds between one stream's questions (staggered).")] = 20.0,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of each question.")] = 32,
    frame_size: Annotated[str, typer.Option(help="JPEG frame size, WIDTHxHEIGHT.")] = "640x480",
    warmup: Annotated[float, typer.Option(help="Seconds of frames only, before the first question.")] = 2.0,
    question: Annotated[Optional[str], typer.Option(
        help="The question every stream asks (default: What is happening on the screen?).")] = None,
    start_timeout: Annotated[float, typer.Option(help="Seconds the local server may take to be ready.")] = 600.0,
    watches: Annotated[int, typer.Option(help="Watches (every_s=1) set on each stream on top of the questions.")] = 0,
    watch_escalate_margin: Annotated[Optional[float], typer.Option(
        help="escalate_margin of each watch (cheap recent-memory score first); default: the server's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load a server through its API: N push streams of JPEG frames, streamed questions, optional watches;
    client-side latencies and the server's watch scoring time."""
    needs_extra("server", "bench serve")  # its client (httpx, websockets) comes with the server
    if streams < 1 or max_tokens < 1:
        raise UserInputError(f"--streams and --max-tokens must be >= 1, got {streams} and {max_tokens}")
    _positive(fps=fps, seconds=seconds, question_every=question_every, start_timeout=start_timeout)
    if warmup < 0:
        raise UserInputError(f"--warmup must be >= 0 seconds, got {warmup:g}")
    if question is not None and not question.strip():
        raise UserInputError(f"--question must be a non-empty question, got {question!r}")
    if watches < 0 or (watch_escalate_margin is not None and not watch_escalate_margin >= 0):
        raise UserInputError(f"--watches and --watch-escalate-margin must be >= 0, got {watches} and "
                             f"{watch_escalate_margin}")
    if url is not None:
        if not url.startswith(("http://", "https://")):
            raise UserInputError(f"--url must be http://HOST:PORT or https://HOST:PORT, got {url!r}")
        if model is not None or device != "auto":
            raise UserInputError("--model and --device choose the local server's model; with --url the server has its "
                                 f"own (got --model {model}, --device {device})")
    else:
        device = str(resolve_device_option(device))
    from vstream.loadgen import LoadConfig, bench_serve as run

    cfg = LoadConfig(streams=streams, fps=fps, seconds=seconds, question_every=question_every, max_tokens=max_tokens,
                     frame_size=_frame_size(frame_size), warmup=warmup, watches=watches,
                     watch_escalate_margin=watch_escalate_margin,
                     **({"question": question} if question is not None else {}))
    r = run(cfg, url=url and url.rstrip("/"), api_key=api_key, model=model or BENCH_DEFAULT_PRESET, device=device,
            start_timeout=start_timeout)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    _serve_table(r)


def _ms(s: dict) -> str:
    return f"p50 {s['median_ms']:.1f}, p95 {s['p95_ms']:.1f}, max {s['max_ms']:.1f} ms ({s['count']})" \
        if s.get("count") else "-"


def _serve_table(r: dict) -> None:
    srv, st, fr, q, h, mem = r["server"], r["streams"], r["frames"], r["questions"], r["health_live"], \
        r["server_memory"]
    where = f"local, started to ready in {srv['start_to_ready_s']} s" if srv["local"] else "--url"
    device = srv["device"] or "its own device"
    typer.echo(f"{srv['model']} on {device} at {srv['url']} ({where}); {r['date']}")
    refused = f" (refused: {st['refused']})" if st["refused"] else ""
    refused += f", closed during the load: {st['closed_early']}" if st["closed_early"] else ""
    typer.echo(f"  streams {st['opened']}/{st['requested']} opened{refused}; frames {fr['sent']} sent, "
               f"{fr['received']} received, {fr['ingested']} ingested, {fr['dropped']} dropped, "
               f"{fr['queued_at_end']} queued at the end; send lag {_ms(fr['send_lag_ms'])}")
    codes = ", ".join(f"{k} {v}" for k, v in q["status"].items() if v)
    typer.echo(f"  questions {q['sent']} ({codes}); {q['completed']} completed, {q['no_content_chunk']} without a "
               f"content chunk, {q['no_visible_text']} without visible text")
    typer.echo(f"  first content chunk {_ms(q['first_chunk_ms'])}")
    typer.echo(f"  [DONE]              {_ms(q['done_ms'])}")
    typer.echo(f"  /health/live        {_ms(h['ms'])}, {h['failures']} failed")
    if r["watches"] is not None:
        typer.echo(_watch_line(r["watches"]))
    rss = mem["rss_bytes_peak"]
    typer.echo(f"  server RSS peak {'-' if rss is None else f'{rss / 2**20:.0f} MiB'}; GPU memory "
               f"{mem['gpu_bytes'] if mem['gpu_bytes'] is not None else '- (' + mem['gpu_note'] + ')'}")


def _watch_line(w: dict) -> str:
    refused = f" (refused: {w['refused']})" if w["refused"] else ""
    line = (f"  watches {w['created']} created{refused}: {w['evaluations']} evaluations ({w['cheap']} cheap, "
            f"{w['escalated']} escalated), {w['events']} events, {w['failing']} failing")
    srv = w["server"]
    if srv is None or not srv["ticks"]:
        return line + "; the server's /metrics has no watch ticks"
    return (line + f"; server: {srv['ticks']} ticks, {srv['tick_ms_mean']} ms each, {srv['ms_per_stream_scored']} ms "
            f"a stream, {100 * srv['busy_share']:.1f} % of the engine's time")
