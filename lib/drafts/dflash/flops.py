"""Useful FLOPs of one DFlash training step (lib/drafts/flops.py's rule), for bench/trainer.py's MFU.

From the step's blocks (lib/drafts/dflash/mask.py): fc over the T captured states (no input gradient);
per layer, k/v projections of the T context states and the whole layer over the Q = N*B block
queries, attention over the pairs the block mask shows (each query sees its sequence's context before
its anchor and its own block); the frozen target lm_head over the valid rows (forward and input
gradient, both formed in forward by the chunked cross-entropy). The count bench/dflash_trainer.py used
before it delegated here. DSpark and DFlash2 (same backbone) build on `backbone_flops`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from lib.drafts.flops import attention, linear


def backbone_flops(c, tokens: int, queries: int, visible_pairs: float) -> float:
    """fc + the decoder stack + attention; c: DFlashConfig (or a subclass), visible_pairs per head and layer."""
    h, inter, heads, kv, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, \
        c.head_dim
    context = linear(tokens, h, 2 * kv * d)
    block = (linear(queries, h, (heads + 2 * kv) * d) + linear(queries, heads * d, h) + 2 * linear(queries, h, inter)
             + linear(queries, inter, h))
    return (linear(tokens, c.fc_in_features, h, input_grad=False)
            + c.num_hidden_layers * (context + block + attention(visible_pairs, heads, d)))


def block_step_flops(c, tokens: int, queries: int, valid_rows: int, visible_pairs: float) -> float:
    return backbone_flops(c, tokens, queries, visible_pairs) + linear(valid_rows, c.hidden_size, c.vocab_size,
                                                                      weight_grad=False)


def visible_pairs(blocks) -> float:
    """The block mask's visible (query, key) pairs: per block, B queries each see (anchor - sequence
    start) context keys and the B keys of their own block (dense_mask(blocks).sum(), without building it)."""
    from lib.drafts.dflash.mask import context_starts

    b = blocks.block_size
    seen = (blocks.anchors - context_starts(blocks)).to(torch.float64) + b
    return float(seen.sum()) * b


def step_flops(bundle, batch: Mapping[str, torch.Tensor], context) -> float:
    """One micro-batch's step under a DFlashBundle; context: DFlashStrategy.prepare's Blocks for it."""
    return block_step_flops(bundle.draft_config, int(batch["input_ids"].shape[0]), int(context.ids.numel()),
                            int(context.valid().sum()), visible_pairs(context))
