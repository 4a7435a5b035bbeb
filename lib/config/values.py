"""One config value at a time: the error every check raises, and the per-key rules `resolve()` uses.

ConfigError and its one-line form (`_fail`: key=value: fix), a choice read from a member, its value or its
name (`_as_enum`), draft.name checked against the families on disk, and the auto/None choices of single
keys (device, target dtype, attention, MoE experts, run directory). lib/config/__init__.py re-exports all of it
(import from there); this module imports only lib.config.choices, so it stays free of torch.
"""
from __future__ import annotations

import enum
import os
import time
from typing import Any, NoReturn

from lib.config.choices import AttnImpl, Device, MoeImpl, TargetDtype, draft_families


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the fix."""


def _as_enum(key: str, value: Any, kind: type[enum.Enum]) -> Any:
    """A member from a member, its value or its name (aliases included); ConfigError otherwise."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        if value in kind.__members__:
            return kind[value]
        try:
            return kind(value)
        except ValueError:
            pass
    _fail(key, value, f"allowed: {', '.join(kind.__members__)}")


def check_draft_name(name: Any) -> str:
    """draft.name, if it names a family under lib/drafts/ (or a root in $SPECDRAFT_DRAFT_ROOTS)."""
    name = getattr(name, "value", name)  # a str enum member from code written against the old enum
    try:
        families = sorted(draft_families())
    except ValueError as err:  # one family under two roots
        raise ConfigError(f"draft.name={name!r}: {err}") from None
    if not isinstance(name, str) or name not in families:
        raise ConfigError(f"draft.name={name!r}: not one of {', '.join(families)} (the packages under lib/drafts/). "
                          f"Fix: pick one of those, e.g. draft=eagle3, or add the family as lib/drafts/{name}/ "
                          f"(registering a DraftStrategy) and conf/draft/{name}.yaml (docs/design.md)")
    return name


def resolve_device(device: Device | str, gpus_per_node: int) -> Device:
    device = _as_enum("device", device, Device)
    if device == Device.auto:
        return Device.cuda if gpus_per_node > 0 else Device.cpu
    return device


def resolve_target_dtype(dtype: TargetDtype | str, device_type: str) -> TargetDtype:
    """auto: bf16 on GPU (the production path), fp32 on CPU (no fast bf16 matmuls there)."""
    dtype = _as_enum("target.dtype", dtype, TargetDtype)
    if dtype == TargetDtype.auto:
        return TargetDtype.bfloat16 if device_type == "cuda" else TargetDtype.float32
    return dtype


def resolve_attn_impl(attn: AttnImpl | str, device_type: str, dtype: TargetDtype | str) -> AttnImpl:
    """auto: the packed varlen flash kernel where it runs (CUDA, half precision), sdpa elsewhere."""
    attn = _as_enum("engine.attn_impl", attn, AttnImpl)
    flash_ok = device_type == "cuda" and resolve_target_dtype(dtype, device_type) in (
        TargetDtype.bfloat16, TargetDtype.float16)
    if attn == AttnImpl.auto:
        return AttnImpl.varlen if flash_ok else AttnImpl.sdpa
    if attn == AttnImpl.varlen and not flash_ok:
        _fail("engine.attn_impl", AttnImpl.varlen, f"needs a CUDA device and bf16/fp16 weights (got {device_type}, "
              f"target.dtype={resolve_target_dtype(dtype, device_type).value}); use engine.attn_impl=auto")
    return attn


def new_run_dir() -> str:
    """outputs/<YYYYmmdd-HHMMSS> under the working directory, with -2, -3 ... if that exists."""
    base = os.path.abspath(os.path.join("outputs", time.strftime("%Y%m%d-%H%M%S")))
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _resolve_moe_impl(value) -> MoeImpl:
    """auto is the engine's grouped experts path (dense targets ignore the key)."""
    impl = _as_enum("engine.moe_impl", value, MoeImpl)
    return MoeImpl.grouped if impl == MoeImpl.auto else impl


def _fail(key: str, value: Any, fix: str) -> NoReturn:
    # As the user types them: enum values bare (attn_impl=varlen), booleans lower case (resume=true).
    if isinstance(value, enum.Enum):
        shown = value.value
    else:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
    raise ConfigError(f"{key}={shown}: {fix}")
