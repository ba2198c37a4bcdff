"""The fused Triton kernels run on the CPU through Triton's interpreter: `tests/kernel_checks.py` in a subprocess with
TRITON_INTERPRET=1 (the variable must be set before the kernels are defined, so not in this process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra; without it there is nothing to interpret")


def test_fused_kernels_match_the_torch_ops_under_the_interpreter():
    checks = Path(__file__).with_name("kernel_checks.py")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_kernels_run_only_on_cuda_or_the_interpreter_and_can_be_turned_off(monkeypatch):
    from vstream import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VSTREAM_KERNELS", raising=False)
    assert not kernels.available("cpu")
    assert kernels.available("cuda")  # Triton is installed: CUDA devices would use the kernels
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available("cpu")
    monkeypatch.setenv("VSTREAM_KERNELS", "0")
    assert not kernels.available("cpu") and not kernels.available("cuda")
