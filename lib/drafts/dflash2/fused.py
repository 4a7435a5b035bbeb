"""DFlash2's elementwise pieces, eager or fused by torch.compile (`train.compile=true`).

DFlash2 runs DFlash's layers (whose norms, q/k norm + rotary and SiLU-multiply sit in
lib/drafts/dflash/fused.py's table) with three new chains: the grouped dynamic convolution around
each sublayer, the candidate selector's transition scores, and the per-chunk losses (forward KL to
the target with its logits gradient, the unary top-k candidates, and the K-way selector
cross-entropy). `use_compiled` switches both tables, so `train.compile` reaches the new layers and
the shared ones alike. The eager functions are the formulas of speculators 0.9.0's DFlash2 classes
(summation orders included), which tests/test_dflash2_parity.py holds to 1e-4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.drafts.dflash import fused as dflash_fused
from lib.drafts.op_table import OpTable


def grouped_conv(x: torch.Tensor, delta: torch.Tensor, base: torch.Tensor, block_size: int) -> torch.Tensor:
    """Causal depthwise convolution inside draft blocks, its taps shared by groups of channels.

    x [..., S, H] (S runs through whole blocks laid end to end, so row s is block position
    s % block_size), delta [..., S, taps, G] (the token's own kernel correction per group), base
    [taps, H]. out[s] = sum over taps t <= s % block_size of x[s - t] * (base[t] + delta[s, t, group]):
    a position never reads an earlier block, nor a later position of its own.
    """
    taps, groups = delta.shape[-2], delta.shape[-1]
    size = x.shape[-1] // groups
    rows = x.shape[-2]
    xg = x.unflatten(-1, (groups, size))  # [..., S, G, size]
    position = torch.arange(rows, device=x.device) % block_size
    out = xg * (base[0].to(x.dtype).view(groups, size) + delta[..., 0, :, None])
    for tap in range(1, taps):
        shifted = F.pad(xg, (0, 0, 0, 0, tap, 0))[..., :rows, :, :]
        coefficient = base[tap].to(x.dtype).view(groups, size) + delta[..., tap, :, None]
        out = out + shifted * coefficient * (position >= tap).view(-1, 1, 1)
    return out.flatten(-2)


def transition_scores(predecessor: torch.Tensor, projected: torch.Tensor, successors: torch.Tensor) -> torch.Tensor:
    """The selector's pairwise term: predecessor code [..., r] * projected hidden [..., r], dotted with each
    candidate's successor code [..., K, r] -> [..., K]."""
    context = predecessor * projected.to(predecessor.dtype)
    return (context.unsqueeze(-2) * successors).sum(-1)


def unary_rows(logits: torch.Tensor, target_logits: torch.Tensor, top_k: int):
    """One chunk of rows' unary terms, in fp32 whatever the logits' dtype:
    (KL(target || draft) per row, d KL / d logits = softmax(draft) - softmax(target) in the logits'
    dtype, the unary top-k candidates with the target's argmax put in the last slot where it is
    missing, the target's slot among them, whether the draft's own top-k held it, and the draft's
    argmax == target's argmax)."""
    wide, target = logits.float(), target_logits.float()
    log_q = F.log_softmax(wide, -1)
    p = F.softmax(target, -1)
    kl = F.kl_div(log_q, p, reduction="none").sum(-1)
    grad = (F.softmax(wide, -1) - p).to(logits.dtype)
    target_ids = target.argmax(-1)
    candidates = wide.topk(top_k, -1).indices
    matches = candidates == target_ids[:, None]
    contains = matches.any(-1)
    slot = torch.where(contains, matches.long().argmax(-1), torch.full_like(target_ids, top_k - 1))
    candidates[:, -1] = torch.where(contains, candidates[:, -1], target_ids)
    unary_correct = wide.argmax(-1) == target_ids
    return kl, grad, candidates, slot, contains, unary_correct


def candidate_ce(scores: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K-way cross-entropy of the selector's scores against the target's slot, argmax == slot)."""
    wide = scores.float()
    return F.cross_entropy(wide, slot, reduction="none"), wide.argmax(-1) == slot


ops = OpTable(grouped_conv=grouped_conv, transition_scores=transition_scores, unary_rows=unary_rows,
              candidate_ce=candidate_ce)


def use_compiled(enabled: bool) -> None:
    """train.compile for DFlash2: its own chains and the DFlash layers' it runs."""
    ops.use_compiled(enabled)
    dflash_fused.use_compiled(enabled)


def compiled() -> bool:
    return ops.compiled() and dflash_fused.compiled()
