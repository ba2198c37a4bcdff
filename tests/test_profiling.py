"""The stack sampler counts where threads wait, with their names reduced to their kind."""

import threading

from vstream.profiling import StackSampler


def _wait_here(event: threading.Event) -> None:
    event.wait()


def test_sampler_counts_a_waiting_thread_under_its_kind(tmp_path):
    release = threading.Event()
    workers = [threading.Thread(target=_wait_here, args=(release,), name=f"vstream-answer-str_{i:04x}ab")
               for i in range(3)]
    for w in workers:
        w.start()
    sampler = StackSampler(str(tmp_path / "stacks.txt"), threads=("vstream-answer",))
    try:
        for _ in range(4):
            sampler.sample()
    finally:
        release.set()
        for w in workers:
            w.join()
    sampler.write()
    lines = (tmp_path / "stacks.txt").read_text().splitlines()
    mine = [line for line in lines if "_wait_here" in line]
    assert len(mine) == 1, lines  # three threads of one kind, in one place: one line
    stack, count = mine[0].rsplit(" ", 1)
    assert stack.startswith("vstream-answer;") and int(count) == 12
    assert all(line.startswith("vstream-answer;") for line in lines)  # the filter left the other threads out
