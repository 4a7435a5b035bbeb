"""Useful FLOPs of one DSpark training step (lib/drafts/flops.py's rule), for bench/trainer.py's MFU.

DFlash's backbone over the step's blocks (lib/drafts/dflash/flops.py), then per valid slot r (R of
them): the frozen target lm_head for the draft logits (forward and the input gradient, both formed in
forward by the chunked KL) and for the target's logits (forward only), the Markov head's W2 (forward,
feature gradient and W2's gradient) and the confidence head; over all Q block slots, the gated or rnn
Markov head's projection when configured. W1 is an embedding lookup (no matmul).
"""
from __future__ import annotations

from typing import Mapping

import torch

from lib.drafts.dflash.flops import backbone_flops, visible_pairs
from lib.drafts.flops import linear


def dspark_step_flops(c, tokens: int, queries: int, valid_rows: int, pairs: float) -> float:
    """c: DSparkConfig; queries: N*B block slots; valid_rows: R; pairs: the block mask's visible pairs."""
    h, v, r = c.hidden_size, c.vocab_size, c.markov_rank
    total = backbone_flops(c, tokens, queries, pairs)
    total += linear(valid_rows, h, v, weight_grad=False) + linear(valid_rows, h, v, input_grad=False,
                                                                  weight_grad=False)
    if r:
        total += linear(valid_rows, r, v)
        if c.markov_head_type == "gated":
            total += linear(queries, h + r, r)
        elif c.markov_head_type == "rnn":
            total += linear(queries, 2 * r + h, 3 * r)
    if c.enable_confidence_head:
        total += linear(valid_rows, h + (r if c.confidence_head_with_markov else 0), 1)
    return total


def step_flops(bundle, batch: Mapping[str, torch.Tensor], context) -> float:
    """One micro-batch's step under a DSparkBundle; context: DSparkStrategy.prepare's DSparkBlocks for it."""
    blocks = context.blocks
    return dspark_step_flops(bundle.draft_config, int(batch["input_ids"].shape[0]), int(blocks.ids.numel()),
                             int(context.valid().sum()), visible_pairs(blocks))
