"""A static KV cache with a batch dimension: one slot per answer being decoded, a shared system-prompt prefix.

`SlotCache` holds the keys and values of up to `max_batch` sequences of at most `max_seq_len` positions each,
preallocated once. Every slot holds the same prefix (the system prompt) at positions [0, P): it is computed once and
copied into all slots, so a new answer writes only positions from P on, and no answer ever writes below P (a Qwen
model shares none: P = 0, each slot holds its own whole prompt, memory included). Each slot's
length (the position its next key goes to) lives on the device, so the batched decode step reads and advances it
without the host; the host keeps its own count of each slot's length, which it knows without reading the device.

Slots are handed out from a host-side free list (`acquire` / `release`): no device read, no device write.

What this module does not do: run the model (`vstream.model.batch_decode` computes the keys it holds), choose which
request gets a slot, or grow: a sequence longer than `max_seq_len` is refused by the caller before it starts.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Keys and values [L, B, Hkv, S_max, Dh] of `max_batch` slots, the shared prefix at [0, P) of each."""

    def __init__(self, layers: int, max_batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        shape = (layers, max_batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, Hkv, S_max, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, Hkv, S_max, Dh]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)  # [B] next write position per slot
        self.host_lengths = [0] * max_batch  # the same counts, as the host knows them
        self.prefix: tuple[int, ...] = ()  # token ids whose keys sit at [0, P) of every slot
        self.free = list(range(max_batch - 1, -1, -1))  # a stack: the lowest free slot is handed out first
        self.in_use: set[int] = set()

    @property
    def prefix_len(self) -> int:
        """P: the positions the shared prefix takes in every slot."""
        return len(self.prefix)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (fixed at construction)."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self.free)

    def acquire(self) -> int:
        """A free slot (host-side bookkeeping only); its positions [0, P) already hold the prefix."""
        if not self.free:
            raise RuntimeError(f"no free slot: {len(self.in_use)} of {self.max_batch} in use")
        slot = self.free.pop()
        self.in_use.add(slot)
        self.host_lengths[slot] = self.prefix_len  # the device length is set when the slot's prefill ends
        return slot

    def release(self, slot: int) -> None:
        """Give `slot` back at once. Its keys from P on stay as they are; the next owner overwrites them before it
        reads them, since a slot attends only to positions below its own length."""
        if slot not in self.in_use:
            raise ValueError(f"slot {slot} is not in use (in use: {sorted(self.in_use)})")
        self.in_use.remove(slot)
        self.free.append(slot)
        self.free.sort(reverse=True)

    @torch.inference_mode()
    def set_prefix(self, prefix: tuple[int, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the prefix's keys and values k, v [L, Hkv, P, Dh] at positions [0, P) of every slot. Only while no slot
        is in use: a running answer's keys rest on the prefix it started with."""
        if self.in_use:
            raise RuntimeError(f"the prefix can change only while no slot is in use, {len(self.in_use)} are")
        p = len(prefix)
        want = (self.k.shape[0], self.k.shape[2], p, self.k.shape[4])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"prefix keys and values must be {list(want)}, got {list(k.shape)} and {list(v.shape)}")
        if p >= self.max_seq_len:
            raise ValueError(f"the prefix takes {p} positions, the cache holds {self.max_seq_len} per slot")
        self.k[:, :, :, :p] = k[:, None]
        self.v[:, :, :, :p] = v[:, None]
        self.lengths.fill_(p)
        self.host_lengths = [p] * self.max_batch
        self.prefix = tuple(prefix)
