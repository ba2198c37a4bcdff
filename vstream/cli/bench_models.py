"""`vstream bench {qwen,startup,demo-paths}`: benchmarks of whole models beside the CLIP/LLaMA presets of `bench`:
the Flash-VStream-Qwen costs, the start-up time of `vstream.load` in fresh processes, the trained demo model's fast
path against its eager path. Each prints one JSON object, as the scripts of benchmarks/ that they replace printed it.

The measurements are `vstream.bench.qwen`, `vstream.bench.startup` and `vstream.bench.demo_paths`; this module checks
the options and prints the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.options import (DEFAULT_MODEL, DeviceOpt, comma_ints, known_preset, positive_ints,
                                 resolve_device_option)
from vstream.errors import UserInputError

DTYPES = ("float32", "float16", "bfloat16")

DtypeOpt = Annotated[Optional[str], typer.Option(help=f"One of {', '.join(DTYPES)} (default: the model's own on CUDA, "
                                                      "float32 on the CPU).")]


def _dtype(name: str | None) -> str | None:
    if name is not None and name not in DTYPES:
        raise UserInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


def bench_qwen(
    preset: Annotated[str, typer.Option(help="Qwen preset (random weights).")] = "qwen2.5-vl-7b-flash",
    device: DeviceOpt = "cuda",
    dtype: DtypeOpt = None,
    units: Annotated[str, typer.Option(help="Memory updates at which to report, increasing, comma-separated.")
                     ] = "100,1000,10000",
    streams: Annotated[str, typer.Option(help="Units encoded together (one per stream), comma-separated.")
                       ] = "1,8,32,64",
    repeats: Annotated[int, typer.Option(help="Timed repeats of each ingest and first token.")] = 5,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded for the ms/token figure.")] = 64,
    skip_model: Annotated[bool, typer.Option(help="The memory section only (no tower, no LLM).")] = False,
    batches: Annotated[str, typer.Option(help="Answers in flight for the engine's batched decode step, "
                                              "comma-separated.")] = "1,8",
) -> None:
    """Flash-VStream-Qwen costs with random weights: memory update per unit up to 10^4+ units, ingest batched across
    streams, time to first token (fresh and from the cached memory prefix), decode ms/token."""
    from vstream.model.qwen.config import QWEN_PRESETS

    known_preset(preset, QWEN_PRESETS)
    marks = comma_ints(units, "units")
    if list(marks) != sorted(set(marks)):
        raise UserInputError(f"--units must increase from one count to the next, got {units!r}")
    counts = comma_ints(streams, "streams")
    in_flight = comma_ints(batches, "batches")
    positive_ints(repeats=repeats, decode_tokens=decode_tokens)
    dtype = _dtype(dtype)
    where = resolve_device_option(device)
    from vstream.bench.qwen import qwen_benchmark

    result = qwen_benchmark(preset, where, dtype, units=marks, streams=counts, repeats=repeats,
                            decode_tokens=decode_tokens, skip_model=skip_model, batches=in_flight)
    typer.echo(json.dumps(result, indent=2))


def bench_startup(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Preset or model directory; repeat the option for "
                                                                    "several.")] = ["flash-vstream-7b"],
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    repeats: Annotated[int, typer.Option(help="Fresh processes per model; the median load is reported.")] = 1,
    checkout: Annotated[Optional[Path], typer.Option(
        help="A vstream checkout (the folder holding its vstream/) that the fresh processes import instead of this "
             "one, to compare versions.")] = None,
    write: Annotated[Optional[Path], typer.Option(
        help="Write a released-format directory of the --model preset here (random float16 weights; ~14 GB for "
             "flash-vstream-7b) and stop.")] = None,
) -> None:
    """Start-up time of `vstream.load` stage by stage, each load in a fresh process: import, CUDA context, each stage
    of the load, the whole process, peak host and GPU memory."""
    positive_ints(repeats=repeats)
    dtype = _dtype(dtype)
    if write is not None:
        if len(model) != 1:
            raise UserInputError(f"--write writes one preset: give one --model, got {len(model)}: {', '.join(model)}")
        from vstream.bench.startup import write_released

        written = write_released(model[0], write, progress=lambda line: typer.echo(line, err=True))
        typer.echo(json.dumps({"written": str(written)}))
        return
    if checkout is not None and not (checkout / "vstream" / "__init__.py").is_file():
        raise UserInputError(f"--checkout must be a folder holding the vstream package (vstream/__init__.py), got "
                             f"{str(checkout)!r}")
    where = str(resolve_device_option(device))
    from vstream.bench.startup import startup_benchmark

    typer.echo(json.dumps(startup_benchmark(model, where, dtype, repeats=repeats, checkout=checkout), indent=1))


def bench_demo_paths(
    streams: Annotated[int, typer.Option(help="Held-out world streams whose questions are asked.")] = 20,
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}.")] = "float32",
    device: DeviceOpt = "cuda",
    model: Annotated[str, typer.Option("--model", "-m", help="Model whose paths are compared (preset or "
                                                             "directory).")] = DEFAULT_MODEL,
) -> None:
    """The trained demo model's fast path against its eager path, and memories from the k-means kernel against the
    PyTorch loop, on held-out world questions: accuracy, agreement and answer latency of each."""
    positive_ints(streams=streams)
    dtype = _dtype(dtype)
    where = resolve_device_option(device)
    from vstream.bench.demo_paths import demo_paths_benchmark

    typer.echo(json.dumps(demo_paths_benchmark(streams, dtype, where, model_name=model), indent=1))
