"""Qwen2-VL / Qwen2.5-VL preprocessing of video frames, without torchvision: resize to the pixel budget, rescale and
normalise, and patches of 2-frame units in the vision tower's input layout.

- `smart_resize`: the size Qwen's processor resizes an image to: both sides multiples of `factor` (patch x merge =
  28), the pixel count within [min_pixels, max_pixels], the aspect ratio kept as closely as possible.
- `resize_frames`: RGB uint8 frames -> uint8 [n, H, W, 3] at that size, PIL bicubic (the processor's PIL path).
- `normalise_frames`: uint8 [n, H, W, 3] -> float32 [n, 3, H, W]: x / 255 (in float64, rounded once to float32), then
  (x - mean) / std per channel in float32: bit for bit what the processor computes.
- `patchify_units`: [2u, 3, H, W] -> [u * gh * gw, 3 * 2 * P * P]: each unit's patches in merge order (the 2x2
  patches of one LLM token are consecutive), every patch laid out (channel, frame, row, column).
- `small_pass`: the frames average-pooled 2x2 and centre-cropped to multiples of `factor` (the memory's small pass).

Checked against transformers' own `Qwen2VLImageProcessor` (PIL path) on the same frames in `tests/test_qwen.py`.
What this module does not do: decode video, sample frames, run the tower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vstream.config import CLIP_MEAN, CLIP_STD

QWEN_MEAN, QWEN_STD = CLIP_MEAN, CLIP_STD  # Qwen2-VL's processor uses the OpenAI CLIP statistics


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 4 * 224 * 224) -> tuple[int, int]:
    """(height, width) of the resized frame; see the module docstring."""
    if height < 1 or width < 1:
        raise ValueError(f"a frame must have a positive size, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a frame's aspect ratio must be at most 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_frames(frames: Sequence[np.ndarray], factor: int = 28, min_pixels: int = 56 * 56,
                  max_pixels: int = 4 * 224 * 224) -> np.ndarray:
    """RGB uint8 frames [H0, W0, 3] (all of one size) -> uint8 [n, H, W, 3] at `smart_resize`'s size."""
    if not len(frames):
        return np.zeros((0, factor, factor, 3), dtype=np.uint8)
    shapes = {tuple(np.asarray(f).shape) for f in frames}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"expected RGB frames [H, W, 3] all of one size, got shapes {sorted(shapes)}")
    h0, w0, _ = next(iter(shapes))
    h, w = smart_resize(h0, w0, factor, min_pixels, max_pixels)
    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))
        out[i] = np.asarray(image if (h, w) == (h0, w0) else image.resize((w, h), Image.Resampling.BICUBIC))
    return out


def normalise_frames(frames: torch.Tensor, mean=QWEN_MEAN, std=QWEN_STD) -> torch.Tensor:
    """uint8 [n, H, W, 3] (any device) -> float32 [n, 3, H, W]: rescaled by 1/255, then normalised per channel."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    x = (frames.permute(0, 3, 1, 2).to(torch.float64) * (1 / 255)).to(torch.float32)  # the processor's rounding
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x - m) / s


def patchify_units(frames: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """[u * temporal, C, H, W] -> [u * gh * gw, C * temporal * patch^2] (gh = H / patch), in the tower's order."""
    n, c, h, w = frames.shape
    if n % temporal or h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"expected [k*{temporal}, C, H, W] with H and W multiples of {patch * merge}, got "
                         f"{tuple(frames.shape)}")
    gh, gw = h // patch, w // patch
    x = frames.reshape(n // temporal, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (unit, gh/m, gw/m, mh, mw, C, frame, ph, pw)
    return x.reshape(n // temporal * gh * gw, c * temporal * patch * patch)


def small_pass(frames: torch.Tensor, pool: int = 2, factor: int = 28) -> torch.Tensor:
    """[n, C, H, W] -> [n, C, h, w]: average-pooled `pool` x `pool`, centre-cropped so h and w are multiples of
    `factor` (at least one multiple)."""
    x = F.avg_pool2d(frames, pool)
    h, w = x.shape[-2:]
    th, tw = (h // factor) * factor, (w // factor) * factor
    if th == 0 or tw == 0:
        raise ValueError(f"a frame of {frames.shape[-2]}x{frames.shape[-1]} pooled {pool}x{pool} is smaller than one "
                         f"{factor}x{factor} block")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]
