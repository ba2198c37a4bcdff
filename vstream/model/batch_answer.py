"""Answers batched across streams: questions from any thread join one running batch of a `BatchDecoder`.

`BatchAnswerer.submit(memory_tokens, question, ...)` returns a `Request` at once; iterating it yields the answer's text
pieces, as `FlashVStream.stream_answer` yields them, from whichever thread iterates. One scheduler thread calls
`run_once` over and over (between rounds of frame ingestion, say); each call is one scheduling iteration:

1. cancelled requests are dropped; a running one frees its slot at once, before the step;
2. waiting requests take free slots in the order they came, and at most `prefill_chunk` prompt positions are prefilled
   (a long prompt takes several iterations, so it never holds the others' step back for long);
3. one batched step for every running answer, whose tokens the host reads after launching it: a token ends its answer
   (a stop id, a stop string, or `max_new_tokens`) one step after the device produced it, and its slot is freed then.

A request beyond the free slots waits (FIFO) until one frees; beyond `max_waiting` waiting requests, `submit` refuses
it with an error that names both counts. The system prompt (the prompt's text before `<image>`) is the same for every
question of the model's template: its keys are computed once, at construction, and shared by every slot.

What this module does not do: ingest frames, build memories, run a thread of its own, or fall back to the eager path
(a prompt and answer longer than a slot holds are refused at `submit` with `TooLong`).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator

import torch

from vstream.model.batch_decode import BatchDecoder
from vstream.model.generate import IncrementalDetokenizer, _check_sampling, default_stop_ids
from vstream.model.prompts import prompt_parts, stop_strings

_END = object()  # closes a request's queue of pieces


class TooLong(ValueError):
    """A prompt and answer longer than a slot holds (the caller may answer it another way)."""


class Request:
    """One question's answer. Iterate it for the text pieces (blocks until each comes); `cancel()` stops it.

    `tokens` (the token ids, a stop id last when one ended it), `finish_reason` ("stop", "length", "cancelled",
    "error") and `slot` are written by the scheduler thread."""

    def __init__(self, memory_tokens: torch.Tensor, question: str, max_new_tokens: int, temperature: float,
                 prompt_len: int):
        self.memory_tokens, self.question = memory_tokens, question
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.prompt_len = prompt_len  # positions of memory + question, prefilled from P on
        self.state = "waiting"  # -> "prefilling" -> "running" -> "done"
        self.slot: int | None = None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._embeds: torch.Tensor | None = None  # [1, prompt_len, H] once admitted, until prefilled
        self._prefilled = 0
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
        if max_seq_len is None:  # memory tokens + room for the question and the template + the answer
            max_seq_len = min(model.cfg.memory.max_tokens + 256 + model.cfg.max_new_tokens,
                              model.llm.config.max_position_embeddings)
        self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
        self.decoder = BatchDecoder(model.llm, max_batch, max_seq_len, cuda_graph=cuda_graph, seed=seed)
        self.stop_ids = default_stop_ids(model.llm, model.tokenizer)
        self.stop_strings = stop_strings(model.cfg.template)
        prefix, _ = self.prompt_parts("")  # the text before <image> does not depend on the question
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
               temperature: float = 0.0) -> Request:
        """Queue a question on memory tokens [N, D]; the returned request yields its text pieces as they come."""
        n_new = self.model.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_sampling(n_new, temperature, 1.0)
        dim = self.model.cfg.vision.hidden_size
        if memory_tokens.dim() != 2 or memory_tokens.shape[1] != dim:
            raise ValueError(f"memory tokens must be [N, {dim}], got {list(memory_tokens.shape)}")
        prefix, rest = self.prompt_parts(question)
        if tuple(prefix) != self.cache.prefix:
            raise ValueError(f"the prompt's prefix {prefix} differs from the cached system prompt "
                             f"{list(self.cache.prefix)}")
        prompt_len = memory_tokens.shape[0] + len(rest)
        need = len(prefix) + prompt_len + n_new - 1
        if need > self.decoder.max_seq_len:
            raise TooLong(f"prompt ({len(prefix) + prompt_len} positions) + max_new_tokens ({n_new}) needs {need} "
                             f"positions, a slot holds {self.decoder.max_seq_len}")
        request = Request(memory_tokens, question, n_new, temperature, prompt_len)
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
                embeds = self.model.prompt_embeds(request.memory_tokens, request.question)  # [1, P + S, H]
            except Exception as error:  # this request's inputs failed; the others go on  # noqa: BLE001
                request.error = error
                self._finish(request, "error")
                continue
            request._embeds = embeds[:, self.cache.prefix_len :]
            self._prefilling.append(request)

    def _prefill_some(self) -> None:
        budget = self.prefill_chunk
        while self._prefilling and budget:
            request = self._prefilling[0]
            start = request._prefilled
            n = min(request.prompt_len - start, budget)
            last = start + n == request.prompt_len
            self.decoder.prefill(request.slot, request._embeds[:, start : start + n], last=last,
                                 temperature=request.temperature)
            request._prefilled += n
            budget -= n
            if last:
                self._prefilling.popleft()
                request._embeds = None
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
        request._embeds = None
        self._close(request, reason)

    @staticmethod
    def _close(request: Request, reason: str) -> None:
        request.state, request.finish_reason = "done", reason
        request._pieces.put(_END)
