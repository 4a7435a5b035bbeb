"""EAGLE-3's trainer side: the draft under FSDP2 with its frozen target head, built for one run.

FSDP2 unshards parameters in forward pre-hooks, so the whole training-time-test unroll runs inside
one module's forward (`TTTModule`): the draft's submodules are then called with gathered weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lib.drafts.base import DraftBundle, dataclass_from_keys
from lib.drafts.eagle3.export import load_draft
from lib.drafts.eagle3.fused import use_compiled
from lib.drafts.eagle3.loss import check_row_loss, ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import (TargetDistribution, TargetHead, load_target_embedding,
                                          load_target_lm_head)
from lib.drafts.eagle3.vocab import vocab_map
from lib.launch.sharding import shard

log = logging.getLogger("specdraft.trainer")
HEAD_INITS = ("target", "random")  # draft.options.head_init


@dataclass(frozen=True)
class Eagle3Options:
    """draft.options for draft=eagle3 (conf/draft/eagle3.yaml: head_init; conf/draft/eagle3_1.yaml: fc_norm)."""

    # EAGLE-3.1: one RMSNorm per captured aux layer before fc (speculators' and vLLM's `fc_norm`).
    fc_norm: bool = False
    # Where the draft's lm_head starts: "target" copies the target's rows of the draft vocabulary (the
    # draft then only has to land its hidden state where the target's head reads the right token),
    # "random" is N(0, 0.02) as the HF initialiser. Trained either way.
    head_init: str = "target"

    def __post_init__(self) -> None:
        if not isinstance(self.fc_norm, bool):
            raise ValueError(f"draft.options.fc_norm={self.fc_norm!r} must be true or false")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"draft.options.head_init={self.head_init!r}: use one of {list(HEAD_INITS)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Eagle3Options":
        if data.get("norm_before_fc"):
            # speculators' other pre-fc norm (one over the concatenation); exclusive with fc_norm there too.
            raise ValueError(f"draft.options.norm_before_fc={data['norm_before_fc']!r} is not implemented (with "
                             f"draft.options.fc_norm={data.get('fc_norm', False)!r}): use draft.options.fc_norm=true, "
                             f"one RMSNorm per aux layer (draft=eagle3_1); the two are exclusive")
        return dataclass_from_keys(cls, data, "draft.options for draft=eagle3")


class TTTModule(nn.Module):
    """forward(batch, target) = the TTT unroll's (loss, metrics); the FSDP2 unit.

    The target head is held outside the module tree (frozen, replicated, never sharded): pass it to
    the constructor, or with `set_head` once it is built (after sharding, on the trainer's device).
    """

    def __init__(self, draft: Eagle3Draft, ttt_length: int, head: Optional[TargetHead] = None,
                 recompute: bool = False, loss: str = "ce"):
        super().__init__()
        self.draft = draft
        self.ttt_length = ttt_length
        self.recompute = recompute
        self.loss = check_row_loss(loss)  # train.loss
        self._head = head

    @property
    def head(self) -> TargetHead:
        if self._head is None:
            raise RuntimeError("TTTModule has no target head: pass head= to the constructor or call set_head(head)")
        return self._head

    def set_head(self, head: TargetHead) -> None:
        if not isinstance(head, TargetHead):
            raise TypeError(f"TTTModule.set_head takes a TargetHead, got {type(head).__name__}")
        self._head = head

    def forward(self, batch: Mapping[str, torch.Tensor], target: TargetDistribution, denominators: torch.Tensor,
                grad_scale: float = 1.0):
        """grad_scale = trainer count: each rank's loss is its share of the global mean, and FSDP
        averages gradients across ranks, so scaling by the count turns that average into the sum
        (exact in fp32 for power-of-two counts; gloo has no pre-multiplied sum to do it instead)."""
        loss, metrics = ttt_forward(self.draft, self.head, batch, self.ttt_length, denominators=denominators,
                                    target=target, recompute=self.recompute, loss=self.loss)
        return loss * grad_scale, metrics


@dataclass
class Eagle3Bundle(DraftBundle):
    draft_config: Eagle3DraftConfig
    target_head: TargetHead  # also held by the model (TTTModule), which applies it in the loss
    ttt_length: int

    def config_dict(self) -> dict[str, Any]:
        return self.draft_config.to_dict()


def _vocab_map_of(export_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    draft = load_draft(export_dir)
    return draft.d2t, draft.t2d


def warm_start(draft: Eagle3Draft, export_dir: str) -> None:
    """Load an export's weights into a fresh draft (draft.init_from). A plain EAGLE-3 export warm-starts
    an EAGLE-3.1 draft too (its fc_norm gains stay at one); the reverse would drop trained norms."""
    init = load_draft(export_dir)
    if init.config.fc_norm and not draft.config.fc_norm:
        raise ValueError(f"draft.init_from={export_dir} is an EAGLE-3.1 draft (fc_norm weights) and this run's "
                         f"draft has none: set draft.options.fc_norm=true (draft=eagle3_1)")
    draft.load_state_dict(init.state_dict(), strict=False)


def layer_overrides(cfg) -> dict[str, int]:
    """The draft layer's sizes set in cfg.draft (the rest follow the target)."""
    return {k: v for k, v in (("intermediate_size", cfg.draft.intermediate_size),
                              ("num_attention_heads", cfg.draft.num_attention_heads),
                              ("num_key_value_heads", cfg.draft.num_key_value_heads)) if v is not None}


def build_bundle(ctx, aux_layers: list[int], options: Optional[Eagle3Options] = None) -> Eagle3Bundle:
    """The draft, its vocab map and target head for this run; aux_layers from the capture plan."""
    from lib.target.shape import load_hf_config, target_shape

    cfg, device = ctx.cfg, ctx.device
    hf = load_hf_config(cfg.target)
    shape = target_shape(cfg.target, device, hf)
    draft_vocab = min(cfg.draft.draft_vocab_size, shape.vocab_size)
    overrides = layer_overrides(cfg)
    overrides["fc_norm"] = (options or Eagle3Options()).fc_norm
    draft_cfg = Eagle3DraftConfig.from_target(hf, draft_vocab, list(aux_layers), overrides)
    init_map = None if cfg.draft.init_from is None else partial(_vocab_map_of, cfg.draft.init_from)
    d2t, t2d = vocab_map(ctx, shape.vocab_size, draft_vocab, init_map)
    use_compiled(cfg.train.compile)  # resolved by lib.config.resolve: on for CUDA unless set
    torch.manual_seed(cfg.train.seed)
    draft = Eagle3Draft(draft_cfg)
    if cfg.draft.init_from is not None:
        warm_start(draft, cfg.draft.init_from)
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
    if (options or Eagle3Options()).head_init == "target" and cfg.draft.init_from is None:
        draft.load_head_rows(head_weight if head_weight is not None else load_target_lm_head(source))
    draft.to(device)
    module = TTTModule(draft, cfg.train.ttt_length, recompute=cfg.train.recompute, loss=cfg.train.loss)
    model = shard(module, ctx.groups.trainer, device)
    head_dtype = shape.dtype
    if head_weight is None:
        head = TargetHead.from_pretrained(source, draft.d2t.detach().to(device), device, head_dtype)
    else:
        head = TargetHead(head_weight.to(device=device, dtype=head_dtype), draft.d2t.detach().to(device))
    module.set_head(head)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if ctx.is_trainer_leader:
        log.info("draft: hidden %d, draft vocab %d, aux layers %s%s, %.1fM trainable parameters, loss %s",
                 draft_cfg.hidden_size, draft_vocab, list(aux_layers), " (fc_norm: EAGLE-3.1)" if draft_cfg.fc_norm
                 else "", params / 1e6, module.loss)
    return Eagle3Bundle(model, draft_config=draft_cfg, target_head=head, ttt_length=cfg.train.ttt_length)
