"""Size limits of vstream/: a file of at most 400 lines, a function of at most 60 (house rule 10: small pieces).

A function's length runs from its `def` line to its last line (decorators not counted, its docstring counted); methods
and nested functions count on their own, and a nested function's lines also count in its parent's. Every file and
function over its limit is reported, and the test fails on any that is not exempted.

An exemption is a comment at the top of the file, before its docstring, one line each, with a reason that says why the
piece is right as it is (or what splitting it waits for):

    # size: <reason>                  the file may hold more than 400 lines
    # size <name>: <reason>           the function `name` (`Class.method` for a method) may run past 60 lines

Files that a branch in flight is splitting or moving may be exempted here, in BEING_SPLIT, not in the files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vstream"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MARKER = re.compile(r"#\s*size(?:\s+(?P<name>[\w.]+))?:\s*(?P<reason>\S.{9,})$")
"""`# size: reason` or `# size name: reason`; a reason of at least ten characters."""

BEING_SPLIT: set[str] = set()
"""Paths (relative to the repository) whose sizes are exempt, file and functions, while another branch restructures
them; every entry must still exist and be over a limit."""


def _header(text: str) -> list[str]:
    """The comment lines before the first statement (the module docstring) of a file."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line)
    return out


def exemptions(text: str) -> dict[str | None, str]:
    """{None: reason} for the file, {name: reason} for each function, from the markers at the top of a file."""
    found = {}
    for line in _header(text):
        match = MARKER.match(line.strip())
        if match:
            found[match["name"]] = match["reason"]
    return found


def functions(tree: ast.AST) -> dict[str, int]:
    """Qualified name (`Class.method`, `outer.inner`) -> lines, for every function of a module."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def offenders() -> list[tuple[str, str | None, int]]:
    """(path, None for the file or a function's name, lines) of everything in vstream/ over its limit."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            out.append((rel, None, lines))
        out += [(rel, name, n) for name, n in functions(ast.parse(text)).items() if n > MAX_FUNCTION_LINES]
    return out


def _describe(rel: str, name: str | None, lines: int) -> str:
    limit = MAX_FILE_LINES if name is None else MAX_FUNCTION_LINES
    return f"{rel}{'' if name is None else ':' + name}: {lines} lines (limit {limit})"


def test_markers_and_functions_are_read():
    text = "# size: the one loop of the engine, in one place\n# size Engine.run: one state machine\n'''doc'''\n"
    assert exemptions(text) == {None: "the one loop of the engine, in one place", "Engine.run": "one state machine"}
    assert exemptions("'''doc'''\n# size: after the docstring is not the top\n") == {}
    assert exemptions("# size: short\n") == {}  # a reason says something
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n")
    assert functions(tree) == {"A.f": 3, "A.f.g": 2}


def test_every_file_and_function_over_its_limit_is_exempted_with_a_reason():
    found = offenders()
    report = "\n".join(_describe(*o) for o in found)
    print(f"over the limits:\n{report}")  # shown with -rA or on failure: the list of offenders
    bad = []
    for rel, name, lines in found:
        if rel in BEING_SPLIT:
            continue
        if name not in exemptions((ROOT / rel).read_text()):
            bad.append(_describe(rel, name, lines))
    assert not bad, "over the size limits without a `# size` exemption (see tests/test_sizes.py):\n" + "\n".join(bad)


def test_exemptions_are_still_needed():
    """An exemption whose file or function shrank under the limit, or no longer exists, goes."""
    over = {(rel, name) for rel, name, _ in offenders()}
    stale = [f"{rel}: BEING_SPLIT" for rel in sorted(BEING_SPLIT) if not any(r == rel for r, _ in over)]
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        stale += [f"{rel}: # size{'' if n is None else ' ' + n}" for n in exemptions(path.read_text())
                  if (rel, n) not in over]
    assert not stale, f"exemptions of pieces now within the limits: {stale}"
