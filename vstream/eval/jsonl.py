"""The resumable JSON-lines files of a run (`predictions.jsonl`, `judgments.jsonl`): read by id, made ready to append.

One corruption policy for both: the last line may be cut by an interruption (a run killed mid-write); it is dropped
and its record computed again. Any other line that is not JSON is damage this code did not make: reading raises
`DataError` with the file and the line number, and nothing is recomputed over it.

This module knows nothing about what the records hold beyond their `id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vstream.errors import DataError


def read_jsonl_by_id(path: Path) -> dict[str, dict]:
    """id -> record of each line of `path` ({} when the file does not exist); a later line with the same id wins (a
    retried record replaces the failed one); blank lines are skipped; corruption as in the module docstring."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} of {len(lines)} is not JSON: expected one record per line") from None
        out[rec["id"]] = rec
    return out


def trim_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by an interruption, so that appended lines start on a line of their own."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
