"""Scoring predictions and writing what a run found: `judgments.jsonl`, `results.json`, `report.md` and PNG plots.

Counting rules. Every question is in every denominator. An open-ended answer whose judge failed counts as wrong with
score 0 in `accuracy` and `score`; `failed` says how many, and `accuracy_if_failed_correct` bounds what they could
change. A multiple-choice answer without a readable letter counts as wrong; `unparsable` says how many.
Judgments are cached by question id and judge signature; failed ones are tried again by the next run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from vstream import __version__
from vstream.errors import UserInputError
from vstream.eval.judges import OFFLINE_LABEL, parse_choice
from vstream.eval.jsonl import read_jsonl_by_id, trim_partial_line
from vstream.stats import percentile

JUDGMENTS = "judgments.jsonl"
RESULTS = "results.json"
REPORT = "report.md"
POSITION_BINS = 5


# ---------------------------------------------------------------- scoring


def score_predictions(records: list[dict], judge, out_dir: str | Path, show_progress: bool = False) -> dict[str, dict]:
    """id -> outcome {correct, score, status, ...}. Multiple choice is read locally; open-ended answers go to `judge`
    (None when the benchmark has no open-ended question)."""
    from tqdm import tqdm

    outcomes: dict[str, dict] = {}
    open_records = []
    for rec in records:
        if rec["kind"] == "choice":
            letter = parse_choice(rec["pred"], rec["options"])
            outcomes[rec["id"]] = {"status": "ok" if letter else "unparsable", "letter": letter,
                                   "correct": letter == rec["answer"], "score": None}
        else:
            open_records.append(rec)
    if not open_records:
        return outcomes
    if judge is None:
        raise UserInputError("open-ended questions need a judge: pass --judge offline or --judge openai")
    path = Path(out_dir) / JUDGMENTS
    cached = read_jsonl_by_id(path)
    trim_partial_line(path)
    signature = judge.signature()
    todo = [r for r in open_records
            if not (r["id"] in cached and cached[r["id"]]["signature"] == signature
                    and cached[r["id"]]["status"] == "ok")]
    bar = tqdm(total=len(todo), desc=f"judge {judge.kind}", unit="q", disable=not show_progress or not todo)
    verdicts = judge.judge_many([(r["question"], r["answer"], r["pred"]) for r in todo], on_done=lambda _: bar.update())
    bar.close()
    with path.open("a", encoding="utf-8") as sink:
        for rec, verdict in zip(todo, verdicts):
            cached[rec["id"]] = {"id": rec["id"], "signature": signature, **verdict.to_dict()}
            sink.write(json.dumps(cached[rec["id"]]) + "\n")
    for rec in open_records:
        j = cached[rec["id"]]
        outcomes[rec["id"]] = {"status": j["status"], "correct": j["status"] == "ok" and j["pred"] == "yes",
                               "score": j["score"], "judge_error": j.get("error")}
    return outcomes


# ---------------------------------------------------------------- aggregation


def _counts(recs: list[dict], outcomes: dict[str, dict]) -> dict:
    n = len(recs)
    got = [outcomes[r["id"]] for r in recs]
    correct = sum(o["correct"] for o in got)
    failed = sum(o["status"] == "failed" for o in got)
    unparsable = sum(o["status"] == "unparsable" for o in got)
    out = {"n": n, "correct": correct, "accuracy": correct / n if n else None}
    if recs and recs[0]["kind"] == "choice":
        out["unparsable"] = unparsable
    else:
        scores = [o["score"] for o in got if o["status"] == "ok"]
        out |= {"failed": failed, "accuracy_if_failed_correct": (correct + failed) / n if n else None,
                "score": sum(scores) / n if n else None,
                "score_of_judged": sum(scores) / len(scores) if scores else None}
    return out


def _latency(records: list[dict]) -> dict:
    out = {}
    for key, pick in (("first_token_s", lambda r: r["latency"].get("first_token_s")),
                      ("answer_s", lambda r: r["latency"].get("answer_s")),
                      ("lag_s", lambda r: (r.get("stream") or {}).get("lag_s"))):
        values = sorted(v for v in map(pick, records) if v is not None)
        if values:
            out[key] = {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 0.5),
                        "p95": percentile(values, 0.95), "max": values[-1]}
    return out


def summarize(records: list[dict], outcomes: dict[str, dict], run: dict, judge_info: dict | None,
              group_by_first_letter: bool = False) -> dict:
    """The results of a run: overall counts, per question type, per position in the stream, latency."""
    by_type: dict[str, list[dict]] = {}
    for r in records:
        by_type.setdefault(r["qtype"] or "-", []).append(r)
    bins: list[list[dict]] = [[] for _ in range(POSITION_BINS)]
    for r in records:
        if r.get("position") is not None:
            bins[min(POSITION_BINS - 1, int(r["position"] * POSITION_BINS))].append(r)
    results = {
        "benchmark": run["benchmark"], "mode": run["mode"], "model": run["model"], "run": run,
        "judge": judge_info or {"kind": "choice-letter", "note": "option letter read from the answer; none = wrong"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "vstream": __version__,
        "overall": _counts(records, outcomes),
        "by_type": {k: _counts(v, outcomes) for k, v in sorted(by_type.items())},
        "by_position": [{"from": i / POSITION_BINS, "to": (i + 1) / POSITION_BINS, **_counts(b, outcomes)}
                        for i, b in enumerate(bins)],
        "latency": _latency(records),
        "not_correct_by_status": {
            status: [r["id"] for r in records if outcomes[r["id"]]["status"] == status][:100]
            for status in ("failed", "unparsable") if any(o["status"] == status for o in outcomes.values())
        },
    }
    if group_by_first_letter:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault((r["qtype"] or "-")[0].upper(), []).append(r)
        results["by_type_letter"] = {k: _counts(v, outcomes) for k, v in sorted(groups.items())}
    return results


# ---------------------------------------------------------------- files


def write_outputs(results: dict, records: list[dict], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"results": out / RESULTS, "report": out / REPORT}
    paths["results"].write_text(json.dumps(results, indent=2))
    paths |= write_plots(results, records, out)
    paths["report"].write_text(markdown(results, [p.name for k, p in paths.items() if k.startswith("plot")]))
    return paths


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _table(rows: dict[str, dict], kind: str) -> list[str]:
    if kind == "choice":
        lines = ["| type | n | accuracy % | unparsable |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {c['n']} | {_pct(c['accuracy'])} | {c['unparsable']} |" for k, c in rows.items()]
    else:
        lines = ["| type | n | accuracy % | score (0-5) | judge failures | accuracy % if failures were right |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {c['n']} | {_pct(c['accuracy'])} | {_num(c['score'])} | {c['failed']} | "
                  f"{_pct(c['accuracy_if_failed_correct'])} |" for k, c in rows.items()]
    return lines


def markdown(results: dict, plots: list[str]) -> str:
    o, judge = results["overall"], results["judge"]
    kind = "choice" if "unparsable" in o else "open"
    run = results["run"]
    own = "the model's"
    lines = [f"# {results['benchmark']} ({results['mode']})", "",
             f"- model: `{run['model']}`, memory mode: {run.get('memory_mode') or own}, "
             f"source: {run['source']}, max new tokens: {run.get('max_new_tokens') or own}"
             + (f", live replay at {run['speed']}x" if run.get("speed") else ""),
             f"- date: {results['date']}, vstream {results['vstream']}"]
    if judge["kind"] == "openai":
        lines.append(f"- judge: `{judge['model']}` at {judge['url']}, prompt SHA-256 `{judge['prompt_sha256']}`, "
                     f"judged on {judge['date']}")
    elif judge["kind"] == "offline":
        lines.append(f"- **{OFFLINE_LABEL}**")
    else:
        lines.append(f"- scoring: {judge['note']}")
    lines += ["", "## Overall", "", *_table({"all": o}, kind), "", "## By question type", "",
              *_table(results["by_type"], kind)]
    if "by_type_letter" in results:
        lines += ["", "## By type group (first letter)", "", *_table(results["by_type_letter"], kind)]
    lines += ["", "## By position in the stream (question time / video length)", "",
              "| position | n | accuracy % |", "|---|---:|---:|"]
    lines += [f"| {b['from']:.1f}-{b['to']:.1f} | {b['n']} | {_pct(b['accuracy'])} |" for b in results["by_position"]]
    if results["latency"]:
        lines += ["", "## Latency (seconds)", "", "| measure | n | mean | p50 | p95 | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['mean']:.3f} | {v['p50']:.3f} | {v['p95']:.3f} | {v['max']:.3f} |"
                  for k, v in results["latency"].items()]
    lines += ["", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, records: list[dict], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    bins = [b for b in results["by_position"] if b["n"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([(b["from"] + b["to"]) / 2 for b in bins], [100 * b["accuracy"] for b in bins],
           width=0.9 / POSITION_BINS, color="#4472c4")
    for b in bins:
        ax.annotate(f"n={b['n']}", ((b["from"] + b["to"]) / 2, 100 * b["accuracy"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set(xlim=(0, 1), ylim=(0, 105), xlabel="question time / video length", ylabel="accuracy %",
           title=f"{results['benchmark']} ({results['mode']}): accuracy by position")
    fig.tight_layout()
    paths["plot_position"] = out / "accuracy_by_position.png"
    fig.savefig(paths["plot_position"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, colour in (("answer_s", "#4472c4"), ("first_token_s", "#ed7d31")):
        values = [r["latency"][key] * 1000 for r in records if r["latency"].get(key) is not None]
        if values:
            ax.hist(values, bins=max(5, min(40, int(math.sqrt(len(values))) * 2)), alpha=0.7, color=colour,
                    label=key.removesuffix("_s").replace("_", " "))
    ax.set(xlabel="milliseconds", ylabel="questions", title=f"{results['benchmark']} ({results['mode']}): latency")
    ax.legend()
    fig.tight_layout()
    paths["plot_latency"] = out / "latency.png"
    fig.savefig(paths["plot_latency"], dpi=100)
    plt.close(fig)
    return paths
