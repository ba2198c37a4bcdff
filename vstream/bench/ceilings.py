"""The device's measured ceilings (`ceilings`): its fp16 matrix-product rate and its copy bandwidth, the figures the
others are read against in `vstream bench all`.
"""

from __future__ import annotations

import torch

from vstream.bench.harness import summary, time_ms


def ceilings(device: torch.device) -> dict:
    """Measured matrix-product rate (fp16, 8192^3) and device copy bandwidth (bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    ms = summary(time_ms(lambda: a @ b, device, 10, warmup=3))
    x = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    cp = summary(time_ms(lambda: y.copy_(x), device, 10, warmup=3))
    return {"fp16_matmul_tflops": round(2 * 8192**3 / ms["median_ms"] / 1e9, 1),
            "copy_TBps": round(2 * x.numel() / cp["median_ms"] / 1e9, 3)}

