"""Qwen2-VL / Qwen2.5-VL answers batched across streams, on the CPU with the tiny random presets: why a text token's
M-RoPE is a plain 1-D RoPE (so a decoded token's position is one number per slot), and that every batched answer gets
the tokens the model's own eager path gives it alone."""

from __future__ import annotations

import pytest
import torch

import vstream

PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")


@pytest.fixture(scope="module", params=PRESETS)
def qwen(request):
    return vstream.load(request.param, device="cpu")


def plain_rope(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE as LLaMA computes it: angle p * f for each frequency f, the halves repeated -> cos, sin [S, Dh]."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def test_a_text_tokens_m_rope_is_plain_rope_at_its_position(qwen):
    """Text tokens have equal temporal, height and width positions; M-RoPE takes each section of the head's
    frequencies from one of the three, so with all three equal it is 1-D RoPE at that position, to the bit. AM-RoPE
    text positions may be fractional (they follow the memory's largest time), so fractional ones are checked too."""
    rotary = qwen.hf.model.language_model.rotary_emb
    assert sum(rotary.mrope_section) == rotary.inv_freq.numel()  # every frequency belongs to one section
    p = torch.tensor([0.0, 1.0, 7.0, 17.5, 130.25, 1000.0 / 3, 4095.0])
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, p.expand(3, 1, -1))  # [1, S, Dh]
    want_cos, want_sin = plain_rope(p, rotary.inv_freq)
    assert torch.equal(cos[0], want_cos) and torch.equal(sin[0], want_sin)
    # a visual token's axes differ: then it is not 1-D RoPE at any one of them
    mixed = torch.stack([p, p + 3, p + 5])[:, None]  # [3, 1, S]
    cos, _ = rotary(x, mixed)
    for axis in range(3):
        assert not torch.allclose(cos[0], plain_rope(mixed[axis, 0], rotary.inv_freq)[0])
