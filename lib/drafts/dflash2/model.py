"""The DFlash2 draft: DFlash's block draft with a dynamic depthwise convolution around each sublayer
and a pairwise candidate selector after the head (speculators 0.9.0 `DFlash2DraftModel`).

- Layers: DFlash's (lib/drafts/dflash/model.py: the same attention over [context ; block], the same
  MLP and norms), each sublayer wrapped as in the method: h = conv_in(norm(x)), x += conv_out(f(h)).
  Both convolutions of a sublayer are causal along the block (kernel_size taps, never across blocks),
  depthwise with one tap weight per channel (`base_kernel`) plus a per-token, per-group correction
  projected from the sublayer's input (`kernel_projection`, one projection for both sides). Initialised
  as the identity (tap 0 = 1, the rest and the projection 0), so a new DFlash2 draft starts as DFlash.
- Selector: the head's top-k candidates per drafted position are rescored with a rank-r bilinear
  transition from the previous token: score(c | prev, h) = logit(c) + <P[prev] * W h, S[c]>.
  Training teacher-forces prev (the block's previous true token); drafting walks the top-k lattice
  greedily from the anchor (drafter.py).
Parameter names are the method's (layers.i.attention_conv.*, layers.i.mlp_conv.*, candidate_selector.*),
so both export layouts carry the state dict as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from lib.drafts.dflash.fused import ops as dflash_ops
from lib.drafts.dflash.model import AttnFn, DFlashConfig, DFlashDraft, DFlashLayer
from lib.drafts.dflash2.fused import ops


@dataclass
class DFlash2Config(DFlashConfig):
    conv_kernel_size: int = 2  # causal taps of each convolution
    conv_group_size: int = 16  # channels sharing one dynamic kernel correction
    selector_rank: int = 256  # rank of the transition codebooks
    selector_top_k: int = 16  # unary candidates the selector reranks per position

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DFlash2Config.{name}={value!r} must be a positive integer: set draft.options.{name}")
        if self.hidden_size % self.conv_group_size:
            raise ValueError(f"DFlash2Config.conv_group_size={self.conv_group_size} must divide hidden_size="
                             f"{self.hidden_size}: set draft.options.conv_group_size to a divisor, e.g. 16")
        if self.conv_kernel_size > self.block_size:
            raise ValueError(f"DFlash2Config.conv_kernel_size={self.conv_kernel_size} exceeds block_size="
                             f"{self.block_size}: a tap cannot reach past the block; lower it (2 in the recipe)")
        if not 2 <= self.selector_top_k <= self.vocab_size:
            raise ValueError(f"DFlash2Config.selector_top_k={self.selector_top_k} must be in [2, vocab_size="
                             f"{self.vocab_size}]: set draft.options.selector_top_k, e.g. 16")

    @property
    def conv_groups(self) -> int:
        return self.hidden_size // self.conv_group_size


class GroupedDynamicConv(nn.Module):
    """The input- and output-side convolutions of one sublayer, driven by one projection of its input."""

    def __init__(self, c: DFlash2Config):
        super().__init__()
        self.block_size, self.taps, self.groups = c.block_size, c.conv_kernel_size, c.conv_groups
        self.base_kernel = nn.Parameter(torch.empty(2, self.taps, c.hidden_size))
        self.kernel_projection = nn.Linear(c.hidden_size, 2 * self.taps * self.groups, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity on both sides (the method's initialisation)."""
        with torch.no_grad():
            self.base_kernel.zero_()
            self.base_kernel[:, 0] = 1.0
            self.kernel_projection.weight.zero_()

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the convolved sublayer input, the output side's kernel corrections)."""
        kernels = self.kernel_projection(x).unflatten(-1, (2, self.taps, self.groups))
        return ops.grouped_conv(x, kernels[..., 0, :, :], self.base_kernel[0], self.block_size), kernels[..., 1, :, :]

    def finish(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return ops.grouped_conv(y, delta, self.base_kernel[1], self.block_size)


class DFlash2Layer(DFlashLayer):
    def __init__(self, c: DFlash2Config):
        super().__init__(c)
        self.attention_conv = GroupedDynamicConv(c)
        self.mlp_conv = GroupedDynamicConv(c)

    def forward_kv(self, x, ctx_kv, cos, sin, attn: AttnFn):
        # Rows of x are block positions (whole blocks end to end, or one drafting block per batch row);
        # the context's keys/values are the same as DFlash's: the convolution is on the block side only.
        h, out_kernel = self.attention_conv.prepare(self.input_layernorm(x))
        x = x + self.attention_conv.finish(self.self_attn(h, ctx_kv, cos, sin, attn), out_kernel)
        h, out_kernel = self.mlp_conv.prepare(self.post_attention_layernorm(x))
        mlp = self.mlp.down_proj(dflash_ops.silu_mul(self.mlp.gate_proj(h), self.mlp.up_proj(h)))
        return x + self.mlp_conv.finish(mlp, out_kernel)


class CandidateSelector(nn.Module):
    def __init__(self, c: DFlash2Config):
        super().__init__()
        self.top_k = c.selector_top_k
        self.predecessor_codebook = nn.Parameter(torch.empty(c.vocab_size, c.selector_rank))
        self.successor_codebook = nn.Parameter(torch.empty(c.vocab_size, c.selector_rank))
        self.hidden_projection = nn.Linear(c.hidden_size, c.selector_rank, bias=False)

    def reset_parameters(self, std: float) -> None:
        for weight in (self.predecessor_codebook, self.successor_codebook, self.hidden_projection.weight):
            nn.init.normal_(weight, std=std)

    def scores(self, unary: torch.Tensor, hidden: torch.Tensor, predecessor_ids: torch.Tensor,
               candidate_ids: torch.Tensor) -> torch.Tensor:
        """unary logits of the candidates [..., K] + the transition from predecessor_ids [...] to
        candidate_ids [..., K] at final hidden states [..., H]."""
        transition = ops.transition_scores(self.predecessor_codebook[predecessor_ids],
                                           self.hidden_projection(hidden), self.successor_codebook[candidate_ids])
        return unary + transition.to(unary.dtype)


class DFlash2Draft(DFlashDraft):
    def __init__(self, config: DFlash2Config):
        if not isinstance(config, DFlash2Config):
            raise TypeError(f"DFlash2Draft needs a DFlash2Config, got {type(config).__name__}")
        super().__init__(config)
        # DFlash's stack replaced in place (the same position in the state dict), then everything
        # initialised once more below: the convolutions as the identity, the selector at random.
        self.layers = nn.ModuleList(DFlash2Layer(config) for _ in range(config.num_hidden_layers))
        self.candidate_selector = CandidateSelector(config)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        for module in self.modules():
            if isinstance(module, GroupedDynamicConv):
                module.reset_parameters()
        if hasattr(self, "candidate_selector"):  # DFlashDraft.__init__ calls this before it exists
            self.candidate_selector.reset_parameters(std)

    def walk(self, hidden: torch.Tensor, anchor_ids: torch.Tensor) -> torch.Tensor:
        """The method's greedy path through the top-k lattice: hidden [B, k, H] (block positions 1..k),
        anchor_ids [B] -> [B, k] tokens. Step j takes the unary top-k of its logits and, given the token
        chosen at step j-1 (the anchor at step 0), the candidate of highest selector score."""
        logits = self.logits(hidden).float()
        unary, candidates = logits.topk(self.config.selector_top_k, -1)
        chosen, previous = [], anchor_ids
        for step in range(hidden.shape[1]):
            scores = self.candidate_selector.scores(unary[:, step], hidden[:, step], previous, candidates[:, step])
            previous = candidates[:, step].gather(-1, scores.argmax(-1, keepdim=True))[:, 0]
            chosen.append(previous)
        return torch.stack(chosen, 1)
