"""A streaming memory's state: the tensors it holds as attributes (allocated once, written in place) and its host
counters; their bytes, and their copy out (`state_dict`) and back in (`load_state_dict`). `HeldState` is that logic's
one home, shared by the STAR memories (star.py, official.py) and the Flash-VStream-Qwen memory (flash.py); what is
state and what the counters are stays each memory's own."""

from __future__ import annotations

import torch


def held_tensors(obj) -> dict[str, torch.Tensor]:
    """The tensors among `obj`'s attributes, by name: a memory's state."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_tensors(mine: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Copy `given` into `mine` in place; the names and shapes must be the same (an error naming `what` otherwise)."""
    if set(given) != set(mine):
        raise ValueError(f"{what} has tensors {sorted(given)}, expected {sorted(mine)}")
    for name, value in given.items():
        if value.shape != mine[name].shape:
            raise ValueError(f"{what} {name!r} has shape {tuple(value.shape)}, expected {tuple(mine[name].shape)}")
    for name, value in given.items():
        mine[name].copy_(value)


class HeldState:
    """A memory whose state is the tensors among its attributes plus host counters. A subclass says which counters
    (`_counters`, `_restore_counters`) and may settle queued work before its state is read or written (`_settle`)."""

    state_name = "memory state"  # what a `load_state_dict` error calls the state

    def _state(self) -> dict[str, torch.Tensor]:
        return held_tensors(self)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (fixed at construction)."""
        return tensor_bytes(self._state())

    def _settle(self) -> None:
        """Run what is queued against the state before it is read or replaced (nothing by default)."""

    def _counters(self) -> dict:
        raise NotImplementedError

    def _restore_counters(self, counters: dict) -> None:
        for name, value in counters.items():
            setattr(self, name, value)

    def state_dict(self) -> dict:
        """Tensors and counters that restore this memory exactly with `load_state_dict`."""
        self._settle()
        return {"tensors": {k: v.clone() for k, v in self._state().items()}, "counters": self._counters()}

    def load_state_dict(self, state: dict) -> None:
        self._settle()
        copy_tensors(self._state(), state["tensors"], self.state_name)
        self._restore_counters(state["counters"])


__all__ = ["HeldState", "copy_tensors", "held_tensors", "tensor_bytes"]
