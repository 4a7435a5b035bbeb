"""P-EAGLE's trainer side: options, the loss module (the FSDP2 unit) and the bundle built for one run.

The loss is speculators' P-EAGLE objective: over every sampled slot that carries a loss, all depths alike
(no per-depth weight), the cross-entropy of the draft's distribution against the target's, both over the
draft vocabulary (the KL divergence of speculators' default kl_div loss plus the target's entropy, which
has no gradient), divided by the global count of such slots over all micro-batches and trainers, so 1 or
N trainers give the same update. As in speculators, the embedding trains (the mask token's row among
others) and the lm_head starts as the target's rows of the draft vocabulary and stays frozen; both are
options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lib.drafts.base import DraftBundle, dataclass_from_keys
from lib.drafts.eagle3.loss import soft_cross_entropy
from lib.drafts.eagle3.target_head import TargetDistribution, TargetHead
from lib.drafts.peagle.attention import ParallelAttention
from lib.drafts.peagle.model import PEagleDraft, PEagleDraftConfig
from lib.drafts.peagle.sampling import Slots

log = logging.getLogger("specdraft.trainer")
SUMS_PER_DEPTH = 3  # cross-entropy sum, correct argmax count, slots with a loss


@dataclass(frozen=True)
class PEagleOptions:
    """draft.options for draft=peagle (conf/draft/peagle.yaml); defaults are speculators 0.9.0's."""

    num_depths: int = 8  # k: tokens one draft forward proposes (and the depths trained)
    num_layers: int = 1  # draft decoder layers
    down_sample_ratio: float = 0.7  # COD: depth d keeps about (n - d) * max(r^d, r_min) chains
    down_sample_ratio_min: float = 0.2
    max_anchors: Optional[int] = 512  # at most this many chains per packed batch (null: all)
    mask_token_id: Optional[int] = None  # null: the tokenizer's mask token, its first unused row, pad, then eos
    norm_before_residual: bool = True  # the first layer's residual is the normed fc output
    fc_norm: bool = False  # EAGLE-3.1's RMSNorm per aux layer before fc
    train_embedding: bool = True
    train_lm_head: bool = False

    def __post_init__(self) -> None:
        for name in ("num_depths", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"draft.options.{name}={value!r} must be an integer >= 1")
        if not 0 < float(self.down_sample_ratio) <= 1 or not 0 <= float(self.down_sample_ratio_min) <= 1:
            raise ValueError(f"draft.options.down_sample_ratio={self.down_sample_ratio!r} must be in (0, 1] and "
                             f"down_sample_ratio_min={self.down_sample_ratio_min!r} in [0, 1], e.g. 0.7 and 0.2")
        if self.max_anchors is not None and (not isinstance(self.max_anchors, int) or self.max_anchors < 1):
            raise ValueError(f"draft.options.max_anchors={self.max_anchors!r} must be an integer >= 1 or null (all)")
        if self.mask_token_id is not None and (not isinstance(self.mask_token_id, int) or self.mask_token_id < 0):
            raise ValueError(f"draft.options.mask_token_id={self.mask_token_id!r} must be a token id >= 0 or null")
        for name in ("norm_before_residual", "fc_norm", "train_embedding", "train_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"draft.options.{name}={getattr(self, name)!r} must be true or false")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "PEagleOptions":
        return dataclass_from_keys(cls, data, "draft.options for draft=peagle")


@dataclass
class BatchContext:
    """What prepare() decides for one micro-batch: the slots, which carry a loss, and the targets."""

    slots: Slots
    valid: torch.Tensor  # [N] bool
    target: TargetDistribution


def slot_loss(draft: PEagleDraft, batch: Mapping[str, torch.Tensor], context: BatchContext, normaliser: torch.Tensor,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sums [3 * depths]: per depth the CE sum, correct count and slot count) of one micro-batch."""
    c = draft.config
    device = draft.fc.weight.device
    slots = context.slots.to(device)
    ids, positions = slots.inputs(batch["input_ids"].to(device), batch["position_ids"].to(device), c.mask_token_id)
    attention = ParallelAttention(slots, batch["cu_seqlens"], draft.layers[0].self_attn.scale, backend, device,
                                  c.head_dim)
    rows = context.valid.to(device).nonzero().flatten()
    hidden = draft(ids, batch["aux_hidden"].to(device), positions, lambda _i, q, k, v: attention(q, k, v), rows)
    logits = draft.compute_logits(hidden)
    depth = slots.depth[rows]
    labels = slots.anchor[rows] + 1 + depth  # the target's distribution at a+1+d predicts x[a+2+d]
    target = context.target
    ce = soft_cross_entropy(logits, target.probs.to(device), labels)
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = ce.sum().to(loss_dtype) / normaliser.to(device=device, dtype=loss_dtype).clamp_min(1.0)
    with torch.no_grad():
        correct = (logits.argmax(-1) == target.draft_argmax.to(device)[labels]).float()
        sums = torch.zeros(3, c.num_depths, device=device)
        sums[0].index_add_(0, depth, ce.detach().float())
        sums[1].index_add_(0, depth, correct)
        sums[2].index_add_(0, depth, torch.ones_like(correct))
    return loss, sums.flatten()


class PEagleModule(nn.Module):
    """forward(batch, context, normaliser) = (loss, sums); the FSDP2 unit. The target head stays outside
    it (frozen, replicated, never sharded): prepare() turns the final hidden states into the context."""

    def __init__(self, draft: PEagleDraft):
        super().__init__()
        self.draft = draft

    def forward(self, batch: Mapping[str, torch.Tensor], context: BatchContext, normaliser: torch.Tensor,
                grad_scale: float = 1.0):
        """grad_scale = trainer count: FSDP averages gradients, the loss is this rank's share of the sum."""
        loss, sums = slot_loss(self.draft, batch, context, normaliser)
        return loss * grad_scale, sums


@dataclass
class PEagleBundle(DraftBundle):
    draft_config: PEagleDraftConfig
    target_head: TargetHead
    options: PEagleOptions
    seed: int  # slot sampling: with each batch's tokens (sampling.batch_generator)

    def config_dict(self) -> dict[str, Any]:
        return self.draft_config.to_dict()


def mask_token_id(options: PEagleOptions, vocab_size: int, tokenizer_path: Optional[str]) -> int:
    """speculators' resolution: the option, else the tokenizer's mask token, else the first embedding row
    no token uses (where it would add <|MASK|>), else pad, else eos."""
    if options.mask_token_id is not None:
        if options.mask_token_id >= vocab_size:
            raise ValueError(f"draft.options.mask_token_id={options.mask_token_id} is outside the target's vocab "
                             f"[0, {vocab_size}): pick an id below {vocab_size}")
        return options.mask_token_id
    if tokenizer_path is None:  # random-init target without a tokenizer: the last row
        return vocab_size - 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if tok.mask_token_id is not None:
        return int(tok.mask_token_id)
    if len(tok) < vocab_size:
        return len(tok)
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError(f"the tokenizer at {tokenizer_path} has no mask, pad or eos token and no unused embedding row: "
                     f"set draft.options.mask_token_id")


def build_bundle(ctx, layers: list[int], options: PEagleOptions) -> PEagleBundle:
    """The draft, its vocab map and target head for this run; layers from the capture plan."""
    from lib.drafts.eagle3.fused import use_compiled
    from lib.drafts.eagle3.trainer import layer_overrides
    from lib.drafts.eagle3.vocab import vocab_map
    from lib.drafts.peagle.export import load_draft
    from lib.launch.sharding import shard
    from lib.target.shape import load_hf_config, target_shape
    from lib.target.weights import load_target_embedding, load_target_lm_head

    cfg, device = ctx.cfg, ctx.device
    hf = load_hf_config(cfg.target)
    shape = target_shape(cfg.target, device, hf)
    draft_vocab = min(cfg.draft.draft_vocab_size, shape.vocab_size)
    overrides = layer_overrides(cfg)
    overrides.update(fc_norm=options.fc_norm, num_hidden_layers=options.num_layers, num_depths=options.num_depths,
                     norm_before_residual=options.norm_before_residual,
                     mask_token_id=mask_token_id(options, shape.vocab_size, ctx.tokenizer_path))
    draft_cfg = PEagleDraftConfig.from_target(hf, draft_vocab, list(layers), overrides)
    init = load_draft(cfg.draft.init_from) if cfg.draft.init_from is not None else None
    d2t, t2d = vocab_map(ctx, shape.vocab_size, draft_vocab, None if init is None else lambda: (init.d2t, init.t2d))
    use_compiled(cfg.train.compile)  # resolved by lib.config.resolve: on for CUDA unless set
    torch.manual_seed(cfg.train.seed)
    draft = PEagleDraft(draft_cfg)
    draft.set_vocab_map(d2t, t2d)
    source = cfg.target.path
    if source is not None:
        embedding, head_weight = load_target_embedding(source), load_target_lm_head(source)
    else:  # random-init target (benchmarks): any fixed embedding and head are as faithful as the engine's
        gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        embedding = torch.randn(draft_cfg.vocab_size, draft_cfg.hidden_size, generator=gen) * 0.02
        head_weight = torch.randn(shape.vocab_size, shape.hidden_size, generator=gen) * 0.02
    head = TargetHead(head_weight.to(device=device, dtype=shape.dtype), draft.d2t.to(device))
    if init is not None:
        draft.load_state_dict(init.state_dict())
    else:
        draft.load_embedding(embedding)
        with torch.no_grad():
            draft.lm_head.weight.copy_(head_weight[head.draft_to_target.cpu()])
    draft.embed_tokens.weight.requires_grad_(options.train_embedding)
    draft.lm_head.weight.requires_grad_(options.train_lm_head)
    draft.to(device)
    module = PEagleModule(draft)
    model = shard(module, ctx.groups.trainer, device)
    if ctx.is_trainer_leader:
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info("p-eagle draft: %d layer(s), k=%d, mask token %d, aux layers %s, draft vocab %d, %.1fM trainable "
                 "parameters", draft_cfg.num_hidden_layers, draft_cfg.num_depths, draft_cfg.mask_token_id, list(layers),
                 draft_vocab, params / 1e6)
    return PEagleBundle(model, draft_config=draft_cfg, target_head=head, options=options, seed=int(cfg.train.seed))
