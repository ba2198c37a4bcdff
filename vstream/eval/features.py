"""Pre-extracted vision features: one safetensors file per video, in the released layout.

A file holds one tensor, `feature` [T, grid^2, D] ([T, 256, 1024] for CLIP ViT-L/14), the patch features of the frames
sampled at the model's `sample_fps`, in time order. The frame times and what produced them go in the file's header
metadata (string values), which readers of the released layout ignore; a file without them is read as 1 fps from 0 s.

Extraction is resumable: a finished file is never recomputed, and each file is written to a temporary name in the
output folder and renamed when complete, so an interrupted run leaves no partial file under a final name.
This module does not build memories or answer questions (see `vstream.eval.runner`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vstream.errors import DataError, MissingPathError
from vstream.video import VideoError, iter_frames

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")
FEATURE_SUFFIX = ".safetensors"
FEATURE_KEY = "feature"


def feature_name(video: str) -> str:
    """`a/b.mp4` -> `a/b.safetensors`: the last extension replaced when it is a video one, otherwise appended (a bare
    video id such as `v_abc` or `0.5s_clip`)."""
    path = Path(video)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return str(path.with_suffix(FEATURE_SUFFIX))
    return video + FEATURE_SUFFIX


def list_videos(videos_dir: str | Path) -> list[str]:
    """Video files under `videos_dir` (recursively), as sorted paths relative to it."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise MissingPathError(f"{root} is not a directory: expected a folder of videos")
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
    )


def encode_video(model, path: str | Path, frames_per_call: int = 32) -> tuple[torch.Tensor, list[float]]:
    """Sample `path` at the model's fps and encode it, `frames_per_call` frames a call of the encoder -> (features
    [T, grid^2, D] on the CPU, times [T])."""
    chunks: list[torch.Tensor] = []
    times: list[float] = []
    frames: list[np.ndarray] = []

    def flush() -> None:
        if frames:
            chunks.append(model.encode(frames, frames_per_call).cpu())  # positional: see StreamProcessor.insert
            frames.clear()

    for t, frame in iter_frames(path, fps=model.cfg.sample_fps):
        times.append(t)
        frames.append(frame)
        if len(frames) == frames_per_call:
            flush()
    flush()
    if not times:
        raise VideoError(f"{path} contains no decodable video frames: expected at least one")
    return torch.cat(chunks), times


def save_features(path: str | Path, features: torch.Tensor, times: list[float],
                  meta: dict[str, str] | None = None) -> Path:
    """Write `{'feature': features}` with the times in the header metadata, atomically (temporary file + rename)."""
    path = Path(path)
    if features.ndim != 3 or features.shape[0] != len(times):
        raise ValueError(f"expected features [T, tokens, D] with one time per frame, got {tuple(features.shape)} "
                         f"and {len(times)} times")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "vstream-features/1", "times": json.dumps(times)} | (meta or {})
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file({FEATURE_KEY: features.contiguous()}, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_features(path: str | Path) -> tuple[torch.Tensor, list[float]]:
    """Read a feature file -> (features [T, tokens, D], times [T] seconds). Files without times are 1 fps from 0 s."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path} does not exist: expected a feature file")
    with safe_open(str(path), framework="pt") as f:
        if FEATURE_KEY not in f.keys():
            raise DataError(f"{path}: expected a tensor named {FEATURE_KEY!r}, found {sorted(f.keys())}")
        features = f.get_tensor(FEATURE_KEY)
        meta = f.metadata() or {}
    if features.ndim != 3 or features.shape[0] == 0:
        raise DataError(f"{path}: expected {FEATURE_KEY!r} of shape [T>0, tokens, D], got {tuple(features.shape)}")
    times = json.loads(meta["times"]) if "times" in meta else [float(i) for i in range(features.shape[0])]
    if len(times) != features.shape[0]:
        raise DataError(f"{path}: {features.shape[0]} frames but {len(times)} times in the metadata")
    return features, [float(t) for t in times]


def extract_features(
    model, videos_dir: str | Path, out_dir: str | Path, frames_per_call: int = 32,
    progress: Callable[[str, str], None] | None = None, show_progress: bool = False,
) -> dict[str, list[str]]:
    """Encode every video under `videos_dir` into `out_dir/<name>.safetensors`; files already there are kept.

    Returns {"written": [...], "skipped": [...]} (video names). A video that cannot be decoded stops the run with its
    error (files finished before it stay). `progress(name, status)` is called after each video."""
    from tqdm import tqdm

    videos = list_videos(videos_dir)
    if not videos:
        raise MissingPathError(f"{videos_dir} holds no video files (extensions {', '.join(VIDEO_EXTENSIONS)})")
    out = Path(out_dir)
    done: dict[str, list[str]] = {"written": [], "skipped": []}
    meta = {"model": model.cfg.name, "fps": repr(model.cfg.sample_fps)}
    for name in tqdm(videos, desc="extract-features", unit="video", disable=not show_progress):
        target = out / feature_name(name)
        if target.exists():
            status = "skipped"
        else:
            features, times = encode_video(model, Path(videos_dir) / name, frames_per_call)
            save_features(target, features, times, meta | {"video": name})
            status = "written"
        done[status].append(name)
        if progress is not None:
            progress(name, status)
    return done
