"""Batched decoding over a `SlotCache`: many answers advance by one token in one step.

`BatchDecoder` reads the weights of a transformers model (references, no copies): a `LlamaForCausalLM`, or the text
model of a Qwen2-VL / Qwen2.5-VL (`TextDecoder` finds the parts), and runs the arithmetic of
`vstream.model.static_decode.StaticLlama` in batched form: RMSNorm in float32, RoPE from the model's own rotary module,
SDPA attention, the model's own projections (Qwen2's q/k/v biases come with them) and MLP. So greedy decoding gives
each slot the tokens the eager path gives it alone.

Positions. A LLaMA token's RoPE position is its cache position. A Qwen token's is not: its prompt carries M-RoPE
positions (temporal, height, width; the memory's visual tokens at their AM-RoPE times), which a prefill takes with its
chunk (`positions`), and text after the memory continues from the memory's largest position + 1, whatever the number of
tokens before it. Each slot therefore keeps its own RoPE position (`rope_pos`, float32: AM-RoPE positions may be
fractional) beside its length. A decoded token is text, and a text token's three M-RoPE components are equal, which
makes its M-RoPE a plain 1-D RoPE at that one number (tested to the bit): one position per slot is all a step needs.

- `set_prefix` computes the system prompt's keys once and places them at [0, P) of every slot.
- `append_kv(slot, kv)` appends keys and values computed elsewhere (a Qwen memory prefix cached off the question's
  path) to one slot.
- `prefill(slot, embeds, positions=...)` appends a chunk of a prompt to one slot, from the slot's length on (P for a
  fresh slot); a prompt may come in several chunks, so that a long one never holds the step back for long. Prefills
  run one slot at a time. The last chunk picks the slot's first token and makes the slot active; the slot's decoded
  tokens continue from its last position + 1.
- `step` advances every active slot by one token at once: each slot's token is fed at its own position, its key is
  written there, and it attends only to its own positions up to that one. Inactive slots run too (fixed shapes) but
  write only at the last position S_max - 1, which a slot always writes itself before it can read it, and their
  tokens and lengths stay as they are. Greedy (temperature 0) and sampled slots mix in one batch; sampling is
  Gumbel-max with per-slot temperatures from a device generator, so the step never reads the device from the host.
  The step reads keys only up to a span of positions (a multiple of `span_step`, or S_max) that covers every active
  slot: a 745-position prompt's answer reads 896 positions of a 1,193-position cache, not all of them (the step's
  time goes mostly to reading keys and weights). On CUDA the step is captured at 1, 2, 4, ... and B_max slots times
  each span, and the smallest size and span that cover every active slot are replayed.
- `fetch` / `fetched`: the host reads the tokens fed to a step after launching it (pinned memory, one event), so the
  read never stalls the device.
- `steps`, `slot_steps`, `widest_step`: the steps run, the slot-tokens they advanced and the most slots one advanced:
  how much the batch shared its steps.

Where Triton runs, a LLaMA model's prefills go through the fused layers of `static_decode.FusedLayers` (the
single-answer fast path's), writing into the slot's rows of the cache, and a Qwen model's prefills and every step
through `static_decode.FusedStep` (the same kernels but RoPE, which stays in torch: each slot at its own position, a
Qwen prompt at its M-RoPE positions); a step is one graph replay either way.

What this module does not do: pick which request gets a slot, build prompts or M-RoPE positions (the model's),
detokenise, check stop conditions (all the host's, in `vstream.model.batch_answer`), top-p sampling, or sliding-window
attention (a model with sliding layers is refused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from vstream.devices import graph_sizes
from vstream.model.batch_cache import SlotCache
from vstream.model.generate import _check_embeds
from vstream.model.static_decode import FusedLayers, FusedStep, rope
from vstream.model.text_decoder import TextDecoder


class BatchDecoder:
    """Static-cache decoding of a LLaMA or Qwen2(.5)-VL decoder for up to `max_batch` sequences of `max_seq_len`
    positions."""

    def __init__(self, llm, max_batch: int, max_seq_len: int, cuda_graph: bool | None = None, seed: int = 0,
                 fused: bool | None = None, span_step: int = 128):
        """`fused`: prefill (LLaMA only) and step through the fused kernels (None: where they run).
        `span_step`: the step's key spans are its multiples below `max_seq_len`, and `max_seq_len`."""
        parts = TextDecoder.of(llm)
        cfg = parts.config
        if max_seq_len < 2 or max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}], got {max_seq_len}")
        if fused and parts.mrope:
            raise ValueError("fused layers run LLaMA decoders only (no q/k/v biases, 1-D RoPE), got an M-RoPE model")
        self.llm, self.parts = llm, parts
        self.layers = parts.layers
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        if span_step < 1:
            raise ValueError(f"span_step must be >= 1, got {span_step}")
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.spans = sorted({*range(span_step, max_seq_len, span_step), max_seq_len})  # key lengths a step reads
        weight = parts.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = SlotCache(len(self.layers), max_batch, self.kv_heads, max_seq_len, self.head_dim,
                               self.device, self.dtype)
        self.positions = torch.arange(max_seq_len, device=self.device)  # [S_max] cache positions
        self.cos = self.sin = None  # [S_max, Dh] RoPE at each cache position: LLaMA's tables
        if not parts.mrope:
            with torch.inference_mode():
                cos, sin = parts.rotary(weight[:1], self.positions[None])  # [1, S_max, Dh] in the model dtype
            self.cos, self.sin = cos[0], sin[0]
        step_fused = FusedStep.possible(parts) if fused is None else fused
        if fused is None:
            fused = not parts.mrope and FusedLayers.possible(llm)
        self.fused = FusedLayers(llm, self.cos, self.sin) if fused else None
        self.fused_step = FusedStep(parts) if step_fused else None
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # [B] fed to the next step
        self.rope_pos = torch.zeros(max_batch, device=self.device)  # [B] float32 RoPE position of that token
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=self.device)  # [B] slots the step advances
        self.temperature = torch.zeros(max_batch, device=self.device)  # [B] float32; 0 = greedy
        self.host_active: set[int] = set()  # the slots `active` holds, as the host knows them
        self.steps = self.slot_steps = self.widest_step = 0  # steps run, slot-tokens they advanced, most in one
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(max_batch, dtype=torch.long, pin_memory=cuda)  # [B] tokens read back
        self.ready = torch.cuda.Event() if cuda else None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (slots, span) -> its captured step
        if cuda if cuda_graph is None else cuda_graph:
            self._capture()

    # ---------------------------------------------------------------- the transformer, batched

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _attend(self, i: int, h: torch.Tensor, cos, sin, write, read, mask, causal: bool) -> torch.Tensor:
        # h: [B, S, H]; cos/sin broadcast against [B, H, S, Dh];
        # write(i, k, v) stores keys, read(i) gives the visible ones
        a = self.layers[i].self_attn
        b, s = h.shape[:2]
        q = a.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [B, Hq, S, Dh]
        k = a.k_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        v = a.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        write(i, k, v)
        keys, values = read(i)  # [B, Hkv, S_keys, Dh]
        if self.kv_heads != self.heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=a.scaling)
        return a.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _forward(self, x: torch.Tensor, cos, sin, write, read, mask, causal: bool) -> torch.Tensor:
        """x [B, S, H] -> logits of each row's last position [B, V]."""
        for i, layer in enumerate(self.layers):
            x = x + self._attend(i, self._rms(x, layer.input_layernorm.weight), cos, sin, write, read, mask, causal)
            x = x + layer.mlp(self._rms(x, layer.post_attention_layernorm.weight))
        return self.parts.lm_head(self._rms(x[:, -1:], self.parts.norm.weight))[:, -1]

    def _pick(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Next tokens [B] from logits [B, V]: argmax where the temperature is 0, else Gumbel-max at that temperature
        (a sample of softmax(logits / T)). Draws noise for every row, so a row's draw depends on its index."""
        u = torch.rand(logits.shape, device=logits.device, generator=self.generator)  # [B, V] float32 in [0, 1)
        t = torch.where(temperature > 0, temperature, 1.0)[:, None]  # [B, 1]
        sampled = (logits.float() / t - torch.log(-torch.log(u))).argmax(dim=-1)
        return torch.where(temperature > 0, sampled, logits.argmax(dim=-1))

    # ---------------------------------------------------------------- prefix and prefill

    @torch.inference_mode()
    def set_prefix(self, ids: tuple[int, ...], embeds: torch.Tensor) -> None:
        """Compute the keys of the prefix embeds [1, P, H] (token ids `ids`) once, into every slot's [0, P)."""
        c = self.cache
        if c.in_use:
            raise RuntimeError(f"the prefix can change only while no slot is in use, {len(c.in_use)} are")
        if embeds.dim() != 3 or embeds.shape[:2] != (1, len(ids)):
            raise ValueError(f"prefix embeds must be [1, {len(ids)}, H] for {len(ids)} ids, got {list(embeds.shape)}")
        p = len(ids)
        if p:
            _check_embeds(self.llm, embeds)
            c.host_lengths[0] = 0
            self._prefill_rows(0, embeds)
            c.set_prefix(tuple(ids), c.k[:, 0, :, :p].clone(), c.v[:, 0, :, :p].clone())
        else:
            c.set_prefix((), c.k[:, 0, :, :0], c.v[:, 0, :, :0])

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, Dh] of the model's rotary module at positions [3, B, S] (M-RoPE; a text token's three
        components are equal, so [1, B, S] gives its plain RoPE) or [B, S] (LLaMA), float32."""
        return self.parts.rotary(self.parts.embed.weight[:1], positions)

    def _check_positions(self, positions: torch.Tensor | None, s: int) -> None:
        if positions is None:
            if self.parts.mrope:
                raise ValueError("an M-RoPE model's prompt chunk needs its positions ([S] or [3, S]), got None")
            return
        if not self.parts.mrope:
            raise ValueError("a LLaMA prompt chunk sits at its cache positions: positions must be None")
        if positions.shape not in ((s,), (3, s)) or positions.dtype != torch.float32 or positions.device != self.device:
            raise ValueError(f"positions must be [{s}] or [3, {s}] float32 on {self.device} for a chunk of {s}, got "
                             f"{list(positions.shape)} {positions.dtype} on {positions.device}")

    def _prefill_rows(self, slot: int, embeds: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run embeds [1, S, H] at cache positions [start, start + S) of `slot`, start = its host length, and RoPE
        positions `positions` ([S] or [3, S] float32; None: the cache positions) -> logits [1, V]."""
        c = self.cache
        start = c.host_lengths[slot]
        s = embeds.shape[1]
        end = start + s
        if end > self.max_seq_len:
            raise ValueError(f"slot {slot} needs {end} positions, the KV cache holds {self.max_seq_len} per slot")

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            c.k[i, slot : slot + 1, :, start:end] = k
            c.v[i, slot : slot + 1, :, start:end] = v

        def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return c.k[i, slot : slot + 1, :, :end], c.v[i, slot : slot + 1, :, :end]

        if start == 0:
            mask, causal = None, s > 1
        elif self.device.type == "cuda":  # query j sits at position start + j and sees keys up to it
            mask, causal = causal_lower_right(s, end), False
        else:  # built once here rather than in every layer
            mask, causal = self.positions[:end][None, :] <= self.positions[start:end][:, None], False  # [S, end]
        if self.fused is not None and s > 1:  # a one-position prefill (a question's last piece) gains nothing
            logits = self.fused.forward(embeds, self.positions[start : start + 1],
                                        lambda i: (c.k[i, slot], c.v[i, slot]), lambda i: read(i), mask, causal)
        elif positions is None:
            logits = self._forward(embeds, self.cos[start:end], self.sin[start:end], write, read, mask, causal)
        else:
            cos, sin = self._rotary(positions.reshape(-1, 1, s))  # [1, S, Dh]
            if self.fused_step is not None:  # a Qwen prompt: its own M-RoPE positions, the fused kernels
                logits = self.fused_step(embeds, cos, sin, write, read, mask, causal)
            else:
                logits = self._forward(embeds, cos, sin, write, read, mask, causal)
        c.host_lengths[slot] = end
        return logits

    @torch.inference_mode()
    def append_kv(self, slot: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append keys and values computed elsewhere to `slot`, from its length on: per layer (k, v) [1, Hkv, n, Dh],
        keys already rotated (a Qwen memory prefix, prefilled by the model's own forward when its snapshot came). A
        prefill of the rest of the prompt continues after them."""
        c = self.cache
        if slot not in c.in_use:
            raise ValueError(f"slot {slot} is not in use (in use: {sorted(c.in_use)})")
        if len(kv) != len(self.layers):
            raise ValueError(f"keys and values of {len(self.layers)} layers expected, got {len(kv)}")
        start, n = c.host_lengths[slot], kv[0][0].shape[2]
        if start + n > self.max_seq_len:
            raise ValueError(f"slot {slot} needs {start + n} positions, the KV cache holds {self.max_seq_len} per slot")
        want = (1, self.kv_heads, n, self.head_dim)
        for i, (k, v) in enumerate(kv):
            for t in (k, v):
                if tuple(t.shape) != want or t.dtype != self.dtype or t.device != self.device:
                    raise ValueError(f"layer {i}'s keys and values must be {list(want)} {self.dtype} on {self.device}, "
                                     f"got {list(t.shape)} {t.dtype} on {t.device}")
            c.k[i, slot : slot + 1, :, start : start + n] = k
            c.v[i, slot : slot + 1, :, start : start + n] = v
        c.host_lengths[slot] = start + n

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, last: bool = True, temperature: float = 0.0,
                positions: torch.Tensor | None = None):
        """Append embeds [1, S, H] to `slot` (from its length on: P for a freshly acquired slot). `positions`: their
        RoPE positions, [S] or [3, S] (temporal, height, width) float32, for an M-RoPE model (None for LLaMA: the
        cache positions). With `last`, pick the slot's first token at `temperature` and make the slot active -> that
        token [1] (a device tensor), else None; the decoded tokens sit at the chunk's last position + 1, + 2, ...: the
        last token of a prompt must be text (its components equal), as the Qwen templates' are."""
        c = self.cache
        if slot not in c.in_use:
            raise ValueError(f"slot {slot} is not in use (in use: {sorted(c.in_use)})")
        _check_embeds(self.llm, embeds)
        self._check_positions(positions, embeds.shape[1])
        logits = self._prefill_rows(slot, embeds, positions)
        if not last:
            return None
        self.temperature[slot] = temperature
        token = self._pick(logits, self.temperature[slot : slot + 1])  # [1]
        self.tokens[slot : slot + 1] = token
        if positions is None:
            self.rope_pos[slot] = c.host_lengths[slot]
        else:  # as transformers' Qwen decoding continues: the last position + 1, in float32
            self.rope_pos[slot : slot + 1] = positions.reshape(-1, embeds.shape[1])[0, -1:] + 1
        c.lengths[slot] = c.host_lengths[slot]
        self.active[slot] = True
        self.host_active.add(slot)
        return token

    def deactivate(self, slot: int) -> None:
        """Leave `slot` out of the following steps (a device write, no read)."""
        self.active[slot] = False
        self.host_active.discard(slot)

    # ---------------------------------------------------------------- the batched step

    def _step(self, b: int, n: int) -> None:
        """One decode step on device state only, for slots [0, b), reading keys [0, n) (every active slot's position
        is below n; inactive ones write at S_max - 1, which no step reads before a slot writes it, and change
        nothing)."""
        c = self.cache
        active, tokens, lengths = self.active[:b], self.tokens[:b], c.lengths[:b]
        pos = torch.where(active, lengths, self.max_seq_len - 1)  # [b] where each slot's token sits in the cache
        x = self.parts.embed(tokens)[:, None]  # [b, 1, H]
        if self.cos is not None:  # LLaMA: the RoPE position is the cache position
            cos = self.cos.index_select(0, pos)[:, None, None]  # [b, 1, 1, Dh]
            sin = self.sin.index_select(0, pos)[:, None, None]
        else:  # the slot's own position (text: one number); an inactive slot's is stale, its outputs unused
            cos, sin = (t[:, None] for t in self._rotary(self.rope_pos[:b].view(1, b, 1)))  # [b, 1, 1, Dh]
        mask = (self.positions[None, :n] <= pos[:, None])[:, None, None]  # [b, 1, 1, n]
        where = pos.view(b, 1, 1, 1).expand(b, self.kv_heads, 1, self.head_dim)  # [b, Hkv, 1, Dh]

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            c.k[i, :b].scatter_(2, where, k)
            c.v[i, :b].scatter_(2, where, v)

        def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return c.k[i, :b, :, :n], c.v[i, :b, :, :n]

        if self.fused_step is not None:
            logits = self.fused_step(x, cos, sin, write, read, mask)
        else:
            logits = self._forward(x, cos, sin, write, read, mask, False)
        tokens.copy_(torch.where(active, self._pick(logits, self.temperature[:b]), tokens))
        lengths.add_(active.long())
        self.rope_pos[:b].add_(active.float())  # float32 + 1, as transformers' Qwen decoding advances

    def step_size(self) -> int:
        """How many leading slots the next step runs: the smallest captured size (any size when eager) that covers
        every active slot. Slots are handed out lowest first, so a few answers run a small step."""
        need = max(self.host_active, default=0) + 1
        return next((b for b in self.sizes() if b >= need), self.max_batch) if self.graphs else need

    def sizes(self) -> list[int]:
        """The slot counts a step is captured at: 1, 2, 4, ... below B_max, and B_max."""
        return graph_sizes(self.max_batch)

    def span(self) -> int:
        """How many key positions the next step reads: the smallest span that holds every active slot's keys."""
        lengths = self.cache.host_lengths
        need = max((lengths[slot] for slot in self.host_active), default=1)
        return next(n for n in self.spans if n >= need)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step for every active slot: a graph replay on CUDA once captured, else the eager step -> `tokens`
        [B], written in place (an active slot's new token; an inactive slot's entry means nothing)."""
        lengths = self.cache.host_lengths
        full = [slot for slot in sorted(self.host_active) if lengths[slot] >= self.max_seq_len]
        if full:
            raise RuntimeError(f"slot {full[0]} is full: its next token would sit at position {lengths[full[0]]}, "
                               f"the KV cache holds {self.max_seq_len} per slot")
        for slot in self.host_active:
            lengths[slot] += 1
        self.steps += 1
        self.slot_steps += len(self.host_active)
        self.widest_step = max(self.widest_step, len(self.host_active))
        b, n = self.step_size(), self.span()
        if self.graphs:
            self.graphs[b, n].replay()
        else:
            self._step(b, n)
        return self.tokens

    def fetch(self) -> None:
        """Queue the copy of the tokens the next step is fed (each active slot's newest token) to the host."""
        with torch.inference_mode():
            self.host.copy_(self.tokens, non_blocking=self.ready is not None)
        if self.ready is not None:
            self.ready.record()

    def fetched(self) -> list[int]:
        """The tokens of the last `fetch` [B], once they have arrived (inactive slots' entries mean nothing)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up on a side stream and capture the step at every slot count of `sizes` and span of `spans` (one memory
        pool: they replay one at a time). No slot is active, so the warm-ups and captures write only at S_max - 1 and
        change no token or length. The generator's state is registered with each graph, so each replay draws new
        noise."""
        self.active.zero_()
        shapes = [(b, n) for b in self.sizes() for n in self.spans]
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b, n in shapes:
                self._step(b, n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b, n in sorted(shapes, reverse=True):  # largest first: the smaller ones fit in its pool
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph, pool=pool):
                self._step(b, n)
            self.graphs[b, n] = graph
        torch.cuda.synchronize(self.device)
