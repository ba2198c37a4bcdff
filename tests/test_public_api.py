"""The public API of `vstream`: the names the README uses, `load`'s real signature, and a light `import vstream`."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import vstream

ROOT = Path(__file__).resolve().parent.parent


def readme_python_names() -> set[str]:
    """Every name that the README's Python examples import from `vstream` or read as `vstream.<name>`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    names: set[str] = set()
    for code in blocks:
        for imported in re.findall(r"^\s*from vstream import ([^\n#]+)", code, re.M):
            names |= {n.strip().split(" as ")[0] for n in imported.strip("() ").split(",") if n.strip()}
        names |= set(re.findall(r"\bvstream\.([A-Za-z_]\w*)", code))
    return names


def test_the_readme_names_are_importable_from_vstream():
    names = readme_python_names()
    assert "load" in names  # the examples were read
    missing = sorted(n for n in names if not hasattr(vstream, n))
    assert not missing, f"the README uses vstream.{missing}, which vstream does not have"


def test_every_public_name_resolves_to_its_module_s_object():
    from vstream.config import ModelConfig, preset
    from vstream.engine import StreamSession
    from vstream.memory import MemoryRead
    from vstream.model.vlm import Answer, FlashVStream

    expected = {"Answer": Answer, "FlashVStream": FlashVStream, "MemoryRead": MemoryRead, "ModelConfig": ModelConfig,
                "StreamSession": StreamSession, "preset": preset}
    assert {n: getattr(vstream, n) for n in expected} == expected
    assert set(vstream.__all__) == set(expected) | {"__version__", "load"}
    assert set(vstream.__all__) <= set(dir(vstream))


def test_load_has_the_loader_s_signature():
    from vstream.model.loading import load

    ours, theirs = inspect.signature(vstream.load), inspect.signature(load)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()]
    assert vstream.load.__doc__ and "preset" in vstream.load.__doc__


def test_load_forwards_every_argument():
    model = vstream.load("tiny", device="cpu", dtype="float32", memory_mode="official", seed=1, eager=True)
    assert model.cfg.memory.mode == "official" and model.device.type == "cpu" and model.static_answerer is None


def test_an_unknown_name_is_an_attribute_error():
    assert not hasattr(vstream, "NoSuchThing")


def test_import_vstream_imports_neither_torch_nor_a_submodule():
    code = ("import sys, vstream; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('vstream.')));"
            "vstream.ModelConfig; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         cwd=ROOT).stdout.split("\n")
    assert out[0] == "[]", out[0]
    assert out[1] == "False"  # the configs need no torch either
