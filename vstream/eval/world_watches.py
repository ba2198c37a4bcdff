"""Watches on held-out streams of the procedural world: how well a model's standing questions fire, per condition type.

Each stream is played once through the model's memory (`memory_snapshots`, as `vstream.eval.world` does); every
`every_s` seconds of stream time each of its watch tasks (`vstream.synth.world.watches`) is scored with the server's
mechanism, the log-odds of "Yes" against "No" in one prefill (`yes_no_scores_shared`: the memory's part of the
prompt once, the tasks' questions batched on its KV cache), and the scores are kept. `replay` then runs the server's
state machine (`vstream.engine.watches.Watch`: threshold, hysteresis, cooldown) over a task's scores to get its
triggers, so thresholds can be compared from the kept scores without the model. `calibrate` picks the threshold with the
best F1 on calibration streams (a split other than the one reported), for all condition types at once and for each type
alone (a watch's threshold is set per watch); `cross_validated` picks per-type thresholds on all streams but one and
scores that one, in turn.

Scoring (`metrics`): a trigger at stream time t matches the earliest unmatched event e of its task with
e <= t <= e + `window_s`; a matched event counts for recall and its delay t - e is kept; a trigger that matches no
event is a false alarm (it counts against precision, and per hour of watched stream time: each task watches its
whole stream). `watch.cleared` events are not scored.

This module does not train and does not draw the world.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from vstream.engine.watches import TRIGGERED, Watch
from vstream.errors import UserInputError
from vstream.stats import percentile
from vstream.model.yesno import yes_no_scores_shared
from vstream.synth import world as w
from vstream.synth.world.watches import WATCH_TYPES, make_watch_tasks

WINDOW_S = 10.0
"""Longest delay from an event to a trigger that still counts as catching it."""


@torch.inference_mode()
def score_streams(model, split: str = "test", streams: int = 20, start: int = 0, every_s: float = 1.0,
                  conditions_per_forward: int = 32, frame_size: int = 128, progress: bool = True,
                  on_stream: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One row per watch task: seed, duration, type, condition, events, and its score at each time in `times`, the
    conditions over one memory scored `conditions_per_forward` a forward; `on_stream(rows so far)` after each stream
    (to keep partial results of a long run)."""
    from tqdm import tqdm

    if not every_s > 0 or conditions_per_forward < 1:
        raise UserInputError(f"expected every_s > 0 and conditions_per_forward >= 1, got {every_s} and "
                             f"{conditions_per_forward}")
    rows = []
    for seed in tqdm(w.split_seeds(split, streams, start), desc=f"{split} streams (watches)", disable=not progress):
        stream = w.generate_stream(seed)
        tasks = make_watch_tasks(stream)
        times = [float(t) for t in np.arange(0.0, stream.duration, every_s)]
        scores: list[list[float]] = [[] for _ in tasks]
        frames = stream.frames(fps=model.cfg.sample_fps, size=frame_size)
        for memory in model.memory_snapshots(frames, times):
            conditions = [task.condition for task in tasks]
            for i in range(0, len(conditions), conditions_per_forward):
                chunk = conditions[i : i + conditions_per_forward]
                for j, score in enumerate(yes_no_scores_shared(model, memory.tokens, chunk)):
                    scores[i + j].append(round(score, 4))
        rows += [{"seed": seed, "duration": stream.duration, "type": task.type, "condition": task.condition,
                  "events": list(task.events), "times": times, "scores": s} for task, s in zip(tasks, scores)]
        if on_stream is not None:
            on_stream(rows)
    return rows


def replay(row: dict, threshold: float, hysteresis: float, cooldown_s: float) -> list[float]:
    """The stream times at which the server's state machine triggers on the row's scores."""
    watch = Watch(row["condition"], every_s=0.0, cooldown_s=cooldown_s, threshold=threshold, hysteresis=hysteresis)
    fired = []
    for t, score in zip(row["times"], row["scores"]):
        event = watch.update(t, score)
        if event is not None and event["type"] == TRIGGERED:
            fired.append(t)
    return fired


def match(events: Sequence[float], triggers: Sequence[float], window_s: float) -> tuple[list[float], int]:
    """(delays of the matched events, false alarms) of one task (see the module docstring)."""
    unmatched, delays, false = sorted(events), [], 0
    for t in sorted(triggers):
        hit = next((e for e in unmatched if e <= t <= e + window_s), None)
        if hit is None:
            false += 1
        else:
            unmatched.remove(hit)
            delays.append(t - hit)
    return delays, false


def metrics(rows: Sequence[dict], threshold: float | dict[str, float] | None, hysteresis: float, cooldown_s: float,
            window_s: float = WINDOW_S) -> dict:
    """{type (and "overall"): events, triggers, recall, precision, median and p95 delay (s), false alarms and false
    alarms per hour}; a ratio with nothing to divide is None. `threshold`: one for all, one per condition type, or
    None: each row's own `threshold`."""
    groups: dict[str, list[dict]] = {t: [r for r in rows if r["type"] == t] for t in WATCH_TYPES}
    groups = {t: g for t, g in groups.items() if g} | {"overall": list(rows)}
    out = {}
    for name, group in groups.items():
        delays, false, triggers, events, seconds = [], 0, 0, 0, 0.0
        for row in group:
            th = row["threshold"] if threshold is None else threshold[row["type"]] if isinstance(threshold, dict) \
                else threshold
            fired = replay(row, th, hysteresis, cooldown_s)
            d, f = match(row["events"], fired, window_s)
            delays += d
            false, triggers, events = false + f, triggers + len(fired), events + len(row["events"])
            seconds += row["duration"]
        out[name] = {
            "tasks": len(group), "events": events, "triggers": triggers, "caught": len(delays), "false_alarms": false,
            "recall": len(delays) / events if events else None,
            "precision": (triggers - false) / triggers if triggers else None,
            "delay_median_s": float(np.median(delays)) if delays else None,
            "delay_p95_s": percentile(sorted(delays), 0.95) if delays else None,  # nearest rank, as every p95
            "false_alarms_per_hour": 3600.0 * false / seconds if seconds else None, "hours": seconds / 3600.0,
        }
    return out


def calibrate(rows: Sequence[dict], hysteresis: float, cooldown_s: float, window_s: float = WINDOW_S) -> float:
    """The threshold with the best overall F1 (ties: fewer false alarms) on `rows`, among the midpoints of their
    scores' range in 0.25 steps."""
    scores = [s for r in rows for s in r["scores"]]
    if not scores:
        raise UserInputError("no scores to calibrate a threshold on")
    lo, hi = np.floor(min(scores) * 4) / 4, np.ceil(max(scores) * 4) / 4
    best, key = 0.0, None
    for th in np.arange(lo, hi + 0.25, 0.25):
        m = metrics(rows, float(th), hysteresis, cooldown_s, window_s)["overall"]
        r, p = m["recall"] or 0.0, m["precision"] or 0.0
        f1 = 2 * r * p / (r + p) if r + p else 0.0
        if key is None or (f1, -m["false_alarms"]) > key:
            best, key = float(th), (f1, -m["false_alarms"])
    return best


def cross_validated(rows: Sequence[dict], hysteresis: float, cooldown_s: float) -> dict:
    """Leave one stream out: each stream's tasks replayed at the per-type thresholds `calibrate` picks on the other
    streams, so no stream is scored at a threshold chosen on itself; {"thresholds": {seed: {type: threshold}},
    "metrics": ...}."""
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) < 2:
        raise UserInputError(f"cross-validation needs at least 2 streams, got {len(seeds)}")
    chosen, scored = {}, []
    for seed in seeds:
        others = [r for r in rows if r["seed"] != seed]
        overall = calibrate(others, hysteresis, cooldown_s)
        chosen[seed] = {t: calibrate(g, hysteresis, cooldown_s) if (g := [r for r in others if r["type"] == t])
                        else overall for t in WATCH_TYPES}
        scored += [r | {"threshold": chosen[seed][r["type"]]} for r in rows if r["seed"] == seed]
    return {"thresholds": chosen, "metrics": metrics(scored, None, hysteresis, cooldown_s)}


def evaluate_watches(model, split: str = "test", streams: int = 20, start: int = 0, calibration_streams: int = 0,
                     threshold: float = 0.0, hysteresis: float = 0.5, cooldown_s: float = 10.0, every_s: float = 1.0,
                     conditions_per_forward: int = 32, progress: bool = True,
                     on_stream: Callable[[list[dict]], None] | None = None) -> dict:
    """Score the `split` streams' watch tasks and report `metrics` at `threshold`; with 2 streams or more, also with
    per-type thresholds cross-validated over the streams (`cross_validated`); with `calibration_streams` > 0, also at
    the thresholds `calibrate` picks on that many `val` streams (`calibrated` in the results)."""
    t0 = time.perf_counter()
    rows = score_streams(model, split, streams, start, every_s, conditions_per_forward, progress=progress,
                         on_stream=on_stream)
    out = {"split": split, "streams": streams, "start": start, "every_s": every_s, "hysteresis": hysteresis,
           "cooldown_s": cooldown_s, "window_s": WINDOW_S, "threshold": threshold,
           "metrics": metrics(rows, threshold, hysteresis, cooldown_s)}
    if streams >= 2:
        out["cross_validated"] = cross_validated(rows, hysteresis, cooldown_s)
    if calibration_streams:
        val = score_streams(model, "val", calibration_streams, 0, every_s, conditions_per_forward, progress=progress)
        tuned = calibrate(val, hysteresis, cooldown_s)
        per_type = {t: calibrate(g, hysteresis, cooldown_s) for t in WATCH_TYPES
                    if (g := [r for r in val if r["type"] == t])}
        per_type |= {t: tuned for t in WATCH_TYPES if t not in per_type}  # a type the val streams lack: the overall
        out["calibrated"] = {"streams": calibration_streams, "split": "val", "threshold": tuned,
                             "metrics": metrics(rows, tuned, hysteresis, cooldown_s),
                             "val_metrics": metrics(val, tuned, hysteresis, cooldown_s),
                             "per_type_thresholds": per_type,
                             "per_type_metrics": metrics(rows, per_type, hysteresis, cooldown_s)}
        out["val_rows"] = val
    return out | {"seconds": time.perf_counter() - t0, "rows": rows}
