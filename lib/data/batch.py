"""Data contracts shared by the data pipeline, the engine, the handoff and the trainer.

Everything that crosses a module boundary on the hot path is one of these types, so each side can
be written and tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedBatch:
    """Variable-length samples packed end to end into one token-budget batch (engine input).

    No padding: `cu_seqlens` marks where each sample starts; attention must never cross them.
    """

    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool, True on assistant tokens (incl. their end-of-turn token)
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for every sample
    cu_seqlens: torch.Tensor  # [B+1] int32, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    sample_ids: list[int] = field(default_factory=list)  # dataset indices, for exact resume/audit

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @staticmethod
    def from_samples(samples: list[tuple[list[int], list[bool]]], sample_ids: list[int]) -> "PackedBatch":
        ids = [t for s, _ in samples for t in s]
        mask = [m for _, m in samples for m in m]
        lengths = [len(s) for s, _ in samples]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        pos = [p for n in lengths for p in range(n)]
        return PackedBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            loss_mask=torch.tensor(mask, dtype=torch.bool),
            position_ids=torch.tensor(pos, dtype=torch.long),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            sample_ids=list(sample_ids),
        )


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a handoff payload: rows vary per step (up to max_rows), the row shape is fixed."""

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...]
    max_rows: int

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def max_bytes(self) -> int:
        return self.row_bytes * self.max_rows

