"""CLIP preprocessing of video frames: RGB conversion, shortest-edge bicubic resize, centre crop, scale, normalise.

`preprocess_frames` gives the same pixels as `transformers.CLIPImageProcessor` (PIL backend) with
`size={"shortest_edge": S}`, `crop_size=S x S`: the shorter edge is resized to S with PIL bicubic, the longer edge to
floor(S * long / short); the uint8 result is centre-cropped at ((h - S) // 2, (w - S) // 2); pixels are scaled by
1/255 in float64, cast to float32 and normalised in float32. This is how the official code feeds video frames to CLIP.

Alpha is dropped, not composited: transformers 5.x composites RGBA onto white, while the transformers the official code
ran (4.x) converted with PIL's `convert("RGB")`, which drops it; decoded video frames never carry alpha.

This module does not pad images to a square (the official code pads still images only, never video frames), does not
decode video, and does not run the vision tower.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from vstream.config import VisionConfig

_WIDE_MODES = ("I", "F")  # PIL modes above 8 bits per channel; convert("RGB") would clip them silently


def to_rgb(frame: np.ndarray | PIL.Image.Image) -> np.ndarray:
    """An image as RGB [H, W, 3] uint8: numpy HxW (gray), HxWx1, HxWx3, HxWx4 (alpha dropped), or an 8-bit PIL image
    in any mode. Other dtypes, shapes and modes raise ValueError naming what was expected and what was found."""
    if isinstance(frame, PIL.Image.Image):
        return _pil_to_rgb(frame)
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"expected a numpy array or a PIL image, got {type(frame).__name__}")
    expected = "a uint8 array HxW, HxWx1, HxWx3 or HxWx4"
    if frame.dtype != np.uint8:
        raise ValueError(f"expected {expected}, got dtype {frame.dtype} with shape {frame.shape}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4) or 0 in frame.shape:
        raise ValueError(f"expected {expected} (non-empty), got shape {frame.shape}")
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    return np.ascontiguousarray(frame[:, :, :3])


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter edge scaled to `size` and the longer one floored, as transformers computes it
    (`int(size * long / short)`; equal to this integer floor division for any image size)."""
    if width <= height:
        return size * height // width, size
    return size, size * width // height


def resize_and_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """RGB [H, W, 3] uint8 -> [size, size, 3] uint8: shortest edge to `size` (PIL bicubic), then centre crop."""
    height, width = resized_size(rgb.shape[0], rgb.shape[1], size)
    resized = np.asarray(PIL.Image.fromarray(rgb).resize((width, height), PIL.Image.Resampling.BICUBIC))
    top, left = (height - size) // 2, (width - size) // 2
    return resized[top : top + size, left : left + size]


def crop_frames(frames: Sequence[np.ndarray | PIL.Image.Image], size: int) -> np.ndarray:
    """Frames (any sizes, see `to_rgb`) -> uint8 crops [n, size, size, 3] (shortest edge resized, centre crop)."""
    crops = np.empty((len(frames), size, size, 3), np.uint8)
    for i, frame in enumerate(frames):
        crops[i] = resize_and_crop(to_rgb(frame), size)
    return crops


def normalise_crops(crops: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """uint8 crops [n, S, S, 3] (on any device) -> pixel values [n, 3, S, S] float32 there: scaled by 1/255 in
    float64, cast to float32, normalised in float32 (the same arithmetic, bit for bit, on the CPU and the GPU)."""
    if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
        raise ValueError(f"expected 3 channel means and stds, got {cfg.image_mean} and {cfg.image_std}")
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1:] != (cfg.image_size, cfg.image_size, 3):
        raise ValueError(f"expected uint8 crops [n, {cfg.image_size}, {cfg.image_size}, 3], "
                         f"got {crops.dtype} {list(crops.shape)}")
    scaled = (crops.double() * (1 / 255)).float()
    mean, std = _channel_stats(tuple(cfg.image_mean), tuple(cfg.image_std), crops.device)
    return ((scaled - mean) / std).permute(0, 3, 1, 2).contiguous()


@functools.cache
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel means and stds as float32 tensors on `device`, copied there once (not at every batch)."""
    return (torch.tensor(mean, dtype=torch.float32).to(device), torch.tensor(std, dtype=torch.float32).to(device))


def preprocess_frames(frames: Sequence[np.ndarray | PIL.Image.Image], cfg: VisionConfig) -> torch.Tensor:
    """Frames (any sizes, see `to_rgb`) -> pixel values [n, 3, S, S] float32 for the CLIP tower, S = cfg.image_size."""
    return normalise_crops(torch.from_numpy(crop_frames(frames, cfg.image_size)), cfg)


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    if image.mode.startswith(_WIDE_MODES):
        raise ValueError(f"expected an 8-bit PIL image (L, P, RGB, RGBA, ...), got mode {image.mode!r}")
    if 0 in image.size:
        raise ValueError(f"expected a non-empty image, got size {image.size}")
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
