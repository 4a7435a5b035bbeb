"""Shared fixtures of the block-draft tests (tests/test_dflash.py, test_dspark.py, test_dflash2.py): one
tiny backbone shape, drafts with drawn weights, and a packed batch of two sequences. Helpers only: no
tests here."""
from __future__ import annotations

import torch

MASK = 1  # the tiny drafts' mask token id


def tiny_spec(**over) -> dict:
    """DFlashConfig's fields for a 2-layer, 32-wide draft over a 6-layer target (block 4); `over` adds or
    replaces fields (a family's own sizes)."""
    spec = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                vocab_size=50, target_hidden_size=32, num_target_layers=6, target_layer_ids=[1, 3, 4],
                block_size=4, mask_token_id=MASK)
    spec.update(over)
    return spec


def drawn_draft(draft_cls, c, seed: int = 0, perturb: bool = True, head_scale: float = 0.3):
    """draft_cls(c) from seed with random target embedding and lm_head (scaled by head_scale); with
    perturb, every weight is moved off its initial value (norms, biases, identity convolutions), so a
    mix-up shows."""
    torch.manual_seed(seed)
    draft = draft_cls(c)
    if perturb:
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
    draft.set_target_weights(torch.randn(c.vocab_size, c.target_hidden_size),
                             torch.randn(c.vocab_size, c.target_hidden_size) * head_scale)
    return draft


def packed(lengths=(9, 7), vocab=50, seed=0):
    """(input_ids, loss_mask, position_ids, cu_seqlens) of sequences of these lengths, packed; the first
    two tokens are a prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    ids = torch.randint(2, vocab, (tokens,), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    loss_mask = torch.ones(tokens, dtype=torch.bool)
    loss_mask[:2] = False  # a prompt in the first sequence
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, loss_mask, positions, cu
