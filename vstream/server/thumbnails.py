"""Thumbnails of a stream's ingested frames: small JPEGs by stream time, the newest few hundred, so that the memory
view can link the frames it cites. Encoding runs on the session's reader thread (its `on_frames` hook), never on the
event loop; this module knows nothing about routes or streams.
"""

from __future__ import annotations

import collections
import io
import threading

import numpy as np
from PIL import Image


class Thumbnails:
    """Small JPEGs (longest edge `edge` pixels) of the newest `size` ingested frames, by stream time; thread-safe."""

    def __init__(self, size: int, edge: int = 192):
        self.size, self.edge = size, edge
        self._items: collections.OrderedDict[float, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, frames: list[tuple[float, np.ndarray]]) -> None:
        """Runs on the ingest thread (never the event loop)."""
        encoded = []
        for t, frame in frames:
            image = Image.fromarray(frame)
            image.thumbnail((self.edge, self.edge))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=75)
            encoded.append((float(t), out.getvalue()))
        with self._lock:
            for t, jpeg in encoded:
                self._items[t] = jpeg
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def nearest(self, t: float, tolerance: float = 1e-3) -> tuple[float, bytes] | None:
        with self._lock:
            if t in self._items:
                return t, self._items[t]
            best = min(self._items, key=lambda k: abs(k - t), default=None)
            if best is None or abs(best - t) > tolerance:
                return None
            return best, self._items[best]

    def has(self, t: float) -> bool:
        return self.nearest(t) is not None
