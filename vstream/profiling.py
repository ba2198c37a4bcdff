"""Where a process's threads spend their wall time: a sampling profiler for diagnosing a loaded server.

    VSTREAM_STACKS=/tmp/stacks.txt vstream serve ...     # the engine starts the sampler when this is set
    VSTREAM_STACKS_THREADS=vstream-engine,MainThread      # only threads whose names start so (default: all)

Every `every_s` seconds the sampler reads every thread's current stack (`sys._current_frames`, no tracing, so the
sampled threads run at full speed) and counts it as one line `thread;outer;...;inner` (function and file). Every
`write_every_s` seconds it rewrites `path` with the counts, most frequent first: the collapsed-stack format that
flame-graph tools read; a thread's name loses its stream id or number, so that threads of one kind add up. A thread
waiting for the device, a lock or a socket is counted where it waits, so the file shows wall time, not CPU time.

What this module does not do: attribute device time (a stack waiting in a synchronisation stands for the device's
work queued before it), or run unless asked.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time

ENV = "VSTREAM_STACKS"
_KIND = re.compile(r"[-_ ]?(str_[0-9a-f]+|\(.*\)|\d+)$")  # "vstream-answer-str_ab12" -> "vstream-answer"
_started: "StackSampler | None" = None
_lock = threading.Lock()


class StackSampler:
    def __init__(self, path: str, every_s: float = 0.01, write_every_s: float = 10.0, depth: int = 40,
                 threads: tuple[str, ...] = ()):
        self.path, self.every_s, self.write_every_s, self.depth = path, every_s, write_every_s, depth
        self.threads = threads  # name prefixes of the threads sampled (empty: all)
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="vstream-stacks", daemon=True)

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def sample(self) -> None:
        """Count every other thread's current stack once."""
        names = {t.ident: t.name for t in threading.enumerate()}
        me = threading.get_ident()
        for ident, frame in sys._current_frames().items():
            name = _KIND.sub("", names.get(ident, "?"))
            if ident == me or (self.threads and not name.startswith(self.threads)):
                continue
            stack = []
            while frame is not None and len(stack) < self.depth:
                code = frame.f_code
                stack.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})")
                frame = frame.f_back
            self.counts[";".join([name, *reversed(stack)])] += 1
        self.samples += 1

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            for stack, n in self.counts.most_common():
                f.write(f"{stack} {n}\n")
        os.replace(tmp, self.path)

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            self.sample()
            if time.monotonic() - last >= self.write_every_s:
                try:
                    self.write()
                except OSError as error:  # a diagnostic must not stop: say so and keep sampling
                    print(f"vstream: cannot write the stack samples to {self.path}: {error}", file=sys.stderr)
                last = time.monotonic()
            time.sleep(self.every_s)


def start_from_env() -> StackSampler | None:
    """Start the process's one sampler when VSTREAM_STACKS names a file (once; later calls return it)."""
    global _started
    path = os.environ.get(ENV)
    if not path:
        return None
    with _lock:
        if _started is None:
            threads = tuple(t for t in os.environ.get(f"{ENV}_THREADS", "").split(",") if t)
            _started = StackSampler(path, threads=threads).start()
        return _started
