"""DFlash2's drafter for speculative decoding: one draft forward per round, then the selector's walk.

The block forward is DFlash's (lib/drafts/dflash/drafter.py block_hidden: the verified slots'
context keys/values kept per row with holes for rejected slots, the block [bonus token, mask x k]
after the last kept slot); the k proposals are the method's greedy path through the top-K lattice (DFlash2Draft.walk):
at drafted position j the head's top-K candidates are rescored by the selector given the token chosen
at j-1 (the bonus token, which is the anchor, at j = 0), and the best one is kept.
"""
from __future__ import annotations

import torch

from lib.drafts.dflash.drafter import DFlashDrafter
from lib.drafts.dflash2.model import DFlash2Draft
from lib.drafts.drafting import VerifiedBlock


class DFlash2Drafter(DFlashDrafter):
    def __init__(self, draft: DFlash2Draft):
        if not isinstance(draft, DFlash2Draft):
            raise TypeError(f"DFlash2Drafter drafts with a DFlash2Draft, got {type(draft).__name__}")
        super().__init__(draft)

    def num_parameters(self) -> int:
        """The stack and the lm_head (as DFlash's count); the selector's codebooks are row lookups, only
        its projection multiplies."""
        selector = self.draft.candidate_selector
        lookups = selector.predecessor_codebook.numel() + selector.successor_codebook.numel()
        return super().num_parameters() - lookups

    @torch.no_grad()
    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        hidden, bonus = self.block_hidden(block, k)
        return self.draft.walk(hidden[:, 1:], bonus)
