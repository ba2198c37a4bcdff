"""`vstream bench {pages,decode,cluster}`: how costs grow with the streams served together: memory updates by pages of
streams, decode steps batched across answers, engine replicas of a cluster. Each prints one JSON object (`pages`: one
JSON line per stream count), as the scripts of benchmarks/ that they replace printed them.

The measurements are `vstream.bench.pages`, `vstream.bench.decode` and `vstream.bench.cluster`; this module checks
the options and prints the results.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import (DeviceOpt, comma_ints, cuda_device_option, known_preset, positive_ints,
                                 resolve_device_option)
from vstream.errors import UserInputError


def bench_pages(
    streams: Annotated[str, typer.Option(help="Numbers of streams, comma-separated.")] = "64,256",
    page: Annotated[int, typer.Option(help="Streams per memory page.")] = 64,
    rounds: Annotated[int, typer.Option(help="Timed rounds (every stream one frame) per stream count.")] = 20,
    profile: Annotated[bool, typer.Option(
        help="Also print the device kernels of one eager page update after each line.")] = False,
    device: DeviceOpt = "cuda",
) -> None:
    """Memory updates of N streams per round on CUDA: each memory replaying its own graph, against memory pages (one
    batched update per page); one JSON line per stream count."""
    counts = comma_ints(streams, "streams")
    positive_ints(page=page, rounds=rounds)
    where = cuda_device_option(device, "bench pages")
    from vstream.bench.pages import pages_benchmark

    for row, kernels in pages_benchmark(counts, page=page, rounds=rounds, device=where, kernels=profile):
        typer.echo(json.dumps(row))
        if kernels is not None:
            typer.echo(kernels)


def bench_decode(
    preset: Annotated[str, typer.Option(help="Preset of the LLM's shape (random weights).")] = "flash-vstream-7b",
    device: DeviceOpt = "cuda",
    batches: Annotated[str, typer.Option(help="Answers decoded together (batch sizes), comma-separated.")
                       ] = "1,8,32,64",
    prompt: Annotated[int, typer.Option(help="Prompt positions prefilled in every slot.")] = 745,
    seq: Annotated[int, typer.Option(help="KV cache positions per slot.")] = 1024,
    repeats: Annotated[int, typer.Option(help="Timed steps per batch size.")] = 50,
) -> None:
    """Decode-step time of the batched decoder at several batch sizes, every slot holding a memory-sized prompt."""
    from vstream.bench.decode import WARMUP_STEPS, decode_benchmark
    from vstream.config import PRESETS

    known_preset(preset, PRESETS)
    sizes = comma_ints(batches, "batches")
    positive_ints(prompt=prompt, seq=seq, repeats=repeats)
    if prompt + WARMUP_STEPS + repeats > seq:
        raise UserInputError(f"--seq must hold --prompt + {WARMUP_STEPS} warm-up steps + --repeats positions "
                             f"({prompt + WARMUP_STEPS + repeats}), got {seq}")
    where = resolve_device_option(device)
    from vstream.bench import load_bench_model

    model, _, _ = load_bench_model(preset, where)
    typer.echo(json.dumps(decode_benchmark(model, sizes, prompt=prompt, seq=seq, repeats=repeats), indent=1))


def bench_cluster(
    replicas: Annotated[str, typer.Option(help="Numbers of engine replicas, one cluster each, comma-separated.")
                        ] = "1,2",
    streams: Annotated[int, typer.Option(help="Push streams created through the ingress.")] = 8,
    clients: Annotated[int, typer.Option(help="Clients asking questions back to back.")] = 8,
    seconds: Annotated[float, typer.Option(help="Seconds of the question phase, and of the frame phase.")] = 20.0,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of each question.")] = 16,
    threads: Annotated[int, typer.Option(help="torch CPU threads per replica.")] = 1,
    model: Annotated[str, typer.Option("--model", "-m", help="The replicas' model (preset or directory).")] = "tiny",
) -> None:
    """Throughput of a cluster on a local Ray instance (the CPU) at several numbers of replicas, through its ingress:
    answers/s, frames/s and the directory's route calls/s."""
    sizes = comma_ints(replicas, "replicas")
    positive_ints(streams=streams, clients=clients, max_tokens=max_tokens, threads=threads)
    if not seconds > 0:
        raise UserInputError(f"--seconds must be > 0, got {seconds:g}")
    needs_extra("ray", "bench cluster")
    needs_extra("server", "bench cluster")  # the ingress, and the client's httpx and websockets
    from vstream.bench.cluster import ClusterLoad, cluster_benchmark

    load = ClusterLoad(streams=streams, clients=clients, seconds=seconds, max_tokens=max_tokens)
    typer.echo(json.dumps(cluster_benchmark(sizes, load, threads=threads, model=model), indent=1))
