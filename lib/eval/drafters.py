"""Drafters for lib.eval.spec_decode: what proposes the k tokens of a round, and the slot-mask helpers
the decode loop shares with them.

EagleDrafter runs an Eagle3Draft over its own cache with holes (HoleKVCache): slots a row rejected
stay and are hidden by the mask, so rows that accept different counts share one batch. ForcedDrafter
proposes from the target's own greedy continuation, to test the loop at tau = k+1 and tau = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from lib.drafts.eagle3.model import Eagle3Draft

FORCED_MODES = ("oracle", "wrong")


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


class HoleKVCache:
    """The draft's keys/values per slot for B rows; `valid` marks the slots of each row's sequence."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None  # [B, L, Hkv, D]
        self.values: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None  # [B, L] bool

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[1])

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        if self.keys is None:
            self.keys, self.values, self.valid = k, v, valid
        else:
            self.keys = torch.cat([self.keys, k], dim=1)
            self.values = torch.cat([self.values, v], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)
        return self.keys, self.values, visible_keys(self.valid, k.shape[1])

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = self.keys[:, :length], self.values[:, :length], self.valid[:, :length]

    def select(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = self.keys[rows], self.values[rows], self.valid[rows]


def draft_step(draft: Eagle3Draft, cache: HoleKVCache, ids: torch.Tensor, hidden: torch.Tensor, is_projected: bool,
               positions: torch.Tensor, valid: torch.Tensor):
    """Eagle3Draft.forward_infer over a cache with holes: the same layer composition, with the slot
    mask in the attention. Returns (draft logits [B, S, draft_vocab], out_hidden [B, S, H])."""
    h = hidden.to(draft.fc.weight.dtype) if is_projected else draft.project_hidden(hidden)
    cos, sin = draft.rope(positions, h.dtype)
    q, k, v = draft.midlayer.attention_inputs(draft.embed(ids), h, cos, sin)
    keys, values, visible = cache.append(k, v, valid)
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                          attn_mask=visible[:, None], scale=draft.midlayer.self_attn.scale,
                                          enable_gqa=q.shape[2] != keys.shape[2])
    out = draft.midlayer.finish(attn.transpose(1, 2), h)
    return draft.compute_logits(out), out


class Drafter(Protocol):
    aux_layers: list[int]  # target layers whose outputs the drafter reads (empty: none)

    def start(self) -> None: ...  # a new batch begins
    def keep(self, rows: torch.Tensor) -> None: ...  # finished rows leave the batch
    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor: ...
    # Optional: check_target(runner) raises if the draft was built for another target or device;
    # num_parameters() -> weights one draft forward multiplies by (for speedup_params; None if unknown).


class EagleDrafter:
    """Chain drafting with an Eagle3Draft: one step over the verified slots, then k-1 steps on its own
    out_hidden. The chain's slots are dropped after proposing: next round re-reads the kept tokens
    with the target's aux states."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        self.aux_layers = list(draft.config.aux_layer_ids)
        self.cache = HoleKVCache()

    def start(self) -> None:
        self.cache = HoleKVCache()

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)

    def num_parameters(self) -> int:
        """Weights a draft forward multiplies by: all but the embedding lookup."""
        return sum(p.numel() for name, p in self.draft.named_parameters() if name != "embed_tokens.weight")

    def check_target(self, runner) -> None:
        """The draft was built for this target (vocab, hidden size, layers) and sits on its device."""
        cfg = self.draft.config
        device = self.draft.fc.weight.device
        if device != runner.device:
            raise ValueError(f"draft is on {device}, target on {runner.device}: move the draft with draft.to(device)")
        if cfg.vocab_size != runner.vocab_size or cfg.target_hidden_size != runner.lm_head.shape[1]:
            raise ValueError(f"draft was built for vocab {cfg.vocab_size} / hidden {cfg.target_hidden_size}, the "
                             f"target has {runner.vocab_size} / {runner.lm_head.shape[1]}: evaluate it with its own "
                             f"target")
        layers = len(runner.base.layers)
        if any(not 0 <= i < layers for i in cfg.aux_layer_ids):
            raise ValueError(f"draft aux_layer_ids={cfg.aux_layer_ids} are outside the target's {layers} layers")

    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        draft = self.draft
        logits, hidden = draft_step(draft, self.cache, block.next_ids, block.aux, False, block.positions, block.valid)
        pick = torch.arange(len(rows), device=logits.device)
        logits, hidden, position = logits[pick, block.last], hidden[pick, block.last], block.positions[pick, block.last]
        verified_length = self.cache.length
        chain_valid = torch.ones(len(rows), 1, dtype=torch.bool, device=logits.device)
        tokens = []
        for step in range(k):
            token = draft.draft_to_target_ids(logits.argmax(-1))
            tokens.append(token)
            if step + 1 < k:
                position = position + 1
                logits, hidden = draft_step(draft, self.cache, token[:, None], hidden[:, None], True,
                                            position[:, None], chain_valid)
                logits, hidden = logits[:, 0], hidden[:, 0]
        self.cache.truncate(verified_length)
        return torch.stack(tokens, dim=1)


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
