"""DFlash's trainer side: options, the loss module (the FSDP2 unit) and the bundle built for one run.

j is the drafted index (block position j+1) and CE_r the cross-entropy of valid row r against the
data's next token. Two position weightings (draft.options.loss_weights):
- decay (default, the DFlash recipe): loss = sum_r w_j(r) * CE_r / sum_j w_j * count_j with
  w_j = exp(-j / gamma): earlier positions matter more, as a rejection ends the accepted prefix;
- dpace (D-PACE, speculators' default for DFlash): loss = sum_r w_r * CE_r / count, with w_r from the
  draft's own detached confidences in r's block (dpace_weights). The denominator is the plain count
  of valid rows, as speculators divides.
Either denominator is global over all micro-batches and trainers (so 1 or N trainers give the same
update): prepare() sums position_weights(j) over valid rows before any forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from lib.drafts.base import DraftBundle, dataclass_from_keys
from lib.drafts.dflash.fused import ops, use_compiled
from lib.drafts.dflash.mask import Blocks, dense_attention, flex_attention_fn
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft

log = logging.getLogger("specdraft.trainer")
# Per drafted index: CE sum, correct argmax count, valid rows, weighted CE sum (the loss numerator),
# normaliser weight sum (the loss denominator); the logged loss is their ratio, whatever the weighting.
SUMS_PER_POSITION = 5
DEFAULT_DRAFT_LAYERS = 5
CE_CHUNK_ROWS = 2048
DPACE_DEFAULT_ALPHA = 0.5  # speculators' default confidence smoothing


class LossWeights(str, Enum):
    """draft.options.loss_weights: how the loss weighs the drafted positions of a block."""

    DECAY = "decay"  # exp(-j / gamma), fixed; what every run before this option trained with
    DPACE = "dpace"  # D-PACE: from the expected accepted length under the draft's own confidences


@dataclass(frozen=True)
class DFlashOptions:
    """draft.options for draft=dflash (conf/draft/dflash.yaml)."""

    block_size: int = 16
    num_layers: int = DEFAULT_DRAFT_LAYERS
    mask_token_id: Optional[int] = None
    loss_gamma: Optional[float] = None
    max_anchors: Optional[int] = None
    loss_weights: LossWeights = LossWeights.DPACE
    dpace_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"draft.options.block_size={self.block_size!r} must be an int >= 2, e.g. 16")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"draft.options.num_layers={self.num_layers!r} must be an int >= 1, e.g. 5")
        if self.loss_gamma is not None and not float(self.loss_gamma) > 0:
            raise ValueError(f"draft.options.loss_gamma={self.loss_gamma!r} must be > 0 or null (recipe default)")
        if self.max_anchors is not None and int(self.max_anchors) < 1:
            raise ValueError(f"draft.options.max_anchors={self.max_anchors!r} must be >= 1 or null")
        weights = self.loss_weights.value if isinstance(self.loss_weights, LossWeights) else self.loss_weights
        choices = [w.value for w in LossWeights]
        if weights not in choices:
            raise ValueError(f"draft.options.loss_weights={weights!r} is not one of {choices}; use decay "
                             f"(exp(-j/gamma), the default) or dpace (D-PACE)")
        object.__setattr__(self, "loss_weights", LossWeights(weights))
        # A knob of the other weighting would be silently ignored: refuse it instead.
        if self.loss_weights is LossWeights.DPACE and self.loss_gamma is not None:
            raise ValueError(f"draft.options.loss_gamma={self.loss_gamma!r} applies to loss_weights=decay only; "
                             f"drop it, or use loss_weights=decay")
        if self.dpace_alpha is not None:
            if self.loss_weights is not LossWeights.DPACE:
                raise ValueError(f"draft.options.dpace_alpha={self.dpace_alpha!r} applies to loss_weights=dpace "
                                 f"only; drop it, or set draft.options.loss_weights=dpace")
            if not 0.0 < float(self.dpace_alpha) <= 1.0:
                raise ValueError(f"draft.options.dpace_alpha={self.dpace_alpha!r} must be in (0, 1] or null "
                                 f"({DPACE_DEFAULT_ALPHA})")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DFlashOptions":
        return dataclass_from_keys(cls, data, "draft.options for draft=dflash")

    @property
    def gamma(self) -> float:
        if self.loss_gamma is not None:
            return float(self.loss_gamma)
        return 7.0 if self.block_size == 16 else self.block_size / 2

    def decay(self, device=None) -> torch.Tensor:
        """[B-1] exp(-j / gamma): the decay weighting's loss weight of each drafted index."""
        return torch.exp(-torch.arange(self.block_size - 1, device=device, dtype=torch.float32) / self.gamma)

    @property
    def alpha(self) -> Optional[float]:
        """D-PACE's confidence smoothing, or None under the decay weighting."""
        if self.loss_weights is not LossWeights.DPACE:
            return None
        return DPACE_DEFAULT_ALPHA if self.dpace_alpha is None else float(self.dpace_alpha)

    def position_weights(self, device=None) -> torch.Tensor:
        """[B-1] what a valid row of drafted index j adds to the loss's denominator: its decay weight, or
        1 under D-PACE (whose per-row weights come from the forward; speculators divides by the count)."""
        if self.loss_weights is LossWeights.DPACE:
            return torch.ones(self.block_size - 1, device=device)
        return self.decay(device)


def default_target_layers(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """One captured layer per draft layer, spread evenly over [1, L-3] (the method's recipe: skip the
    embedding-near first layer and the prediction-specialised last ones)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, max(1, num_target_layers - 3)
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of hidden @ head^T against labels, for a frozen head.

    The head is the target's lm_head (no gradient), and each row's loss depends on its own hidden
    state only, so d(ce_r)/d(hidden_r) = (softmax_r - onehot_r) @ head is formed in forward, one chunk
    of rows at a time, and kept ([rows, hidden]: 64 MB for 8k rows at 4096 wide). Backward only scales
    it by the incoming per-row gradient. A chunk's full-vocabulary logits are thus computed once; the
    checkpointed alternative ran the head matmul a third time (forward, recompute, input gradient).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor):
        ce, correct, grads = [], [], []
        for h, y in zip(hidden.split(CE_CHUNK_ROWS), labels.split(CE_CHUNK_ROWS)):
            # Labels copied out of their views: the compiled op guards on whether an input is a view.
            c, ok, d_logits = ops.ce_rows_with_grad(h @ head.t(), y.clone())
            ce.append(c)
            correct.append(ok)
            grads.append(d_logits @ head)
        ctx.save_for_backward(torch.cat(grads))
        correct = torch.cat(correct)
        ctx.mark_non_differentiable(correct)
        return torch.cat(ce), correct

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, _grad_correct):
        (d_hidden,) = ctx.saved_tensors
        return (grad_ce[:, None] * d_hidden.float()).to(d_hidden.dtype), None, None


def chunked_ce(draft: DFlashDraft, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, correct) per row; at most CE_CHUNK_ROWS rows' full-vocabulary logits exist at a
    time (8k rows x 152k vocab would hold ~5 GB in fp32)."""
    head = draft.head_weight(hidden.dtype)
    if head.requires_grad:
        raise RuntimeError("DFlash's lm_head is the frozen target head; it must not require a gradient")
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        parts = [ops.ce_rows(h @ head.t(), y.clone())
                 for h, y in zip(hidden.split(CE_CHUNK_ROWS), labels.split(CE_CHUNK_ROWS))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _HeadCrossEntropy.apply(hidden, head, labels)


@torch.no_grad()
def dpace_weights(ce: torch.Tensor, rows: torch.Tensor, num_blocks: int, block_size: int,
                  alpha: float) -> torch.Tensor:
    """D-PACE's weight of each valid row (rows: their indices in the [num_blocks * block_size] layout).

    The draft's confidence in row r's label is q_r = exp(-CE_r), smoothed to s_r = (1 - alpha) q_r + alpha
    (alpha keeps a position that is still wrong from zeroing every later one). With s = 1 at rows
    without a loss, P_m = s_1 * ... * s_m is the chance that the block is accepted through position m,
    and the expected accepted length is sum_m P_m over valid m. The weight of row k is
    w_k = sum_{valid m >= k} P_m, the derivative of that length in log s_k (log q_k at alpha = 0): a
    position counts for every later one whose acceptance it gates. All of it is detached: the weights scale the
    cross-entropy's gradient, they are not trained through. Definition and precision (fp32) as
    speculators 0.9.0's dpace_loss_decay; tests/test_dflash_loss_parity.py holds the two equal.
    """
    cells = num_blocks * block_size
    smooth = torch.ones(cells, device=ce.device, dtype=torch.float32)
    smooth[rows] = (1.0 - alpha) * torch.exp(-ce.detach().float()) + alpha
    valid = torch.zeros(cells, device=ce.device, dtype=torch.float32)
    valid[rows] = 1.0
    through = torch.cumprod(smooth.view(num_blocks, block_size), dim=-1) * valid.view(num_blocks, block_size)
    # sum over m >= k: a cumulative sum from the block's end
    after = torch.cumsum(through.flip(-1), dim=-1).flip(-1)
    return after.flatten()[rows]


def block_forward(draft: nn.Module, batch: Mapping[str, torch.Tensor], blocks: Blocks,
                  use_flex: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N*B, H], rows, j): the draft's output at every block cell, the cells with a label, and
    their drafted index j (block position j+1). One forward of a DFlash-backbone draft over its blocks."""
    attn = flex_attention_fn(blocks) if use_flex else dense_attention(blocks)
    hidden = draft(blocks.ids[None], blocks.positions[None], batch["aux_hidden"][None],
                   batch["position_ids"][None], attn)[0]
    drafted = (torch.arange(hidden.shape[0], device=hidden.device) % blocks.block_size) - 1  # -1 at the anchor
    rows = blocks.valid().nonzero().flatten()
    return hidden, rows, drafted[rows]


def block_loss(draft: DFlashDraft, batch: Mapping[str, torch.Tensor], blocks: Blocks, decay: torch.Tensor,
               normaliser: torch.Tensor, use_flex: bool,
               dpace_alpha: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sums [SUMS_PER_POSITION*(B-1)]) of one micro-batch's blocks. decay: [B-1] the fixed
    per-position weights (DFlashOptions.position_weights); with dpace_alpha set, each row's loss weight
    is D-PACE's instead, and decay only says what the normaliser counted (ones)."""
    hidden, rows, j = block_forward(draft, batch, blocks, use_flex)
    b = blocks.block_size
    labels = blocks.labels[rows]
    ce, correct = chunked_ce(draft, hidden[rows], labels)
    if dpace_alpha is None:
        weight = decay[j]
    else:
        weight = dpace_weights(ce, rows, blocks.num_blocks, b, dpace_alpha)
    loss = (ce * weight).sum() / normaliser.clamp_min(1e-6)
    with torch.no_grad():
        sums = torch.zeros(SUMS_PER_POSITION, b - 1, device=hidden.device)
        sums[0].index_add_(0, j, ce.detach())
        sums[1].index_add_(0, j, correct)
        sums[2].index_add_(0, j, torch.ones_like(correct))
        sums[3].index_add_(0, j, ce.detach() * weight)
        sums[4].index_add_(0, j, decay[j])
    return loss, sums.flatten()


class BlockLossModule(nn.Module):
    """forward(batch, blocks, normaliser) = (loss, sums); the FSDP2 unit of a DFlash-backbone family
    (its state is the draft's, under `draft.`). Subclasses give the forward."""

    def __init__(self, draft: nn.Module, options: Any, use_flex: bool):
        super().__init__()
        self.draft = draft
        self.options = options
        self.use_flex = use_flex


class DFlashModule(BlockLossModule):
    def forward(self, batch, blocks: Blocks, normaliser: torch.Tensor, grad_scale: float = 1.0):
        weights = self.options.position_weights(normaliser.device)
        loss, sums = block_loss(self.draft, batch, blocks, weights, normaliser, self.use_flex, self.options.alpha)
        return loss * grad_scale, sums


@dataclass
class BlockBundle(DraftBundle):
    """The bundle of a DFlash-backbone family: its draft config, options and the run seed."""

    draft_config: Any  # a DFlashConfig or a family's extension of it (to_dict)
    options: Any
    seed: int  # anchor sampling: with each batch's tokens (strategy.batch_generator)

    def config_dict(self) -> dict[str, Any]:
        return self.draft_config.to_dict()


@dataclass
class DFlashBundle(BlockBundle):
    draft_config: DFlashConfig
    options: DFlashOptions


def draft_config_for(hf: Any, cfg, options: DFlashOptions, layers: list[int]) -> DFlashConfig:
    hidden = int(hf.hidden_size)
    heads = int(cfg.draft.num_attention_heads or hf.num_attention_heads)
    kv = int(cfg.draft.num_key_value_heads or min(int(getattr(hf, "num_key_value_heads", None) or heads), heads))
    params = getattr(hf, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None)) if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(hf, "rope_theta", 10000.0)
    mask_id = options.mask_token_id
    if mask_id is None:
        pad = getattr(hf, "pad_token_id", None)
        mask_id = int(pad) if pad is not None else int(hf.vocab_size) - 1
    return DFlashConfig(
        hidden_size=hidden, intermediate_size=int(cfg.draft.intermediate_size or hf.intermediate_size),
        num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=int(getattr(hf, "head_dim", None) or hidden // heads), num_hidden_layers=options.num_layers,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(theta),
        max_position_embeddings=int(hf.max_position_embeddings), vocab_size=int(hf.vocab_size),
        target_hidden_size=hidden, num_target_layers=int(hf.num_hidden_layers), target_layer_ids=list(layers),
        block_size=options.block_size, mask_token_id=mask_id)


def init_block_draft(ctx, draft_cls: Callable[[Any], nn.Module], draft_cfg: Any,
                     load_draft: Callable[[str], nn.Module]) -> nn.Module:
    """draft_cls(draft_cfg) initialised from train.seed (or draft.init_from's export, read by load_draft)
    on ctx.device, with the frozen target embedding and lm_head bound (bf16 on CUDA): the target's own,
    or fixed random ones for a random-init target."""
    from lib.target.weights import load_target_embedding, load_target_lm_head

    cfg, device = ctx.cfg, ctx.device
    torch.manual_seed(cfg.train.seed)
    draft = draft_cls(draft_cfg)
    if cfg.draft.init_from is not None:
        draft.load_state_dict(load_draft(cfg.draft.init_from).state_dict())
    source = cfg.target.path
    if source is not None:
        embedding, head = load_target_embedding(source), load_target_lm_head(source)
    else:  # random-init target (benchmarks): any fixed weights are as faithful as the engine's
        gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        embedding = torch.randn(draft_cfg.vocab_size, draft_cfg.hidden_size, generator=gen) * 0.02
        head = torch.randn(draft_cfg.vocab_size, draft_cfg.hidden_size, generator=gen) * 0.02
    draft.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    draft.set_target_weights(embedding.to(device=device, dtype=dtype), head.to(device=device, dtype=dtype))
    return draft


def shard_trainer_module(ctx, module: nn.Module) -> tuple[nn.Module, float]:
    """(module sharded with FSDP2 over the trainer group, its trainable parameters in millions)."""
    from lib.launch.sharding import shard

    model = shard(module, ctx.groups.trainer, ctx.device)
    return model, sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


def build_bundle(ctx, options: DFlashOptions, layers: list[int]) -> DFlashBundle:
    from lib.drafts.dflash.export import load_draft
    from lib.target.shape import load_hf_config

    cfg, device = ctx.cfg, ctx.device
    hf = load_hf_config(cfg.target)
    draft_cfg = draft_config_for(hf, cfg, options, layers)
    use_compiled(cfg.train.compile)  # resolved by lib.config.resolve: on for CUDA unless set
    draft = init_block_draft(ctx, DFlashDraft, draft_cfg, load_draft)
    module = DFlashModule(draft, options, use_flex=device.type == "cuda")
    model, params = shard_trainer_module(ctx, module)
    if ctx.is_trainer_leader:
        weights = (f"dpace (alpha {options.alpha})" if options.alpha is not None
                   else f"decay (gamma {options.gamma:g})")
        log.info("dflash draft: %d layers, block %d, target layers %s, mask id %d, loss weights %s, "
                 "%.1fM trainable parameters", draft_cfg.num_hidden_layers, draft_cfg.block_size, layers,
                 draft_cfg.mask_token_id, weights, params)
    return DFlashBundle(model, draft_config=draft_cfg, options=options, seed=int(cfg.train.seed))
