"""torch.compile as the draft ops (`train.compile`) and the engine's layers (`engine.compile`) call it.

The backend is Inductor, what runs use. `SPECDRAFT_COMPILE_BACKEND` names another of torch's backends
for the process and its children: the CPU test suite sets `aot_eager` (tests/conftest.py), so its
compiled-equals-eager tests still run Dynamo's trace, guards, recompiles and AOT autograd as a run
does, without Inductor's C++ code generation, which CPU runs never use (`train.compile` and
`engine.compile` are off on CPU) and which cost a fresh 2-core CI machine several minutes. The GPU
suite compiles with Inductor. flex attention (GPU only) and eval's compiled decode step compile with
Inductor always: a decode loop calls its two small graphs thousands of times, and through aot_eager each
call cost more than Inductor's code generation saved (tests/test_fast_decode.py ran 40% longer).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKEND_ENV = "SPECDRAFT_COMPILE_BACKEND"


def compile_fn(fn: Callable, **kwargs) -> Callable:
    return torch.compile(fn, backend=os.environ.get(BACKEND_ENV, "inductor"), **kwargs)
