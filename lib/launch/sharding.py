"""FSDP2 over the trainer group, and the full state gathered back: the two places every draft family,
the trainer loop and online evaluation meet the sharded model."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def shard(module: nn.Module, group: dist.ProcessGroup, device: torch.device,
          units: Optional[Sequence[nn.Module]] = None) -> nn.Module:
    """FSDP2 over the trainer group: bf16 compute with fp32 master weights on GPU, fp32 on CPU.

    `units` (default: the module's fsdp_units(), a draft's decoder layers each called once per forward)
    become FSDP units of their own before the root: each one's parameter gather (and the bf16 cast) then runs on FSDP's side stream
    while the layer before it computes, and its gradient reduction while the layer after it runs
    backward. With the whole draft one unit, both were exposed at the ends of the step: 5-6 ms of a
    155 ms DFlash 8B-shape step on one GPU, and the whole communication time with several trainers.
    A module called several times per forward (EAGLE-3's training-time-test layer) stays in the root.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # From the trainer group, never init_device_mesh: that would span the engines too.
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    if units is None:
        units = module.fsdp_units() if hasattr(module, "fsdp_units") else ()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return module


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU state dict on every trainer (a collective: all trainers must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
