"""Build the trainer's side of the model: draft (FSDP2 over the trainer group), vocab map, target head.

FSDP2 unshards parameters in forward pre-hooks, so the whole training-time-test unroll runs inside
one module's forward (`TTTModule`): the draft's submodules are then called with gathered weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lib.drafts.eagle3.export import load_draft
from lib.drafts.eagle3.loss import ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.fused import use_compiled
from lib.drafts.eagle3.target_head import TargetDistribution, TargetHead, load_target_embedding
from lib.drafts.eagle3.vocab import ensure_vocab_map, save_vocab_map
from lib.launch.runtime import RunContext
from lib.engine.target_shape import load_hf_config, target_shape

log = logging.getLogger("specdraft.trainer")


class TTTModule(nn.Module):
    """forward(batch, target) = the TTT unroll's (loss, metrics); the FSDP2 unit."""

    def __init__(self, draft: Eagle3Draft, ttt_length: int):
        super().__init__()
        self.draft = draft
        self.ttt_length = ttt_length
        self._head: Optional[TargetHead] = None  # not a submodule: frozen, replicated, never sharded

    def forward(self, batch: Mapping[str, torch.Tensor], target: TargetDistribution, denominators: torch.Tensor,
                grad_scale: float = 1.0):
        """grad_scale = trainer count: each rank's loss is its share of the global mean, and FSDP
        averages gradients across ranks, so scaling by the count turns that average into the sum
        (exact in fp32 for power-of-two counts; gloo has no pre-multiplied sum to do it instead)."""
        loss, metrics = ttt_forward(self.draft, self._head, batch, self.ttt_length, denominators=denominators,
                                    target=target)
        return loss * grad_scale, metrics


@dataclass
class DraftBundle:
    model: nn.Module  # TTTModule, FSDP2-wrapped when distributed
    draft_config: Eagle3DraftConfig
    target_head: TargetHead

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm over all shards (DTensor reduces it); the same value on every trainer."""
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


def _token_counts(ctx: RunContext, vocab_size: int) -> torch.Tensor:
    from lib.data.datasets import load_dataset, token_counts

    return token_counts(load_dataset(ctx.cfg.data, ctx.tokenizer_path, "train"), vocab_size)


def vocab_map(ctx: RunContext, vocab_size: int, draft_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per run by the trainer leader (or taken from draft.init_from), loaded by all."""
    group = ctx.groups.trainer_gloo
    if ctx.is_trainer_leader:
        if ctx.cfg.draft.init_from is not None:
            init = load_draft(ctx.cfg.draft.init_from)
            save_vocab_map(ctx.run_dir, init.d2t, init.t2d)
        ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, lambda: _token_counts(ctx, vocab_size))
    dist.barrier(group=group)
    return ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, _no_rebuild)


def _no_rebuild() -> torch.Tensor:
    raise RuntimeError("the trainer leader did not write vocab_map.safetensors; see its log")


def build_draft(ctx: RunContext) -> DraftBundle:
    cfg, device = ctx.cfg, ctx.device
    hf = load_hf_config(cfg.target)
    shape = target_shape(cfg.target, device, hf)
    draft_vocab = min(cfg.draft.draft_vocab_size, shape.vocab_size)
    overrides = {k: v for k, v in (("intermediate_size", cfg.draft.intermediate_size),
                                   ("num_attention_heads", cfg.draft.num_attention_heads),
                                   ("num_key_value_heads", cfg.draft.num_key_value_heads)) if v is not None}
    draft_cfg = Eagle3DraftConfig.from_target(hf, draft_vocab, list(shape.aux_layers), overrides)
    d2t, t2d = vocab_map(ctx, shape.vocab_size, draft_vocab)
    use_compiled(cfg.train.compile)  # resolved by lib.config.resolve: on for CUDA unless set
    torch.manual_seed(cfg.train.seed)
    draft = Eagle3Draft(draft_cfg)
    if cfg.draft.init_from is not None:
        draft.load_state_dict(load_draft(cfg.draft.init_from).state_dict(), strict=False)
    draft.set_vocab_map(d2t, t2d)
    source = cfg.target.path
    if source is not None:
        draft.load_embedding(load_target_embedding(source))
        head_weight = None
    else:
        # Random-init target (benchmarks): the engine's weights are random too, so any fixed
        # embedding and head are equally faithful; seed them for reproducibility.
        gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        draft.load_embedding(torch.randn(draft_cfg.vocab_size, draft_cfg.hidden_size, generator=gen) * 0.02)
        head_weight = torch.randn(shape.vocab_size, shape.hidden_size, generator=gen) * 0.02
    draft.to(device)
    module = TTTModule(draft, cfg.train.ttt_length)
    model = shard(module, ctx.groups.trainer, device)
    head_dtype = shape.dtype
    if head_weight is None:
        head = TargetHead.from_pretrained(source, draft.d2t.detach().to(device), device, head_dtype)
    else:
        head = TargetHead(head_weight.to(device=device, dtype=head_dtype), draft.d2t.detach().to(device))
    module._head = head
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if ctx.is_trainer_leader:
        log.info("draft: hidden %d, draft vocab %d, aux layers %s, %.1fM trainable parameters",
                 draft_cfg.hidden_size, draft_vocab, list(shape.aux_layers), params / 1e6)
    return DraftBundle(model, draft_cfg, head)


def shard(module: TTTModule, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
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

