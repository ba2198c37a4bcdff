"""Flash-VStream-Qwen: Qwen2-VL / Qwen2.5-VL backbones with Flash Memory (config, model, stream memory, loading)."""
