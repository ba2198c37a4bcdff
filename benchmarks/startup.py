"""Start-up time of `vstream.load`, stage by stage, as JSON on stdout.

Every load runs in a fresh Python process, as a real start does: the report gives per run the seconds to import
vstream (torch and transformers included), to create the CUDA context, each stage `vstream.load` logs (config,
modules, weights, fast path; see `Stages` in vstream/model/loading.py) and its total, the process's whole life, and
its peak host and GPU memory. A released-format directory of a preset's shapes (random float16 weights in 5 GB
safetensors shards, the CLIP tower inside, as `IVGSZ/Flash-VStream-7b` is laid out) is written once with `--write`.

Usage, from the repository root:
  PYTHONPATH=. python benchmarks/startup.py --model flash-vstream-7b --device cuda
  PYTHONPATH=. python benchmarks/startup.py --write /tmp/fv7b --model flash-vstream-7b   # once: ~14 GB on disk
  PYTHONPATH=. python benchmarks/startup.py --model flash-vstream-7b /tmp/fv7b --device cuda --repeats 3
  PYTHONPATH=. python benchmarks/startup.py --model tiny smollm2-demo demo --device cpu --repeats 3
  PYTHONPATH=/path/to/old/checkout python benchmarks/startup.py ...   # the same runs against another version
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # the child's clock starts before torch is imported
SHARD_BYTES = 5_000_000_000


def child(model: str, device: str, dtype: str | None) -> dict:
    """One load in this process: seconds per stage and memory peaks."""
    import logging

    import torch

    import vstream

    stages: dict[str, float] = {}

    class Collect(logging.Handler):
        def emit(self, record):
            if hasattr(record, "stage"):
                stages[record.stage] = round(record.seconds, 3)

    logger = logging.getLogger("vstream.load")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    import vstream.model.loading  # noqa: F401  (what `vstream.load` imports on its first call)

    out = {"model": model, "device": device, "dtype": dtype, "import_s": round(time.perf_counter() - T0, 3)}
    if device.startswith("cuda"):
        t = time.perf_counter()
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
        out["cuda_init_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    m = vstream.load(model, device=device, dtype=dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    out["load_s"] = round(time.perf_counter() - t, 3)
    out["stages"] = stages  # empty for versions of vstream that log no stages
    out["parameters"] = sum(p.numel() for p in m.parameters())
    out["param_dtype"] = str(next(m.llm.parameters()).dtype).removeprefix("torch.")
    out["host_peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    out["to_ready_s"] = round(time.perf_counter() - T0, 3)
    return out


def write_released(preset_name: str, path: Path) -> Path:
    """A released-format directory with `preset_name`'s shapes: config.json, tokenizer, random float16 weights under
    the released names (full-depth CLIP tower inside), written shard by shard so that memory stays one shard."""
    import torch
    from safetensors.torch import save_file

    from transformers import LlamaConfig, LlamaForCausalLM

    from vstream.config import preset
    from vstream.encoder.tower import VisionTower
    from vstream.model.loading import KNOWN_TOWERS, OFFICIAL_VISION_PREFIX, to_released_name
    from vstream.model.tokenizers import build_tiny_tokenizer
    from vstream.model.vlm import FlashVStream
    from vstream.testing.checkpoint import released_config

    cfg = preset(preset_name)
    tower = next((name for name, known in KNOWN_TOWERS.items() if known == cfg.vision), None)
    if tower is None:
        raise ValueError(f"preset {preset_name!r} has no released CLIP tower ({sorted(KNOWN_TOWERS)}): its config.json "
                         "could not name one")
    with torch.device("meta"):  # shapes only
        model = FlashVStream(cfg, LlamaForCausalLM(LlamaConfig(**cfg.llm.to_hf())), None, VisionTower(cfg.vision))
    shapes = {to_released_name(k): v.shape for k, v in model.state_dict().items() if not k.startswith("vision.")}
    vision = {k.removeprefix("vision.clip."): v.shape for k, v in model.state_dict().items() if k.startswith("vision.")}
    last = cfg.vision.num_layers_used - 1  # the blocks the truncated tower skips have the shapes of its last one
    for block in range(cfg.vision.num_layers_used, cfg.vision.num_hidden_layers):
        copied = {k.replace(f"layers.{last}.", f"layers.{block}."): s
                  for k, s in vision.items() if f"layers.{last}." in k}
        vision |= copied
    vision |= {"post_layernorm.weight": (cfg.vision.hidden_size,), "post_layernorm.bias": (cfg.vision.hidden_size,)}
    shapes |= {OFFICIAL_VISION_PREFIX + k: s for k, s in vision.items()}
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir=path)
    (path / "config.json").write_text(json.dumps(released_config(cfg, tower, cfg.llm.vocab_size) | {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "torch_dtype": "float16"}))
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.empty(shapes[n], dtype=torch.float16).normal_(0, 0.02, generator=generator) for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        print(f"wrote {file}: {len(names)} tensors", file=sys.stderr)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def run(model: str, device: str, dtype: str | None) -> dict:
    """One load in a fresh process; adds the process's whole life (`process_s`)."""
    t = time.perf_counter()
    args = [sys.executable, __file__, "--child", "--model", model, "--device", device]
    args += ["--dtype", dtype] if dtype else []
    done = subprocess.run(args, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"loading {model} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"process_s": round(time.perf_counter() - t, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["flash-vstream-7b"], help="presets or model directories")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: vstream.load's)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per model; the median is reported")
    parser.add_argument("--write", type=Path, help="write a released-format directory of the --model preset and stop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model[0], args.device, args.dtype)))
        return
    if args.write:
        print(json.dumps({"written": str(write_released(args.model[0], args.write))}))
        return
    report = []
    for model in args.model:
        runs = [run(model, args.device, args.dtype) for _ in range(args.repeats)]
        middle = sorted(runs, key=lambda r: r["load_s"])[len(runs) // 2]
        report.append(middle | {"repeats": len(runs), "load_s_all": [r["load_s"] for r in runs],
                                "load_s_median": statistics.median(r["load_s"] for r in runs)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "runs": report}, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
