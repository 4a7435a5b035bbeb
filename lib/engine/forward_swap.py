"""The one way the engine replaces a transformers module's forward: swap the module's class.

The engine runs some transformers modules (MoE experts, routers, Qwen3 attention) with forwards of its
own. Each module gets a subclass of its class whose forward is the engine's, one subclass per original
class shared by every module of that class (and every model in the process). Why a class and not a
bound method or a partial per module: a compiled decoder layer guards on the identity of what it calls,
so a per-module function made each layer compile its own graph until dynamo's recompile limit (8) sent
the remaining layers, and every later model, back to eager. Hooks on the module keep working (it is the
same object), and a module swapped before keeps its class.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


class ForwardSwap:
    """Subclasses named `prefix` + the original class name, whose forward is `make_forward(original class)`."""

    def __init__(self, prefix: str, make_forward: Callable[[type], Callable]):
        self.prefix = prefix
        self.make_forward = make_forward
        self._classes: dict[type, type] = {}

    def swapped(self, module: nn.Module) -> bool:
        return type(module) in self._classes.values()

    def apply(self, modules: Iterable[nn.Module]) -> None:
        for m in modules:
            cls = type(m)
            if cls in self._classes.values():
                continue
            if cls not in self._classes:
                self._classes[cls] = type(f"{self.prefix}{cls.__name__}", (cls,), {"forward": self.make_forward(cls)})
            m.__class__ = self._classes[cls]
