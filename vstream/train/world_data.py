"""Training data made on the fly from the procedural world (`vstream.synth.world`): no files, deterministic by seed.

- `WorldQADataset`: one stream per item; its frames at the model's sample fps, rendered and passed through the same
  preprocessing as decoded video; the world's question/answer pairs (task `qa`, with `inventory` and `watches`
  conversations if asked: `vstream.train.watch_data`) or captions of the screen at random moments (task `captions`,
  for the projector stage), each at its own stream time.
- `WorldFrameDataset`: single frames with per-patch class shares from the world's label maps, for `vision` training.

`augment` imitates what a video file does to a rendered frame (4:2:0 chroma subsampling) and adds pixel noise, so a
model trained on rendered frames also reads the H.264 videos the world writes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from vstream.config import ModelConfig
from vstream.encoder.preprocess import preprocess_frames
from vstream.errors import ConfigError
from vstream.synth import world as w
from vstream.train.config import DataConfig
from vstream.train.data import SnapshotBuilder, make_examples
from vstream.train.watch_data import PackedQuestions, sample_time, watch_questions

NUMBER_WORDS = ("no", "one", "two", "three", "four")


def augment_frame(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """4:2:0 chroma subsampling (BT.601, as the H.264 writer uses) plus Gaussian pixel noise (sigma 0-4)."""
    rgb = frame.astype(np.float32)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    cb, cr = (rgb[..., 2] - y) * 0.564, (rgb[..., 0] - y) * 0.713
    h, wd = y.shape
    if h % 2 == 0 and wd % 2 == 0:
        cb = cb.reshape(h // 2, 2, wd // 2, 2).mean((1, 3)).repeat(2, 0).repeat(2, 1)
        cr = cr.reshape(h // 2, 2, wd // 2, 2).mean((1, 3)).repeat(2, 0).repeat(2, 1)
    out = np.stack([y + 1.403 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.773 * cb], axis=-1)
    out += rng.normal(0.0, rng.uniform(0.0, 4.0), out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def caption(scene: w.Scene) -> str:
    """What is on screen, objects left to right: "A red circle and a blue square on a teal background."."""
    names = [f"a {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.x)]
    if not names:
        return f"Nothing on a {scene.background} background."
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


class WorldQADataset(Dataset):
    def __init__(self, data: DataConfig, cfg: ModelConfig, builder: SnapshotBuilder, template: str, tokenizer):
        if data.task not in ("qa", "captions"):
            raise ConfigError(f"data.task must be 'qa' or 'captions' for world data, got {data.task!r}")
        self.data, self.cfg, self.builder, self.template, self.tokenizer = data, cfg, builder, template, tokenizer
        self.seeds = w.split_seeds(data.split, data.streams, data.start)

    def __len__(self) -> int:
        return len(self.seeds)

    def conversations(self, stream: w.WorldTimeline, rng: np.random.Generator) -> list[tuple[float, list[dict]]]:
        if self.data.task == "qa":
            qas = w.make_questions(stream, seed=stream.seed)
            if len(qas) > self.data.max_questions:
                qas = [qas[i] for i in sorted(rng.choice(len(qas), self.data.max_questions, replace=False))]
            convs = [(qa.time, _turn(qa.question, qa.answer)) for qa in qas]
            for t in sorted(rng.choice(range(2, stream.duration), min(self.data.inventory, stream.duration - 2),
                                       replace=False)):
                convs.append((float(t), _turn(INVENTORY_QUESTION, inventory(stream, float(t)))))
            for _ in range(self.data.watches):
                t = sample_time(stream, rng, self.data.watch_near, self.data.watch_kind_weights)
                packed = watch_questions(stream, t, rng, self.data.watch_questions,
                                         self.data.watch_false_per_true).packed()
                qas = w.questions_at(stream, int(t), self.data.watch_qa, rng)
                world = PackedQuestions(tuple(q.question for q in qas), tuple(q.answer for q in qas))
                convs.append((t, packed + world))
            return sorted(convs, key=lambda c: c[0])
        times = sorted(rng.choice(stream.duration, min(self.data.max_questions, stream.duration), replace=False))
        return [(float(t), _turn("", caption(stream.state_at(float(t))))) for t in times]

    def __getitem__(self, index: int) -> list[dict]:
        seed = self.seeds[index]
        stream = w.generate_stream(seed)
        rng = np.random.default_rng([seed, 1])
        convs = self.conversations(stream, rng)
        last = max(t for t, _ in convs)
        frames, times = [], []
        for t, frame in stream.frames(fps=self.cfg.sample_fps, size=self.data.frame_size):
            if t > last:
                break
            frames.append(augment_frame(frame, rng) if self.data.augment else frame)
            times.append(t)
        features = self.builder.encode(frames)
        return make_examples(self.builder, features, times, convs, self.template, self.tokenizer)


INVENTORY_QUESTION = "Which objects have appeared so far, in order?"


def inventory(stream: w.WorldTimeline, t: float) -> str:
    """The objects seen in the frames sampled at whole seconds up to `t`, in order of first sight (ties: left to
    right), each with the colour it first showed: "red circle, blue square, white triangle"."""
    seen: dict[int, tuple[float, float, str]] = {}
    for k in range(int(t) + 1):
        for o in stream.state_at(float(k)).objects:
            if o.id not in seen:
                seen[o.id] = (float(k), o.x, f"{o.colour} {o.shape}")
    return ", ".join(name for _, _, name in sorted(seen.values()))


def _turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


PATCH_CLASSES = 1 + len(w.OBJECT_COLOURS) * len(w.SHAPES)
FRAME_CLASSES = len(w.BACKGROUNDS)


class WorldFrameDataset(Dataset):
    """Frames at random moments of the split's streams, with per-patch class shares (0 = background, else
    `label_of(colour, shape)`) and the background index."""

    def __init__(self, data: DataConfig, cfg: ModelConfig, samples: int = 1_000_000):
        self.data, self.cfg = data, cfg
        self.seeds = w.split_seeds(data.split, data.streams, data.start)
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([index, 2])
        stream = w.generate_stream(self.seeds[index % len(self.seeds)])
        scene = stream.state_at(float(rng.integers(stream.duration)))
        size = self.data.frame_size
        frame = w.render(scene, size)
        if self.data.augment:
            frame = augment_frame(frame, rng)
        labels = w.label_map(scene, size).astype(np.int64)  # [S, S]
        grid = self.cfg.vision.grid
        cell = size // grid
        if cell * grid != size:
            raise ConfigError(f"frame_size {size} must be a multiple of the tower's grid {grid}")
        onehot = np.eye(PATCH_CLASSES, dtype=np.float32)[labels]  # [S, S, C]
        shares = onehot.reshape(grid, cell, grid, cell, PATCH_CLASSES).mean((1, 3)).reshape(grid * grid, PATCH_CLASSES)
        return {
            "pixel_values": preprocess_frames([frame], self.cfg.vision)[0],
            "patch_targets": torch.from_numpy(shares),
            "frame_targets": torch.tensor(list(w.BACKGROUNDS).index(scene.background)),
        }
