"""Which optional extra of pyproject.toml each command needs, and the check a command makes before it loads anything.

This module only looks modules up (`importlib.util.find_spec`); it imports none of them.
"""

from __future__ import annotations

import importlib.util

from vstream.errors import MissingExtraError

EXTRAS = {
    "server": ("fastapi", "starlette", "uvicorn", "pydantic", "httpcore", "httpx", "websockets"),
    "train": ("peft", "yaml", "matplotlib"),
    "eval": ("httpx", "matplotlib"),
    "ray": ("ray",),
}
"""The modules each optional extra of pyproject.toml brings, as the commands that need them import them."""


def needs_extra(extra: str, command: str) -> None:
    """Raise MissingExtraError naming the extra to install when a module of `extra` is missing."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"`vstream {command}` needs the [{extra}] extra (missing: {', '.join(missing)}): "
                                f"pip install 'vstream[{extra}]' (from a checkout: pip install -e '.[{extra}]')")
