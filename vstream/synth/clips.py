"""Deterministic synthetic video frames and a PyAV writer, for tests and demos.

`moving_shapes` draws coloured shapes bouncing over a background whose colour changes every few seconds.
`barcode_frame` draws a frame whose top half encodes its index as black and white bars (read back with
`read_barcode`), so a test can tell which source frame a decoder returned, even after lossy compression. `write_video`
encodes frames with any PyAV codec, at a constant rate or at given timestamps (variable frame rate).

This module does not decode video (see `vstream.video`) and does not make questions or answers about the clips.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

BARCODE_BITS = 12
"""Bits of the frame index drawn by `barcode_frame` (indices 0..4095)."""
BARCODE_COLOUR = (220, 40, 120)
"""RGB fill of the lower half of a barcode frame: checks channel order after a decode."""

_MS = Fraction(1, 1000)  # time base of variable-frame-rate output


def moving_shapes(
    num_frames: int, width: int = 320, height: int = 240, seed: int = 0, fps: float = 10.0, scene_seconds: float = 3.0
) -> Iterator[np.ndarray]:
    """Yield `num_frames` RGB frames [height, width, 3] uint8: 4 shapes (rectangles, discs) moving and bouncing off
    the edges, over a background that changes colour every `scene_seconds` (at `fps`). Same seed, same frames."""
    rng = np.random.default_rng(seed)
    shapes = [_random_shape(rng, width, height, fps) for _ in range(4)]
    frames_per_scene = max(1, round(scene_seconds * fps))
    rows, cols = np.ogrid[:height, :width]  # [H, 1], [1, W]
    for i in range(num_frames):
        scene_rng = np.random.default_rng([seed, i // frames_per_scene])
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = scene_rng.integers(0, 256, 3, dtype=np.uint8)
        for shape in shapes:
            _draw(frame, shape, i, rows, cols)
        yield frame


def barcode_frame(index: int, width: int = 320, height: int = 240) -> np.ndarray:
    """RGB frame [height, width, 3] uint8: top half = `index` in BARCODE_BITS bars (white = 1, most significant bit
    left), bottom half = BARCODE_COLOUR. Needs width >= 4 * BARCODE_BITS and height >= 8."""
    if not 0 <= index < 2**BARCODE_BITS:
        raise ValueError(f"index must be in [0, {2**BARCODE_BITS}), got {index}")
    if width < 4 * BARCODE_BITS or height < 8:
        raise ValueError(f"barcode frames need width >= {4 * BARCODE_BITS} and height >= 8, got {width}x{height}")
    frame = np.zeros((height, width, 3), np.uint8)
    bar = width // BARCODE_BITS
    for b in range(BARCODE_BITS):
        if index >> (BARCODE_BITS - 1 - b) & 1:
            frame[: height // 2, b * bar : (b + 1) * bar] = 255
    frame[height // 2 :] = BARCODE_COLOUR
    return frame


def read_barcode(frame: np.ndarray) -> int:
    """Index drawn by `barcode_frame`, read from the middle of each bar of a decoded HxWx3 frame."""
    height, width = frame.shape[:2]
    bar = width // BARCODE_BITS
    index = 0
    for b in range(BARCODE_BITS):
        patch = frame[height // 8 : 3 * height // 8, b * bar + bar // 4 : (b + 1) * bar - bar // 4]
        index = index << 1 | int(patch.mean() > 127)
    return index


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 10.0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    timestamps: Sequence[float] | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 frames (HxW gray, HxWx3 RGB or HxWx4 RGBA; all the same shape) to `path` with PyAV.

    Without `timestamps` the video has a constant `fps`. With them (seconds, strictly increasing, one per frame)
    frame i is stamped at timestamps[i] in a 1/1000 s time base: variable frame rate. Odd sizes, gray and alpha need a
    codec that takes them, e.g. `ffv1` in .mkv (pix_fmt `yuv444p`, `gray`), `png` in .mov (`rgba`), `qtrle` in .mov
    (`argb`); libx264 with yuv420p needs even sizes.
    `options` go to the encoder (e.g. {"preset": "veryfast"}). Returns the path.
    """
    import av  # here, not at module import: rendering the world needs no video library

    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"write_video({path}): expected at least one frame, got none")
    layout = _input_layout(first)
    height, width = first.shape[:2]
    times = None if timestamps is None else _checked_times(timestamps)
    count = 0
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1_000_000), options=options or {})
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            if times is not None:
                stream.codec_context.time_base = _MS
            for count, frame in enumerate(itertools.chain([first], it), start=1):
                if frame.shape != first.shape or frame.dtype != np.uint8:
                    raise ValueError(f"frame {count - 1} is {frame.dtype} {frame.shape}: expected uint8 {first.shape}")
                video_frame = av.VideoFrame.from_ndarray(_squeeze(frame), format=layout)
                if times is not None:
                    if count > len(times):
                        raise ValueError(f"got more frames than the {len(times)} timestamps")
                    video_frame.pts, video_frame.time_base = round(times[count - 1] * 1000), _MS
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except av.FFmpegError as e:
        raise ValueError(
            f"could not write {path} with codec {codec}, pix_fmt {pix_fmt}, {width}x{height}: "
            f"{type(e).__name__}: {e.strerror}"
        ) from e
    if times is not None and count != len(times):
        raise ValueError(f"got {count} frames for {len(times)} timestamps: expected one timestamp per frame")
    return path


def write_test_video(
    path: str | Path, seconds: float, fps: float = 10, size: tuple[int, int] = (320, 240), seed: int = 0
) -> Path:
    """A `moving_shapes` clip of `seconds` at `fps`, size (width, height), as H.264 yuv420p (even sizes only)."""
    width, height = size
    frames = moving_shapes(max(1, round(seconds * fps)), width, height, seed=seed, fps=fps)
    return write_video(path, frames, fps=fps)


def _random_shape(rng: np.random.Generator, width: int, height: int, fps: float) -> dict:
    size = int(rng.integers(max(2, min(width, height) // 8), max(3, min(width, height) // 3)))
    return {
        "disc": bool(rng.integers(2)),
        "size": size,
        "colour": rng.integers(0, 256, 3, dtype=np.uint8),
        "start": rng.uniform(0, [max(1, width - size), max(1, height - size)]),  # x, y of the top-left corner
        "velocity": rng.uniform(-0.5, 0.5, 2) * min(width, height) / fps,  # pixels per frame
    }


def _draw(frame: np.ndarray, shape: dict, i: int, rows: np.ndarray, cols: np.ndarray) -> None:
    height, width = frame.shape[:2]
    size = shape["size"]
    x, y = shape["start"] + shape["velocity"] * i
    x, y = _bounce(x, width - size), _bounce(y, height - size)
    if shape["disc"]:
        r = size / 2
        frame[(rows - y - r) ** 2 + (cols - x - r) ** 2 <= r * r] = shape["colour"]
    else:
        frame[int(y) : int(y) + size, int(x) : int(x) + size] = shape["colour"]


def _bounce(position: float, span: float) -> float:
    """Fold an unbounded coordinate into [0, span], reflecting at both ends."""
    if span <= 0:
        return 0.0
    folded = position % (2 * span)
    return span - abs(folded - span)


def _input_layout(frame: np.ndarray) -> str:
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return "gray"
    if frame.ndim == 3 and frame.shape[2] in (3, 4):
        return "rgb24" if frame.shape[2] == 3 else "rgba"
    raise ValueError(f"frames must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")


def _squeeze(frame: np.ndarray) -> np.ndarray:
    return frame[..., 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame


def _checked_times(timestamps: Sequence[float]) -> list[float]:
    times = [float(t) for t in timestamps]
    millis = [round(t * 1000) for t in times]
    if any(t < 0 for t in times) or any(b <= a for a, b in zip(millis, millis[1:])):
        raise ValueError(f"timestamps must be >= 0 and strictly increasing at 1 ms resolution, got {times[:10]}...")
    return times
