"""Acceptance counts of speculative decoding, pooled and per prompt row (lib/eval/spec_decode.py fills them).

Every (row, round) pair is one verify forward for that row; m accepted draft tokens produce m + 1
tokens. Pooled over a set of pairs:

    tau = sum(m + 1) / #pairs,   accept_rate[i] = #(m > i) / #(m >= i)

The pooled counters are kept exactly as they always were; the per-row counters beside them hold the
same integers split by prompt, so any grouping of prompts (e.g. by the held-out line's "category")
sums back to the pooled numbers exactly, from the one batched decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence

import torch


class _Rates:
    k: int
    verify_rows: int
    produced: int
    reached: list[int]
    accepted: list[int]

    @property
    def tau(self) -> float:
        return self.produced / max(self.verify_rows, 1)

    @property
    def accept_rates(self) -> list[float]:
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached)]


@dataclass
class AcceptanceCounts(_Rates):
    """Acceptance summed over a group of prompts (all their rounds)."""

    k: int
    prompts: int
    verify_rows: int
    produced: int
    reached: list[int]
    accepted: list[int]

    def summary(self) -> dict:
        return {"tau": self.tau, "accept_rates": self.accept_rates, "prompts": self.prompts,
                "verify_rows": self.verify_rows}


@dataclass
class AcceptanceStats(_Rates):
    """Acceptance of k-token drafts over (row, round) pairs, and where the time went."""

    k: int
    verify_rows: int = 0  # (row, round) pairs: one verify forward per row per round
    produced: int = 0  # sum of accepted + 1 over them
    rounds: int = 0  # batched verify forwards
    draft_s: float = 0.0
    verify_s: float = 0.0
    num_prompts: int = 0  # prompts decoded (a prompt finished by its prefill token has no round)
    reached: list[int] = field(init=False)  # per draft position: rounds that got that far
    accepted: list[int] = field(init=False)  # per draft position: rounds that accepted it
    # The same counts per prompt (index into the decoded prompt list): [P] and [P, k]
    row_verify: torch.Tensor = field(init=False, repr=False)
    row_produced: torch.Tensor = field(init=False, repr=False)
    row_reached: torch.Tensor = field(init=False, repr=False)
    row_accepted: torch.Tensor = field(init=False, repr=False)
    # (prompt, answer tokens before the round, accepted) per verify row, when record() is given starts
    round_starts: list[tuple[int, int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.round_starts = []
        self.reached, self.accepted = [0] * self.k, [0] * self.k
        self.row_verify = torch.zeros(0, dtype=torch.long)
        self.row_produced = torch.zeros(0, dtype=torch.long)
        self.row_reached = torch.zeros(0, self.k, dtype=torch.long)
        self.row_accepted = torch.zeros(0, self.k, dtype=torch.long)
        self._grow(self.num_prompts)

    def record(self, accepted: torch.Tensor, draft_s: float, verify_s: float,
               rows: Optional[Sequence[int]] = None, starts: Optional[Sequence[int]] = None) -> None:
        """One batched round: `accepted[j]` draft tokens accepted for prompt `rows[j]` (default: j), whose
        answer held `starts[j]` tokens before the round (optional: for by_answer_position)."""
        counts = accepted.cpu()
        self.verify_rows += counts.numel()
        self.produced += int(counts.sum()) + counts.numel()
        for i in range(self.k):
            self.reached[i] += int((counts >= i).sum())
            self.accepted[i] += int((counts > i).sum())
        self.rounds += 1
        self.draft_s += draft_s
        self.verify_s += verify_s
        index = torch.tensor(list(rows) if rows is not None else range(counts.numel()), dtype=torch.long)
        if index.numel() != counts.numel():
            raise ValueError(f"record(): {counts.numel()} acceptance counts but {index.numel()} rows")
        if index.numel():
            self._grow(int(index.max()) + 1)
            self.num_prompts = self.row_verify.shape[0]
        if starts is not None:
            self.round_starts.extend(zip(index.tolist(), (int(x) for x in starts), counts.tolist()))
        counts = counts.long()
        positions = torch.arange(self.k)
        self.row_verify.index_add_(0, index, torch.ones_like(counts))
        self.row_produced.index_add_(0, index, counts + 1)
        self.row_reached.index_add_(0, index, (counts[:, None] >= positions).long())
        self.row_accepted.index_add_(0, index, (counts[:, None] > positions).long())

    def _grow(self, size: int) -> None:
        extra = size - self.row_verify.shape[0]
        if extra > 0:
            self.row_verify = torch.cat([self.row_verify, torch.zeros(extra, dtype=torch.long)])
            self.row_produced = torch.cat([self.row_produced, torch.zeros(extra, dtype=torch.long)])
            self.row_reached = torch.cat([self.row_reached, torch.zeros(extra, self.k, dtype=torch.long)])
            self.row_accepted = torch.cat([self.row_accepted, torch.zeros(extra, self.k, dtype=torch.long)])

    def for_rows(self, rows: Iterable[int]) -> AcceptanceCounts:
        """The counts of these prompts (indices into the decoded list), summed over all their rounds."""
        index = torch.tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
        size = self.row_verify.shape[0]
        bad = [r for r in index.tolist() if not 0 <= r < size]
        if bad:
            raise ValueError(f"rows {bad[:5]} were not decoded: the prompts are 0..{size - 1}")
        return AcceptanceCounts(self.k, int(index.numel()), int(self.row_verify[index].sum()),
                                int(self.row_produced[index].sum()), self.row_reached[index].sum(0).tolist(),
                                self.row_accepted[index].sum(0).tolist())

    def by_label(self, labels: Sequence[Hashable]) -> dict[Hashable, AcceptanceCounts]:
        """labels[i] is prompt i's group (e.g. its category): the counts of each group, in sorted order."""
        if len(labels) != self.row_verify.shape[0]:
            raise ValueError(f"{len(labels)} labels for {self.row_verify.shape[0]} decoded prompts: give one "
                             "per prompt")
        groups: dict[Hashable, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        return {label: self.for_rows(groups[label]) for label in sorted(groups, key=str)}

    def by_answer_position(self, span: int) -> dict[str, AcceptanceCounts]:
        """The rounds grouped by where in the answer they start, `span` tokens a group ("0-127",
        "128-255", ...; rounds recorded with starts only): whether acceptance holds through an answer or
        rises where the target starts repeating itself."""
        if span <= 0:
            raise ValueError(f"span={span} must be > 0")
        groups: dict[int, list[tuple[int, int]]] = {}
        for row, start, count in self.round_starts:
            groups.setdefault(start // span, []).append((row, count))
        out = {}
        for g in sorted(groups):
            counts = torch.tensor([c for _, c in groups[g]], dtype=torch.long)
            positions = torch.arange(self.k)
            out[f"{g * span}-{(g + 1) * span - 1}"] = AcceptanceCounts(
                self.k, len({r for r, _ in groups[g]}), int(counts.numel()), int(counts.sum()) + counts.numel(),
                (counts[:, None] >= positions).sum(0).tolist(), (counts[:, None] > positions).sum(0).tolist())
        return out
