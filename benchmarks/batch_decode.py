"""Decode-step time of the batched decoder (`vstream.model.batch_decode.BatchDecoder`) at several batch sizes, beside
the single-answer fast path's step, for a preset's LLM with random weights (CUDA events; the step is one graph replay).

    python benchmarks/batch_decode.py --preset flash-vstream-7b --batches 1,8,32,64 --prompt 745

Every slot holds a prompt of `--prompt` positions (prefilled once), so each step attends over a full memory-sized
context, as answers in flight do. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from vstream.bench import environment, load_bench_model, time_ms
from vstream.model.batch_decode import BatchDecoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-vstream-7b")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=745)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    model, _, _ = load_bench_model(args.preset, "cuda", eager=False)
    llm, hidden = model.llm, model.llm.config.hidden_size
    result = {"env": environment(model), "prompt_tokens": args.prompt, "max_seq_len": args.seq, "batched": {}}
    for b in (int(x) for x in args.batches.split(",")):
        dec = BatchDecoder(llm, max_batch=b, max_seq_len=args.seq)
        embeds = torch.randn(1, args.prompt, hidden, device="cuda", dtype=model.dtype) * 0.02
        for _ in range(b):
            dec.prefill(dec.cache.acquire(), embeds)
        ms = time_ms(dec.step, torch.device("cuda"), args.repeats, warmup=3)
        result["batched"][b] = {"median_ms": statistics.median(ms), "min_ms": min(ms),
                                "per_answer_ms": statistics.median(ms) / b}
        del dec
        torch.cuda.empty_cache()
    result["note"] = "the single-answer fast path (fused kernels) is BENCHMARKS.md's decode figure"
    base = result["batched"][min(result["batched"])]["median_ms"]
    result["ratio_to_smallest_batch"] = {b: r["median_ms"] / base for b, r in result["batched"].items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
