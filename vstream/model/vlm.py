"""The Flash-VStream model in one file: frames -> vision tower -> STAR memory -> projector -> splice -> LLM -> text.

The model owns its weights and turns inputs into outputs; it does no I/O beyond `answer(video_path, ...)`, the offline
convenience that decodes a file. Streaming sessions (ingest and answer concurrently) are built on `encode`,
`new_memory` and `stream_answer` elsewhere. Loading and saving live in `vstream.model.loading`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vstream.config import ModelConfig
from vstream.encoder.preprocess import crop_frames, normalise_crops
from vstream.encoder.tower import VisionTower
from vstream.errors import ConfigError
from vstream.memory import AbstractAttention, MemoryRead, build_memory
from vstream.model.generate import stream_generate
from vstream.model.prompts import IMAGE_TOKEN_INDEX, prompt_parts, stop_strings
from vstream.model.splice import splice


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`mlp2x_gelu`: Linear, GELU (exact erf), Linear; `linear`: one Linear. Indices match the released keys."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ConfigError(f"projector type must be 'mlp2x_gelu' or 'linear', got {kind!r}")


@dataclass
class Answer:
    """An answer with the stream times its memory rests on and what it cost."""

    text: str
    question: str
    frames: int
    memory_tokens: int
    spatial_times: list[float]
    retrieved_times: list[float]
    temporal_spans: list[tuple[float, float]]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(vars(self))


class FlashVStream(nn.Module):
    """Vision tower (optional: features can be given directly), abstract attention, projector and a causal LM."""

    def __init__(self, cfg: ModelConfig, llm: nn.Module, tokenizer, vision: VisionTower | None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        dim = cfg.vision.hidden_size
        self.attention_model = AbstractAttention(dim, cfg.memory.attention_dim)
        self.mm_projector = build_projector(cfg.projector_type, dim, llm.config.hidden_size)
        self.llm = llm
        self.tokenizer = tokenizer
        cfg.memory.validate(cfg.vision.grid)

    @property
    def device(self) -> torch.device:
        return next(self.mm_projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    # ---------------------------------------------------------------- frames -> features -> memory

    def encode(self, frames: Sequence[np.ndarray], frames_per_call: int = 32) -> torch.Tensor:
        """RGB frames (any size) -> patch features [n, grid^2, D] at the tower's selected layer, `frames_per_call`
        frames a call of the tower."""
        return self.encode_crops(torch.from_numpy(self.crop(frames)), frames_per_call)

    def crop(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """RGB frames (any size) -> the tower's uint8 input crops [n, S, S, 3] (host work, no model)."""
        return crop_frames(frames, self.cfg.vision.image_size)

    def encode_crops(self, crops: torch.Tensor, frames_per_call: int = 32, graphs: dict | None = None) -> torch.Tensor:
        """uint8 crops [n, S, S, 3] from `crop` (on any device) -> patch features [n, grid^2, D], normalised on the
        model's device; through the tower's captured `graphs` when given (see `VisionTower.capture`)."""
        if self.vision is None:
            raise RuntimeError("this model was loaded without a vision tower; pass pre-extracted features instead")
        pixels = normalise_crops(crops.to(self.device, non_blocking=True), self.cfg.vision)
        return self.vision.encode(pixels, frames_per_call, graphs=graphs)

    def new_memory(self):
        """An empty streaming STAR memory of the configured mode, on the model's device and dtype."""
        return build_memory(
            self.cfg.memory, self.cfg.vision.hidden_size, self.attention_model, self.cfg.vision.grid,
            device=self.device, dtype=self.dtype,
        )

    @torch.no_grad()
    def memory_from_features(self, features: torch.Tensor, times: Sequence[float] | None = None) -> MemoryRead:
        """The offline memory after a whole clip [T, tokens, D] (see `vstream.model.processor`)."""
        from vstream.model.processor import StreamProcessor

        processor = StreamProcessor(self, offline=True)
        processor.insert(list(times) if times is not None else [float(i) for i in range(features.shape[0])],
                         features=features)
        return processor.snapshot().memory

    @torch.no_grad()
    def memory_snapshots(
        self, video: str | Iterable[tuple[float, np.ndarray]], at: Sequence[float | None], frames_per_call: int = 32
    ) -> Iterator[MemoryRead]:
        """One sequential pass over `video` (a file path, or any `(t, frame)` source): yield the offline memory as of
        each time in `at` (increasing; None = the end), through a `StreamProcessor`.

        Frames of a file are sampled at `cfg.sample_fps`, encoded `frames_per_call` at a time and added to the memory
        as they come, so the host never holds more than that many frames. A `(t, frame)` source needs no video
        library (PyAV is imported for a path only)."""
        from vstream.model.processor import StreamProcessor, snapshots_at

        keys = [math.inf if t is None else t for t in at]
        name = str(video) if isinstance(video, (str, Path)) else "the source"
        if isinstance(video, (str, Path)):  # opened lazily: snapshots_at checks the times first
            from vstream.video import iter_frames

            video = iter_frames(video, fps=self.cfg.sample_fps, until=None if math.inf in keys else max(keys))
        snaps = snapshots_at(StreamProcessor(self, offline=True), video, at, frames_per_call, name=name)
        try:
            for snap in snaps:
                yield snap.memory
        finally:
            snaps.close()

    # ---------------------------------------------------------------- memory + question -> prompt embeddings -> text

    static_answerer = None  # a `vstream.model.static_decode.StaticAnswerer` once `use_static_decoder` ran; None: eager

    def use_static_decoder(self, max_seq_len: int | None = None, cuda_graph: bool | None = None) -> "FlashVStream":
        """Answer through the static-cache decoder (the eager path's greedy tokens in float32; in half precision its
        fused products may round differently); on CUDA its decode step is captured and one blank answer runs now, so
        the first answer pays neither. Call after moving the model to its device and dtype."""
        from vstream.model.static_decode import StaticAnswerer

        self.static_answerer = StaticAnswerer(self, max_seq_len=max_seq_len, cuda_graph=cuda_graph)
        return self

    def prompt_embeds(self, memory_tokens: torch.Tensor, question: str,
                      system_extra: str | None = None) -> torch.Tensor:
        """Project the memory [N, D] and splice it at the prompt's single `<image>` -> inputs_embeds [1, S, H]."""
        before, after = prompt_parts(self.cfg.template, question, self.tokenizer, system_extra=system_extra)
        vision = self.mm_projector(memory_tokens.to(self.device, self.dtype))  # [N, H]
        return splice([*before, IMAGE_TOKEN_INDEX, *after], self.llm.get_input_embeddings(), vision)[None]

    def stream_answer(
        self, memory: MemoryRead, question: str, max_new_tokens: int | None = None, temperature: float = 0.0
    ) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated from a memory snapshot (greedy by default)."""
        n_new = max_new_tokens or self.cfg.max_new_tokens
        pieces = (None if self.static_answerer is None
                  else self.static_answerer.answer(memory.tokens, question, n_new, temperature))
        if pieces is not None:
            yield from pieces
            return
        # the eager path: no static decoder, or an answer longer than its static cache holds
        with torch.inference_mode():
            embeds = self.prompt_embeds(memory.tokens, question)
        yield from stream_generate(
            self.llm, embeds, self.tokenizer,
            max_new_tokens=n_new,
            stop_strings=stop_strings(self.cfg.template), temperature=temperature,
        )

    def answer(self, video: str, question: str, at: float | None = None, max_new_tokens: int | None = None) -> Answer:
        """Decode `video` at `cfg.sample_fps` up to `at` seconds (default: the end), build the memory, answer."""
        t0 = time.perf_counter()
        snapshots = self.memory_snapshots(video, [at])
        try:
            memory = next(snapshots)
        finally:
            snapshots.close()  # closes the video file now, not at garbage collection
        t3 = time.perf_counter()
        return self.answer_from(memory, question, max_new_tokens=max_new_tokens, timings={"memory_build_s": t3 - t0})

    def answer_from(
        self, memory: MemoryRead, question: str, max_new_tokens: int | None = None, timings: dict | None = None
    ) -> Answer:
        """Answer from a memory snapshot, with the times it rests on and the answer's latencies."""
        t3 = time.perf_counter()
        pieces, first = [], None
        for piece in self.stream_answer(memory, question, max_new_tokens=max_new_tokens):
            first = first if first is not None else time.perf_counter()
            pieces.append(piece)
        t4 = time.perf_counter()
        return Answer(
            text="".join(pieces).strip(),
            question=question,
            frames=memory.frames_seen,
            memory_tokens=memory.num_tokens,
            spatial_times=memory.spatial_times.tolist(),
            retrieved_times=memory.retrieved_times.tolist(),
            temporal_spans=[(a, b) for a, b, _ in memory.temporal_spans.tolist()],
            timings=(timings or {}) | {"first_token_s": (first or t4) - t3, "answer_s": t4 - t3},
        )
