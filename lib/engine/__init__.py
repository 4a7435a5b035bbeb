"""Engine backends: run the frozen target over packed batches and capture the hidden states a draft needs.

`make_backend(engine.backend)` returns an unloaded backend; the engine role then calls
`backend.load(target, engine, device, tp_group, plan)` (plan: the draft strategy's CapturePlan) and,
per step, `backend.capture(batch, out=slot_views)`.
The process's GPU memory is capped before that, at start-up, by lib/launch/runtime.py cap_process_memory.
"""
from __future__ import annotations

from lib.engine.base import (
    EngineBackend,
    EngineInputError,
    SampleProblem,
    drop_samples,
)

# Imported on demand: sglang's module pulls in optional dependencies only when chosen.
_BACKENDS = {
    "hf": ("lib.engine.hf", "HFBackend"),
    "sglang": ("lib.engine.sglang_backend", "SGLangBackend"),
}


def make_backend(name: str) -> EngineBackend:
    """A fresh, unloaded backend for engine.backend=`name`."""
    if name not in _BACKENDS:
        raise ValueError(f"engine.backend={name!r} is not known; use one of {', '.join(sorted(_BACKENDS))}")
    import importlib

    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()


__all__ = [
    "EngineBackend",
    "EngineInputError",
    "SampleProblem",
    "drop_samples",
    "make_backend",
]
