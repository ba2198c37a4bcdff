"""Flash-VStream-Qwen in one file: frames -> Qwen preprocessing -> vision tower (two passes, pre-merger) -> Flash
Memory -> merger on the finished memory -> splice at the prompt's video pads -> AM-RoPE M-RoPE positions -> Qwen LLM.

The transformer blocks are transformers' own Qwen2-VL / Qwen2.5-VL modules (`self.hf`); this module only wires them:
it calls the vision model for pre-merger features, its `merger` on the memory, the text model with `inputs_embeds`
and 3-axis position ids, and `lm_head`. It offers what the engine, the stream processor and the CLI use of a model
(`crop`, `encode`, `encode_crops`, `new_memory`, `stream_answer`, `answer`, `answer_from`, `memory_snapshots`), so
`vstream ask`, `run` and `serve` answer through it unchanged. Loading lives in `vstream.model.qwen.loading`.

`stream_answer` is the eager path: one answer, transformers' own forward. The engine batches answers across streams
instead (`slot_prompts`: `vstream.model.qwen.batch` puts this model's prompts into the batched decoder's slots, which
run the same arithmetic and give the same greedy tokens).

What this module does not do: schedule or batch answers itself, sample frames, or download anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from vstream.encoder.qwen_preprocess import normalise_frames, resize_frames
from vstream.memory.flash import FlashRead, am_rope_positions
from vstream.model.generate import _check_sampling, default_stop_ids, stream_text
from vstream.model.prompts import prompt_parts, stop_strings
from vstream.model.qwen.config import QwenModelConfig
from vstream.model.qwen.prefix import MemoryPrefix, decode
from vstream.model.qwen.stream_memory import QwenStreamMemory, QwenTower, UnitBatcher
from vstream.model.vlm import FlashVStream


class FlashVStreamQwen(nn.Module):
    """A Hugging Face Qwen2-VL / Qwen2.5-VL model (`hf`) with Flash Memory; see the module docstring."""

    vision = None  # no CLIP tower (the engine captures none); the Qwen tower runs inside the memory updates
    prefix_slots = 0  # memory prefixes kept for answers (`enable_prefix_cache`); 0: every answer prefills it all

    def __init__(self, cfg: QwenModelConfig, hf_model: nn.Module, tokenizer):
        super().__init__()
        self.cfg, self.hf, self.tokenizer = cfg, hf_model, tokenizer
        self.tower = QwenTower(hf_model.model.visual, cfg.backbone)
        self.video_token_id = int(hf_model.config.video_token_id)

    @property
    def llm(self) -> nn.Module:
        """The whole Hugging Face model (the batched decoder finds its text model's parts from `model_type`)."""
        return self.hf

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.lm_head.weight.dtype

    # ---------------------------------------------------------------- frames -> memory

    def crop(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """RGB frames (one size) -> uint8 [n, H, W, 3] at the pixel budget (host work, no model)."""
        c = self.cfg
        return resize_frames(frames, c.patch * c.merge, c.min_pixels, c.max_pixels)

    def encode_crops(self, crops: torch.Tensor, frames_per_call: int = 32, graphs=None) -> torch.Tensor:
        """uint8 [n, H, W, 3] from `crop` -> normalised pixels [n, 3 H, W] on the model's device (the memory runs the
        tower per 2-frame unit; `frames_per_call` and `graphs` are accepted for the engine and not used)."""
        x = normalise_frames(crops.to(self.device, non_blocking=True)).to(self.dtype)
        return x.reshape(x.shape[0], 3 * x.shape[2], x.shape[3])

    def encode(self, frames: Sequence[np.ndarray], frames_per_call: int = 32) -> torch.Tensor:
        return self.encode_crops(torch.from_numpy(self.crop(frames)), frames_per_call=frames_per_call)

    def new_memory(self) -> QwenStreamMemory:
        return QwenStreamMemory(self)

    def unit_batcher(self) -> UnitBatcher:
        """A batcher that encodes the units of the memories given it in one tower call (the engine's, for all its
        streams)."""
        return UnitBatcher(self.tower, self.cfg)

    # ---------------------------------------------------------------- the memory's KV off the question's path

    def enable_prefix_cache(self, slots: int = 4) -> "FlashVStreamQwen":
        """Keep the memory prefix (`MemoryPrefix`: the KV of everything before the question) of the last `slots`
        snapshots given to `prepare_answers`; an answer from one of them prefills only its question. Each costs the
        KV of its prompt (about 56 KiB a token for the 7B shapes: 645 MB at 11,520 memory tokens)."""
        if slots < 1:
            raise ValueError(f"prefix slots must be at least 1, got {slots}")
        self.prefix_slots, self._prefixes = slots, OrderedDict()
        return self

    def prepare_answers(self, reads: Sequence) -> None:
        """Prefill the memory prefix of each read now (the engine calls it after publishing a round's snapshots, so a
        question that comes later finds its snapshot's prefix ready); a no-op unless `enable_prefix_cache` ran."""
        if not self.prefix_slots:
            return
        for read in reads:
            if isinstance(read, FlashRead) and read.num_tokens and id(read) not in self._prefixes:
                prefix = MemoryPrefix(self)
                prefix.refresh(read)
                self._prefixes[id(read)] = prefix  # the prefix holds the read: its id is not reused while kept
                while len(self._prefixes) > self.prefix_slots:
                    self._prefixes.popitem(last=False)

    def _prefix_of(self, read) -> MemoryPrefix | None:
        prefix = self._prefixes.get(id(read)) if self.prefix_slots else None
        return prefix if prefix is not None and prefix.read is read and not prefix.busy else None

    def slot_prompts(self):
        """How this model's prompts go into the slots of a `BatchAnswerer` (`vstream.model.qwen.batch.QwenPrompts`)."""
        from vstream.model.qwen.batch import QwenPrompts

        return QwenPrompts(self)

    memory_snapshots = FlashVStream.memory_snapshots
    answer = FlashVStream.answer
    answer_from = FlashVStream.answer_from

    # ---------------------------------------------------------------- memory + question -> prompt

    @torch.no_grad()
    def prompt(self, memory: FlashRead, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [1, S, H], position_ids [3, 1, S] float32): the memory merged and spliced at the video pads,
        text before it at 0..B-1, the memory at its AM-RoPE positions from B, text after it from their maximum + 1.
        No gradient: the tower, the merger and the embeddings are frozen (LoRA trains the LLM's layers after them)."""
        before, after = prompt_parts(self.cfg.template, question, self.tokenizer)
        n = memory.num_tokens
        ids = torch.tensor([*before, *[self.video_token_id] * n, *after], device=self.device)
        embeds = self.hf.get_input_embeddings()(ids)
        if n:
            vision = self.hf.model.visual.merger(memory.tokens.to(self.device, self.dtype))  # [n, H]
            pads = ids == self.video_token_id
            if int(pads.sum()) != vision.shape[0]:
                raise ValueError(f"the prompt has {int(pads.sum())} video pads for {vision.shape[0]} memory tokens")
            embeds = embeds.masked_scatter(pads[:, None], vision.to(embeds.dtype))
            grids = memory.extra["grids"]
            mem = am_rope_positions(memory, grids["small"], grids["full"], self.cfg.seconds_scale, len(before))
            mem = mem.to(self.device)
        else:
            mem = torch.zeros(3, 0, dtype=torch.float64, device=self.device)
        start = float(mem.max()) + 1 if n else float(len(before))  # one read of the device per answer
        head = torch.arange(len(before), dtype=torch.float64, device=self.device).expand(3, -1)
        tail = start + torch.arange(len(after), dtype=torch.float64, device=self.device).expand(3, -1)
        positions = torch.cat([head, mem, tail], dim=1)
        return embeds[None], positions[:, None, :].float()

    # ---------------------------------------------------------------- generation

    @torch.inference_mode()
    def iter_tokens(self, embeds: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                    stop: set[int], temperature: float = 0.0) -> Iterator[int]:
        """Greedy (or sampled) token ids after a prefill of `embeds` at `positions`; each new token one position after
        the previous. One host read per token (the id, to decide whether to stop)."""
        _check_sampling(max_new_tokens, temperature, 1.0)
        if max_new_tokens == 0:
            return
        cache = DynamicCache(config=self.hf.config.get_text_config())
        yield from decode(self.hf, {"inputs_embeds": embeds}, positions, cache, max_new_tokens, temperature, stop)

    def stream_answer(self, memory, question: str, max_new_tokens: int | None = None,
                      temperature: float = 0.0) -> Iterator[str]:
        """The answer's text pieces from a memory read (a `FlashRead`: its times give the positions)."""
        if not isinstance(memory, FlashRead):
            raise TypeError(f"a Qwen model answers from a FlashRead (tokens with their AM-RoPE times), got "
                            f"{type(memory).__name__}")
        prefix = self._prefix_of(memory)
        if prefix is not None:
            yield from prefix.stream_answer(question, max_new_tokens, temperature)
            return
        with torch.inference_mode():
            embeds, positions = self.prompt(memory, question)
        stop = default_stop_ids(self.hf, self.tokenizer)
        n_new = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        tokens = self.iter_tokens(embeds, positions, n_new, stop, temperature)
        yield from stream_text(tokens, self.tokenizer, stop, stop_strings(self.cfg.template))
