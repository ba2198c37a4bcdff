"""Training data: stream passes -> memory snapshots -> supervised conversations, batched for the trainer.

A dataset item is one pass over one video (or one world stream) with the conversations asked along it, each at its
stream time. The pass runs in a DataLoader worker on the CPU: the frozen vision tower encodes the frames and a
`StreamProcessor` (the one inference and evaluation drive) inserts them into a streaming `PaperStarMemory`; at each
conversation's time its snapshot is taken, so a training sample's memory is the one streaming builds. Only the abstract
slots depend on trained weights (the attention's q/k), so the worker hands over the memory without them plus each
frame's P_abs features, and the trainer recomputes the slots with autograd through `abstract_slots` (the same update
rule, checked equal to the streaming memory in the tests).

Example (one conversation over one snapshot), as tensors:
- `rest` [N_rest, D]: the snapshot's temporal | retrieved | spatial tokens, in `MemoryRead` order;
- `abstract_inputs` [T, P_abs^2, D]: the frames seen so far, pooled to P_abs;
- `input_ids`, `labels`: the conversation tokenised by `build_training_example` (one `IMAGE_TOKEN_INDEX` where the
  memory goes; none for a text-only record);
- `segments` (questions packed over one memory only, `vstream.train.watch_data`): per id, 0 for the part shared by
  all questions (up to the memory), i for the i-th question's own prompt and answer (`pack_questions`).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vstream.config import ModelConfig
from vstream.encoder.pooling import pyramid
from vstream.encoder.preprocess import preprocess_frames
from vstream.encoder.tower import VisionTower
from vstream.model.processor import StreamProcessor
from vstream.errors import ConfigError, DataError, MissingPathError
from vstream.memory import AbstractAttention, PaperStarMemory
from vstream.model.prompts import IGNORE_INDEX, IMAGE_TOKEN, build_training_example
from vstream.train.config import DataConfig
from vstream.train.watch_data import PackedQuestions, WatchQuestions, pack_questions


class SnapshotBuilder:
    """Frames or features of one stream -> the memory snapshots at given times, without the abstract slots.

    The builder is the frames-to-memory half of a model on the CPU (`cfg`, `device`, `dtype`, `encode`, `new_memory`),
    which is what a `StreamProcessor` drives: the snapshots are the processor's, frame for frame."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, cfg: ModelConfig, tower: VisionTower | None):
        if cfg.memory.mode != "paper":
            raise ConfigError(f"training builds the paper-mode streaming memory; the model's memory mode is "
                              f"{cfg.memory.mode!r}")
        self.cfg = cfg
        self.tower = tower
        # The worker's attention only keeps the memory running; its slots are discarded (the trainer recomputes them).
        self.attention = AbstractAttention(cfg.vision.hidden_size, cfg.memory.attention_dim)

    @torch.no_grad()
    def encode(self, frames: Sequence[np.ndarray], frames_per_call: int = 64) -> torch.Tensor:
        if self.tower is None:
            raise ValueError("this dataset reads frames but no vision tower was given")
        return self.tower.encode(preprocess_frames(frames, self.cfg.vision), frames_per_call).clone().float()

    def new_memory(self) -> PaperStarMemory:
        c = self.cfg
        return PaperStarMemory(c.memory, c.vision.hidden_size, self.attention, c.vision.grid, device=self.device,
                               dtype=self.dtype)

    @torch.no_grad()
    def snapshots(self, features: torch.Tensor, times: Sequence[float],
                  at: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """features [T, tokens, D] in time order -> for each time in `at` (any order): (rest, abstract_inputs) of the
        memory holding every frame with time <= that time. A time before the first frame is an error."""
        c = self.cfg
        if features.shape[0] != len(times):
            raise ValueError(f"expected one time per frame: {features.shape[0]} frames, {len(times)} times")
        _, _, abs_all = pyramid(features.float(), c.memory.spatial_size, c.memory.temporal_size, c.memory.abstract_size)
        processor = StreamProcessor(self)
        out: list = [None] * len(at)
        for i in sorted(range(len(at)), key=lambda i: at[i]):
            end = bisect.bisect_right(times, at[i] + 1e-9)
            if end > processor.frames:
                processor.insert(times[processor.frames : end], features=features[processor.frames : end])
            snap = processor.snapshot()
            if snap is None:
                raise DataError(f"a conversation at {at[i]:.2f} s comes before the first frame ({times[0]:.2f} s)")
            n_abs = snap.memory.counts["abstract"]
            out[i] = (snap.memory.tokens[n_abs:].clone(), abs_all[: snap.frames].clone())
        return out


def tokenize(template: str, conversations: list[dict], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = build_training_example(template, conversations, tokenizer)
    return torch.tensor(ids), torch.tensor(labels)


def make_examples(builder: SnapshotBuilder, features, times, convs, template: str, tokenizer) -> list[dict]:
    """convs: [(time, conversations, or questions packed over one memory)] -> examples (see the module docstring)."""
    snaps = builder.snapshots(features, times, [t for t, _ in convs])
    examples = []
    for (rest, abs_inputs), (_, conversation) in zip(snaps, convs):
        example = {"rest": rest, "abstract_inputs": abs_inputs}
        if isinstance(conversation, (PackedQuestions, WatchQuestions)):
            example["input_ids"], example["labels"], example["segments"] = pack_questions(template, conversation,
                                                                                          tokenizer)
        else:
            example["input_ids"], example["labels"] = tokenize(template, conversation, tokenizer)
        examples.append(example)
    return examples


class LlavaDataset(Dataset):
    """A LLaVA-format JSON list: `{"id", "video" | "image" (path under root), "conversations", "time"?}`.

    A video is read at the model's sample fps up to `time` (default: its end); the conversation is asked at `time`.
    With `features`, the frames come from `{features}/{video with its extension replaced by .safetensors}` holding
    `{"feature": [T, tokens, D]}` at 1 fps, and no frame is decoded. A record without `video` or `image` is text
    only."""

    def __init__(self, data: DataConfig, builder: SnapshotBuilder, template: str, tokenizer):
        path = Path(data.json)
        if not path.is_file():
            raise MissingPathError(f"training data {str(path)!r} does not exist")
        try:
            records = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not JSON: {exc}") from None
        if not isinstance(records, list) or not records:
            raise DataError(f"{path}: expected a non-empty JSON list of LLaVA records")
        self.root = Path(data.root) if data.root else path.parent
        self.features = Path(data.features) if data.features else None
        for i, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
                raise DataError(f"{path}: record {i} has no 'conversations' list")
            media = r.get("video") or r.get("image")
            if media is not None and self._source(media) is None:
                elsewhere = f" nor has features in {self.features}" if self.features else ""
                raise MissingPathError(f"{path}: record {i} ({r.get('id')}) names {media!r}, which is not under "
                                       f"{self.root}{elsewhere}")
        self.records = records
        self.builder, self.template, self.tokenizer = builder, template, tokenizer

    def _source(self, media: str) -> Path | None:
        if self.features is not None:
            feature = self.features / (str(Path(media).with_suffix(".safetensors")))
            return feature if feature.is_file() else None
        path = self.root / media
        return path if path.is_file() else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> list[dict]:
        from safetensors.torch import load_file

        from vstream.video import iter_frames, read_frames

        record = self.records[index]
        conversation = record["conversations"]
        media = record.get("video") or record.get("image")
        if media is None:
            if any(IMAGE_TOKEN in m.get("value", "") for m in conversation):
                raise DataError(f"record {record.get('id')} has {IMAGE_TOKEN} but no video or image")
            ids, labels = tokenize(self.template, conversation, self.tokenizer)
            d, p = self.builder.cfg.vision.hidden_size, self.builder.cfg.memory.abstract_size**2
            return [{"rest": torch.zeros(0, d), "abstract_inputs": torch.zeros(0, p, d), "input_ids": ids,
                     "labels": labels}]
        at = float(record["time"]) if record.get("time") is not None else math.inf
        source = self._source(media)
        if self.features is not None:
            feature = load_file(str(source))["feature"]
            times = [float(i) for i in range(feature.shape[0])]
            keep = sum(t <= at for t in times)
            features, times = feature[:keep], times[:keep]
        elif "video" in record:
            pairs = list(iter_frames(source, fps=self.builder.cfg.sample_fps, until=None if math.isinf(at) else at))
            times = [t for t, _ in pairs]
            features = self.builder.encode([f for _, f in pairs])
        else:
            frame = (read_frames(source)[0] if source.suffix.lower() not in (".png", ".jpg", ".jpeg")
                     else _read_image(source))
            times, features = [0.0], self.builder.encode([frame])
        if not times:
            raise DataError(f"record {record.get('id')}: no frames at or before {at} s in {source}")
        ask = times[-1] if math.isinf(at) else at
        return make_examples(self.builder, features, times, [(ask, conversation)], self.template, self.tokenizer)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def collate(items: Iterable[list[dict] | dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Dataset items (each a list of examples) -> one padded batch of examples; `segments` (0 where an example has
    none, -1 in padding) when one of them has them."""
    examples = [e for item in items for e in (item if isinstance(item, list) else [item])]
    b = len(examples)
    d = max(e["rest"].shape[-1] for e in examples)
    p = max(e["abstract_inputs"].shape[1] for e in examples)
    n_ids = max(len(e["input_ids"]) for e in examples)
    n_rest = max(e["rest"].shape[0] for e in examples)
    n_abs = max(max(e["abstract_inputs"].shape[0] for e in examples), 1)
    batch = {
        "input_ids": torch.full((b, n_ids), pad_id, dtype=torch.long),
        "labels": torch.full((b, n_ids), IGNORE_INDEX, dtype=torch.long),
        "lengths": torch.tensor([len(e["input_ids"]) for e in examples]),
        "rest": torch.zeros(b, n_rest, d),
        "rest_lengths": torch.tensor([e["rest"].shape[0] for e in examples]),
        "abstract_inputs": torch.zeros(b, n_abs, p, d),
        "abstract_lengths": torch.tensor([e["abstract_inputs"].shape[0] for e in examples]),
    }
    for i, e in enumerate(examples):
        batch["input_ids"][i, : len(e["input_ids"])] = e["input_ids"]
        batch["labels"][i, : len(e["labels"])] = e["labels"]
        batch["rest"][i, : e["rest"].shape[0]] = e["rest"]
        batch["abstract_inputs"][i, : e["abstract_inputs"].shape[0]] = e["abstract_inputs"]
    if any("segments" in e for e in examples):
        batch["segments"] = torch.full((b, n_ids), -1, dtype=torch.long)
        for i, e in enumerate(examples):
            batch["segments"][i, : len(e["input_ids"])] = e.get("segments", 0)
    return batch
