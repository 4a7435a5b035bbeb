"""The frozen target lm_head and the target-side tensors the draft borrows.

The engine hands over the target's final (post-norm) hidden states instead of logits (~40x fewer
bytes); TargetHead turns them into what the loss needs: the target distribution restricted to the
draft vocabulary, and the full-vocabulary argmax mapped into it. Full-vocab logits exist only one
chunk of rows at a time. The weights are read straight from the target checkpoint, one tensor each,
without building the target model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

# The checkpoint readers are the target's, shared with evaluation; re-exported here for the draft code.
from lib.target.weights import (EMBEDDING_NAMES, LM_HEAD_NAMES, load_target_embedding,  # noqa: F401
                                       load_target_lm_head, read_checkpoint_tensor)


@dataclass
class TargetDistribution:
    probs: torch.Tensor  # [T, draft_vocab]: target softmax over the draft-vocab columns, renormalised
    draft_argmax: torch.Tensor  # [T] int64: the full-vocab argmax as a draft id, -1 when outside the draft vocab

    @property
    def in_draft_vocab(self) -> torch.Tensor:
        return self.draft_argmax >= 0


class TargetHead:
    """Frozen, replicated target lm_head plus the draft<->target id maps. Never trained."""

    def __init__(self, weight: torch.Tensor, d2t: torch.Tensor, chunk_rows: int = 1024,
                 probs_dtype: torch.dtype = torch.float32):
        if weight.dim() != 2 or d2t.dim() != 1:
            raise ValueError(f"TargetHead needs weight [vocab, hidden] and d2t [draft_vocab], got "
                             f"{tuple(weight.shape)} and {tuple(d2t.shape)}")
        if chunk_rows <= 0:
            raise ValueError(f"TargetHead chunk_rows={chunk_rows} must be > 0")
        vocab = weight.shape[0]
        draft_to_target = torch.arange(d2t.numel(), device=d2t.device) + d2t.to(torch.long)
        if int(draft_to_target.min()) < 0 or int(draft_to_target.max()) >= vocab:
            raise ValueError(f"d2t maps draft ids outside the target vocab [0, {vocab}): the vocab map was built "
                             f"for another target")
        self.weight = weight.detach()
        self.chunk_rows, self.probs_dtype = chunk_rows, probs_dtype
        self.draft_to_target = draft_to_target.to(weight.device)
        self.target_to_draft = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
        self.target_to_draft[self.draft_to_target] = torch.arange(d2t.numel(), device=weight.device)

    @classmethod
    def from_pretrained(cls, target: Union[str, nn.Module], d2t: torch.Tensor, device: torch.device,
                        dtype: torch.dtype, **kwargs) -> "TargetHead":
        weight = load_target_lm_head(target).to(device=device, dtype=dtype)
        return cls(weight, d2t.to(device), **kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def target_probs(self, final_hidden: torch.Tensor) -> TargetDistribution:
        """final_hidden [T, H] (after the target's final norm) -> TargetDistribution, chunk by chunk."""
        if final_hidden.dim() != 2 or final_hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"final_hidden shape {tuple(final_hidden.shape)} != [T, {self.weight.shape[1]}]: it "
                             f"must be the target's last hidden state after its final norm")
        tokens = final_hidden.shape[0]
        probs = torch.empty(tokens, self.draft_to_target.numel(), dtype=self.probs_dtype, device=self.weight.device)
        draft_argmax = torch.empty(tokens, dtype=torch.long, device=self.weight.device)
        for start in range(0, tokens, self.chunk_rows):
            rows = final_hidden[start:start + self.chunk_rows].to(device=self.weight.device, dtype=self.weight.dtype)
            logits = rows @ self.weight.T  # [chunk, full vocab], transient
            draft_argmax[start:start + rows.shape[0]] = self.target_to_draft[logits.argmax(dim=-1)]
            restricted = logits.index_select(1, self.draft_to_target)
            restricted = restricted.to(torch.promote_types(restricted.dtype, torch.float32))
            probs[start:start + rows.shape[0]] = torch.softmax(restricted, dim=-1).to(self.probs_dtype)
        return TargetDistribution(probs, draft_argmax)
