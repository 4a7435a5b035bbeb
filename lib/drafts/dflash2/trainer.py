"""DFlash2's trainer side: options, the loss module (the FSDP2 unit) and the bundle built for one run.

The draft's shape comes from the target as DFlash's does (lib/drafts/dflash/trainer.py
draft_config_for), plus the convolution and selector sizes; the defaults are speculators 0.9.0's
DFlash2 recipe (5 layers, block 8, gamma 4, KL, K = 16, rank 256, 2 taps, groups of 16, alpha 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from lib.drafts.base import dataclass_from_keys
from lib.drafts.dflash.mask import Blocks
from lib.drafts.dflash.trainer import (BlockBundle, BlockLossModule, draft_config_for, init_block_draft,
                                       shard_trainer_module)
from lib.drafts.dflash2.fused import use_compiled
from lib.drafts.dflash2.loss import block_loss
from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft

log = logging.getLogger("specdraft.trainer")


@dataclass(frozen=True)
class DFlash2Options:
    """draft.options for draft=dflash2 (conf/draft/dflash2.yaml)."""

    block_size: int = 8
    num_layers: int = 5
    mask_token_id: Optional[int] = None
    loss_gamma: float = 4.0
    max_anchors: Optional[int] = None
    conv_kernel_size: int = 2
    conv_group_size: int = 16
    selector_rank: int = 256
    selector_top_k: int = 16
    selector_loss_alpha: float = 1.0

    def __post_init__(self) -> None:
        for name, low, example in (("block_size", 2, 8), ("num_layers", 1, 5), ("conv_kernel_size", 1, 2),
                                   ("conv_group_size", 1, 16), ("selector_rank", 1, 256), ("selector_top_k", 2, 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"draft.options.{name}={value!r} must be an int >= {low}, e.g. {example}")
        if not float(self.loss_gamma) > 0:
            raise ValueError(f"draft.options.loss_gamma={self.loss_gamma!r} must be > 0 (the recipe: 4)")
        if not float(self.selector_loss_alpha) >= 0:
            raise ValueError(f"draft.options.selector_loss_alpha={self.selector_loss_alpha!r} must be >= 0 (recipe: 1)")
        if self.max_anchors is not None and int(self.max_anchors) < 1:
            raise ValueError(f"draft.options.max_anchors={self.max_anchors!r} must be >= 1 or null")
        if self.conv_kernel_size > self.block_size:
            raise ValueError(f"draft.options.conv_kernel_size={self.conv_kernel_size} exceeds block_size="
                             f"{self.block_size}; use at most the block size (2 in the recipe)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DFlash2Options":
        return dataclass_from_keys(cls, data, "draft.options for draft=dflash2")

    def decay(self, device=None) -> torch.Tensor:
        """[B-1] loss weight of each drafted index: exp(-j / gamma)."""
        return torch.exp(-torch.arange(self.block_size - 1, device=device, dtype=torch.float32)
                         / float(self.loss_gamma))


class DFlash2Module(BlockLossModule):
    def forward(self, batch, blocks: Blocks, normaliser: torch.Tensor, grad_scale: float = 1.0):
        loss, sums = block_loss(self.draft, batch, blocks, self.options.decay(normaliser.device),
                                float(self.options.selector_loss_alpha), normaliser, self.use_flex)
        return loss * grad_scale, sums


@dataclass
class DFlash2Bundle(BlockBundle):
    draft_config: DFlash2Config
    options: DFlash2Options


def dflash2_config_for(hf: Any, cfg, options: DFlash2Options, layers: list[int]) -> DFlash2Config:
    """DFlash's shape for this target (draft_config_for reads block_size, num_layers, mask_token_id),
    with the convolution and selector sizes."""
    base = draft_config_for(hf, cfg, options, layers)
    return DFlash2Config(**base.to_dict(), conv_kernel_size=options.conv_kernel_size,
                         conv_group_size=options.conv_group_size, selector_rank=options.selector_rank,
                         selector_top_k=options.selector_top_k)


def build_bundle(ctx, options: DFlash2Options, layers: list[int]) -> DFlash2Bundle:
    from lib.drafts.dflash2.export import load_draft
    from lib.target.shape import load_hf_config

    cfg, device = ctx.cfg, ctx.device
    draft_cfg = dflash2_config_for(load_hf_config(cfg.target), cfg, options, layers)
    use_compiled(cfg.train.compile)  # resolved by lib.config.resolve: on for CUDA unless set
    draft = init_block_draft(ctx, DFlash2Draft, draft_cfg, load_draft)
    module = DFlash2Module(draft, options, use_flex=device.type == "cuda")
    model, params = shard_trainer_module(ctx, module)
    if ctx.is_trainer_leader:
        log.info("dflash2 draft: %d layers, block %d, target layers %s, mask id %d, top-%d selector of rank %d, "
                 "%d-tap convolutions, %.1fM trainable parameters", draft_cfg.num_hidden_layers,
                 draft_cfg.block_size, layers, draft_cfg.mask_token_id, draft_cfg.selector_top_k,
                 draft_cfg.selector_rank, draft_cfg.conv_kernel_size, params)
    return DFlash2Bundle(model, draft_config=draft_cfg, options=options, seed=int(cfg.train.seed))
