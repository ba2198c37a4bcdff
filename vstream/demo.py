"""The demo: a new stream of the procedural world played in simulated real time through the streaming engine, with the
world's questions asked at their moments and each answer scored against the ground truth.

`run_demo` generates the stream of a seed (`vstream.synth.world`), renders its frames at the model's sample rate and
feeds them to a `StreamSession` as a live source paced at `speed` x real time, so frames may be dropped when ingestion
falls behind (they are counted). When the memory reaches a question's time, the question is answered from the memory
as it stood at that time (the session's per-frame history) while ingestion goes on; its answer is scored by exact match
after normalisation, as `vstream.eval.world` scores. A random seed is drawn above the world's split ranges, so
the stream was never seen in training or evaluation. The result is a plain dict; `run_demo` does not print: its
callbacks (`on_load`, `on_start`, `on_event`, `on_answer`) see each step as it happens, and `ConsoleView` renders them
with rich.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from vstream import demo_watch
from vstream.errors import UserInputError
from vstream.model.loading import OWN_CONFIG, PACKAGED
from vstream.sources import paced
from vstream.synth import world as w

DEFAULT_SPEED = 1.0
"""Real time: the longest world stream (48 s) plays in 48 s, so the demo ends in about a minute on 2 cores."""
MAX_NEW_TOKENS = 8
"""Answer length limit: the world's answers are one or two words."""
FRAME_SIZE = 128
"""Side of the rendered frames, as in training and `vstream.eval.world`."""


def default_model() -> str:
    """`demo` (the trained model shipped in the package) when it is installed, else the untrained `tiny` preset."""
    return "demo" if (PACKAGED["demo"] / OWN_CONFIG).exists() else "tiny"


def is_untrained(model: str) -> bool:
    """Presets are built with random weights: their answers mean nothing."""
    from vstream.config import PRESETS

    return model in PRESETS


def pick_questions(qas: list[w.WorldQuestion], count: int | None) -> list[w.WorldQuestion]:
    """`count` questions, the types in turn as far as each has some, each type's spread evenly over the stream; all
    of them when `count` is None or not less than their number. In time order."""
    if count is not None and count < 1:
        raise UserInputError(f"the number of questions must be >= 1, got {count}")
    if count is None or count >= len(qas):
        return list(qas)
    by_type = {kind: [qa for qa in qas if qa.type == kind] for kind in w.QUESTION_TYPES}
    quota = dict.fromkeys(by_type, 0)
    while sum(quota.values()) < count:
        for kind in by_type:
            if quota[kind] < len(by_type[kind]) and sum(quota.values()) < count:
                quota[kind] += 1
    picked = [by_type[kind][int(round(i))] for kind in by_type if quota[kind]
              for i in np.linspace(0, len(by_type[kind]) - 1, quota[kind])]
    return sorted(picked, key=lambda qa: qa.time)


def describe_start(stream: w.WorldTimeline) -> str:
    """What the first frame shows: "a red circle and a blue square on a gray background"."""
    names = [f"a {o.colour} {o.shape}" for o in sorted(stream.state_at(0.0).objects, key=lambda o: o.x)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"the stream starts: {listed} on a {stream.background_at(0.0)} background"


def describe_event(stream: w.WorldTimeline, event: w.Event) -> str:
    """One line on what changed: "a red circle appears", "the square turns blue", "scene: gray -> night"."""
    d = event.details
    if event.kind == "appear":
        return f"a {d['colour']} {d['shape']} appears"
    if event.kind == "disappear":
        return f"the {d['colour']} {d['shape']} leaves"
    if event.kind == "recolour":
        return f"the {d['from']} {d['shape']} turns {d['to']}"
    added = ", ".join(f"{stream.objects[i].colour_at(event.time)} {stream.objects[i].shape}" for i in d["added"])
    return f"the scene changes from {d['from']} to {d['to']}: now {added}"


def accuracy_table(rows: list[dict]) -> dict[str, dict]:
    """{type: {"right", "total", "accuracy"}} for each question type asked, and "overall"."""
    table = {}
    for kind in [*w.QUESTION_TYPES, "overall"]:
        picked = [r["correct"] for r in rows if kind == "overall" or r["type"] == kind]
        if picked:
            table[kind] = {"right": sum(picked), "total": len(picked), "accuracy": sum(picked) / len(picked)}
    return table


def run_demo(
    model: str | None = None, seed: int | None = None, speed: float = DEFAULT_SPEED, questions: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS, on_load: Callable[[dict], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
    on_event: Callable[[dict], None] | None = None, on_answer: Callable[[dict], None] | None = None,
    watch: bool = False, on_watch: Callable[[dict], None] | None = None,
) -> dict:
    """Play a new world stream live through the engine and answer its questions at their moments.

    `model`: preset, directory or packaged name (default: `default_model()`); `seed`: the stream's seed (random when
    None); `speed`: stream seconds per wall-clock second; `questions`: how many of the world's questions to ask (all
    when None); `watch`: also set a watch on the stream's first new object (`demo_watch`), each trigger going to
    `on_watch`. Returns the settings, the watch and its triggers (with `watch`), one row per question (truth,
    prediction, correct, latencies), the accuracy per type and overall, the session's frame counts and the wall-clock
    times."""
    import vstream

    t0 = time.perf_counter()
    if not speed > 0:
        raise UserInputError(f"--speed must be > 0, got {speed}")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seed = random.randrange(w.SPLIT_SEEDS["test"].stop, 1 << 31) if seed is None else seed
    stream = w.generate_stream(seed)  # checks the seed before the model is loaded
    qas = pick_questions(w.make_questions(stream), questions)
    defaulted = model is None
    model = model or default_model()
    info = {"seed": seed, "model": model, "defaulted": defaulted, "untrained": is_untrained(model),
            "duration": stream.duration, "speed": speed, "questions": len(qas)}
    if on_load:
        on_load(info)
    m = vstream.load(model)
    info |= {"model_name": m.cfg.name, "sample_fps": m.cfg.sample_fps, "load_s": time.perf_counter() - t0}
    if on_start:
        on_start(info)
    if on_event:
        on_event({"time": 0.0, "kind": "start", "text": describe_start(stream)})
    task = demo_watch.choose(stream) if watch else None
    if watch:
        info["watch"] = None if task is None else {"condition": task.condition, "events": list(task.events),
                                                   "threshold": demo_watch.threshold_for(model)}
        if on_event:
            on_event({"time": 0.0, "kind": "watch", "text": "no object appears in this stream: no watch to set"
                      if task is None else f"watching: “{task.condition}” (it happens at {task.events[0]:.1f} s)"})
    played = _play(m, stream, qas, speed, max_new_tokens, on_event or (lambda e: None), on_answer or (lambda r: None),
                   task, on_watch or (lambda t: None), demo_watch.threshold_for(model))
    return info | played | {
        "max_new_tokens": max_new_tokens,
        "accuracy": accuracy_table(played["rows"]),
        "total_s": time.perf_counter() - t0,
        "timeline": stream.to_dict() | {"questions": [asdict(qa) for qa in qas]},
    }


def _play(m, stream: w.WorldTimeline, qas: list[w.WorldQuestion], speed: float, max_new_tokens: int,
          on_event: Callable[[dict], None], on_answer: Callable[[dict], None], task=None,
          on_watch: Callable[[dict], None] = lambda t: None, threshold: float = 0.0) -> dict:
    """The session over the paced frames; each question answered once the memory reaches its time; the watch
    `task` (if any) evaluated meanwhile."""
    from vstream.engine import StreamSession
    from vstream.eval.scoring import normalise_keep_word_breaks

    frames = stream.frames(fps=m.cfg.sample_fps, size=FRAME_SIZE)
    history = int(stream.duration * m.cfg.sample_fps) + 2  # every frame's memory is kept: questions see their time
    events, rows = list(stream.events), []

    lock = threading.Lock()  # the watch's thread reports the world's events up to a trigger, too

    def report_events(until: float) -> None:
        with lock:
            while events and events[0].time < until:
                event = events.pop(0)
                on_event({"time": event.time, "kind": event.kind, "text": describe_event(stream, event)})

    def watch_fired(trigger: dict) -> None:
        report_events(trigger["time"])
        on_watch(trigger)

    with StreamSession(m, history=history) as session:
        started = time.monotonic()
        session.start(paced(frames, speed, start=started), live=True)
        loop = None if task is None else demo_watch.WatchLoop(session, m, task, watch_fired, threshold)
        for qa in qas:
            _wait_for_time(session, qa.time, timeout=30 + 4 * qa.time / speed)
            report_events(qa.time)
            row = _ask(session, qa, max_new_tokens, started, speed)
            row["correct"] = normalise_keep_word_breaks(row["prediction"]) == normalise_keep_word_breaks(qa.answer)
            rows.append(row)
            on_answer(row)
        limit = 30 + 2 * stream.duration / speed
        if not session.wait(timeout=limit):
            raise TimeoutError(f"the stream did not finish within {limit:.0f} s")
        if loop is not None:
            loop.stop()
        stats = session.stats()
    if session.error is not None:
        raise RuntimeError(f"the stream failed: {session.error}")
    report_events(float("inf"))
    return {
        "frames": {k: stats[f"frames_{k}"] for k in ("received", "encoded", "dropped")},
        "rows": rows,
        "latency": {k: stats["latency"][k] for k in ("encode", "memory_update", "first_token", "answer")},
        "stream_s": time.monotonic() - started,
    } | ({} if loop is None else {"watch_triggers": loop.triggers, "watch_evaluations": loop.watch.evaluations,
                                   "watch_last_score": loop.watch.last_score})


def _wait_for_time(session, t: float, timeout: float) -> None:
    """Block until the memory holds a frame at or after stream time `t`, or the stream ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = session.snapshot()
        if (snap is not None and snap.stream_time >= t) or session.finished:
            if snap is None:
                raise RuntimeError(f"the stream ended before any frame was ingested: {session.error}")
            return
        time.sleep(0.01)
    raise TimeoutError(f"the memory did not reach stream time {t} s within {timeout:.0f} s")


def _ask(session, qa: w.WorldQuestion, max_new_tokens: int, started: float, speed: float) -> dict:
    """Answer `qa` from the memory as of its time; latencies from the moment it is asked."""
    asked = time.monotonic()
    snap, pieces = session.ask_stream(qa.question, max_new_tokens=max_new_tokens, as_of=qa.time)
    text, first = [], None
    for piece in pieces:
        first = first if first is not None else time.monotonic()
        text.append(piece)
    done = time.monotonic()
    return {
        "time": qa.time, "type": qa.type, "question": qa.question, "answer": qa.answer,
        "prediction": "".join(text).strip(), "memory_time": snap.stream_time, "memory_frames": snap.frames,
        "asked_late_s": max(0.0, asked - started - qa.time / speed),
        "first_token_s": (first or done) - asked, "answer_s": done - asked,
    }


class ConsoleView:
    """Renders a demo run on a terminal: the settings, the world's events and each answer as they come, then the
    accuracy per question type."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(highlight=False)

    def callbacks(self) -> dict:
        return {"on_load": self.load, "on_start": self.start, "on_event": self.event, "on_answer": self.answer,
                "on_watch": self.watch}

    def watch(self, t: dict) -> None:
        when = "" if t["delay_s"] is None else f", {t['delay_s']:.1f} s after it happened at {t['event_time']:.1f} s"
        self.console.print(f"{t['time']:6.1f}s  [bold magenta]watch triggered[/]: “{t['condition']}” (score "
                           f"{t['score']:.2f}{when})", soft_wrap=True)

    def load(self, info: dict) -> None:
        self.console.print(f"[bold]vstream demo[/]  seed [bold]{info['seed']}[/]: a {info['duration']} s stream of the "
                           f"procedural world, played at {info['speed']:g}x real time, {info['questions']} questions",
                           soft_wrap=True)
        self.console.print(f"[dim]loading model {info['model']} ...[/]", soft_wrap=True)

    def start(self, info: dict) -> None:
        c = self.console
        c.print(f"model [bold]{info['model']}[/] ({info['model_name']}, {info['sample_fps']:g} frame/s), ready after "
                f"{info['load_s']:.1f} s", soft_wrap=True)
        if info["untrained"]:
            why = ("the trained demo model is not installed (vstream/assets/demo), so the demo runs the "
                   f"'{info['model']}' preset" if info["defaulted"] else f"'{info['model']}' is a preset")
            c.print(f"[yellow]note: {why}, whose weights are random and untrained: its answers are meaningless and its "
                    "accuracy is near zero. It shows the pipeline running end to end (render -> encode -> STAR memory "
                    "-> LLM).[/]", soft_wrap=True)
        elif info["model"] == "demo":
            c.print("[dim]the demo model was trained on other streams of this world (its own seeds); this stream is "
                    "new to it.[/]", soft_wrap=True)
        c.print()

    def event(self, e: dict) -> None:
        self.console.print(f"[dim]{e['time']:6.1f}s  {e['text']}[/]", soft_wrap=True)

    def answer(self, r: dict) -> None:
        mark = "[green]✓[/]" if r["correct"] else "[red]✗[/]"
        said = _printable(r["prediction"]) or "(empty)"
        self.console.print(f"{r['time']:6.1f}s  [cyan]{r['type']:<10}[/] {r['question']}", soft_wrap=True)
        self.console.print(f"         {mark} {said}  [dim]truth:[/] [bold]{r['answer']}[/]   [dim]first token "
                           f"{r['first_token_s']:.2f} s, answer {r['answer_s']:.2f} s[/]", soft_wrap=True)

    def summary(self, result: dict) -> None:
        from rich.table import Table

        table = Table(title="accuracy by question type", title_justify="left")
        for column in ("type", "right", "asked", "accuracy"):
            table.add_column(column, justify="left" if column == "type" else "right")
        for kind, a in result["accuracy"].items():
            table.add_row(kind, str(a["right"]), str(a["total"]), f"{a['accuracy']:.0%}",
                          style="bold" if kind == "overall" else None)
        c, f, overall = self.console, result["frames"], result["accuracy"]["overall"]
        c.print()
        c.print(table)
        c.print(f"accuracy: {overall['right']}/{overall['total']} = {overall['accuracy']:.0%} "
                f"({'untrained model' if result['untrained'] else result['model']})", soft_wrap=True)
        c.print(f"frames: {f['received']} received, {f['encoded']} encoded, {f['dropped']} dropped; stream played in "
                f"{result['stream_s']:.1f} s, demo took {result['total_s']:.1f} s. Repeat with: vstream demo "
                f"--seed {result['seed']}" + ("" if result["defaulted"] else f" --model {result['model']}"),
                soft_wrap=True)


def _printable(text: str) -> str:
    """The answer as one line of visible characters (rich markup escaped): control characters become U+FFFD."""
    from rich.markup import escape

    return escape("".join(ch if ch.isprintable() else "\ufffd" for ch in text.replace("\n", " ")))
