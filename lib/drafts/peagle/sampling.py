"""Which slots P-EAGLE trains on in a packed batch: every real slot, and sampled chains of mask slots.

A slot is (anchor a, depth d). Depth 0 is the real slot at packed position a: token x[a+1], the
target's aux state at a, rotated at position_ids[a]. Depth d >= 1 is the d-th mask slot after anchor a:
mask token, mask state, position_ids[a] + d. Slot (a, d) predicts token x[a+2+d]: its target is the
target's distribution at a+1+d, and it carries a loss iff `valid[d, a]` (lib/drafts/eagle3/loss.py
valid_positions: x[a+2+d] is in a's sample and under the loss mask, and the target's argmax there is in
the draft vocabulary; the same rule as EAGLE-3's unroll step d).

Training all T*k slots would cost k forwards; P-EAGLE's conditional drop (COD, speculators'
generate_cod_sample_indices) keeps fewer per depth: all T real slots (they are every slot's context),
then at depth d about (n - d) * max(r^d, r_min) chains, drawn among the chains kept at depth d-1 whose
depth-d slot is valid (at depth 1: among the anchors whose depth-1 slot is valid, at most max_anchors of
them, n being their number). So every kept mask slot carries a loss and every chain is complete from
depth 0 up, which the attention relies on. Unlike the reference, a chain never crosses into the next
sample (the reference drops that case only where the loss mask happens to be off).

The draws come from a generator seeded by the run seed and the batch's own tokens: the same batch
gets the same slots after a resume and on any number of trainers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Slots:
    """The slots of one packed batch in training order: the T real slots (anchor 0..T-1), then each
    depth's mask slots with ascending anchors."""

    anchor: torch.Tensor  # [N] int64
    depth: torch.Tensor  # [N] int64
    counts: list[int]  # slots per depth; counts[0] = T

    def __post_init__(self) -> None:
        if self.anchor.shape != self.depth.shape or self.anchor.dim() != 1:
            raise ValueError(f"Slots anchor {tuple(self.anchor.shape)} and depth {tuple(self.depth.shape)} must be "
                             f"equal 1-d shapes")
        if sum(self.counts) != self.anchor.numel():
            raise ValueError(f"Slots counts {self.counts} sum to {sum(self.counts)}, not {self.anchor.numel()} slots")

    @property
    def tokens(self) -> int:
        return self.counts[0]

    @property
    def depths(self) -> int:
        return len(self.counts)

    def to(self, device: torch.device) -> "Slots":
        return Slots(self.anchor.to(device), self.depth.to(device), list(self.counts))

    def starts(self) -> list[int]:
        """First slot index of each depth."""
        out, total = [], 0
        for n in self.counts:
            out.append(total)
            total += n
        return out

    def chain_index(self) -> torch.Tensor:
        """[depths, T] int64: the slot index of (anchor a, depth d), -1 where not sampled."""
        table = torch.full((self.depths, self.tokens), -1, dtype=torch.long, device=self.anchor.device)
        table[self.depth, self.anchor] = torch.arange(self.anchor.numel(), device=self.anchor.device)
        return table

    def inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask_token_id: int):
        """(ids, positions) [N] of every slot. A real slot reads the token after its anchor (the last
        slot of the batch, which has none, reads its own: it is nobody's context and carries no loss)."""
        tokens = self.tokens
        nxt = input_ids[(torch.arange(tokens, device=input_ids.device) + 1).clamp(max=tokens - 1)]
        mask = torch.full((self.anchor.numel() - tokens,), mask_token_id, dtype=nxt.dtype, device=nxt.device)
        return torch.cat([nxt, mask]), position_ids[self.anchor] + self.depth


def batch_generator(seed: int, input_ids: torch.Tensor) -> torch.Generator:
    """A CPU generator from the run seed and the batch's tokens (a position-weighted digest)."""
    weights = torch.arange(1, input_ids.numel() + 1, dtype=torch.int64)
    digest = int((input_ids.detach().cpu().to(torch.int64) * weights).remainder(2_147_483_629).sum())
    return torch.Generator().manual_seed((seed * 999_983 + digest) % (2 ** 63))


def cod_sample(valid: torch.Tensor, ratio: float, ratio_min: float, max_anchors: Optional[int],
               generator: torch.Generator) -> Slots:
    """The slots to train on, from valid [depths, T] (bool, valid[d, a]: slot (a, d) carries a loss)."""
    table = valid.detach().cpu()
    depths, tokens = table.shape
    groups = [torch.arange(tokens)]
    chains = table[1].nonzero().flatten() if depths > 1 else torch.zeros(0, dtype=torch.long)
    if max_anchors is not None and chains.numel() > max_anchors:
        chains = chains[torch.randperm(chains.numel(), generator=generator)[:max_anchors]].sort().values
    seeds = chains.numel()
    for d in range(1, depths):
        size = int(max(seeds - d, 0) * max(ratio ** d, ratio_min))
        chains = chains[table[d, chains]]  # the chains whose depth-d slot carries a loss
        if size <= 0 or chains.numel() == 0:
            break
        if chains.numel() > size:
            chains = chains[torch.randperm(chains.numel(), generator=generator)[:size]].sort().values
        groups.append(chains)
    anchor = torch.cat(groups)
    depth = torch.cat([torch.full((g.numel(),), d, dtype=torch.long) for d, g in enumerate(groups)])
    return Slots(anchor.to(valid.device), depth.to(valid.device), [g.numel() for g in groups])


def all_slots(tokens: int, depths: int, device: Optional[torch.device] = None) -> Slots:
    """Every (anchor, depth) of a batch, unsampled (tests, and checking training against the drafter)."""
    anchor = torch.arange(tokens, device=device).repeat(depths)
    depth = torch.arange(depths, device=device).repeat_interleave(tokens)
    return Slots(anchor, depth, [tokens] * depths)
