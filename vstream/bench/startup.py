"""Start-up time of `vstream.load`, stage by stage (`startup_benchmark`, what `vstream bench startup` runs).

Every load runs in a fresh Python process, as a real start does: the report gives per run the seconds to import
vstream (torch and transformers included), to create the CUDA context, each stage `vstream.load` logs (config,
modules, weights, fast path; see `Stages` in vstream/model/loading.py) and its total, the process's whole life, and
its peak host and GPU memory. `write_released` writes a released-format directory of a preset's shapes (random float16
weights in 5 GB safetensors shards, the CLIP tower inside, as `IVGSZ/Flash-VStream-7b` is laid out) to load from.

The fresh process runs the source of `child` alone (`child_program`), importing vstream from the checkout it is given:
this one by default, another one for a before/after comparison (a version that logs no stages reports none).
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vstream.errors import ConfigError, UserInputError

SHARD_BYTES = 5_000_000_000


def startup_benchmark(models, device: str, dtype: str | None = None, repeats: int = 1,
                      checkout: Path | None = None) -> dict:
    """For each of `models` (presets or directories), `repeats` loads, each in a fresh process importing vstream from
    `checkout` (None: this one): the run of median load time, with every run's load time and their median."""
    checkout = this_checkout() if checkout is None else checkout
    report = []
    for model in models:
        runs = [run_fresh(model, device, dtype, checkout) for _ in range(repeats)]
        middle = sorted(runs, key=lambda r: r["load_s"])[len(runs) // 2]
        report.append(middle | {"repeats": len(runs), "load_s_all": [r["load_s"] for r in runs],
                                "load_s_median": statistics.median(r["load_s"] for r in runs)})
    return {"date": time.strftime("%Y-%m-%d"), "host_cpus": os.cpu_count(), "runs": report}


def this_checkout() -> Path:
    """The folder that holds the vstream package this process imported (a checkout, or site-packages)."""
    import vstream

    return Path(vstream.__file__).resolve().parent.parent


def child_program() -> str:
    """What each fresh process runs (argv: model, device, dtype or ''): its clock starts before torch is imported,
    then `child`, from its source, so that a checkout without this module can be measured."""
    return ("import time\nt0 = time.perf_counter()\nimport json, sys\n\n" + inspect.getsource(child)
            + "\n\nprint(json.dumps(child(sys.argv[1], sys.argv[2], sys.argv[3] or None, t0)))\n")


def run_fresh(model: str, device: str, dtype: str | None, checkout: Path) -> dict:
    """One load in a fresh process importing vstream from `checkout` first (`-P`: not from the working folder); adds
    the process's whole life (`process_s`). A load refused for its input (an unknown preset, a folder that holds no
    model) raises UserInputError with the child's one line."""
    env = os.environ | {"PYTHONWARNINGS": "ignore",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", child_program(), model, device, dtype or ""],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"loading {model} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in out:
        raise UserInputError(f"loading {model!r} in a fresh process was refused: {out['error']}")
    return out | {"process_s": round(time.perf_counter() - t, 3)}


def child(model: str, device: str, dtype: str | None, t0: float) -> dict:
    """One load in this process, which started its clock at `t0`: seconds per stage and memory peaks, or {"error":
    its line} when vstream refuses the input. Self-contained (imports inside): the fresh process runs its source."""
    import logging
    import resource
    import time

    import torch

    import vstream

    try:
        from vstream.errors import VStreamError
    except ImportError:  # a version before vstream.errors: every failure keeps its traceback
        VStreamError = ()  # an empty tuple of classes catches nothing

    stages: dict[str, float] = {}

    class Collect(logging.Handler):
        def emit(self, record):
            if hasattr(record, "stage"):
                stages[record.stage] = round(record.seconds, 3)

    logger = logging.getLogger("vstream.load")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    import vstream.model.loading  # noqa: F401  (what `vstream.load` imports on its first call)

    out = {"model": model, "device": device, "dtype": dtype, "import_s": round(time.perf_counter() - t0, 3)}
    if device.startswith("cuda"):
        t = time.perf_counter()
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
        out["cuda_init_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    try:
        m = vstream.load(model, device=device, dtype=dtype)
    except VStreamError as exc:
        return {"error": str(exc)}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    out["load_s"] = round(time.perf_counter() - t, 3)
    out["stages"] = stages  # empty for versions of vstream that log no stages
    out["parameters"] = sum(p.numel() for p in m.parameters())
    out["param_dtype"] = str(next(m.llm.parameters()).dtype).removeprefix("torch.")
    out["host_peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    out["to_ready_s"] = round(time.perf_counter() - t0, 3)
    return out


def released_shapes(cfg) -> dict:
    """Released name -> shape of every weight of a released-format checkpoint of `cfg`, the full-depth CLIP tower
    included (the blocks the truncated tower skips have the shapes of its last one, plus its post-layernorm)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vstream.encoder.tower import VisionTower
    from vstream.model.loading import OFFICIAL_VISION_PREFIX, to_released_name
    from vstream.model.vlm import FlashVStream

    with torch.device("meta"):  # shapes only
        model = FlashVStream(cfg, LlamaForCausalLM(LlamaConfig(**cfg.llm.to_hf())), None, VisionTower(cfg.vision))
    state = model.state_dict()
    shapes = {to_released_name(k): v.shape for k, v in state.items() if not k.startswith("vision.")}
    vision = {k.removeprefix("vision.clip."): v.shape for k, v in state.items() if k.startswith("vision.")}
    last = cfg.vision.num_layers_used - 1
    for block in range(cfg.vision.num_layers_used, cfg.vision.num_hidden_layers):
        vision |= {k.replace(f"layers.{last}.", f"layers.{block}."): s
                   for k, s in vision.items() if f"layers.{last}." in k}
    vision |= {"post_layernorm.weight": (cfg.vision.hidden_size,), "post_layernorm.bias": (cfg.vision.hidden_size,)}
    return shapes | {OFFICIAL_VISION_PREFIX + k: s for k, s in vision.items()}


def write_released(preset_name: str, path: Path, progress: Callable[[str], None] = lambda line: None) -> Path:
    """A released-format directory with `preset_name`'s shapes: config.json, tokenizer, random float16 weights under
    the released names, written shard by shard so that memory stays one shard (`progress` is told of each)."""
    import torch
    from safetensors.torch import save_file

    from vstream.config import preset
    from vstream.model.loading import KNOWN_TOWERS
    from vstream.model.tokenizers import build_tiny_tokenizer
    from vstream.testing.checkpoint import released_config

    cfg = preset(preset_name)
    tower = next((name for name, known in KNOWN_TOWERS.items() if known == cfg.vision), None)
    if tower is None:
        raise ConfigError(f"preset {preset_name!r} has no released CLIP tower ({sorted(KNOWN_TOWERS)}): its "
                          "config.json could not name one")
    shapes = released_shapes(cfg)
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
        progress(f"wrote {file}: {len(names)} tensors")
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return path
