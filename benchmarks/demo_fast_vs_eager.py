"""The trained demo model on a GPU: answers through the fast path (fused kernels, graph-replayed decode) against the
eager path, and memories built with the k-means kernel against the PyTorch loop, on held-out world questions.

Usage: PYTHONPATH=. python benchmarks/demo_fast_vs_eager.py [--streams 20] [--dtype float32] [--device cuda]
Prints one JSON object: accuracy of each variant, how often their answers agree, and answer latencies.
"""

import argparse
import json
import os
import statistics
import time

import torch

from vstream.model.loading import load
from vstream.synth import world as w
from vstream.eval.scoring import normalise_keep_word_breaks


def snapshots(model, seeds, kernels_on: bool) -> list:
    os.environ["VSTREAM_KERNELS"] = "1" if kernels_on else "0"
    out = []
    for seed in seeds:
        stream = w.generate_stream(seed)
        qas = sorted(w.make_questions(stream, seed=seed), key=lambda q: q.time)
        frames = stream.frames(fps=model.cfg.sample_fps, size=128)
        out += list(zip(qas, model.memory_snapshots(frames, [q.time for q in qas])))
    os.environ["VSTREAM_KERNELS"] = "1"
    return out


def answers(model, items, fast) -> tuple[list[str], list[float]]:
    model.static_answerer = fast
    texts, ms = [], []
    for qa, memory in items:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        texts.append("".join(model.stream_answer(memory, qa.question)))
        ms.append((time.perf_counter() - t0) * 1000)
    return texts, ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    model = load("demo", device=args.device, dtype=args.dtype, eager=False)
    fast = model.static_answerer
    seeds = w.split_seeds("test", args.streams, 0)
    with_kernel, with_loop = snapshots(model, seeds, True), snapshots(model, seeds, False)
    truth = [normalise_keep_word_breaks(qa.answer) for qa, _ in with_kernel]
    runs = {"fast_kernel_memory": answers(model, with_kernel, fast),
            "eager_kernel_memory": answers(model, with_kernel, None),
            "eager_loop_memory": answers(model, with_loop, None)}

    def acc(texts):
        return round(sum(normalise_keep_word_breaks(t) == a for t, a in zip(texts, truth)) / len(truth), 4)

    def agree(a, b):
        return round(sum(x == y for x, y in zip(runs[a][0], runs[b][0])) / len(truth), 4)

    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
        "dtype": args.dtype, "streams": args.streams, "questions": len(truth), "fused": fast.decoder.fused,
        "accuracy": {k: acc(v[0]) for k, v in runs.items()},
        "same_text": {"fast_vs_eager": agree("fast_kernel_memory", "eager_kernel_memory"),
                      "kernel_vs_loop_memory": agree("eager_kernel_memory", "eager_loop_memory")},
        "answer_ms_median": {k: round(statistics.median(v[1]), 2) for k, v in runs.items()},
        "differing": [{"q": qa.question, "fast": a, "eager": b} for (qa, _), a, b
                      in zip(with_kernel, runs["fast_kernel_memory"][0], runs["eager_kernel_memory"][0])
                      if a != b][:10],
    }, indent=1))


if __name__ == "__main__":
    main()
