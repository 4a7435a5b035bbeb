"""DSpark's drafter: one backbone forward per round, the Markov chain over its slots, and the
confidence schedule that decides how much of the proposal the target verifies.

The verified slots' captured states are projected into every layer's context keys/values once and
kept (DFlash's drafter does this, lib/drafts/dflash/drafter.py). The block is [bonus token, mask x
(B-1)] at the positions after the last kept slot, as in training (always the whole block: its
attention is bidirectional). Slot k proposes token k: its backbone logits plus the Markov bias of the
token chosen at slot k-1 (the bonus token at slot 0). The confidence head gives each slot the chance
that its token is accepted given the earlier ones were; their running product is the chance that the
prefix up to slot k survives. The schedule (config.confidence_threshold, config.verify_budget) ends a
row's proposal after the last slot it keeps; the rest are NOT_PROPOSED, which the target never
accepts, so the output stays the target's greedy decoding and the round costs fewer verified tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.drafts.dflash.drafter import DFlashDrafter
from lib.drafts.drafting import NOT_PROPOSED, VerifiedBlock
from lib.drafts.dspark.model import DSparkDraft


def schedule_lengths(survival: torch.Tensor, threshold: float, budget: Optional[float]) -> torch.Tensor:
    """[n] draft tokens each row has verified, from the running confidence products survival [n, k]
    (non-increasing along k): every slot with survival >= threshold, then, under a budget of
    round(budget * n) tokens for the batch, those of highest survival (DSpark's prefix scheduler with
    a fixed budget). Counting kept slots per row keeps each row's choice a prefix."""
    keep = survival >= threshold
    keep = keep.long().cumprod(1).bool()  # a prefix, also where rounding broke monotonicity
    if budget is not None:
        total = min(int(round(budget * survival.shape[0])), int(keep.sum()))
        scores = torch.where(keep, survival, torch.full_like(survival, -1.0)).flatten()
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[scores.topk(total).indices] = True
        return torch.minimum(keep.sum(1), chosen.view_as(keep).sum(1))
    return keep.sum(1)


class DSparkDrafter(DFlashDrafter):
    def __init__(self, draft: DSparkDraft):
        super().__init__(draft)
        self.verified_tokens = 0  # draft tokens handed to the target over all rounds and rows
        self.row_rounds = 0

    @property
    def verified_per_round(self) -> float:
        """Mean draft tokens a row had verified per round (the schedule's saving, next to tau)."""
        return self.verified_tokens / max(self.row_rounds, 1)

    @torch.no_grad()
    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        c = self.draft.config
        if k > c.block_size:
            raise ValueError(f"k={k} draft tokens exceed what a DSpark block of {c.block_size} proposes "
                             f"({c.block_size}): set eval.draft_tokens to values <= {c.block_size}")
        self._append(block)
        n, b = block.next_ids.shape[0], c.block_size
        pick = torch.arange(n, device=block.next_ids.device)
        bonus = block.next_ids[pick, block.last]
        ids = torch.full((n, b), c.mask_token_id, dtype=torch.long, device=bonus.device)
        ids[:, 0] = bonus
        positions = (block.positions[pick, block.last] + 1)[:, None] + torch.arange(b, device=bonus.device)
        # Every valid context slot precedes the block; the block sees itself whole.
        mask = torch.cat([self.valid[:, None, :].expand(n, b, -1),
                          torch.ones(n, b, b, dtype=torch.bool, device=bonus.device)], 2)[:, None]

        def attn(q, key, value):
            return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, enable_gqa=q.shape[1] != key.shape[1])

        hidden = self.draft.forward_kv(ids, positions, self.kv, attn)
        tokens, conf = self.draft.draft_chain(hidden, bonus, k)
        lengths = torch.full((n,), k, dtype=torch.long, device=tokens.device)
        if c.scheduled:
            survival = torch.sigmoid(conf.float()).cumprod(1)
            lengths = schedule_lengths(survival, float(c.confidence_threshold), c.verify_budget)
            cut = torch.arange(k, device=tokens.device)[None] >= lengths[:, None]
            tokens = tokens.masked_fill(cut, NOT_PROPOSED)
        self.verified_tokens += int(lengths.sum())
        self.row_rounds += n
        return tokens
