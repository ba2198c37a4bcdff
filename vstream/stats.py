"""The one percentile of the project: nearest rank, so that every reported p50 and p95 means the same thing.

For n values in ascending order, the q-quantile is the smallest value with at least q·n values at or below it: the
value at index ceil(q·n) − 1. For 20 samples p95 is the 19th value, not the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 < q <= 1) of non-empty values sorted ascending."""
    if not ordered:
        raise ValueError("a percentile needs at least one value, got none")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]  # the tolerance absorbs 0.95 * 20 = 19.000...04
