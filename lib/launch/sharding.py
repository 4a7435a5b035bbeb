"""FSDP2 over the trainer group, and the full state gathered back: the two places every draft family,
the trainer loop and online evaluation meet the sharded model."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """FSDP2 over the trainer group: bf16 compute with fp32 master weights on GPU, fp32 on CPU."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # From the trainer group, never init_device_mesh: that would span the engines too.
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return module


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 CPU state dict on every trainer (a collective: all trainers must call it)."""
    # Imported here: torch.distributed.checkpoint costs ~1 s of import, and engines import this module
    # (through online evaluation) without ever gathering a state.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
