"""DSpark's trainer side: options, the loss module (the FSDP2 unit) and the bundle built for one run.

The backbone's config, the frozen target embedding and lm_head, and the train.compile switch for the
backbone's elementwise ops are DFlash's (lib/drafts/dflash/trainer.py); the loss is DSpark's
(lib/drafts/dspark/loss.py).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from lib.drafts.base import dataclass_from_keys
from lib.drafts.dflash import fused as dflash_fused
from lib.drafts.dflash.trainer import (DEFAULT_DRAFT_LAYERS, BlockBundle, BlockLossModule, DFlashOptions,
                                       draft_config_for, init_block_draft, shard_trainer_module)
from lib.drafts.dspark import loss as dspark_loss
from lib.drafts.dspark.blocks import DSparkBlocks
from lib.drafts.dspark.model import MARKOV_HEAD_TYPES, DSparkConfig, DSparkDraft

log = logging.getLogger("specdraft.trainer")


@dataclass(frozen=True)
class DSparkOptions:
    """draft.options for draft=dspark (conf/draft/dspark.yaml); defaults are speculators 0.9.0's for dspark."""

    block_size: int = 8
    num_layers: int = DEFAULT_DRAFT_LAYERS
    mask_token_id: Optional[int] = None
    loss_gamma: float = 4.0
    max_anchors: Optional[int] = None
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    confidence_head_with_markov: bool = True
    confidence_alpha: float = 1.0
    confidence_threshold: float = 0.0
    verify_budget: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"draft.options.block_size={self.block_size!r} must be an int >= 2, e.g. 8")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"draft.options.num_layers={self.num_layers!r} must be an int >= 1, e.g. 5")
        if not (isinstance(self.loss_gamma, (int, float)) and self.loss_gamma > 0):
            raise ValueError(f"draft.options.loss_gamma={self.loss_gamma!r} must be > 0 (slot k weighs exp(-k/gamma))")
        if self.max_anchors is not None and int(self.max_anchors) < 1:
            raise ValueError(f"draft.options.max_anchors={self.max_anchors!r} must be >= 1 or null")
        if not isinstance(self.markov_rank, int) or self.markov_rank < 0:
            raise ValueError(f"draft.options.markov_rank={self.markov_rank!r} must be an int >= 0 (0: no Markov head)")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"draft.options.markov_head_type={self.markov_head_type!r}: use one of "
                             f"{list(MARKOV_HEAD_TYPES)}")
        if not (isinstance(self.confidence_alpha, (int, float)) and self.confidence_alpha >= 0):
            raise ValueError(f"draft.options.confidence_alpha={self.confidence_alpha!r} must be >= 0")
        self.heads()  # the head and schedule combinations DSparkConfig accepts

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DSparkOptions":
        return dataclass_from_keys(cls, data, "draft.options for draft=dspark")

    def heads(self) -> dict[str, Any]:
        """The DSparkConfig fields these options set (validated by building a config's worth of them)."""
        fields = dict(markov_rank=self.markov_rank, markov_head_type=self.markov_head_type,
                      enable_confidence_head=bool(self.confidence_head),
                      confidence_head_with_markov=bool(self.confidence_head_with_markov) and bool(self.confidence_head),
                      confidence_threshold=float(self.confidence_threshold),
                      verify_budget=None if self.verify_budget is None else float(self.verify_budget))
        try:
            DSparkConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                         num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=8,
                         vocab_size=8, target_hidden_size=8, num_target_layers=1, target_layer_ids=[0],
                         block_size=2, mask_token_id=0, **fields)
        except ValueError as err:
            raise ValueError(f"draft.options: {err}") from None
        return fields

    def decay(self, device=None) -> torch.Tensor:
        """[B] loss weight of block slot k: exp(-k / gamma)."""
        return torch.exp(-torch.arange(self.block_size, device=device, dtype=torch.float32) / float(self.loss_gamma))

    def anchors_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size) if self.max_anchors is None else int(self.max_anchors)


class DSparkModule(BlockLossModule):
    def forward(self, batch, blocks: DSparkBlocks, normaliser: torch.Tensor, grad_scale: float = 1.0):
        decay = self.options.decay(normaliser.device)
        loss, sums = dspark_loss.block_loss(self.draft, batch, blocks, decay, float(self.options.confidence_alpha),
                                            normaliser, self.use_flex)
        return loss * grad_scale, sums


@dataclass
class DSparkBundle(BlockBundle):
    draft_config: DSparkConfig
    options: DSparkOptions


def dspark_config_for(hf: Any, cfg, options: DSparkOptions, layers: list[int]) -> DSparkConfig:
    base = draft_config_for(hf, cfg, DFlashOptions(block_size=options.block_size, num_layers=options.num_layers,
                                                   mask_token_id=options.mask_token_id), layers)
    return DSparkConfig.from_dflash(base, **options.heads())


def build_bundle(ctx, options: DSparkOptions, layers: list[int]) -> DSparkBundle:
    from lib.drafts.dspark.export import load_draft
    from lib.target.shape import load_hf_config

    cfg, device = ctx.cfg, ctx.device
    draft_cfg = dspark_config_for(load_hf_config(cfg.target), cfg, options, layers)
    dflash_fused.use_compiled(cfg.train.compile)  # the backbone's norms, rotary, SiLU-multiply
    dspark_loss.use_compiled(cfg.train.compile)  # the per-chunk KL and its gradient
    draft = init_block_draft(ctx, DSparkDraft, draft_cfg, load_draft)
    module = DSparkModule(draft, options, use_flex=device.type == "cuda")
    model, params = shard_trainer_module(ctx, module)
    if ctx.is_trainer_leader:
        log.info("dspark draft: %d layers, block %d, target layers %s, mask id %d, markov %s rank %d, confidence "
                 "head %s, %.1fM trainable parameters", draft_cfg.num_hidden_layers, draft_cfg.block_size, layers,
                 draft_cfg.mask_token_id, draft_cfg.markov_head_type, draft_cfg.markov_rank,
                 draft_cfg.enable_confidence_head, params)
    return DSparkBundle(model, draft_config=draft_cfg, options=options, seed=int(cfg.train.seed))
