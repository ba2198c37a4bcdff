"""The trained demo model's two paths on held-out world questions (`demo_paths_benchmark`, what `vstream bench
demo-paths` runs): answers through the fast path (fused kernels, graph-replayed decode) against the eager path, and
memories built with the k-means kernel against the PyTorch loop (`VSTREAM_KERNELS=0`).

The result: each variant's accuracy, how often their answers agree word for word, their answer latencies, and the
first questions on which fast and eager differ. The kernels run on CUDA only: on the CPU both memories come from the
PyTorch loop, and the run says only that the paths agree. Scoring a model on the world's questions is
`vstream world-eval`; this compares paths of one model.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

DIFFERING_SHOWN = 10
"""Questions on which the fast and the eager answers differ, listed at most."""


def demo_paths_benchmark(streams: int = 20, dtype: str = "float32", device: torch.device | str = "cuda",
                         model_name: str = "demo") -> dict:
    """The three variants on the questions of the first `streams` held-out world streams."""
    from vstream.eval.scoring import normalise_keep_word_breaks
    from vstream.model.loading import load
    from vstream.synth import world

    device = torch.device(device)
    model = load(model_name, device=device, dtype=dtype, eager=False)
    fast = model.static_answerer
    seeds = world.split_seeds("test", streams, 0)
    with_kernel, with_loop = snapshots(model, seeds, kernels=True), snapshots(model, seeds, kernels=False)
    truth = [normalise_keep_word_breaks(qa.answer) for qa, _ in with_kernel]
    runs = {"fast_kernel_memory": answers(model, with_kernel, fast),
            "eager_kernel_memory": answers(model, with_kernel, None),
            "eager_loop_memory": answers(model, with_loop, None)}

    def accuracy(texts: list[str]) -> float:
        return round(sum(normalise_keep_word_breaks(t) == a for t, a in zip(texts, truth)) / len(truth), 4)

    def agree(a: str, b: str) -> float:
        return round(sum(x == y for x, y in zip(runs[a][0], runs[b][0])) / len(truth), 4)

    differing = [{"q": qa.question, "fast": a, "eager": b} for (qa, _), a, b
                 in zip(with_kernel, runs["fast_kernel_memory"][0], runs["eager_kernel_memory"][0]) if a != b]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "dtype": dtype, "streams": streams, "questions": len(truth),
        "fused": fast.decoder.fused,
        "accuracy": {k: accuracy(v[0]) for k, v in runs.items()},
        "same_text": {"fast_vs_eager": agree("fast_kernel_memory", "eager_kernel_memory"),
                      "kernel_vs_loop_memory": agree("eager_kernel_memory", "eager_loop_memory")},
        "answer_ms_median": {k: round(statistics.median(v[1]), 2) for k, v in runs.items()},
        "differing": differing[:DIFFERING_SHOWN],
    }


@contextlib.contextmanager
def kernels_switched(on: bool) -> Iterator[None]:
    """VSTREAM_KERNELS set to 1 or 0 inside the block (`vstream.kernels.available` reads it at each call), and put
    back as it was after."""
    before = os.environ.get("VSTREAM_KERNELS")
    os.environ["VSTREAM_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["VSTREAM_KERNELS"]
        else:
            os.environ["VSTREAM_KERNELS"] = before


def snapshots(model, seeds, kernels: bool) -> list:
    """(question, memory at its time) of every question of the world streams `seeds`, in time order per stream, the
    memories built with the k-means kernel or the PyTorch loop."""
    from vstream.synth import world

    out = []
    with kernels_switched(kernels):
        for seed in seeds:
            stream = world.generate_stream(seed)
            qas = sorted(world.make_questions(stream, seed=seed), key=lambda q: q.time)
            frames = stream.frames(fps=model.cfg.sample_fps, size=128)
            out += list(zip(qas, model.memory_snapshots(frames, [q.time for q in qas])))
    return out


def answers(model, items: list, fast) -> tuple[list[str], list[float]]:
    """The answer to each (question, memory) of `items` and its milliseconds, through the static-cache answerer
    `fast` or, with None, the eager path."""
    model.static_answerer = fast
    texts, ms = [], []
    for qa, memory in items:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        texts.append("".join(model.stream_answer(memory, qa.question)))
        ms.append((time.perf_counter() - t0) * 1000)
    return texts, ms
