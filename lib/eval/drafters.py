"""Drafters that belong to evaluation itself rather than to a draft family.

ForcedDrafter proposes from the target's own greedy continuation, to test the decode loop at
tau = k+1 ("oracle") and tau = 1 ("wrong"). The drafter interface is lib/drafts/drafting.py; each
family's drafter lives with the family (lib/drafts/<family>/drafter.py).
"""
from __future__ import annotations

import torch

from lib.drafts.drafting import VerifiedBlock

FORCED_MODES = ("oracle", "wrong")


class ForcedDrafter:
    """Test hook: proposals taken from the target's own greedy continuation. 'oracle' proposes it
    (tau = k+1), 'wrong' proposes the next id after each of its tokens (never accepted: tau = 1)."""

    aux_layers: list[int] = []

    def __init__(self, reference: list[list[int]], mode: str, vocab_size: int):
        self.reference, self.mode, self.vocab_size = reference, mode, vocab_size

    def start(self) -> None:
        pass

    def keep(self, rows: torch.Tensor) -> None:
        pass

    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        chosen = [self.reference[r][n:n + k] for r, n in zip(rows, generated)]
        if any(len(c) < k for c in chosen):
            raise RuntimeError("forced drafter ran past its reference: build it with max_new_tokens + k tokens")
        tokens = torch.tensor(chosen, dtype=torch.long, device=block.next_ids.device)
        return tokens if self.mode == "oracle" else (tokens + 1) % self.vocab_size
