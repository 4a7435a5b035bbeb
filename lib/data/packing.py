"""Packing a tokenised dataset into the engine's token-budget batches, one shard per engine/trainer
pair, resumable from a checkpointed position."""
from __future__ import annotations

import logging

import torch

from lib.data.batch import PackedBatch
from lib.data.datasets import SHOWN_LINES, DataError, TokenizedDataset

log = logging.getLogger(__name__)


class ShardedPackedLoader:
    """Endless token-budget batches for one shard (one engine/trainer pair) of a dataset.

    Epoch e visits the samples in a permutation seeded by seed + e; shard k takes every num_shards-th
    sample of it starting at k, so the shards of an epoch are disjoint and together cover every sample
    exactly once (the remainder is spread: shard sizes differ by at most one). Consecutive samples
    are packed greedily up to token_budget; a sample that does not fit starts the next batch, so the
    position (epoch, index) always points at the next unconsumed sample and a resume from
    state_dict() neither repeats nor skips one. A sample longer than the budget is truncated to it
    (overlong="truncate", counted in .truncated) or skipped (overlong="skip", counted in .skipped).
    """

    def __init__(self, dataset: TokenizedDataset, shard: int, num_shards: int, token_budget: int, seed: int,
                 overlong: str = "truncate"):
        if not 0 <= shard < num_shards:
            raise DataError(f"shard={shard} is outside [0, num_shards={num_shards})")
        if len(dataset) < num_shards:
            raise DataError(f"the dataset has {len(dataset)} samples, fewer than the {num_shards} shards "
                            "(engine/trainer pairs); use more data or fewer processes")
        if token_budget < 2:
            raise DataError(f"engine.token_budget={token_budget}; set it >= 2")
        if overlong not in ("truncate", "skip"):
            raise DataError(f"overlong={overlong!r}; use 'truncate' or 'skip'")
        if overlong == "skip" and int((dataset.offsets.diff() <= token_budget).sum()) == 0:
            raise DataError(f"every sample is longer than engine.token_budget={token_budget} and overlong=skip; "
                            "raise the budget or truncate")
        self.dataset, self.shard, self.num_shards = dataset, shard, num_shards
        self.token_budget, self.seed, self.overlong = token_budget, seed, overlong
        self.epoch, self.index = 0, 0
        self.truncated = self.skipped = 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _shard_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)[self.shard::self.num_shards]
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "ShardedPackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        samples, ids, used = [], [], 0
        while True:
            order = self._shard_order()
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            i = int(order[self.index])
            n = self.dataset.length(i)
            if n > self.token_budget and self.overlong == "skip":
                self.skipped += 1
                self.index += 1
                continue
            if used + min(n, self.token_budget) > self.token_budget:
                return PackedBatch.from_samples(samples, ids)
            tokens, mask = self.dataset[i]
            if n > self.token_budget:
                self.truncated += 1
                if self.truncated <= SHOWN_LINES:
                    log.warning("sample %s has %d tokens, more than engine.token_budget=%d: truncated (%d so far)",
                                self.dataset.sample_ids[i], n, self.token_budget, self.truncated)
                tokens, mask = tokens[:self.token_budget], mask[:self.token_budget]
            samples.append((tokens, mask))
            ids.append(i)
            used += len(tokens)
            self.index += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shard": self.shard,
                "num_shards": self.num_shards, "num_samples": len(self.dataset),
                "truncated": self.truncated, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "shard", "num_shards", "num_samples"):
            mine = len(self.dataset) if key == "num_samples" else getattr(self, key)
            if state[key] != mine:
                raise DataError(f"loader state was saved with {key}={state[key]} but this run has {key}={mine}; "
                                "resume with the same data, seed and process count, or start without resume")
        self.epoch, self.index = state["epoch"], state["index"]
        self.truncated, self.skipped = state["truncated"], state["skipped"]
