"""The interactive console of `vstream run`: a live status line on stderr, questions read from stdin at any moment,
answers streamed to stdout while ingestion goes on. It only talks to a `StreamSession`; it never touches the model.

Status line (rewritten in place on a terminal, one line per refresh otherwise):
    [stream   42.0s | frames 43 encoded 41 dropped 2 | memory 681 tokens]
Each answer starts with the stream time of the memory it rests on: `[42.0s] A red circle moves left.`
With watches (`vstream run --watch "..."`), each event is printed with its stream time and score as it fires:
`[12.0s] watch triggered: a purple square appears (score 1.73)`.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from vstream.engine.session import StreamSession
from vstream.engine.watches import Scorer, Watch, evaluate_due

FIRST_FRAME_WAIT_S = 30.0  # a question typed before the first frame waits this long for it


def status_line(stats: dict) -> str:
    t = stats["stream_time"]
    when = "     -" if t is None else f"{t:6.1f}s"
    return (
        f"[stream {when} | frames {stats['frames_received']} encoded {stats['frames_encoded']} "
        f"dropped {stats['frames_dropped']} | memory {stats['memory_tokens']} tokens]"
    )


def _read_lines(stream: TextIO, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.strip())
    into.put(None)  # end of input


def run_console(
    session: StreamSession, stdin: TextIO, max_new_tokens: int | None = None,
    out: TextIO = sys.stdout, err: TextIO = sys.stderr, interval: float = 0.5,
    watches: Sequence[Watch] = (), score: Scorer | None = None,
) -> int:
    """Run until the source ends (and no question is waiting) or Ctrl-C. Returns the exit code: 0, 1 when the
    source failed (its error is printed; what was ingested was still answerable), 130 on Ctrl-C. `watches` are
    evaluated every interval with the `score` Scorer (`vstream.model.yesno.scorer`) on the engine thread, their events
    printed."""
    questions: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(stdin, questions), daemon=True).start()
    rewrite = "\r" if err.isatty() else ""
    end = "" if err.isatty() else "\n"
    input_open = True
    try:
        while True:
            try:
                question = questions.get(timeout=interval)
            except queue.Empty:
                question = ""
                if session.finished:  # the source ended and no question came for one interval
                    break
            if question is None:
                input_open = False
            elif question:
                _answer(session, question, max_new_tokens, out, err)
            if watches and score is not None:
                check_watches(session, watches, score, out)
            err.write(rewrite + status_line(session.stats()) + end)
            err.flush()
            if session.finished and not input_open and questions.empty():
                break
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130
    if watches and score is not None:  # the source's last frames
        check_watches(session, watches, score, out)
    err.write(rewrite + status_line(session.stats()) + "\n")
    if session.error is not None:
        err.write(f"error: the source ended with an error after {session.counters.encoded} frames: {session.error}\n")
        return 1
    return 0


def check_watches(session: StreamSession, watches: Sequence[Watch], score: Scorer, out: TextIO) -> list[dict]:
    """Evaluate the due watches on the latest snapshot (on the engine thread) and print the events they fire."""
    snap = session.snapshot()
    if snap is None:
        return []
    failures = [w.failures for w in watches]
    events = session.engine.call(lambda: evaluate_due(watches, snap, score)).result(timeout=300)
    for event in events:
        kind = event["type"].removeprefix("watch.")
        out.write(f"[{event['stream_time']:.1f}s] watch {kind}: {event['condition']} (score {event['score']:.2f})\n")
    for watch, before in zip(watches, failures):
        if watch.failures > before:  # it backs off; say so rather than go quiet
            out.write(f"[{snap.stream_time:.1f}s] watch failed: {watch.condition}: {watch.error}\n")
    out.flush()
    return events


def _answer(session: StreamSession, question: str, max_new_tokens: int | None, out: TextIO, err: TextIO) -> None:
    try:
        if session.snapshot() is None and not session.finished:  # asked before the first frame: wait for it
            session.wait_for_frames(1, timeout=FIRST_FRAME_WAIT_S)
        snap, pieces = session.ask_stream(question, max_new_tokens=max_new_tokens)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        err.write(f"\nerror: {exc}\n")
        return
    out.write(f"[{snap.stream_time:.1f}s] ")
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
