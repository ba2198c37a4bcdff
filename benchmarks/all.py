"""Every benchmark in one process (one model load), for a GPU lease: device ceilings, memory, encode, answer, streams,
and a torch.profiler table of the fast path's hot calls. Writes one JSON file per part to --out and prints a summary.

Usage: PYTHONPATH=. python benchmarks/all.py --preset flash-vstream-7b --device cuda --out $OUT [--parts ...]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vstream import bench


def ceilings(device: torch.device) -> dict:
    """Measured matrix-product rate (fp16, 8192^3) and device copy bandwidth (bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    ms = bench.summary(bench.time_ms(lambda: a @ b, device, 10, warmup=3))
    x = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    cp = bench.summary(bench.time_ms(lambda: y.copy_(x), device, 10, warmup=3))
    return {"fp16_matmul_tflops": round(2 * 8192**3 / ms["median_ms"] / 1e9, 1),
            "copy_TBps": round(2 * x.numel() / cp["median_ms"] / 1e9, 3)}


def profile(model, out: Path) -> None:
    """Kernel-time tables of one fast prefill + decode steps, and of one batch-64 encode."""
    from torch.profiler import ProfilerActivity, profile as prof

    fast = model.fast
    dec = fast.decoder
    prefix, rest = fast.prompt_parts("What is happening?")
    mem = torch.randn(model.cfg.memory.max_tokens, model.cfg.vision.hidden_size, device=model.device, dtype=model.dtype)
    embeds, start = fast.embeds(mem, "What is happening?")
    pixels = torch.randn(64, 3, 224, 224, device=model.device, dtype=model.dtype)
    tables = []
    for name, fn in {
        "prefill": lambda: dec.prefill(embeds, start),
        "decode_steps": lambda: [dec.step() for _ in range(20)],
        "encode64": lambda: model.vision.encode(pixels, batch_size=64),
    }.items():
        fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        tables.append(f"== {name}\n" + p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    (out / "profile.txt").write_text("\n\n".join(tables))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-vstream-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--parts", nargs="+", default=["ceilings", "answer", "encode", "memory", "streams", "profile"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    ap.add_argument("--counts", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results = {}
    if "ceilings" in args.parts and device.type == "cuda":
        results["ceilings"] = ceilings(device)
    model, built, warm = bench.load_bench_model(args.preset, device)
    results["load"] = {"build_s": built, "fast_warmup_s": warm, "tower_warmup_s": model.vision.warmup_s,
                       "decode_warmup_s": model.fast.warmup_s, "memory": bench.gpu_memory(device)}
    print(json.dumps(results), flush=True)
    runs = {
        "answer": lambda: bench.answer_benchmark(model, new_tokens=128, repeats=20, anchor_tokens=128,
                                                 compile_anchor=True),
        "encode": lambda: bench.encode_benchmark(model, batch_sizes=(1, 8, 64, 256), repeats=20),
        "memory": lambda: bench.memory_benchmark(model, lengths=args.lengths, repeats=200),
        "streams": lambda: bench.streams_benchmark(model, counts=args.counts, seconds=args.seconds, warm_frames=27),
    }
    for part, run in runs.items():
        if part in args.parts:
            t0 = time.perf_counter()
            try:
                results[part] = run()
            except Exception as exc:  # keep the other parts' numbers; the error is reported in the output  # noqa: BLE001
                results[part] = {"error": repr(exc)}
            results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
            (out / "all.json").write_text(json.dumps(results, indent=1))  # rewritten after each part
            print(part, json.dumps(results[part])[:3000], flush=True)
    if "profile" in args.parts and device.type == "cuda":
        profile(model, out)


if __name__ == "__main__":
    main()
