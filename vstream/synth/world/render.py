"""What the world shows at one moment and how it is drawn: object colours, shapes and backgrounds, `Scene`, and the
frame (`render`) and per-pixel label map (`label_map`) of a scene.

Label values: 0 is the background, else `label_of(colour, shape)` = 1 + colour index * len(SHAPES) + shape index, so
a frame is its label map looked up in the background's palette. Shapes are exact at pixel centres (no antialiasing).

This module knows nothing about time: timelines are `timeline`, questions `questions`, files `dataset`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vstream.errors import UserInputError

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
}
"""RGB of each object colour; the order gives the colour index of `label_map`."""
SHAPES = ("circle", "square", "triangle")
"""Object shapes; the order gives the shape index of `label_map`."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (115, 115, 115),
    "sand": (200, 175, 130),
    "teal": (20, 110, 115),
    "night": (20, 25, 60),
}
"""RGB of each scene background."""
COLOUR_NAMES = tuple(OBJECT_COLOURS)
"""Object colour names in index order."""


@dataclass(frozen=True)
class SceneObject:
    """An object as drawn at one moment: centre (x, y) and size as fractions of the frame side."""

    id: int
    shape: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """What the world shows at `time`: the background and the visible objects (by id)."""

    time: float
    background: str
    objects: tuple[SceneObject, ...]


def label_of(colour: str, shape: str) -> int:
    """The `label_map` value of a (colour, shape) pair: 1 + colour_index * len(SHAPES) + shape_index."""
    return 1 + COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def label_name(label: int) -> tuple[str, str]:
    """The (colour, shape) pair of a non-zero `label_map` value."""
    if not 1 <= label <= len(COLOUR_NAMES) * len(SHAPES):
        raise ValueError(f"label must be in [1, {len(COLOUR_NAMES) * len(SHAPES)}], got {label}")
    return COLOUR_NAMES[(label - 1) // len(SHAPES)], SHAPES[(label - 1) % len(SHAPES)]


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """RGB frame [size, size, 3] uint8 of a scene: its label map looked up in the background's palette."""
    return np.take(_palette(scene.background), label_map(scene, size), axis=0)


@functools.lru_cache(maxsize=None)
def _palette(background: str) -> np.ndarray:
    """RGB of each label value [1 + len(OBJECT_COLOURS) * len(SHAPES), 3] uint8, label 0 = the background."""
    palette = np.empty((1 + len(COLOUR_NAMES) * len(SHAPES), 3), np.uint8)
    palette[0] = BACKGROUNDS[background]
    palette[1:] = np.repeat(np.array(list(OBJECT_COLOURS.values()), np.uint8), len(SHAPES), axis=0)
    palette.flags.writeable = False
    return palette


def label_map(scene: Scene, size: int = 128) -> np.ndarray:
    """Per-pixel labels [size, size] int16: 0 = background, else `label_of(colour, shape)` of the object there."""
    labels = np.zeros((checked_frame_size(size), size), np.int16)
    for o in scene.objects:
        rows, cols, mask = _object_mask(o, size)
        labels[rows, cols][mask] = label_of(o.colour, o.shape)
    return labels


def checked_frame_size(size: int) -> int:
    """`size` as an int when it is an integer >= 8, else a UserInputError naming what came."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise UserInputError(f"frame size must be an integer >= 8 pixels, got {size!r}")
    return int(size)


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> np.ndarray:
    return (np.arange(size) + 0.5) / size  # [size], fraction of the frame side


def _object_mask(o: SceneObject, size: int) -> tuple[slice, slice, np.ndarray]:
    """The object's bounding box in pixels and its mask inside the box [h, w] bool."""
    centres = _pixel_centres(size)
    i0, i1 = max(0, math.floor((o.y - o.size) * size)), min(size, math.ceil((o.y + o.size) * size) + 1)
    j0, j1 = max(0, math.floor((o.x - o.size) * size)), min(size, math.ceil((o.x + o.size) * size) + 1)
    u = centres[j0:j1][None, :] - o.x  # [1, w]
    v = centres[i0:i1][:, None] - o.y  # [h, 1]
    s = o.size
    if o.shape == "circle":
        mask = u * u + v * v <= s * s
    elif o.shape == "square":
        mask = (np.abs(u) <= s) & (np.abs(v) <= s)
    else:  # triangle: apex at the top centre, base along the bottom of the box
        mask = (v <= s) & (np.abs(u) <= (v + s) / 2)
    return slice(i0, i1), slice(j0, j1), mask

