"""P-EAGLE's drafter for speculative decoding: k tokens from one draft forward per round.

Each round the verified slots (the target's aux state at p with the token after p) and k-1 mask slots at
the next positions after the newest kept slot go through the layer stack together, once. Per layer the
keys/values of every verified slot are kept (with the decode loop's validity mask: rejected slots stay
as holes); a verified slot depends only on the slots before it, so they are exact next round too. The
mask slots see every kept slot and the mask slots before them, as in training (attention.py), and are
dropped after the round. The newest kept slot's output proposes token 1, mask slot j token j+1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lib.drafts.drafting import VerifiedBlock, visible_keys
from lib.drafts.eagle3.drafter import EagleDrafter
from lib.drafts.peagle.model import PEagleDraft


class PEagleDrafter(EagleDrafter):
    """EagleDrafter's target checks and parameter count; its own caches and one-forward proposal."""

    def __init__(self, draft: PEagleDraft):
        super().__init__(draft)
        self.forwards = 0  # draft forwards run (one per round)
        self.start()

    def start(self) -> None:
        # Per layer (keys, values) [B, L, Hkv, D] of the verified slots, and their validity [B, L].
        self.kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self.valid: Optional[torch.Tensor] = None

    def keep(self, rows: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]
            self.valid = self.valid[rows]

    @staticmethod
    def draft_forwards(k: int) -> int:
        """Draft forwards per round of k proposals (lib/eval/spec_decode.py charges the draft that many)."""
        return 1

    @torch.no_grad()
    def draft_logits(self, block: VerifiedBlock, k: int) -> torch.Tensor:
        """[B, k, draft_vocab]: the logits of the k proposals after `block`, caching its slots."""
        draft: PEagleDraft = self.draft
        c = draft.config
        if not 1 <= k <= c.num_depths:
            raise ValueError(f"k={k} draft tokens: this P-EAGLE draft proposes 1 to {c.num_depths} per forward "
                             f"(its trained depths); set eval.draft_tokens to values <= {c.num_depths}")
        n, slots = block.next_ids.shape
        masks = k - 1
        device = block.next_ids.device
        pick = torch.arange(n, device=device)
        ids = torch.cat([block.next_ids, torch.full((n, masks), c.mask_token_id, dtype=torch.long, device=device)], 1)
        offsets = torch.arange(1, masks + 1, device=device)
        positions = torch.cat([block.positions, block.positions[pick, block.last][:, None] + offsets], 1)
        hidden = draft.slot_hidden(block.aux.to(draft.fc.weight.dtype), masks)
        valid = block.valid if self.valid is None else torch.cat([self.valid, block.valid], 1)
        # Verified slots see the valid slots up to their own; mask slots every valid slot (all precede
        # them: slots after the newest kept one are invalid) and the mask slots up to their own.
        seen_real = torch.cat([visible_keys(valid, slots), valid[:, None, :].expand(n, masks, -1)], 1)
        chain = torch.ones(masks, masks, dtype=torch.bool, device=device).tril()
        seen_mask = torch.cat([torch.zeros(n, slots, masks, dtype=torch.bool, device=device),
                               chain.expand(n, masks, masks)], 1)
        seen = torch.cat([seen_real, seen_mask], 2)[:, None]  # [B, 1, S + k - 1, L + S + k - 1]
        new_kv = []

        def attend(layer: int, q, key, value):
            new_kv.append((key[:, :slots], value[:, :slots]))
            if self.kv is not None:
                key = torch.cat([self.kv[layer][0], key], 1)
                value = torch.cat([self.kv[layer][1], value], 1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=seen, scale=draft.layers[layer].self_attn.scale,
                                                 enable_gqa=q.shape[2] != key.shape[2])
            return out.transpose(1, 2)

        out = draft.run_layers(ids, hidden, positions, attend)
        self.forwards += 1
        self.kv = new_kv if self.kv is None else [(torch.cat([k0, k1], 1), torch.cat([v0, v1], 1))
                                                  for (k0, v0), (k1, v1) in zip(self.kv, new_kv)]
        self.valid = valid
        proposing = torch.cat([out[pick, block.last][:, None], out[:, slots:]], 1)
        return draft.compute_logits(proposing)

    def propose(self, block: VerifiedBlock, k: int, rows: list[int], generated: list[int]) -> torch.Tensor:
        return self.draft.draft_to_target_ids(self.draft_logits(block, k).argmax(-1))
