"""Durable stream snapshots on disk: one stream's processor state (`StreamProcessor.state_dict`) and what the caller
tells about it (its source and settings), written atomically and read back only when intact.

Layout, one directory per stream under the state directory:

    DIR/<stream_id>/manifest.json               # the commit point: format version, identity, checksum, counters, meta
    DIR/<stream_id>/memory-<seq>.safetensors    # every memory tensor, named as in the memory's state_dict

A save writes `memory-<seq+1>.safetensors` (a temporary file, fsync, rename), then the manifest the same way, then
removes the older tensor file and every leftover temporary file: a kill at any moment leaves the previous manifest and
the tensor file it names intact, or the new ones. So a stream holds one current snapshot (two tensor files for the
moment between the renames). The manifest records the sha256 of its tensor file and the identity of what made it (the
model's name, feature width, dtype and memory configuration); `read` refuses a missing or half-written file, bad JSON,
a checksum mismatch (`CorruptSnapshot`) and a snapshot of another identity (`IncompatibleSnapshot`, naming both).

What this module does not do: decide when to save, reopen sources or talk to the engine thread (the server does:
`vstream.server.durable`), or keep the history of past snapshots (it restarts empty).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vstream.errors import ConfigError, DataError, VStreamError

FORMAT = "vstream.stream-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
_TENSORS = re.compile(r"memory-(\d{8})\.safetensors")
_STREAM_ID = re.compile(r"str_[0-9a-f]{16}")


class SnapshotError(VStreamError):
    """A stream snapshot that cannot be used."""


class CorruptSnapshot(SnapshotError, DataError):
    """A missing, truncated or altered file, or a manifest that is not this format's."""


class IncompatibleSnapshot(SnapshotError, ConfigError):
    """A snapshot made by another model or memory configuration."""


def identity(model) -> dict:
    """What a snapshot must have been made by to be loaded into `model`'s memories."""
    cfg = model.cfg
    return {"model": cfg.name, "dim": cfg.vision.hidden_size, "dtype": str(model.dtype).removeprefix("torch."),
            "memory": dataclasses.asdict(cfg.memory)}


@dataclass
class Snapshot:
    """One stream's snapshot as read from disk: its processor state, its identity and the caller's `meta`."""

    stream_id: str
    state: dict
    identity: dict
    meta: dict
    saved_at: float


def stream_dir(root: Path, stream_id: str) -> Path:
    """The directory of `stream_id` (checked to be a server stream id, so it names no other path)."""
    if not _STREAM_ID.fullmatch(stream_id):
        raise ValueError(f"expected a stream id like str_<16 hex digits>, got {stream_id!r}")
    return Path(root) / stream_id


def write(root: Path, stream_id: str, state: dict, ident: dict, meta: dict) -> Path:
    """Save `state` (from `StreamProcessor.state_dict`) atomically as the current snapshot of `stream_id`; returns
    the manifest's path."""
    folder = stream_dir(root, stream_id)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _tensor_files(folder)
    seq = max((int(_TENSORS.fullmatch(p.name).group(1)) for p in previous), default=0) + 1
    tensors = folder / f"memory-{seq:08d}.safetensors"
    memory = state["memory"]
    blob = {k: v.detach().to("cpu").contiguous() for k, v in memory["tensors"].items()}
    _atomic(tensors, lambda tmp: save_file(blob, str(tmp)))
    manifest = {"format": FORMAT, "version": VERSION, "stream_id": stream_id, "saved_at": time.time(),
                "identity": ident, "tensors": tensors.name, "sha256": _sha256(tensors),
                "bytes": tensors.stat().st_size, "counters": memory["counters"],
                "processor": {k: state[k] for k in ("frames", "stream_time", "version")}, "meta": meta}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    _atomic(folder / MANIFEST, lambda tmp: tmp.write_text(text))
    for path in [*previous, *folder.glob("*.tmp")]:
        path.unlink(missing_ok=True)
    return folder / MANIFEST


def remove(root: Path, stream_id: str) -> None:
    """Delete every file of `stream_id` (nothing when it has none)."""
    folder = stream_dir(root, stream_id)
    if folder.exists():
        shutil.rmtree(folder)


def stream_ids(root: Path) -> list[str]:
    """The streams that have a directory under `root`, in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _STREAM_ID.fullmatch(p.name))


def read_manifest(root: Path, stream_id: str) -> dict:
    """The manifest of `stream_id`, checked to be this format's (CorruptSnapshot otherwise); tensors not read."""
    path = stream_dir(root, stream_id) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptSnapshot(f"{path}: no manifest (a save that never finished, or a deleted file)") from None
    except (OSError, ValueError) as exc:
        raise CorruptSnapshot(f"{path}: expected a JSON manifest, got an unreadable file: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptSnapshot(f"{path}: expected format {FORMAT!r}, got {got!r}")
    if manifest.get("version") != VERSION:
        raise CorruptSnapshot(f"{path}: expected format version {VERSION}, got {manifest.get('version')!r}")
    missing = {"stream_id", "identity", "tensors", "sha256", "counters", "processor", "meta"} - set(manifest)
    if missing or manifest["stream_id"] != stream_id or not _TENSORS.fullmatch(str(manifest["tensors"])):
        raise CorruptSnapshot(f"{path}: a manifest of stream {stream_id} with a tensor file name, expected; got "
                              f"stream {manifest.get('stream_id')!r}, tensors {manifest.get('tensors')!r}, "
                              f"missing fields {sorted(missing)}")
    return manifest


def check_identity(manifest: dict, ident: dict) -> None:
    """IncompatibleSnapshot naming both identities (what differs) unless the snapshot was made by `ident`."""
    saved = manifest["identity"]
    if saved != ident:
        raise IncompatibleSnapshot(
            f"stream {manifest['stream_id']} was saved by model {saved.get('model')!r} with "
            f"{_describe(saved, ident)}; this server runs model {ident.get('model')!r} with {_describe(ident, saved)}: "
            "start the server with the model and memory configuration that saved it, or remove the stream's directory")


def read(root: Path, stream_id: str, ident: dict) -> Snapshot:
    """The current snapshot of `stream_id`, its checksum verified; CorruptSnapshot or IncompatibleSnapshot."""
    manifest = read_manifest(root, stream_id)
    check_identity(manifest, ident)
    tensors = stream_dir(root, stream_id) / manifest["tensors"]
    if not tensors.is_file():
        raise CorruptSnapshot(f"{tensors}: missing, expected the tensor file the manifest names")
    digest = _sha256(tensors)
    if digest != manifest["sha256"]:
        raise CorruptSnapshot(f"{tensors}: checksum mismatch: expected sha256 {manifest['sha256']}, got {digest} "
                              f"({tensors.stat().st_size} bytes, expected {manifest.get('bytes')})")
    try:
        blob = load_file(str(tensors))
    except Exception as exc:  # the checksum matched a file safetensors cannot read: report it, never load  # noqa: BLE001
        raise CorruptSnapshot(f"{tensors}: not a readable safetensors file: {exc}") from None
    processor = manifest["processor"]
    state = {"memory": {"tensors": blob, "counters": manifest["counters"]}, **processor}
    return Snapshot(stream_id, state, manifest["identity"], manifest["meta"], manifest["saved_at"])


def _describe(ident: dict, other: dict) -> str:
    """The settings of `ident` that differ from `other`'s (memory fields one by one)."""
    mem, other_mem = ident.get("memory") or {}, other.get("memory") or {}
    parts = [f"{k}={ident.get(k)!r}" for k in sorted(set(ident) | set(other))
             if k not in ("model", "memory") and ident.get(k) != other.get(k)]
    parts += [f"memory.{k}={mem.get(k)!r}" for k in sorted(set(mem) | set(other_mem)) if mem.get(k) != other_mem.get(k)]
    return ", ".join(parts) or "the same settings"


def _tensor_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _TENSORS.fullmatch(p.name))


def _atomic(path: Path, write_to) -> None:
    """Write `path` through `write_to(tmp)` on a temporary file beside it, fsync it, rename it over `path`, fsync the
    directory: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of two tensor dicts (NaNs equal where both are NaN: the memory's unwritten times)."""
    return a.keys() == b.keys() and all(
        x.dtype == b[k].dtype and x.shape == b[k].shape and torch.equal(x.cpu().view(-1).view(torch.uint8),
                                                                         b[k].cpu().view(-1).view(torch.uint8))
        for k, x in a.items())
