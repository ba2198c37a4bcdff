"""Shipped configs and the config dataclasses: every `configs/**/*.yaml` reads and validates with the training config's
own loader (unknown keys and bad values are errors there) and names a known model; every DeepSpeed JSON parses; every
field of the config dataclasses (vstream/config.py, vstream/train/config.py, the engine's `EngineConfig`), of the
server's state and limits (vstream/server/state.py) and of the HTTP API's wire schemas (vstream/server/schemas.py)
says what it is.

Building a stage from these configs needs the previous stage's model (`init: runs/demo/...`) and the SmolLM2 weights,
so it is left to the training tests, which build each stage from a tiny model.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from vstream.config import PRESETS
from vstream.train.config import STAGES, load_config

ROOT = Path(__file__).resolve().parent.parent
YAML_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
JSON_CONFIGS = sorted((ROOT / "configs").rglob("*.json"))
CONFIG_MODULES = [ROOT / "vstream/config.py", ROOT / "vstream/train/config.py", ROOT / "vstream/server/schemas.py",
                  ROOT / "vstream/server/state.py"]
CONFIG_CLASSES = {ROOT / "vstream/engine/scheduler.py": {"EngineConfig"}}
"""Modules whose other dataclasses are not configuration: only these classes of them are checked."""


def test_the_shipped_configs_are_found():
    assert len(YAML_CONFIGS) >= 4 and len(JSON_CONFIGS) >= 2


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_training_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.stage in STAGES
    assert cfg.model in PRESETS or (ROOT / cfg.model).is_dir(), f"{path}: model {cfg.model!r} is no preset"
    if cfg.deepspeed:
        assert (ROOT / cfg.deepspeed).is_file(), f"{path}: deepspeed {cfg.deepspeed!r} does not exist"


@pytest.mark.parametrize("path", JSON_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_json_config_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def undocumented_fields(path: Path, only: set[str] | None = None) -> list[str]:
    """`Class.field` for each field of a dataclass or pydantic model in `path` (of the classes `only`, when given)
    with neither a docstring under it, a comment on its line or the line above, nor a `Field(description=...)`."""
    source = path.read_text()
    lines = source.splitlines()
    missing = []
    for cls in ast.walk(ast.parse(source)):
        if not _is_config(cls) or (only is not None and cls.name not in only):
            continue
        body = cls.body
        for i, node in enumerate(body):
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            after = body[i + 1] if i + 1 < len(body) else None
            docstring = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(
                after.value.value, str)
            comment = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            described = isinstance(node.value, ast.Call) and any(k.arg == "description" for k in node.value.keywords)
            if not (docstring or comment or described):
                missing.append(f"{cls.name}.{node.target.id}")
    return missing


def _is_config(node: ast.AST) -> bool:
    """A dataclass, or a class that derives from pydantic's BaseModel by name."""
    return isinstance(node, ast.ClassDef) and (
        any("dataclass" in ast.unparse(d) for d in node.decorator_list)
        or any(ast.unparse(b) == "BaseModel" for b in node.bases))


def test_the_field_check_reads_docstrings_and_comments(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("@dataclass\nclass C:\n    a: int = 0\n    \"\"\"doc\"\"\"\n    b: int = 0  # why\n"
                    "    # what c is\n    c: int = 0\n    d: int = 0\n")
    assert undocumented_fields(path) == ["C.d"]
    path.write_text("class M(BaseModel):\n    a: int = Field(default=0, description='doc')\n    b: int = Field(0)\n"
                    "class N:\n    c: int = 0\n")
    assert undocumented_fields(path) == ["M.b"], "a pydantic field's description documents it; a plain class is none"


@pytest.mark.parametrize("path", CONFIG_MODULES + list(CONFIG_CLASSES), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_field_is_documented(path):
    missing = undocumented_fields(path, CONFIG_CLASSES.get(path))
    assert not missing, f"{path.relative_to(ROOT)}: fields without a docstring or comment: {missing}"
