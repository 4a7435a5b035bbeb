"""DFlash's drafter for speculative decoding: one draft forward proposes a whole block.

Each round the verified slots' captured states are projected once into every layer's context keys
and values (kept per row, with the decode loop's validity mask: rejected slots stay as holes; the
drafter and training share the layers, so the cache is exact). The block is
[bonus token, mask x k] at the positions after the last kept slot; its outputs at block positions
1..k are the k proposals. The target then verifies them (longest accepted prefix plus bonus).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.drafts.dflash.model import DFlashDraft
from lib.drafts.drafting import VerifiedBlock


class DFlashDrafter:
    def __init__(self, draft: DFlashDraft):
        self.draft = draft
        self.aux_layers = list(draft.config.target_layer_ids)
        self.start()

    def start(self) -> None:
        # Per layer, the rotated keys/values [B, L, Hkv, D] of every verified slot's projected target
        # states: they depend on the context alone, so each slot is projected once.
        self.kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self.valid: Optional[torch.Tensor] = None  # [B, L]

    def keep(self, rows: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]
            self.valid = self.valid[rows]

    def num_parameters(self) -> int:
        """Weights one draft forward multiplies by: the trained stack plus the target's lm_head it applies."""
        return sum(p.numel() for p in self.draft.parameters()) + self.draft.lm_head.numel()

    def check_target(self, runner) -> None:
        """The draft fits this target; binds the target's lm_head when the draft came without one."""
        c = self.draft.config
        if self.draft.fc.weight.device != runner.device:
            raise ValueError(f"draft is on {self.draft.fc.weight.device}, target on {runner.device}: move it")
        if c.vocab_size != runner.vocab_size or c.target_hidden_size != runner.lm_head.shape[1]:
            raise ValueError(f"draft was built for vocab {c.vocab_size} / hidden {c.target_hidden_size}, the target "
                             f"has {runner.vocab_size} / {runner.lm_head.shape[1]}: evaluate it with its own target")
        layers = len(runner.base.layers)
        if any(not 0 <= i < layers for i in c.target_layer_ids):
            raise ValueError(f"draft target_layer_ids={c.target_layer_ids} are outside the target's {layers} layers")
        if not self.draft.has_lm_head:
            self.draft.set_target_weights(None, runner.lm_head.to(self.draft.fc.weight.dtype))

    def _append(self, block: VerifiedBlock) -> None:
        kv = self.draft.context_kv(block.aux, block.positions)
        if self.kv is None:
            self.kv, self.valid = kv, block.valid
        else:
            self.kv = [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1)) for (k0, v0), (k1, v1) in zip(self.kv, kv)]
            self.valid = torch.cat([self.valid, block.valid], 1)

    @torch.no_grad()
    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        hidden, _ = self.block_hidden(block, k)
        return self.draft.logits(hidden[:, 1:]).argmax(-1)

    def block_hidden(self, block: VerifiedBlock, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden states [B, k+1, H] of the round's block, its bonus tokens [B]), the verified
        slots appended to the context first. DFlash2's drafter (lib/drafts/dflash2/) drafts from them too."""
        c = self.draft.config
        if k > c.block_size - 1:
            raise ValueError(f"k={k} draft tokens exceed what a block of {c.block_size} proposes ({c.block_size - 1}): "
                             f"set eval.draft_tokens to values <= {c.block_size - 1}")
        self._append(block)
        n = block.next_ids.shape[0]
        pick = torch.arange(n, device=block.next_ids.device)
        bonus = block.next_ids[pick, block.last]
        offsets = torch.arange(k + 1, device=bonus.device)
        ids = torch.full((n, k + 1), c.mask_token_id, dtype=torch.long, device=bonus.device)
        ids[:, 0] = bonus
        positions = (block.positions[pick, block.last] + 1)[:, None] + offsets
        # Every valid context slot precedes the block; the block sees itself whole.
        mask = torch.cat([self.valid[:, None, :].expand(n, k + 1, -1),
                          torch.ones(n, k + 1, k + 1, dtype=torch.bool, device=bonus.device)], 2)[:, None]

        def attn(q, key, value):
            return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, enable_gqa=q.shape[1] != key.shape[1])

        return self.draft.forward_kv(ids, positions, self.kv, attn), bonus
