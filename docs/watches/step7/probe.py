"""The watch score of a model on training-distribution questions, by condition type and truth.

For each stream (the first N of step 7's training streams, from seed 700000), one time and its questions are drawn as
step 7's data draws them (`sample_time` with watch_near 0.8, recolour and scene weighing 8;
`watch_questions` with one false condition per true one). The memory at that time is built from the rendered frames
(no augmentation). Each condition is scored as a watch scores it (`yes_no_scores_shared`). The output gives, per
(type, truth), the mean score, the share on the right side of 0, and the count.

    python docs/watches/step7/probe.py 40 demo runs/demo/watches2/model
"""

import collections
import json
import sys

import numpy as np
import torch

import vstream
from vstream.model.yesno import yes_no_scores_shared
from vstream.synth import world as w
from vstream.train.watch_data import sample_time, watch_questions


def kind(condition: str) -> str:
    if "background" in condition:
        return "scene"
    return "appear" if "appears" in condition else "leave" if "leaves" in condition else "recolour"


@torch.inference_mode()
def probe(model_name: str, seeds: list[int]) -> dict:
    model = vstream.load(model_name, device="cpu")
    scores = collections.defaultdict(list)
    for seed in seeds:
        stream = w.generate_stream(seed)
        rng = np.random.default_rng([seed, 9])
        t = sample_time(stream, rng, 0.8, {"recolour": 8, "scene": 8})
        q = watch_questions(stream, t, rng, 24, 1.0)
        memory = next(iter(model.memory_snapshots(stream.frames(fps=model.cfg.sample_fps, size=128), [t])))
        for c, a, s in zip(q.conditions, q.answers, yes_no_scores_shared(model, memory.tokens, list(q.conditions))):
            scores[kind(c), a].append(float(s))
    return {f"{t} {'yes' if a else 'no'}": {"mean": round(float(np.mean(v)), 2),
                                             "right": round(float(np.mean((np.asarray(v) > 0) == a)), 2), "n": len(v)}
            for (t, a), v in sorted(scores.items())}


if __name__ == "__main__":
    n = int(sys.argv[1])
    for name in sys.argv[2:]:
        print(name, json.dumps(probe(name, list(range(700000, 700000 + n)))), flush=True)
