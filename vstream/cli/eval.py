"""`vstream extract-features` and `vstream eval`: the evaluation commands. The datasets, runners, judges and reports
are `vstream.eval`; this module checks the options and prints the summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import (DEFAULT_MODEL, DeviceOpt, FramesPerCallOpt, LoraOpt, MaxNewTokensOpt, MemoryModeOpt,
                                 ModelOpt)
from vstream.errors import UserInputError

SpeedOpt = Annotated[Optional[float], typer.Option(
    help="Streaming: replay live at this multiple of real time (default: simulated time).")]
VisionTowerOpt = Annotated[
    Optional[str], typer.Option(help="Local CLIP folder, for a released checkpoint whose config names a hub id.")
]


def extract_features_command(
    videos_dir: Annotated[Path, typer.Argument(help="Folder of videos (searched recursively).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the .safetensors files (created if needed).")],
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    frames_per_call: FramesPerCallOpt = 32,
    vision_tower: VisionTowerOpt = None,
) -> None:
    """One feature file per video, {'feature': [T, grid^2, D]} at the model's sample rate; finished files are kept."""
    import vstream
    from vstream.eval.features import extract_features

    if not videos_dir.is_dir():
        raise UserInputError(f"VIDEOS_DIR must be an existing folder, got {videos_dir}")
    if frames_per_call < 1:
        raise UserInputError(f"--frames-per-call must be >= 1, got {frames_per_call}")
    m = vstream.load(model, device=device, vision_tower=vision_tower)
    done = extract_features(m, videos_dir, out_dir, frames_per_call, show_progress=True)
    typer.echo(f"{len(done['written'])} written, {len(done['skipped'])} already there, in {out_dir}")


def eval_command(
    benchmark: Annotated[str, typer.Option(help="vs-ego, vs-movie, rvs-ego, rvs-movie, actnet, msvd, msrvtt, nextoe, "
                                                "open, egoschema, mvbench or videomme.")],
    data: Annotated[Path, typer.Option(help="Folder holding the benchmark's question file.")],
    mode: Annotated[str, typer.Option(help="offline (each question from the video up to its time), streaming "
                                           "(one pass per video, questions asked during the stream) or "
                                           "both.")] = "offline",
    judge: Annotated[str, typer.Option(help="offline (no network; not comparable to LLM-judged numbers) or openai "
                                            "(any OpenAI-compatible endpoint).")] = "offline",
    judge_url: Annotated[Optional[str], typer.Option(
        help="Base URL of the judge, e.g. https://api.openai.com/v1.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Judge model name, e.g. gpt-3.5-turbo-0125.")] = None,
    judge_key: Annotated[Optional[str], typer.Option(help="Judge API key (default: env VSTREAM_JUDGE_API_KEY, "
                                                          "then OPENAI_API_KEY).")] = None,
    judge_timeout: Annotated[float, typer.Option(help="Seconds per judge request.")] = 60.0,
    judge_retries: Annotated[int, typer.Option(help="Extra attempts per question after a failed request.")] = 3,
    judge_backoff: Annotated[float, typer.Option(help="First retry delay in seconds (doubles each retry).")] = 1.0,
    judge_concurrency: Annotated[int, typer.Option(help="Judge requests in flight.")] = 4,
    model: ModelOpt = DEFAULT_MODEL,
    memory_mode: MemoryModeOpt = None,
    qa: Annotated[Optional[Path], typer.Option(help="Question file (default: the benchmark's file in --data).")] = None,
    videos: Annotated[Optional[Path], typer.Option(help="Folder of videos (default: DATA/videos).")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Folder of feature files to use instead of videos.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: eval/BENCHMARK-MODE).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N questions.")] = None,
    speed: SpeedOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    rvs_originals: Annotated[bool, typer.Option(help="RVS: ask every question on the original long video at its "
                                                     "end_time (videos named by original_video).")] = False,
    frames_per_call: FramesPerCallOpt = 8,
    workers: Annotated[int, typer.Option(help="Processes over videos, each with its own model.")] = 1,
    device: DeviceOpt = "auto",
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
) -> None:
    """Evaluate a model on a benchmark: predictions.jsonl (resumable), judgments, results.json, report.md, plots.
    `--mode both` runs offline then streaming, into OUT/offline and OUT/streaming."""
    needs_extra("eval", "eval")
    import os

    from vstream.eval.datasets import load_benchmark
    from vstream.eval.judges import build_judge
    from vstream.eval.runner import RunConfig

    _check(mode, speed, features, workers, frames_per_call)
    bench = load_benchmark(benchmark, data, qa_file=qa, videos=videos, features=features, limit=limit,
                           originals=rvs_originals)
    scorer = None
    if bench.kind == "open":
        key = judge_key or os.environ.get("VSTREAM_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        scorer = build_judge(judge, url=judge_url, model=judge_model, api_key=key, timeout=judge_timeout,
                             retries=judge_retries, backoff=judge_backoff, concurrency=judge_concurrency)
    out = out or Path("eval") / f"{benchmark}-{mode}"
    for one in ("offline", "streaming") if mode == "both" else (mode,):
        cfg = RunConfig(benchmark=benchmark, mode=one, model=model, memory_mode=memory_mode,
                        max_new_tokens=max_new_tokens, frames_per_call=frames_per_call,
                        speed=None if one == "offline" else speed,
                        source="features" if features is not None else "video", originals=rvs_originals,
                        device=device, vision_tower=vision_tower, lora=lora)
        _evaluate(bench, cfg, scorer, out / one if mode == "both" else out, workers)


def _check(mode: str, speed: float | None, features: Path | None, workers: int, frames_per_call: int) -> None:
    if mode not in ("offline", "streaming", "both"):
        raise UserInputError(f"--mode must be offline, streaming or both, got {mode!r}")
    if speed is not None and (mode == "offline" or features is not None or speed <= 0):
        raise UserInputError(f"--speed needs --mode streaming, videos (not --features) and a value > 0, got {speed}")
    if workers < 1 or frames_per_call < 1:
        raise UserInputError(f"--workers and --frames-per-call must be >= 1, got {workers} and {frames_per_call}")


def _evaluate(bench, cfg, scorer, out: Path, workers: int) -> None:
    from vstream.eval.report import score_predictions, summarize, write_outputs
    from vstream.eval.runner import run_predictions

    records = run_predictions(bench, cfg, out, workers=workers, show_progress=True)
    outcomes = score_predictions(records, scorer, out, show_progress=True)
    results = summarize(records, outcomes, cfg.key(), scorer.describe() if scorer else None,
                        group_by_first_letter=bench.spec.group_by_first_letter)
    paths = write_outputs(results, records, out)
    o = results["overall"]
    extra = (f", {o['unparsable']} unparsable" if "unparsable" in o
             else f", score {o['score']:.2f}, {o['failed']} judge failures")
    typer.echo(f"{bench.name} {cfg.mode}: accuracy {100 * o['accuracy']:.1f}% of {o['n']}{extra}")
    if scorer is not None and scorer.kind == "offline":
        typer.echo("note: offline judge; not comparable to LLM-judged numbers")
    typer.echo(f"report: {paths['report']}")
