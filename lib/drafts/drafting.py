"""What speculative decoding hands a drafter and asks of it, for every draft family.

The decode loop (lib/eval/spec_decode.py) verifies k proposed tokens per round with one target
forward and gives the drafter a `VerifiedBlock` of the slots it just processed; each family's drafter
(lib/drafts/<name>/drafter.py) proposes the next k tokens from it. Slots a row rejected stay in the
caches and are hidden by masks (`visible_keys`), so rows that accept different counts share a batch.
A drafter may end a row's proposal early (a verification schedule): the slots after it hold
NOT_PROPOSED, which the target never accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

NOT_PROPOSED = -1  # a proposal slot left empty: never equal to the target's choice, so never accepted


def visible_keys(valid: torch.Tensor, new: int) -> torch.Tensor:
    """valid [B, L] (the last `new` slots are the queries) -> [B, new, L] bool: a query sees the valid
    slots up to its own, and always itself, so no softmax row is empty (padding stays finite)."""
    total = valid.shape[1]
    slots = torch.arange(total, device=valid.device)
    query_slots = slots[total - new:, None]
    return (valid[:, None, :] & (slots <= query_slots)[None]) | (slots == query_slots)[None]


@dataclass
class VerifiedBlock:
    """Slots the target just processed, as the draft reads them: the slot at position p pairs the
    target's aux state at p with the token after p; `last` is each row's last kept slot."""

    next_ids: torch.Tensor  # [B, S]
    aux: Optional[torch.Tensor]  # [B, S, n_aux*H]
    positions: torch.Tensor  # [B, S]
    valid: torch.Tensor  # [B, S]
    last: torch.Tensor  # [B]

    def select(self, rows: torch.Tensor) -> "VerifiedBlock":
        aux = None if self.aux is None else self.aux[rows]
        return VerifiedBlock(self.next_ids[rows], aux, self.positions[rows], self.valid[rows], self.last[rows])


class Drafter(Protocol):
    aux_layers: list[int]  # target layers whose outputs the drafter reads (empty: none)

    def start(self) -> None: ...  # a new batch begins
    def keep(self, rows: torch.Tensor) -> None: ...  # finished rows leave the batch
    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor: ...
    # Optional: check_target(runner) raises if the draft was built for another target or device;
    # num_parameters() -> weights one draft forward multiplies by (for speedup_params; None if unknown);
    # draft_forwards(k) -> draft forwards per round of k proposals (default k, a chain; 1 for parallel drafting).
