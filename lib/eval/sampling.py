"""Batched sampling with the target's KV cache: the decoding behind tools/regenerate.py.

Rows are left-padded so every row's newest token sits in the last slot; padding is hidden by the
explicit [B, S, L] mask and positions follow each row's own tokens, so a row decodes as it would
alone. Finished rows leave the batch (the cache keeps only the live rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lib.drafts.drafting import visible_keys
from lib.eval.target import TargetRunner


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


def sample_batch(runner: TargetRunner, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                 stop_ids: Sequence[int], cfg: SamplingConfig,
                 generator: Optional[torch.Generator] = None) -> list[Generated]:
    """Decode each prompt up to its own budget of new tokens (or a stop token), all rows in one batch."""
    device, n = runner.device, len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        valid[b, width - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    stops = set(int(t) for t in stop_ids)
    out = [Generated([], "length") for _ in prompts]
    rows = list(range(n))
    with runner.decoding():
        logits, cache = runner.last_logits(ids, positions, visible_keys(valid, width), None)
        next_position = positions[:, -1] + 1
        while True:
            tokens = pick_tokens(logits, cfg, generator)
            live = []
            for i, (r, token) in enumerate(zip(rows, tokens.tolist())):
                if token in stops:
                    out[r].finish = "stop"
                    continue
                out[r].tokens.append(token)
                if len(out[r].tokens) < budgets[r]:
                    live.append(i)
            if not live:
                return out
            if len(live) < len(rows):
                index = torch.tensor(live, device=device)
                cache.batch_select_indices(index)
                valid, next_position, tokens = valid[index], next_position[index], tokens[index]
                rows = [rows[i] for i in live]
            valid = torch.cat([valid, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], 1)
            logits, cache = runner.last_logits(tokens[:, None], next_position[:, None], visible_keys(valid, 1), cache)
            next_position = next_position + 1
