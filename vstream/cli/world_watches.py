"""`vstream world-eval --watches`: how a model's watches fire on held-out streams of the procedural world
(`vstream.eval.world_watches`), written as `watches.json` (every task's scores), `watches.md` (precision, recall,
delay and false alarms per condition type, against the issue's targets) and `watches.png` (the scores of a few tasks
over stream time, with their events and triggers).

`--from-results` renders the report and plot again from a `watches.json` alone. This module checks the options,
records what produced the results and renders them; the evaluation is `vstream.eval.world_watches`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vstream.errors import UserInputError

RESULTS, REPORT, PLOT, PARTIAL = "watches.json", "watches.md", "watches.png", "watches.partial.json"
TARGETS = {"recall": 0.9, "precision": 0.9, "delay_median_s": 2.0, "delay_p95_s": 5.0, "false_alarms_per_hour": 1.0}
"""Issue 17's targets for the demo model on held-out streams."""


def run(model_name: str, split: str, streams: int, start: int, calibration_streams: int, threshold: float,
        device: str, conditions_per_forward: int, provenance, out: Path) -> dict:
    """Load the model and evaluate its watches; the results with what produced them (`provenance(model)`). The
    rows scored so far are kept in `out/watches.partial.json` after each stream until the run ends."""
    import vstream
    from vstream.cli.options import resolve_device_option
    from vstream.eval.world_watches import evaluate_watches

    if calibration_streams < 0:
        raise UserInputError(f"--calibration-streams must be >= 0, got {calibration_streams}")
    m = vstream.load(model_name, device=resolve_device_option(device))
    partial = out / PARTIAL
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate_watches(m, split, streams, start, calibration_streams, threshold,
                               conditions_per_forward=conditions_per_forward,
                               on_stream=lambda rows: partial.write_text(json.dumps(rows)))
    partial.unlink(missing_ok=True)
    return provenance(m) | results


def read(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"--from-results must be a {RESULTS} file, got {path}")
    results = json.loads(path.read_text())
    missing = [k for k in ("metrics", "rows", "threshold", "command") if k not in results]
    if missing:
        raise UserInputError(f"{path} is not a world-eval --watches results file: missing {missing}")
    return results


def _cell(value, key: str) -> str:
    if value is None:
        return "-"
    if key in ("recall", "precision"):
        return f"{value:.0%}"
    return f"{value:.2f}" if key.endswith("_s") else f"{value:.1f}"


def _meets(value, key: str) -> str:
    if value is None:
        return ""
    ok = value >= TARGETS[key] if key in ("recall", "precision") else value <= TARGETS[key]
    return " ✓" if ok else " ✗"


def table(metrics: dict) -> list[str]:
    keys = ["recall", "precision", "delay_median_s", "delay_p95_s", "false_alarms_per_hour"]
    lines = ["| condition type | tasks | events | triggers | caught | false alarms | recall | precision | "
             "median delay (s) | p95 delay (s) | false alarms / h |", "|---" * 11 + "|"]
    for name, m in metrics.items():
        cells = [_cell(m[k], k) + _meets(m[k], k) for k in keys]
        lines.append(f"| {name} | {m['tasks']} | {m['events']} | {m['triggers']} | {m['caught']} | "
                     f"{m['false_alarms']} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(results: dict) -> str:
    v = results.get("versions", {})
    lines = [
        "# Watches on held-out streams of the procedural world", "",
        f"- Model: `{results.get('model')}` ({results.get('model_name', '?')}); device {results.get('device', '?')}",
        f"- Streams: {results['streams']} of the `{results['split']}` split from index {results['start']}, "
        f"{len(results['rows'])} watch tasks, scored every {results['every_s']} s of stream time; "
        f"evaluation took {results.get('seconds', float('nan')):.0f} s",
        f"- Watch settings: hysteresis {results['hysteresis']}, cooldown {results['cooldown_s']} s; a trigger "
        f"catches an event when it comes 0 to {results['window_s']:.0f} s after it",
        f"- Date: {results.get('date')}; vstream {v.get('vstream')}, torch {v.get('torch')}, "
        f"transformers {v.get('transformers')}",
        f"- Command: `{results['command']}`", "",
        "Targets (issue 17): recall and precision >= 90 %, median delay <= 2 s, p95 <= 5 s, <= 1 false alarm per "
        "hour (✓ met, ✗ missed). Events fall at k + 0.5 s and frames are sampled at whole seconds, so the "
        "shortest possible delay is 0.5 s.", "",
        f"## At the default threshold ({results['threshold']})", "", *table(results["metrics"]), "",
    ]
    cv = results.get("cross_validated")
    if cv is not None:
        lines += ["## At per-type thresholds cross-validated over the streams", "",
                  "Each stream is scored at the thresholds (one per condition type, best F1) picked on the other "
                  "streams: " + "; ".join(f"seed {seed}: " + ", ".join(f"{t} {v:.2f}" for t, v in th.items())
                                          for seed, th in cv["thresholds"].items()) + ".", "",
                  *table(cv["metrics"]), ""]
    cal = results.get("calibrated")
    if cal is not None:
        lines += [f"## At the threshold calibrated on {cal['streams']} `{cal['split']}` streams "
                  f"({cal['threshold']:.2f}, best F1 there)", "", *table(cal["metrics"]), ""]
        if "per_type_thresholds" in cal:
            tuned = ", ".join(f"{t} {v:.2f}" for t, v in cal["per_type_thresholds"].items())
            lines += [f"## At thresholds calibrated per condition type on the same `{cal['split']}` streams "
                      f"({tuned})", "", *table(cal["per_type_metrics"]), ""]
    lines += [f"![scores of some watch tasks over stream time]({PLOT})", ""]
    return "\n".join(lines)


def write_plot(results: dict, path: Path, per_type: int = 1) -> Path:
    """Scores over stream time of the first `per_type` tasks with events of each type on the first stream that has
    them, with their events (dashed) and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = []
    for kind in ("appear", "leave", "recolour", "scene"):
        picked += [r for r in results["rows"] if r["type"] == kind and r["events"]][:per_type]
    picked += [r for r in results["rows"] if not r["events"]][:1]
    threshold = results.get("calibrated", {}).get("threshold", results["threshold"])
    fig, axes = plt.subplots(len(picked), 1, figsize=(8, 1.6 * len(picked) + 0.6), sharex=False, squeeze=False)
    for ax, row in zip(axes[:, 0], picked):
        ax.plot(row["times"], row["scores"], marker=".", lw=1)
        for e in row["events"]:
            ax.axvline(e, color="tab:green", ls="--", lw=1)
        ax.axhline(threshold, color="tab:red", lw=0.8)
        ax.set_title(f"seed {row['seed']}: “{row['condition']}” ({row['type']}; events dashed)", fontsize=8)
        ax.set_ylabel("log-odds", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("stream time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results))
    (out / REPORT).write_text(report_markdown(results))
    write_plot(results, out / PLOT)
