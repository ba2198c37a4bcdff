"""The one percentile of the project: nearest rank, so that every reported p50 and p95 means the same thing; and
`RecentValues`, the values of the last seconds (what an autoscaler reads).

For n values in ascending order, the q-quantile is the smallest value with at least q·n values at or below it: the
value at index ceil(q·n) − 1. For 20 samples p95 is the 19th value, not the maximum.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 < q <= 1) of non-empty values sorted ascending."""
    if not ordered:
        raise ValueError("a percentile needs at least one value, got none")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]  # the tolerance absorbs 0.95 * 20 = 19.000...04


class RecentValues:
    """The values added in the last `window_s` seconds (at most `size` of them, the newest), and their percentiles.
    Safe from any thread. A quiet window has no percentile (None), so an idle server reports no latency rather than
    the last one it saw."""

    def __init__(self, window_s: float = 60.0, size: int = 4096, clock=time.monotonic):
        if not window_s > 0 or size < 1:
            raise ValueError(f"a window needs window_s > 0 and size >= 1, got {window_s} and {size}")
        self.window_s, self.clock = window_s, clock
        self._items: collections.deque[tuple[float, float]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._items.append((self.clock(), value))

    def values(self) -> list[float]:
        """The window's values, sorted ascending."""
        cutoff = self.clock() - self.window_s
        with self._lock:
            while self._items and self._items[0][0] < cutoff:
                self._items.popleft()
            return sorted(v for _, v in self._items)

    def percentile(self, q: float) -> float | None:
        """The nearest-rank `q`-quantile of the window's values; None when it holds none."""
        values = self.values()
        return percentile(values, q) if values else None
