"""Useful FLOPs of one DFlash2 training step (lib/drafts/flops.py's rule), for bench/trainer.py's MFU.

DFlash's backbone over the step's blocks (lib/drafts/dflash/flops.py) plus, per layer, the two
dynamic convolutions' kernel projections over the Q block queries (the depthwise convolutions
themselves are elementwise: not counted). Per valid drafted row (R of them): the frozen target
lm_head for the draft logits (forward and the input gradient, formed in forward) and for the target's
logits (forward only), the backward of the K candidates' unary logits into the hidden state, and the
selector (hidden projection to rank r, and the bilinear scores of K candidates).
"""
from __future__ import annotations

from typing import Mapping

import torch

from lib.drafts.dflash.flops import backbone_flops, visible_pairs
from lib.drafts.flops import linear


def dflash2_step_flops(c, tokens: int, queries: int, valid_rows: int, pairs: float) -> float:
    """c: DFlash2Config; queries: N*B block slots; valid_rows: R; pairs: the block mask's visible pairs."""
    h, v, k, r = c.hidden_size, c.vocab_size, c.selector_top_k, c.selector_rank
    convs = c.num_hidden_layers * 2 * linear(queries, h, 2 * c.conv_kernel_size * c.conv_groups)
    head = linear(valid_rows, h, v, weight_grad=False) + linear(valid_rows, h, v, input_grad=False, weight_grad=False)
    unary_backward = 2.0 * valid_rows * k * h
    selector = linear(valid_rows, h, r) + 3 * 2.0 * valid_rows * k * r
    return backbone_flops(c, tokens, queries, pairs) + convs + head + unary_backward + selector


def step_flops(bundle, batch: Mapping[str, torch.Tensor], context) -> float:
    """One micro-batch's step under a DFlash2Bundle; context: DFlash2Strategy.prepare's Blocks for it."""
    return dflash2_step_flops(bundle.draft_config, int(batch["input_ids"].shape[0]), int(context.ids.numel()),
                              int(context.valid().sum()), visible_pairs(context))
