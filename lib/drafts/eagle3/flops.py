"""Useful FLOPs of one EAGLE-3 training step (lib/drafts/flops.py's rule), for bench/trainer.py's MFU.

Per unroll step i of ttt_length: the decoder layer over all T tokens (q/k/v read the 2H-wide
[embedding ; hidden]), attention over each sample's causal pairs plus i keys of the earlier steps'
diagonal per query, and the draft head (norm + lm_head, trainable) over that step's valid rows only
(the loss computes logits for no other row). Once per step: fc over the captured states (no input
gradient) and the frozen target head's forward over all T tokens (prepare's target distribution).
EAGLE-3.1 (fc_norm) and every train.loss (ce, lk, lk_hybrid, tv, jsd) count the same: they differ in
norms and elementwise loss terms only.

bench/flops.py draft_step_flops (the earlier count, still used by bench/e2e.py) counted fc with an
input gradient and the draft head over every token at every step; with every row valid the two
differ by exactly fc's input gradient (tests/test_family_steps.py).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from lib.drafts.flops import attention, causal_pairs, linear, sample_lengths


def ttt_step_flops(dc, lengths: Sequence[int], ttt_length: int, target_vocab: int,
                   head_rows: Sequence[int]) -> float:
    """dc: Eagle3DraftConfig; lengths: the packed samples; head_rows[i]: valid rows of unroll step i."""
    if len(head_rows) != ttt_length:
        raise ValueError(f"head_rows has {len(head_rows)} entries, one per unroll step ({ttt_length}) expected")
    h, inter, heads, kv, d = dc.hidden_size, dc.intermediate_size, dc.num_attention_heads, dc.num_key_value_heads, \
        dc.head_dim
    tokens = sum(lengths)
    layer = (linear(tokens, 2 * h, (heads + 2 * kv) * d) + linear(tokens, heads * d, h)
             + 2 * linear(tokens, h, inter) + linear(tokens, inter, h))
    context = causal_pairs(list(lengths))
    total = linear(tokens, dc.fc_in_features, h, input_grad=False)
    for i, rows in enumerate(head_rows):
        total += layer + attention(context + tokens * i, heads, d) + linear(rows, h, dc.draft_vocab_size)
    return total + linear(tokens, h, target_vocab, input_grad=False, weight_grad=False)


def step_flops(bundle, batch: Mapping[str, torch.Tensor], context) -> float:
    """One micro-batch's step under an Eagle3Bundle; context: what Eagle3Strategy.prepare returned for it
    (the batch's TargetDistribution)."""
    from lib.drafts.eagle3.loss import valid_positions

    mask = batch["loss_mask"]
    valid = valid_positions(mask, batch["cu_seqlens"], context.in_draft_vocab.to(mask.device), bundle.ttt_length)
    return ttt_step_flops(bundle.draft_config, sample_lengths(batch["cu_seqlens"]), bundle.ttt_length,
                          bundle.target_head.vocab_size, valid.sum(dim=1).tolist())
