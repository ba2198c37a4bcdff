"""Per-frame STAR memory update time at growing stream lengths (released memory shapes, D=1024, fp16).

Usage: python benchmarks/memory_update.py [--device cuda] [--mode paper|official] [--lengths 100 1000 10000]
Prints one JSON line per stream length: median and p95 of one-frame updates, timed with CUDA events (or
perf_counter on CPU), plus the memory state's bytes. A first version; the full `vstream bench` comes later.
"""

import argparse
import json
import statistics
import time

import torch

from vstream.config import MemoryConfig
from vstream.memory import AbstractAttention, build_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="paper", choices=["paper", "official"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--cuda-graph", action="store_true", help="replay steady paper-mode updates from a CUDA graph")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    att = AbstractAttention(args.dim, 32).to(dev, dtype)
    mem = build_memory(MemoryConfig(mode=args.mode), args.dim, att, 16, device=dev, dtype=dtype)
    if args.cuda_graph:
        mem.enable_cuda_graph()
    pool = torch.randn(64, 256, args.dim, device=dev, dtype=dtype)
    seen = 0
    for length in args.lengths:
        while seen < length:  # fast-forward in chunks of 25 frames (eager), then one frame to reach the graph path
            n = min(25, length - seen)
            mem.update(pool[seen % 39 : seen % 39 + n], torch.arange(seen, seen + n, dtype=torch.float64, device=dev))
            seen += n
        mem.update(pool[:1], torch.tensor([float(seen)], dtype=torch.float64, device=dev))  # warm (captures a graph)
        seen += 1
        times = []
        for r in range(args.repeats):
            frame = pool[r % 64 : r % 64 + 1]
            t = torch.tensor([float(seen)], dtype=torch.float64, device=dev)
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                mem.update(frame, t)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                mem.update(frame, t)
                times.append((time.perf_counter() - t0) * 1000)
            seen += 1
        times.sort()
        print(json.dumps({
            "mode": args.mode, "cuda_graph": args.cuda_graph, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "frames_seen": seen,
            "update_ms_median": round(statistics.median(times), 4), "update_ms_p95": round(times[int(0.95 * len(times))], 4),
            "state_bytes": mem.nbytes, "tokens": mem.num_tokens,
        }))


if __name__ == "__main__":
    main()
