"""A family's elementwise functions behind one switch: eager, or fused by torch.compile (`train.compile`).

Each draft family lists its memory-bound chains (norms, rotary, SiLU-multiply, loss chunks) in an
`OpTable` and calls them as `ops.name(...)`; `ops.use_compiled(True)` swaps in versions compiled with
dynamic shapes (batch sizes change every step), each compiled lazily once per process.
"""
from __future__ import annotations

from typing import Callable

from lib.launch.compiling import compile_fn


class OpTable:
    def __init__(self, **eager: Callable):
        self._eager = dict(eager)
        self._compiled: dict[str, Callable] = {}
        self.__dict__.update(eager)

    def use_compiled(self, enabled: bool) -> None:
        """Route every op through its torch.compile'd version, or back to the eager function."""
        for name, fn in self._eager.items():
            if enabled and name not in self._compiled:
                self._compiled[name] = compile_fn(fn, dynamic=True)
            setattr(self, name, self._compiled[name] if enabled else fn)

    def compiled(self) -> bool:
        return any(getattr(self, name) is not fn for name, fn in self._eager.items())
