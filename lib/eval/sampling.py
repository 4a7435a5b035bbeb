"""Batched sampling with the target's KV cache: the decoding behind tools/regenerate.py.

Rows are left-padded so every row's newest token sits in the last slot; padding is hidden by the
explicit [B, S, L] mask and positions follow each row's own tokens, so a row decodes as it would
alone. Finished rows leave the batch (the cache keeps only the live rows). sample_stream() also
refills the batch as rows finish (continuous batching): new prompts are prefilled on their own and
joined to the running cache, left-padded to a common width, and the leading slots no live row sees
any more are cut, so the cache stays as wide as the longest live row.

Dense Llama-family targets decode through lib/eval/fast_decode.py (their own modules, a preallocated
KV cache written in place); the rest through the transformers forward with a DynamicCache. Both give
the same tokens; `lean=False` forces the transformers forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from lib.drafts.drafting import visible_keys
from lib.eval.fast_decode import KVCache
from lib.eval.target import TargetRunner

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


class SamplingError(ValueError):
    """A sampling setting is wrong; the message names it, its value and the fix."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (the target's argmax, deterministic)
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SamplingError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy), e.g. 0.7")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p={self.top_p!r}: must be in (0, 1], e.g. 0.95 (1 = no nucleus cut)")
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r}: must be >= 1, e.g. 2048")

    def record(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] float -> token ids [B]: argmax at temperature 0, else nucleus sampling."""
    if cfg.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generated:
    tokens: list[int]  # without the stop token
    finish: str  # "stop" (a stop token) or "length" (the budget)


Request = tuple[Any, Sequence[int], int]  # (caller's key, prompt ids, budget of new tokens >= 1)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


class _Batch:
    """The live rows: a KVCache (the lean path) or a transformers DynamicCache (per layer keys/values
    [B, H, L, D]), the valid slots [B, L], each row's next position, its (row, caller's key), and the
    logits of its next token [B, V]."""

    def __init__(self, cache: Any, valid: torch.Tensor, next_position: torch.Tensor, keys: list,
                 logits: torch.Tensor):
        self.cache, self.valid, self.next_position, self.keys, self.logits = cache, valid, next_position, keys, logits

    def join(self, other: "_Batch") -> None:
        width = max(self.valid.shape[1], other.valid.shape[1])
        if isinstance(self.cache, KVCache):
            self.cache.join(other.cache)
        else:
            for mine, theirs in zip(self.cache.layers, other.cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
                mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.valid = torch.cat([_left_pad(self.valid, width, 1), _left_pad(other.valid, width, 1)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.keys += other.keys

    def keep(self, index: list[int]) -> None:
        at = torch.tensor(index, device=self.valid.device)
        self.valid, self.next_position, self.logits = self.valid[at], self.next_position[at], self.logits[at]
        self.keys = [self.keys[i] for i in index]
        # Cut the leading slots no live row sees (they belonged to rows that left).
        first = int(self.valid.any(0).long().argmax())
        if isinstance(self.cache, KVCache):
            self.cache.keep(at, first)  # one copy per layer: rows and slots together
            self.valid = self.valid[:, first:]
            return
        self.cache.batch_select_indices(at)
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.valid = self.valid[:, first:]


@dataclass
class StreamCounters:
    """What a sample_stream did: decode steps, and live rows summed over them (occupancy = rows/steps)."""
    steps: int = 0
    rows: int = 0

    def occupancy(self) -> float:
        return self.rows / self.steps if self.steps else 0.0


def sample_stream(runner: TargetRunner, feed: Callable[[int], list[Request]], stop_ids: Sequence[int],
                  cfg: SamplingConfig, max_batch: int, generator: Optional[torch.Generator] = None,
                  counters: Optional[StreamCounters] = None, lean: bool = True,
                  compile: bool = False) -> Iterator[tuple[Any, Generated]]:
    """Decode requests with up to max_batch rows live, refilling from feed(n) (up to n new requests,
    [] when none are ready now) as rows finish; yields (key, Generated) as each row ends. The caller
    may feed more requests after a yield (the next turn of a conversation). `counters`, when given,
    counts decode steps and live rows (a batch that runs mostly empty decodes slowly per token).
    `lean=False` decodes through the transformers forward even where the lean path applies; `compile`
    runs the lean path's one-token steps compiled (lib/eval/compiled_decode.py)."""
    stops = set(int(t) for t in stop_ids)
    device = runner.device
    decoder = runner.lean_decoder(compile) if lean else None
    step: Step = decoder.last_logits if decoder is not None else runner.last_logits
    batch: Optional[_Batch] = None
    outputs: dict[int, tuple[Generated, int]] = {}  # row -> (output so far, budget)
    serial = 0
    with runner.decoding():
        while True:
            live = 0 if batch is None else len(batch.keys)
            # Refill in chunks (each refill is a prefill forward), or whenever the batch ran dry.
            if live == 0 or max_batch - live >= max(1, max_batch // 8):
                new = feed(max_batch - live)
                if new:
                    rows = list(range(serial, serial + len(new)))
                    serial += len(new)
                    for row, (_, _, budget) in zip(rows, new):
                        outputs[row] = (Generated([], "length"), budget)
                    fresh = _prefill(step, [list(r[1]) for r in new], [(row, r[0]) for row, r in zip(rows, new)],
                                     device)
                    if batch is None:
                        batch = fresh
                    else:
                        batch.join(fresh)
            if batch is None:
                return
            tokens = pick_tokens(batch.logits, cfg, generator)
            if counters is not None:
                counters.steps += 1
                counters.rows += len(batch.keys)
            keep, finished = [], []
            for i, ((row, key), token) in enumerate(zip(batch.keys, tokens.tolist())):
                out, budget = outputs[row]
                if token in stops:
                    out.finish = "stop"
                else:
                    out.tokens.append(token)
                    if len(out.tokens) < budget:
                        keep.append(i)
                        continue
                del outputs[row]
                finished.append((key, out))
            if not keep:
                batch = None
            elif len(keep) < len(batch.keys):
                batch.keep(keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            if batch is not None:
                batch.valid = torch.cat([batch.valid, torch.ones(len(keep), 1, dtype=torch.bool, device=device)], 1)
                batch.logits, batch.cache = step(tokens[:, None], batch.next_position[:, None],
                                                 visible_keys(batch.valid, 1), batch.cache)
                batch.next_position = batch.next_position + 1
            # Yield after the step: the caller's feed() for the next turn runs between steps.
            yield from finished


def _prefill(step: Step, prompts: list[list[int]], keys: list, device: torch.device) -> _Batch:
    """Left-padded prefill of new prompts, as a batch of their own."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[b, width - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    logits, cache = step(ids, positions, visible_keys(valid, width), None)
    return _Batch(cache, valid, positions[:, -1] + 1, keys, logits)
