"""EAGLE-3's drafter for speculative decoding: chain drafting over a KV cache with holes.

EagleDrafter runs an Eagle3Draft over its own cache (HoleKVCache): one step over the verified slots,
then k-1 steps on its own output hidden, each one position further on, the way servers run the
chain (and the way training's unroll is checked against, tests/test_train_serve_consistency.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.drafts.drafting import VerifiedBlock, visible_keys
from lib.drafts.eagle3.model import Eagle3Draft


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
