"""`vstream world-eval`: accuracy on held-out streams of the procedural world per question type, with each memory part
switched off in turn (`vstream.eval.world.evaluate`), written as `results.json` (every row), `report.md` (a table
per ablation, the command, model, date, device and versions) and `accuracy.png` (grouped bars).

`--from-results FILE` renders the report and plot again from a results file alone (e.g. one made on a GPU machine), so
the same file always gives the same report.

The evaluation itself is `vstream.eval.world`; this module checks the options, records what produced the results
and renders them.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import DeviceOpt, resolve_device_option
from vstream.errors import UserInputError

RESULTS, REPORT, PLOT = "results.json", "report.md", "accuracy.png"
ABLATIONS = (None, "spatial", "temporal", "abstract", "retrieved")
"""Rows of the report with `--ablate`: the full model, then each memory part dropped from every snapshot."""
REQUIRED = ("command", "model", "date", "device", "versions", "split", "streams", "start", "source", "questions",
            "per_type", "accuracy", "rows")
"""Fields a results file must hold for its report to be rendered."""


def world_eval(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Preset, model directory or 'demo'.")] = None,
    split: Annotated[str, typer.Option(help="train, val or test (disjoint seed ranges).")] = "test",
    streams: Annotated[int, typer.Option(help="Number of streams.")] = 50,
    start: Annotated[int, typer.Option(help="Index of the first stream within the split.")] = 0,
    source: Annotated[str, typer.Option(help="render (frames drawn directly) or video (H.264 files decoded).")]
    = "render",
    ablate: Annotated[bool, typer.Option("--ablate", help="Also evaluate with each memory part switched off.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for results.json, report.md and accuracy.png.")]
    = Path("runs/world-eval"),
    device: DeviceOpt = "auto",
    questions_per_call: Annotated[int, typer.Option(help="Questions handed to the model's engine together (each "
                                                    "under every ablation).")] = 64,
    conditions_per_forward: Annotated[int, typer.Option(help="With --watches: watch conditions scored in one "
                                                        "forward over a memory.")] = 64,
    batch_size: Annotated[Optional[int], typer.Option(hidden=True, help="Deprecated: sets --questions-per-call "
                                                      "and --conditions-per-forward.")] = None,
    from_results: Annotated[Optional[Path], typer.Option(help="Render report.md and accuracy.png from this "
                                                         "results.json instead of evaluating.")] = None,
    watches: Annotated[bool, typer.Option("--watches", help="Evaluate watches (standing questions) instead: "
                                          "precision, recall, delay and false alarms per condition type, written "
                                          "as watches.json, watches.md and watches.png.")] = False,
    watch_threshold: Annotated[float, typer.Option(help="With --watches: the watches' threshold (log-odds).")] = 0.0,
    calibration_streams: Annotated[int, typer.Option(help="With --watches: also report at the threshold with the "
                                                     "best F1 on this many val streams (0: no calibration).")] = 0,
) -> None:
    """Accuracy per question type on streams of the procedural world (with --ablate: each memory part switched off;
    with --watches: how watches fire)."""
    needs_extra("eval", "world-eval")  # its plot
    if batch_size is not None:  # the old option, one value for both counts
        typer.echo("--batch-size is deprecated: use --questions-per-call (with --watches: --conditions-per-forward)",
                   err=True)
        questions_per_call = conditions_per_forward = batch_size
    if watches:
        return _watches(model, split, streams, start, calibration_streams, watch_threshold, device,
                        conditions_per_forward, out, from_results)
    if from_results is not None:
        results = read_results(from_results)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RESULTS).exists() or not (out / RESULTS).samefile(from_results):
            shutil.copyfile(from_results, out / RESULTS)
        write_report(results, out)
        typer.echo(f"report written to {out / REPORT} and {out / PLOT}")
        return
    results = run_world_eval(model, split, streams, start, source, ablate, device, questions_per_call)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(results, indent=1))
    write_report(results, out)
    full = results["accuracy"]["full"]
    typer.echo(f"{results['questions']} questions: overall {full['overall']:.1%} "
               + ", ".join(f"{k} {v:.1%}" for k, v in full.items() if k != "overall"))
    typer.echo(f"wrote {out / RESULTS}, {out / REPORT} and {out / PLOT}")


def _watches(model, split, streams, start, calibration_streams, threshold, device, conditions_per_forward, out,
             from_results):
    from vstream.cli import world_watches

    if from_results is not None:
        results = world_watches.read(from_results)
    else:
        _check(model, split, streams, start, "render", ("--conditions-per-forward", conditions_per_forward))
        results = world_watches.run(model, split, streams, start, calibration_streams, threshold, device,
                                    conditions_per_forward, lambda m: _provenance(model, m), out)
    world_watches.write(results, out)
    typer.echo(f"wrote {out / world_watches.RESULTS}, {out / world_watches.REPORT} and {out / world_watches.PLOT}")


def _provenance(model: str, m) -> dict:
    """What produced a result: the command, model, date, device and versions."""
    import torch
    import transformers

    from vstream import __version__

    return {
        "command": "vstream " + shlex.join(sys.argv[1:]),
        "model": model, "model_name": m.cfg.name, "memory_mode": m.cfg.memory.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(m.device), "dtype": m.cfg.dtype,
        "versions": {"vstream": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def run_world_eval(model: str | None, split: str, streams: int, start: int, source: str, ablate: bool, device: str,
                   questions_per_call: int) -> dict:
    """Check the arguments, load the model, evaluate; the results with what produced them."""
    import vstream
    from vstream.eval.world import evaluate

    _check(model, split, streams, start, source, ("--questions-per-call", questions_per_call))
    m = vstream.load(model, device=resolve_device_option(device))
    ablations = ABLATIONS if ablate else (None,)
    results = evaluate(m, split=split, streams=streams, start=start, ablations=ablations, source=source,
                       questions_per_call=questions_per_call)
    return _provenance(model, m) | {
        "ablations": ["full" if a is None else f"no_{a}" for a in ablations],
        "right": _right_counts(results["rows"], ["full" if a is None else f"no_{a}" for a in ablations]),
    } | results


def _check(model: str | None, split: str, streams: int, start: int, source: str, per_call: tuple[str, int]) -> None:
    """The options' checks before the model is loaded; `per_call`: (option, value) of the count that must be >= 1."""
    from vstream.synth.world import SPLIT_SEEDS, split_seeds

    if model is None:
        raise UserInputError("--model is required (a preset, a model directory or 'demo') unless --from-results is "
                             "given")
    if split not in SPLIT_SEEDS:
        raise UserInputError(f"--split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    if streams < 1:
        raise UserInputError(f"--streams must be >= 1, got {streams}")
    split_seeds(split, streams, start)  # a range outside the split fails before the model is loaded
    if source not in ("render", "video"):
        raise UserInputError(f"--source must be render or video, got {source!r}")
    option, count = per_call
    if count < 1:
        raise UserInputError(f"{option} must be >= 1, got {count}")


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _right_counts(rows: list[dict], names: list[str]) -> dict[str, dict[str, int]]:
    """{ablation name: {type: right answers, "overall": ...}} from the rows."""
    out = {}
    for name in names:
        counts: dict[str, int] = {}
        for r in rows:
            for key in (r["type"], "overall"):
                counts[key] = counts.get(key, 0) + int(r[name + "_right"])
        out[name] = dict(sorted(counts.items()))
    return out


def read_results(path: Path) -> dict:
    """A results file written by `world-eval`, checked for the fields the report needs."""
    if not path.is_file():
        raise UserInputError(f"--from-results must be a results.json file, got {path}")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path} is not JSON: {exc}") from None
    missing = [k for k in REQUIRED if not isinstance(results, dict) or k not in results]
    if missing:
        raise UserInputError(f"{path} is not a world-eval results file: missing {missing}")
    if "full" not in results["accuracy"]:
        raise UserInputError(f"{path}: accuracy has no 'full' row, got {sorted(results['accuracy'])}")
    return results


# ---------------------------------------------------------------- report and plot


def _columns(results: dict) -> list[str]:
    from vstream.synth.world import QUESTION_TYPES

    return [t for t in QUESTION_TYPES if t in results["per_type"]] + ["overall"]


def _label(name: str) -> str:
    return "full model" if name == "full" else f"without {name.removeprefix('no_')}"


def report_markdown(results: dict) -> str:
    """The report: settings, one row per ablation (accuracy and right/asked per type), the drop each part causes."""
    cols = _columns(results)
    total = {**results["per_type"], "overall": results["questions"]}
    right = _right_counts(results["rows"], list(results["accuracy"]))
    seeds = f"seeds {results['rows'][0]['seed']}..{results['rows'][-1]['seed']}" if results["rows"] else "no seeds"
    v = results["versions"]
    lines = [
        "# Procedural world: accuracy on held-out streams", "",
        f"- Model: `{results['model']}` ({results.get('model_name', '?')}, "
        f"memory mode {results.get('memory_mode', '?')})",
        f"- Streams: {results['streams']} of the `{results['split']}` split from index {results['start']} ({seeds}), "
        f"{results['questions']} questions, frames from `{results['source']}`",
        f"- Device: {results['device']}, {results.get('dtype', '?')}; evaluation took "
        f"{results.get('seconds', float('nan')):.0f} s",
        f"- Date: {results['date']}; vstream {v.get('vstream')}, torch {v.get('torch')}, "
        f"transformers {v.get('transformers')}, Python {v.get('python')}",
        f"- Command: `{results['command']}`", "",
        "Accuracy (right / asked). Each ablation drops the tokens of one memory part from every snapshot before the "
        "question is answered; answers are greedy and scored by exact match after normalisation.", "",
        "| | " + " | ".join(f"{c} (n={total[c]})" for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, acc in results["accuracy"].items():
        cells = [f"{acc[c]:.1%} ({right[name][c]}/{total[c]})" for c in cols]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    if len(results["accuracy"]) > 1:
        full = results["accuracy"]["full"]
        lines += ["", "What each part contributes: accuracy of the full model minus accuracy without it, in points.",
                  "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, acc in results["accuracy"].items():
            if name != "full":
                lines.append(f"| {_label(name)} | " + " | ".join(f"{100 * (full[c] - acc[c]):+.1f}" for c in cols)
                             + " |")
    lines += ["", f"![accuracy per question type]({PLOT})", ""]
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> Path:
    """Grouped bars: accuracy per question type (and overall), one bar per ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, names = _columns(results), list(results["accuracy"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 4))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [100 * results["accuracy"][name][c] for c in cols], width, label=_label(name))
    ax.set_xticks(range(len(cols)), [f"{c}\n(n={results['questions'] if c == 'overall' else results['per_type'][c]})"
                                     for c in cols])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['model']} on {results['questions']} questions ({results['split']} split)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> tuple[Path, Path]:
    """report.md and accuracy.png in `out` from `results` alone."""
    (out / REPORT).write_text(report_markdown(results))
    return out / REPORT, write_plot(results, out / PLOT)
