"""Trainer-side pieces every draft family shares: FSDP2 over the trainer group, and the draft vocab map.

Each family's `DraftStrategy.build` (e.g. lib/drafts/eagle3/trainer.py) assembles its bundle from these.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from lib.drafts.eagle3.vocab import ensure_vocab_map, save_vocab_map
from lib.launch.runtime import RunContext


def _token_counts(ctx: RunContext, vocab_size: int) -> torch.Tensor:
    from lib.data.datasets import load_dataset, token_counts

    return token_counts(load_dataset(ctx.cfg.data, ctx.tokenizer_path, "train"), vocab_size)


def vocab_map(ctx: RunContext, vocab_size: int, draft_vocab: int,
              init_map: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per run by the trainer leader, loaded by all. init_map: the (d2t, t2d) of the draft
    being fine-tuned (draft.init_from), whose rows must keep their meaning."""
    group = ctx.groups.trainer_gloo
    if ctx.is_trainer_leader:
        if init_map is not None:
            save_vocab_map(ctx.run_dir, *init_map())
        ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, lambda: _token_counts(ctx, vocab_size))
    dist.barrier(group=group)
    return ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, _no_rebuild)


def _no_rebuild() -> torch.Tensor:
    raise RuntimeError("the trainer leader did not write vocab_map.safetensors; see its log")


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

