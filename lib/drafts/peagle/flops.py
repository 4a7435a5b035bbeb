"""Useful FLOPs of one P-EAGLE training step (lib/drafts/flops.py's rule), for bench/trainer.py's MFU.

The step's own slots decide it (lib/drafts/peagle/sampling.py): fc over the T real slots' captured
states (no input gradient; the one mask state is negligible), every decoder layer over all N slots
(the first reads the 2H-wide [embedding ; hidden], the embedding trains), attention over each slot's
visible keys (the real slots of its sample up to its anchor, plus its chain's mask slots up to itself),
the lm_head over the R slots with a loss (weight gradient only with draft.options.train_lm_head), and
the frozen target head's forward over the T tokens (prepare's target distribution).
"""
from __future__ import annotations

from typing import Mapping

import torch

from lib.drafts.flops import attention, linear


def parallel_step_flops(dc, tokens: int, slots: int, loss_rows: int, visible_pairs: float, target_vocab: int,
                        train_lm_head: bool) -> float:
    """dc: PEagleDraftConfig; tokens: T real slots; slots: N in all; loss_rows: R; visible_pairs: per head."""
    h, inter, heads, kv, d = dc.hidden_size, dc.intermediate_size, dc.num_attention_heads, dc.num_key_value_heads, \
        dc.head_dim
    rest = linear(slots, heads * d, h) + 2 * linear(slots, h, inter) + linear(slots, inter, h) \
        + attention(visible_pairs, heads, d)
    first = linear(slots, 2 * h, (heads + 2 * kv) * d) + rest
    later = linear(slots, h, (heads + 2 * kv) * d) + rest
    return (linear(tokens, dc.fc_in_features, h, input_grad=False) + first + (dc.num_hidden_layers - 1) * later
            + linear(loss_rows, h, dc.draft_vocab_size, weight_grad=train_lm_head)
            + linear(tokens, h, target_vocab, input_grad=False, weight_grad=False))


def slot_pairs(anchor: torch.Tensor, depth: torch.Tensor, cu_seqlens: torch.Tensor) -> float:
    """Visible keys summed over slots: (anchor - its sample's start + 1) real slots + depth mask slots."""
    cu = cu_seqlens.to(device=anchor.device, dtype=torch.long)
    start = cu[torch.bucketize(anchor, cu[1:], right=True)]
    return float((anchor - start + 1 + depth).sum())


def step_flops(bundle, batch: Mapping[str, torch.Tensor], context) -> float:
    """One micro-batch's step under a PEagleBundle; context: PEagleStrategy.prepare's BatchContext for it."""
    slots = context.slots
    return parallel_step_flops(bundle.draft_config, slots.tokens, int(slots.anchor.numel()), int(context.valid.sum()),
                               slot_pairs(slots.anchor, slots.depth, batch["cu_seqlens"]),
                               bundle.target_head.vocab_size, bundle.options.train_lm_head)
