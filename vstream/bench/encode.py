"""Vision tower frames/s at several frames per call (`encode_benchmark`, what `vstream bench encode` runs): the fast
path, the truncated transformers tower and the full tower read at hidden state -2 (anchor), with the fast path's
error against the reference.
"""

from __future__ import annotations

import torch

from vstream.bench.harness import environment, summary, time_ms


def tower_gflop(cfg) -> float:
    """Forward GFLOP per frame of the truncated tower (matrix products and attention; 2 per multiply-add)."""
    t, d, i = cfg.grid**2 + 1, cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * t * (4 * d * d + 2 * d * i) + 4 * t * t * d
    patch = 2 * cfg.grid**2 * 3 * cfg.patch_size**2 * d
    return (per_layer * cfg.num_layers_used + patch) / 1e9


def encode_benchmark(model, frame_counts=(1, 8, 64, 256), repeats: int = 20, anchor: bool = True) -> dict:
    """Frames/s of the vision tower at each of `frame_counts` frames a call (a row's "batch"): the fast path as
    enabled on `model.vision`, the truncated tower through transformers' modules, and (anchor) the full-depth
    transformers tower read at hidden state -2."""
    from transformers import CLIPVisionModel

    from vstream.encoder.tower import clip_config

    tower, device = model.vision, model.device
    dtype = tower.clip.embeddings.patch_embedding.weight.dtype
    cfg = tower.cfg
    variants = {"fast": lambda x: tower.encode(x, max(frame_counts))}
    saved = (tower.fused, tower.graphs)

    def truncated(x):
        tower.fused, tower.graphs = False, {}
        try:
            return tower.encode(x, max(frame_counts))
        finally:
            tower.fused, tower.graphs = saved

    variants["truncated_eager"] = truncated
    full = None
    if anchor:
        with torch.device(device):
            full = CLIPVisionModel(clip_config(cfg)).to(dtype).eval()
        full.load_state_dict(tower.clip.state_dict(), strict=False)  # the blocks it shares with the tower
        variants["hf_full_hidden_states"] = lambda x: full(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # noqa: F821 (called before the del below)
    torch.manual_seed(0)
    rows = []
    for b in frame_counts:
        inputs = [torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype) for _ in range(2)]
        row = {"batch": b}
        for name, fn in variants.items():
            state = {"i": 0}

            def call(fn=fn):
                state["i"] += 1
                with torch.inference_mode():
                    fn(inputs[state["i"] % 2])

            s = summary(time_ms(call, device, repeats if b <= 64 else max(5, repeats // 4)))
            row[name] = s | {"fps": round(b / s["median_ms"] * 1000, 1)}
        rows.append(row)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        ref = truncated(x) if not anchor else full(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        saved_graphs = tower.graphs
        got = tower.encode(x)
        rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    del full
    return {"environment": environment(model) | {"tower_gflop_per_frame": round(tower_gflop(cfg), 2),
                                                 "graph_batch_sizes": sorted(saved_graphs),
                                                 "tower_warmup_s": round(tower.warmup_s, 3)},
            "relative_error_fast_vs_reference": rel, "batches": rows}

