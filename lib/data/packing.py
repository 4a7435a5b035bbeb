"""Packing a tokenised dataset into the engine's token-budget batches, dealt round-robin to the
engine/trainer pairs, resumable from one global data position (also with another number of pairs)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from lib.data.batch import PackedBatch
from lib.data.datasets import SHOWN_LINES, DataError, TokenizedDataset

log = logging.getLogger(__name__)


# Version of the data position; 1 (unmarked) was a per-shard index into a strided sub-order.
POSITION_FORMAT = 2


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The fixed order in which epoch `epoch` visits the samples."""
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=g)


class ShardedPackedLoader:
    """Endless token-budget batches for one shard (one engine/trainer pair) of a dataset.

    The epochs' orders (epoch_order) one after another form one stream of samples. It is packed
    greedily into batches of at most token_budget tokens (a sample that does not fit starts the next
    batch), and batch b goes to shard b % num_shards. Packing reads only sample lengths, so every
    shard derives the same batches cheaply and loads the tokens of its own; after its batch a shard
    steps over the rest of the round. Hence at a step boundary (every shard took the same number of
    batches) all shards hold the same position (epoch, index): the count of samples of the epoch's
    order consumed by all pairs together. It does not depend on num_shards, so a resume from
    state_dict() with a different number of pairs packs on from there and, across the runs, every
    sample of an epoch is trained on exactly once. A sample longer than the budget is truncated to it
    (overlong="truncate", counted in .truncated) or skipped (overlong="skip", counted in .skipped);
    both count over the whole stream, so they are the same on every shard too.
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
        self._lengths: list[int] = dataset.offsets.diff().tolist()
        self._order_epoch, self._order = -1, []

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(len(self.dataset), self.seed, self.epoch).tolist()
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "ShardedPackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        for _ in range(self.shard):
            self._pack(load=False)
        batch = self._pack(load=True)
        for _ in range(self.num_shards - self.shard - 1):
            self._pack(load=False)
        return batch

    def _pack(self, load: bool) -> Optional[PackedBatch]:
        """The next batch of the stream (its tokens only when `load`); advances the position past it."""
        samples, ids, used = [], [], 0
        while True:
            order = self._epoch_order()
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            i = order[self.index]
            n = self._lengths[i]
            if n > self.token_budget and self.overlong == "skip":
                self.skipped += 1
                self.index += 1
                continue
            if used + min(n, self.token_budget) > self.token_budget:
                return PackedBatch.from_samples(samples, ids) if load else None
            if n > self.token_budget:
                self.truncated += 1
            if load:
                tokens, mask = self.dataset[i]
                if n > self.token_budget:
                    if self.truncated <= SHOWN_LINES:
                        log.warning("sample %s has %d tokens, more than engine.token_budget=%d: truncated (%d so "
                                    "far)", self.dataset.sample_ids[i], n, self.token_budget, self.truncated)
                    tokens, mask = tokens[:self.token_budget], mask[:self.token_budget]
                samples.append((tokens, mask))
            ids.append(i)
            used += min(n, self.token_budget)
            self.index += 1

    def state_dict(self) -> dict[str, int]:
        """The data position; the same on every shard at a step boundary (see the class docstring)."""
        return {"format": POSITION_FORMAT, "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_samples": len(self.dataset), "shard": self.shard, "num_shards": self.num_shards,
                "truncated": self.truncated, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved with any number of shards (and any token budget)."""
        if state.get("format", 1) != POSITION_FORMAT and state["num_shards"] != 1:
            raise DataError(f"the data position was saved per shard by an older version with num_shards="
                            f"{state['num_shards']}; resume it with the version that wrote it, or start without resume")
        for key in ("seed", "num_samples"):
            mine = len(self.dataset) if key == "num_samples" else getattr(self, key)
            if state[key] != mine:
                raise DataError(f"loader state was saved with {key}={state[key]} but this run has {key}={mine}; "
                                "resume with the same data and train.seed, or start without resume")
        self.epoch, self.index = state["epoch"], state["index"]
        self.truncated, self.skipped = state["truncated"], state["skipped"]


def position_key(state: dict[str, int]) -> tuple[int, int]:
    """Orders data positions: how far into the stream of epochs a position is."""
    return state["epoch"], state["index"]
