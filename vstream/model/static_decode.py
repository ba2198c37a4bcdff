# size: the static-cache LLaMA answer path in one file (fused layers, static cache, decode graph), read against eager
"""The static-cache answer path of a LLaMA decoder: a static KV cache, a cached system-prompt prefix, and a decode
step replayed from a CUDA graph that is captured once, when the decoder is built.

`StaticLlama` reads the weights of a transformers `LlamaForCausalLM` (references, no copies) and runs the same
arithmetic as its SDPA forward: RMSNorm in float32, RoPE from the model's own rotary module, SDPA attention, SiLU-gated
MLP. So greedy decoding gives the tokens of the eager path (`vstream.model.generate.iter_tokens`); tests check this on
the CPU and on the GPU.

- Prefill runs eagerly (one pass over the prompt, causal SDPA) and writes keys and values into the static cache.
- The decode step works on fixed shapes: the token and its position live in device tensors, keys are written at that
  position with `index_copy_`, attention reads the whole cache under a position mask, and the step writes the greedy
  next token and advances the position itself. On CUDA the step is one graph replay; nothing in it reads the device
  from the host.
- Greedy decoding is pipelined: step k+1 is launched before token k is read back (through pinned memory), so the
  host's read of each token never stalls the device.
- Where Triton runs (`vstream.kernels.available`), the layers run fused: q/k/v and gate/up are each one product over
  weights stored concatenated (the model's own projections become views into them, so no weight is held twice), and
  the residual add + RMSNorm, RoPE + cache write and SiLU-gate are one kernel each: about ten launches a layer instead
  of forty. Same arithmetic and roundings as the unfused ops; products over concatenated weights may round differently.

What this module does not do: batch several sequences (one cache, one answer at a time: a lock serialises callers),
build prompts beyond splicing the memory at the `<image>` position, or change the eager path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from vstream import kernels
from vstream.model.generate import _check_sampling, _pick, default_stop_ids, stream_text
from vstream.model.prompts import IMAGE_TOKEN_INDEX, prompt_parts, stop_strings
from vstream.model.splice import splice


class FusedLayers:
    """A LLaMA decoder's prefill through the fused kernels (see the module docstring), for any KV cache: the caller
    says where each layer's new keys go and which keys each layer attends to. Each layer's q/k/v and gate/up weights
    are stored concatenated once per model (the projections become views), whoever asks first."""

    def __init__(self, llm, cos: torch.Tensor, sin: torch.Tensor):
        cfg = llm.config
        self.llm, self.layers = llm, list(llm.model.layers)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.cos, self.sin = cfg.rms_norm_eps, cos, sin  # [S_max, Dh] tables
        self.qkv, self.gate_up = concatenated_weights(llm)

    @staticmethod
    def possible(llm) -> bool:
        """Triton runs on the model's device, the MLP is SiLU-gated without biases, head_dim / 2 is a power of two."""
        cfg, layers = llm.config, list(llm.model.layers)
        half = (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) // 2
        biased = any(getattr(m, "bias", None) is not None for layer in layers
                     for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.mlp.gate_proj, layer.mlp.up_proj))
        return (kernels.available(llm.get_input_embeddings().weight.device) and cfg.hidden_act == "silu"
                and not biased and half > 0 and half & (half - 1) == 0)

    def forward(self, x: torch.Tensor, start: torch.Tensor, cache, keys, mask, causal: bool) -> torch.Tensor:
        """x [1, S, H] at positions start[0] + [0, S) -> logits of the last position [1, V]. `cache(i)`: layer i's
        (k, v) caches [Hkv, S_max, Dh] that the new keys are written into at those positions; `keys(i)`: the
        (keys, values) [1, Hkv, S_keys, Dh] layer i attends to, once written."""
        s = x.shape[1]
        x = x.reshape(s, -1).clone()  # the residual stream, updated in place from here on
        weights = [layer.input_layernorm.weight for layer in self.layers] + [self.llm.model.norm.weight]
        h = kernels.rms_norm(x, weights[0], self.eps)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            qkv = F.linear(h, self.qkv[i])  # [S, (Hq + 2 Hkv) Dh]
            q = kernels.rope_to_cache(qkv, self.cos, self.sin, start, *cache(i), self.heads, self.kv_heads,
                                      self.head_dim)  # [1, Hq, S, Dh]
            k, v = keys(i)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=a.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            h = kernels.rms_norm(x, layer.post_attention_layernorm.weight, self.eps,
                                 residual=a.o_proj(out.transpose(1, 2).reshape(s, -1)))
            mlp = layer.mlp.down_proj(kernels.silu_mul(F.linear(h, self.gate_up[i])))
            if i + 1 < len(self.layers):
                h = kernels.rms_norm(x, weights[i + 1], self.eps, residual=mlp)
            else:  # only the last position reaches the head
                h = kernels.rms_norm(x[-1:], weights[-1], self.eps, residual=mlp[-1:])
        return self.llm.lm_head(h)


@torch.no_grad()
def concatenated_weights(llm) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer of a LLaMA model, the q/k/v weights [(Hq + 2 Hkv) Dh, H] and the gate/up weights [2 I, H] stored
    concatenated (`concatenated_projections`)."""
    qkv, gate_up, _ = concatenated_projections(list(llm.model.layers))
    return qkv, gate_up


@torch.no_grad()
def concatenated_projections(layers: list) -> tuple[list[torch.Tensor], list[torch.Tensor], list | None]:
    """Per decoder layer, the q/k/v weights [(Hq + 2 Hkv) Dh, H], the gate/up weights [2 I, H] and, where the q/k/v
    projections have biases (Qwen2), their biases [(Hq + 2 Hkv) Dh] (else None), each stored concatenated and the
    projections' own parameters pointed at views of them (nothing held twice); done once per model, kept on its first
    layer."""
    done = layers[0].__dict__.get("_vstream_concatenated")
    if done is not None:
        return done
    biased = layers[0].self_attn.q_proj.bias is not None
    qkv, gate_up, qkv_bias = [], [], [] if biased else None
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        joins = [(qkv, (a.q_proj, a.k_proj, a.v_proj), "weight"), (gate_up, (m.gate_proj, m.up_proj), "weight")]
        if biased:
            joins.append((qkv_bias, (a.q_proj, a.k_proj, a.v_proj), "bias"))
        for out, parts, name in joins:
            joined = torch.cat([getattr(p, name) for p in parts])
            row = 0
            for p in parts:
                n = getattr(p, name).shape[0]
                getattr(p, name).data = joined[row : row + n]
                row += n
            out.append(joined)
    layers[0].__dict__["_vstream_concatenated"] = (qkv, gate_up, qkv_bias)
    return qkv, gate_up, qkv_bias


class FusedStep:
    """One decode position for each of b sequences (the batched step of `vstream.model.batch_decode`), or a chunk of
    one sequence's prompt (a Qwen prefill, at its M-RoPE positions), through the fused kernels, for a LLaMA decoder or
    a Qwen2-VL / Qwen2.5-VL text model (`TextDecoder` parts):
    one q/k/v product (with its biases, Qwen2) and one gate/up product over weights stored concatenated, the residual
    add + RMSNorm and the SiLU-gate as one kernel each; RoPE in torch, each row at its own position (a decoded Qwen
    token is text: its M-RoPE is a 1-D RoPE at one number)."""

    def __init__(self, parts):
        cfg = parts.config
        self.parts, self.layers = parts, parts.layers
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.qkv, self.gate_up, self.qkv_bias = concatenated_projections(self.layers)

    @staticmethod
    def possible(parts) -> bool:
        """Triton runs on the model's device, the MLP is SiLU-gated without biases, the output projection has none,
        and the q/k/v projections all have biases or none do."""
        cfg, layers = parts.config, parts.layers
        unbiased = [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                                     layer.mlp.down_proj)]
        biases = {p.bias is not None for layer in layers
                  for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)}
        return (kernels.available(parts.embed.weight.device) and cfg.hidden_act == "silu"
                and all(getattr(m, "bias", None) is None for m in unbiased) and len(biases) == 1)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write, read, mask: torch.Tensor | None,
                 causal: bool = False) -> torch.Tensor:
        """x [b, s, H] (a step: s = 1, one row per slot; a prefill: b = 1) at RoPE `cos`/`sin` broadcasting against
        [b, heads, s, Dh] (a step's [b, 1, 1, Dh], each slot at its own position; a Qwen prefill's [1, s, Dh] from its
        M-RoPE positions); `write(i, k, v)` stores layer i's new keys and values [b, Hkv, s, Dh], `read(i)` gives the
        (keys, values) [b, Hkv, n, Dh] the rows attend to under `mask` (or `causal`) -> logits of each row's last
        position [b, V]."""
        b, s = x.shape[:2]
        hq, hkv, dh = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        x = x.reshape(b * s, -1).clone()  # the residual stream, updated in place from here on
        weights = [layer.input_layernorm.weight for layer in self.layers] + [self.parts.norm.weight]
        h = kernels.rms_norm(x, weights[0], self.eps)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            bias = None if self.qkv_bias is None else self.qkv_bias[i]
            qkv = F.linear(h, self.qkv[i], bias)  # [b s, (Hq + 2 Hkv) Dh]
            q = rope(qkv[:, :hq].view(b, s, self.heads, dh).transpose(1, 2), cos, sin)
            k = rope(qkv[:, hq : hq + hkv].view(b, s, self.kv_heads, dh).transpose(1, 2), cos, sin)
            write(i, k, qkv[:, hq + hkv :].view(b, s, self.kv_heads, dh).transpose(1, 2))
            keys, values = read(i)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=a.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            h = kernels.rms_norm(x, layer.post_attention_layernorm.weight, self.eps,
                                 residual=a.o_proj(out.transpose(1, 2).reshape(b * s, -1)))
            mlp = layer.mlp.down_proj(kernels.silu_mul(F.linear(h, self.gate_up[i])))
            if i + 1 < len(self.layers) or s == 1:
                h = kernels.rms_norm(x, weights[i + 1], self.eps, residual=mlp)
            else:  # only each row's last position reaches the head
                h = kernels.rms_norm(x.view(b, s, -1)[:, -1].contiguous(), weights[-1], self.eps,
                                     residual=mlp.view(b, s, -1)[:, -1].contiguous())
        return self.parts.lm_head(h)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (rotate_half), `cos`/`sin` broadcasting against x [..., Dh]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class StaticLlama:
    """Static-cache decoding of a `LlamaForCausalLM` for one sequence of at most `max_seq_len` positions."""

    def __init__(self, llm, max_seq_len: int, cuda_graph: bool | None = None, fused: bool | None = None):
        cfg = llm.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ValueError("the static-cache decoder needs a LLaMA decoder, got model_type "
                             f"{getattr(cfg, 'model_type', None)!r}")
        if max_seq_len < 2 or max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}], got {max_seq_len}")
        self.llm = llm
        self.layers = list(llm.model.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.max_seq_len = max_seq_len
        weight = llm.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (len(self.layers), 1, self.kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)  # [L, 1, Hkv, S_max, Dh]
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            positions = torch.arange(max_seq_len, device=self.device)
            cos, sin = llm.model.rotary_emb(weight[:1], positions[None])  # [1, S_max, Dh] in the model dtype
        self.cos, self.sin = cos[0], sin[0]
        self.positions = positions  # [S_max]
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)  # [1] token fed to the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # [1] its position
        self.logits = torch.zeros(1, cfg.vocab_size, device=self.device, dtype=self.dtype)  # [1, V] of the last step
        self.prefix: tuple[int, ...] = ()  # token ids whose keys and values sit at positions [0, len(prefix))
        self.lock = threading.Lock()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmup_s = 0.0
        can_fuse = FusedLayers.possible(llm)
        if fused and not can_fuse:
            raise ValueError(f"fused layers need Triton on a CUDA device, a SiLU MLP without biases and a power-of-two "
                             f"head_dim / 2; got device {self.device}, hidden_act {cfg.hidden_act!r}")
        self.fused = can_fuse if fused is None else fused
        self.fused_layers = FusedLayers(llm, self.cos, self.sin) if self.fused else None
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if use_graph:
            self._capture()

    @property
    def nbytes(self) -> int:
        """Bytes of the static KV cache."""
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # ---------------------------------------------------------------- the transformer

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _attend(self, i: int, h: torch.Tensor, cos, sin, write, keys_upto: int, mask, causal: bool) -> torch.Tensor:
        # h: [1, S, H]; cos/sin: [S, Dh]; keys are read from cache positions [0, keys_upto)
        a = self.layers[i].self_attn
        s = h.shape[1]
        q = a.q_proj(h).view(1, s, self.heads, self.head_dim).transpose(1, 2)  # [1, Hq, S, Dh]
        k = a.k_proj(h).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [1, Hkv, S, Dh]
        v = a.v_proj(h).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        write(self.k_cache[i], k)
        write(self.v_cache[i], v)
        keys, values = self.k_cache[i][:, :, :keys_upto], self.v_cache[i][:, :, :keys_upto]
        if self.kv_heads != self.heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=a.scaling)
        return a.o_proj(out.transpose(1, 2).reshape(1, s, self.heads * self.head_dim))

    def _forward(self, x: torch.Tensor, cos, sin, write, keys_upto: int, mask, causal: bool) -> torch.Tensor:
        """x [1, S, H] -> logits of the last position [1, V]."""
        for i, layer in enumerate(self.layers):
            x = x + self._attend(i, self._rms(x, layer.input_layernorm.weight), cos, sin, write, keys_upto, mask,
                                 causal)
            x = x + layer.mlp(self._rms(x, layer.post_attention_layernorm.weight))
        return self.llm.lm_head(self._rms(x[:, -1:], self.llm.model.norm.weight))[:, -1]

    def _forward_fused(self, x: torch.Tensor, start: torch.Tensor, keys_upto: int, mask, causal: bool) -> torch.Tensor:
        """`_forward` through the fused kernels: x [1, S, H] at positions start[0] + [0, S) -> logits [1, V]."""
        return self.fused_layers.forward(x, start, lambda i: (self.k_cache[i, 0], self.v_cache[i, 0]),
                                         lambda i: (self.k_cache[i][:, :, :keys_upto],
                                                    self.v_cache[i][:, :, :keys_upto]),
                                         mask, causal)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Run embeds [1, S, H] at positions [start, start + S) (keys before `start` must be cached) ->
        logits [1, V]."""
        s = embeds.shape[1]
        end = start + s
        if end > self.max_seq_len:
            raise ValueError(f"the prompt needs {end} positions, the KV cache holds {self.max_seq_len}")

        def write(cache: torch.Tensor, value: torch.Tensor) -> None:
            cache[:, :, start:end] = value

        if start == 0:
            mask, causal = None, s > 1
        elif self.device.type == "cuda":  # query j sits at position start + j and sees keys up to it
            mask, causal = causal_lower_right(s, end), False  # flash attention runs this mask natively
        else:  # the CPU kernel would materialise the lower-right mask in every layer: build it once
            mask, causal = self.positions[:end][None, :] <= self.positions[start:end][:, None], False  # [S, end]
        if self.fused:
            return self._forward_fused(embeds, self.positions[start : start + 1], end, mask, causal)
        return self._forward(embeds, self.cos[start:end], self.sin[start:end], write, end, mask, causal)

    def _step(self) -> None:
        """One decode step on device state only: feed `token` at `pos`, write the greedy next token, advance `pos`."""
        x = self.llm.get_input_embeddings()(self.token.view(1, 1))  # [1, 1, H]
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)  # [1, 1, 1, S_max]
        if self.fused:
            logits = self._forward_fused(x, self.pos, self.max_seq_len, mask, False)
        else:
            cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)  # [1, Dh]

            def write(cache: torch.Tensor, value: torch.Tensor) -> None:
                cache.index_copy_(2, self.pos, value)

            logits = self._forward(x, cos, sin, write, self.max_seq_len, mask, False)
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(dim=-1))
        self.pos.add_(1)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step: a graph replay on CUDA once captured, else the eager step."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up on a side stream and capture the decode step; the warm-up writes only the last cache slot, which a
        sequence reaches only after writing it itself. Then run both kinds of prefill once (from position 0, and after a
        cached prefix), so that what loads or compiles at a first call does so now, not at the first answer. Nothing is
        cached yet, so the positions they write hold nothing."""
        t0 = time.perf_counter()
        n = max(2, min(self.max_seq_len // 2, 512))
        blank = torch.zeros(1, n, self.llm.config.hidden_size, device=self.device, dtype=self.dtype)
        self.prefill(blank, 0)
        self.prefill(blank[:, : n // 2], n // 2)
        self.pos.fill_(self.max_seq_len - 1)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.fill_(self.max_seq_len - 1)
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pos.fill_(self.max_seq_len - 1)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - t0

    # ---------------------------------------------------------------- tokens

    def iter_tokens(
        self,
        embeds: torch.Tensor,
        start: int = 0,
        *,
        max_new_tokens: int,
        stop_token_ids: Iterable[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Like `generate.iter_tokens`, for embeds [1, S, H] placed at positions [start, start + S)."""
        _check_sampling(max_new_tokens, temperature, top_p)
        if max_new_tokens == 0:
            return
        need = start + embeds.shape[1] + max_new_tokens - 1
        if need > self.max_seq_len:
            raise ValueError(
                f"prompt ({start + embeds.shape[1]} positions) + max_new_tokens ({max_new_tokens}) needs {need} "
                f"positions, the KV cache holds {self.max_seq_len}"
            )
        stop = {int(i) for i in stop_token_ids}
        with self.lock:
            logits = self.prefill(embeds, start)
            with torch.inference_mode():
                self.token.copy_(_pick(logits, temperature, top_p, generator))
                self.pos.fill_(start + embeds.shape[1])
            if temperature == 0.0:
                yield from self._greedy(max_new_tokens, stop)
            else:
                yield from self._sampled(max_new_tokens, stop, temperature, top_p, generator)

    def _greedy(self, max_new_tokens: int, stop: set[int]) -> Iterator[int]:
        cuda = self.device.type == "cuda"
        host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=cuda)  # token ids read back
        ready: list[torch.cuda.Event | None] = [None] * max_new_tokens

        def fetch(k: int) -> None:  # queue token k's copy to the host; `token` holds it now
            host[k : k + 1].copy_(self.token, non_blocking=cuda)
            if cuda:
                ready[k] = torch.cuda.Event()
                ready[k].record()

        with torch.inference_mode():
            fetch(0)
            for k in range(max_new_tokens):
                if k + 1 < max_new_tokens:  # launch the next step before reading this token back
                    self.step()
                    fetch(k + 1)
                if ready[k] is not None:
                    ready[k].synchronize()
                token_id = int(host[k])
                yield token_id
                if token_id in stop:
                    return

    def _sampled(self, max_new_tokens, stop, temperature, top_p, generator) -> Iterator[int]:
        for k in range(max_new_tokens):
            token_id = int(self.token)  # decides the stop, so read before the next step
            yield token_id
            if token_id in stop or k == max_new_tokens - 1:
                return
            self.step()
            with torch.inference_mode():
                self.token.copy_(_pick(self.logits, temperature, top_p, generator))


class StaticAnswerer:
    """Answers from memory snapshots with a `StaticLlama`: the prompt's text before `<image>` (the system prompt) is
    prefilled once and kept in the cache; each answer prefills only the memory tokens and the question."""

    def __init__(self, model, max_seq_len: int | None = None, cuda_graph: bool | None = None):
        self.model = model
        if max_seq_len is None:  # memory tokens + room for the question and the template + the answer
            max_seq_len = min(model.cfg.memory.max_tokens + 256 + model.cfg.max_new_tokens,
                              model.llm.config.max_position_embeddings)
        self.decoder = StaticLlama(model.llm, max_seq_len, cuda_graph=cuda_graph)
        self.answer_warmup_s = 0.0
        if self.decoder.graph is not None:
            self._warm_up()

    def _warm_up(self) -> None:
        """One short answer from a blank full memory, so that the shapes of a real prompt (the system prompt cached,
        then memory + question) have met the GPU libraries before the first real answer. The system prompt stays
        cached."""
        t0 = time.perf_counter()
        m = self.model
        blank = torch.zeros(m.cfg.memory.max_tokens, m.cfg.vision.hidden_size, device=m.device, dtype=m.dtype)
        for _ in self.answer(blank, "What is happening in the video right now?", max_new_tokens=2):
            pass
        self.answer_warmup_s = time.perf_counter() - t0

    @property
    def warmup_s(self) -> float:
        return self.decoder.warmup_s + self.answer_warmup_s

    def prompt_parts(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single `<image>` placeholder of the question's prompt."""
        return prompt_parts(self.model.cfg.template, question, self.model.tokenizer)

    @torch.inference_mode()
    def _ids_embeds(self, ids: list[int]) -> torch.Tensor:
        d = self.decoder
        host = torch.tensor(ids, dtype=torch.long, pin_memory=d.device.type == "cuda")
        return self.model.llm.get_input_embeddings()(host.to(d.device, non_blocking=True))  # [n, H]

    @torch.inference_mode()
    def embeds(self, memory_tokens: torch.Tensor, question: str, parts=None) -> tuple[torch.Tensor, int]:
        """Cache the prompt's prefix if it changed; return (embeds [1, S, H] of memory + question, their start).
        `parts`: the question's `prompt_parts`, when the caller has them already."""
        prefix, rest = parts or self.prompt_parts(question)
        d = self.decoder
        if tuple(prefix) != d.prefix:
            d.prefix = ()
            if prefix:
                with d.lock:
                    d.prefill(self._ids_embeds(prefix)[None], 0)
            d.prefix = tuple(prefix)
        m = self.model
        vision = m.mm_projector(memory_tokens.to(m.device, m.dtype))  # [N, H]
        return splice([IMAGE_TOKEN_INDEX, *rest], m.llm.get_input_embeddings(), vision)[None], len(prefix)

    def answer(self, memory_tokens: torch.Tensor, question: str, max_new_tokens: int,
               temperature: float = 0.0) -> Iterator[str] | None:
        """The answer's text pieces, as `FlashVStream.stream_answer` yields them on the eager path; None when the
        prompt and `max_new_tokens` do not fit the static cache (the caller then answers on the eager path)."""
        parts = self.prompt_parts(question)
        need = len(parts[0]) + memory_tokens.shape[0] + len(parts[1]) + max_new_tokens - 1
        if need > self.decoder.max_seq_len:
            return None
        return self._pieces(memory_tokens, question, parts, max_new_tokens, temperature)

    def _pieces(self, memory_tokens, question, parts, max_new_tokens, temperature) -> Iterator[str]:
        m = self.model
        embeds, start = self.embeds(memory_tokens, question, parts)
        stop_ids = default_stop_ids(m.llm, m.tokenizer)
        tokens = self.decoder.iter_tokens(embeds, start, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                                          temperature=temperature)
        yield from stream_text(tokens, m.tokenizer, stop_ids, stop_strings(m.cfg.template))
