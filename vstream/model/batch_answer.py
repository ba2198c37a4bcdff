"""Answers batched across streams: questions from any thread join one running batch of a `BatchDecoder`.

`BatchAnswerer.submit(memory_tokens, question, ...)` returns a `Request` at once; iterating it yields the answer's text
pieces, as the model's own `stream_answer` yields them, from whichever thread iterates. One scheduler thread calls
`run_once` over and over (between rounds of frame ingestion, say); each call is one scheduling iteration:

1. cancelled requests are dropped; a running one frees its slot at once, before the step;
2. waiting requests take free slots in the order they came, and at most `prefill_chunk` prompt positions are prefilled
   (a long prompt takes several iterations, so it never holds the others' step back for long);
3. one batched step for every running answer, whose tokens the host reads after launching it: a token ends its answer
   (a stop id, a stop string, or `max_new_tokens`) one step after the device produced it, and its slot is freed then.

A request beyond the free slots waits (FIFO) until one frees; beyond `max_waiting` waiting requests, `submit` refuses
it with an error that names both counts.

How a question's prompt goes into a slot is the model's: a model with `slot_prompts()` (the Qwen models:
`vstream.model.qwen.batch`) gives its own; a LLaMA VLM (`FlashVStream`) gets `LlamaPrompts`. Either says which token
ids every slot shares (LLaMA: the system prompt, the prompt's text before `<image>`, the same for every question of
the model's template: its keys are computed once, at construction, and shared by every slot; Qwen: none), how many
positions a question's prompt takes after them, and what goes in at admission (a `SlotPrompt`: keys and values
computed already, then embeddings prefilled at their positions).

What this module does not do: ingest frames, build memories, run a thread of its own, or fall back to the eager path
(a prompt and answer longer than a slot holds are refused at `submit` with `TooLong`).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vstream.model.batch_decode import BatchDecoder
from vstream.model.generate import IncrementalDetokenizer, _check_sampling, default_stop_ids
from vstream.model.prompts import prompt_parts, stop_strings

_END = object()  # closes a request's queue of pieces


class TooLong(ValueError):
    """A prompt and answer longer than a slot holds (the caller may answer it another way)."""


@dataclass
class SlotPrompt:
    """A question's prompt as it goes into a slot after the shared prefix: keys and values computed already (`kv`,
    per layer [1, Hkv, n, Dh]: a cached memory prefix), then `embeds` [1, S, H] prefilled at `positions` ([S] or
    [3, S] float32 RoPE positions of an M-RoPE model; None: LLaMA's cache positions)."""

    embeds: torch.Tensor
    positions: torch.Tensor | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def kv_len(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[2]


def span_step(max_seq_len: int, most: int = 16) -> int:
    """The grain of the key spans a step reads, for slots of `max_seq_len` positions: 128, or the multiple of 128 that
    makes at most `most` spans (on CUDA the step is captured at every span and batch size: a 12,032-position slot
    of a Qwen 7B memory would take 94 spans per size at 128)."""
    return 128 * max(1, -(-max_seq_len // (128 * most)))


class LlamaPrompts:
    """A LLaMA VLM's (`FlashVStream`) prompts in slots: the system prompt shared, memory tokens [N, D] spliced into the
    question's prompt and prefilled after it."""

    def __init__(self, model):
        self.model = model
        self._prefix = self.parts("")[0]  # the text before <image> does not depend on the question

    def parts(self, question: str) -> tuple[list[int], list[int]]:
        return prompt_parts(self.model.cfg.template, question, self.model.tokenizer)

    def prefix(self) -> list[int]:
        return list(self._prefix)

    def max_seq_len(self) -> int:
        """Memory tokens + room for the question and the template + the answer."""
        m = self.model
        return min(m.cfg.memory.max_tokens + 256 + m.cfg.max_new_tokens, m.llm.config.max_position_embeddings)

    def positions(self, memory_tokens: torch.Tensor, question: str, memory=None) -> int:
        dim = self.model.cfg.vision.hidden_size
        if memory_tokens.dim() != 2 or memory_tokens.shape[1] != dim:
            raise ValueError(f"memory tokens must be [N, {dim}], got {list(memory_tokens.shape)}")
        prefix, rest = self.parts(question)
        if prefix != self._prefix:
            raise ValueError(f"the prompt's prefix {prefix} differs from the cached system prompt {self._prefix}")
        return memory_tokens.shape[0] + len(rest)

    def build(self, memory_tokens: torch.Tensor, question: str, memory=None) -> SlotPrompt:
        embeds = self.model.prompt_embeds(memory_tokens, question)  # [1, P + S, H]
        return SlotPrompt(embeds[:, len(self._prefix) :])


def slot_prompts(model):
    """How `model`'s prompts go into the slots: its own `slot_prompts()` (a Qwen model's) or `LlamaPrompts`."""
    return model.slot_prompts() if hasattr(model, "slot_prompts") else LlamaPrompts(model)


class Request:
    """One question's answer. Iterate it for the text pieces (blocks until each comes); `cancel()` stops it.

    `tokens` (the token ids, a stop id last when one ended it), `finish_reason` ("stop", "length", "cancelled",
    "error") and `slot` are written by the scheduler thread."""

    def __init__(self, memory_tokens: torch.Tensor, question: str, max_new_tokens: int, temperature: float,
                 prompt_len: int, memory=None):
        self.memory_tokens, self.question, self.memory = memory_tokens, question, memory
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.prompt_len = prompt_len  # positions of memory + question, from P on
        self.state = "waiting"  # -> "prefilling" -> "running" -> "done"
        self.slot: int | None = None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt: SlotPrompt | None = None  # once admitted, until prefilled
        self._prefilled = 0  # positions of its embeds prefilled
        self._detok: IncrementalDetokenizer | None = None

    def cancel(self) -> None:
        """Stop this answer; the scheduler frees its slot at its next iteration. Safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        """The pieces not yet taken; once the answer has ended, a new iteration ends at once."""
        while (piece := self._pieces.get()) is not _END:
            yield piece
        self._pieces.put(_END)
        if self.error is not None:
            raise RuntimeError(f"the answer to {self.question!r} failed: {self.error}") from self.error

    def text(self) -> str:
        """The whole answer (blocks until it ends)."""
        return "".join(self)


class BatchAnswerer:
    """Answers memory snapshots of many streams in one batch of `max_batch` slots of a `BatchDecoder`."""

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 max_waiting: int = 256, seed: int = 0, cuda_graph: bool | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.prompts = slot_prompts(model)
        max_seq_len = self.prompts.max_seq_len() if max_seq_len is None else max_seq_len
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self.decoder = BatchDecoder(model.llm, max_batch, max_seq_len, cuda_graph=cuda_graph, seed=seed,
                                    span_step=span_step(max_seq_len))
        self.stop_ids = default_stop_ids(model.llm, model.tokenizer)
        self.stop_strings = stop_strings(model.cfg.template)
        prefix = self.prompts.prefix()
        with torch.inference_mode():
            ids = torch.tensor(prefix, dtype=torch.long, device=self.decoder.device)
            self.decoder.set_prefix(tuple(prefix), model.llm.get_input_embeddings()(ids)[None])
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._prefilling: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # slot -> its request

    @property
    def cache(self):
        return self.decoder.cache

    @property
    def pending(self) -> int:
        """Requests not yet done: waiting, prefilling or running."""
        with self._lock:
            waiting = len(self._waiting)
        return waiting + len(self._prefilling) + len(self._running)

    def prompt_parts(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single `<image>` placeholder of the question's prompt."""
        return prompt_parts(self.model.cfg.template, question, self.model.tokenizer)

    # ---------------------------------------------------------------- any thread

    def submit(self, memory_tokens: torch.Tensor, question: str, max_new_tokens: int | None = None,
               temperature: float = 0.0, memory=None) -> Request:
        """Queue a question on memory tokens [N, D] (`memory`: the read they come from, which a Qwen model's prompt
        needs for its AM-RoPE times); the returned request yields its text pieces as they come."""
        n_new = self.model.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_sampling(n_new, temperature, 1.0)
        p = self.cache.prefix_len
        prompt_len = self.prompts.positions(memory_tokens, question, memory)
        need = p + prompt_len + n_new - 1
        if need > self.decoder.max_seq_len:
            raise TooLong(f"prompt ({p + prompt_len} positions) + max_new_tokens ({n_new}) needs {need} "
                             f"positions, a slot holds {self.decoder.max_seq_len}")
        request = Request(memory_tokens, question, n_new, temperature, prompt_len, memory=memory)
        if n_new == 0:
            self._close(request, "length")
            return request
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise RuntimeError(f"the queue is full: {len(self._waiting)} of {self.max_waiting} requests waiting")
            self._waiting.append(request)
        return request

    # ---------------------------------------------------------------- the scheduler thread

    @torch.inference_mode()
    def run_once(self) -> int:
        """One scheduling iteration (drop cancelled, admit and prefill, one batched step) -> requests still pending."""
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        self._decode()
        return self.pending

    def fail_all(self, error: BaseException) -> None:
        """End every request with `error` and free every slot: what the scheduler does when an iteration failed
        outside any one request's inputs (a device error in a step, say), so that no client waits forever."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in [*self._prefilling, *self._running.values()]:
            request.error = error
            try:
                self._finish(request, "error")
            except Exception:  # the device may refuse even the slot's release: the request still ends  # noqa: BLE001
                self._running.pop(request.slot, None)
                self._close(request, "error")
        self._prefilling.clear()
        for request in waiting:
            request.error = error
            self._close(request, "error")

    def run_until_idle(self) -> None:
        """`run_once` until no request is pending."""
        while self.run_once():
            pass

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._close(request, "cancelled")
        for request in [r for r in self._prefilling if r.cancelled]:
            self._prefilling.remove(request)
            self._finish(request, "cancelled")
        for request in [r for r in self._running.values() if r.cancelled]:
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self.cache.free_slots:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            request.slot = self.cache.acquire()
            request.state = "prefilling"
            try:
                request._prompt = self._enter(request)
            except Exception as error:  # this request's inputs failed; the others go on  # noqa: BLE001
                request.error = error
                self._finish(request, "error")
                continue
            self._prefilling.append(request)

    def _enter(self, request: Request) -> SlotPrompt:
        """Build the request's prompt and put its keys and values computed already into its slot."""
        prompt = self.prompts.build(request.memory_tokens, request.question, request.memory)
        got = prompt.kv_len + prompt.embeds.shape[1]
        if got != request.prompt_len:
            raise ValueError(f"the prompt takes {got} positions, {request.prompt_len} were counted at submit")
        if prompt.kv is not None:
            self.decoder.append_kv(request.slot, prompt.kv)
            prompt.kv = None  # copied into the slot: the request no longer holds the prefix's cache
        return prompt

    def _prefill_some(self) -> None:
        budget = self.prefill_chunk
        while self._prefilling and budget:
            request = self._prefilling[0]
            prompt, start = request._prompt, request._prefilled
            total = prompt.embeds.shape[1]
            n = min(total - start, budget)
            last = start + n == total
            positions = None if prompt.positions is None else prompt.positions[..., start : start + n]
            self.decoder.prefill(request.slot, prompt.embeds[:, start : start + n], last=last,
                                 temperature=request.temperature, positions=positions)
            request._prefilled += n
            budget -= n
            if last:
                self._prefilling.popleft()
                request._prompt = None
                request._detok = IncrementalDetokenizer(self.model.tokenizer, self.stop_strings)
                request.state = "running"
                self._running[request.slot] = request

    def _decode(self) -> None:
        """Read each running answer's newest token while the device runs the step that feeds it."""
        if not self._running:
            return
        d = self.decoder
        d.fetch()
        stepping = 0
        for slot, request in self._running.items():
            if len(request.tokens) + 1 == request.max_new_tokens:  # its last token needs no step
                d.deactivate(slot)
            else:
                stepping += 1
        if stepping:
            d.step()
        tokens = d.fetched()
        for slot, request in list(self._running.items()):
            self._take(request, tokens[slot])

    def _take(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        if token in self.stop_ids:
            self._finish(request, "stop")
            return
        delta = request._detok.push(token)
        if delta:
            request._pieces.put(delta)
        if request._detok.stopped:
            self._finish(request, "stop")
        elif len(request.tokens) == request.max_new_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        """End an admitted request: the rest of its text (unless cancelled), then its slot back at once."""
        if reason in ("stop", "length") and request._detok is not None:
            tail = request._detok.finish()
            if tail:
                request._pieces.put(tail)
        slot = request.slot
        self._running.pop(slot, None)
        self.decoder.deactivate(slot)
        self.cache.release(slot)
        request._prompt = None
        self._close(request, reason)

    @staticmethod
    def _close(request: Request, reason: str) -> None:
        request.state, request.finish_reason = "done", reason
        request._pieces.put(_END)
