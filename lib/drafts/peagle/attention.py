"""P-EAGLE's training attention over the sampled slots of a packed batch (lib/drafts/peagle/sampling.py).

Slot (a, d) attends to
  - the real slots s of a's sample with s <= a (anchor-causal: what the target has verified when a is
    the newest slot), and
  - the mask slots (a, 1) .. (a, d) of its own chain (for d >= 1; itself included).
That is speculators' create_peagle_mask_mod. The first part is one attention of all N queries over the
T real slots' keys that also returns its log-sum-exp; the chain keys (at most k-1 per query) are merged
into it exactly through that log-sum-exp (EAGLE-3's merge_diagonal), so no [N, N] score or mask exists.

Back ends for the first part, as EAGLE-3's TTTAttention: "reference" (explicit masked math in fp32 or
wider, one sample at a time: CPU and tests) and "flex" (flex_attention with a block-sparse mask of Q_LEN
N by KV_LEN T, compiled: GPU).
"""
from __future__ import annotations

from typing import Optional

import torch

from lib.drafts.eagle3.attention import (BACKENDS, FLEX_MIN_HEAD_DIM, _compiled_flex, document_ids, flex_with_lse,
                                         merge_diagonal)
from lib.drafts.peagle.sampling import Slots


class ParallelAttention:
    """Per-batch: built once from the slots, called once per layer with that layer's q, k, v [N, H, D]."""

    def __init__(self, slots: Slots, cu_seqlens: torch.Tensor, scale: float, backend: str = "auto",
                 device: Optional[torch.device] = None, head_dim: Optional[int] = None):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend={backend!r}: use one of {list(BACKENDS)}")
        device = device if device is not None else slots.anchor.device
        if backend == "auto":
            small_heads = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
            backend = "flex" if device.type == "cuda" and not small_heads else "reference"
        tokens = slots.tokens
        if int(cu_seqlens[-1]) != tokens:
            raise ValueError(f"cu_seqlens[-1]={int(cu_seqlens[-1])} != the {tokens} real slots: the slots were "
                             f"sampled for another batch")
        self.backend, self.scale, self.tokens = backend, scale, tokens
        self.slots = slots.to(device)
        self.doc = document_ids(cu_seqlens.to(device), tokens)
        self.query_doc = self.doc[self.slots.anchor]
        # Per depth d >= 1: (first slot, last slot + 1, [slot index of (a, 1..d) for each of its anchors]).
        table = self.slots.chain_index()
        self.chains = []
        for d, (start, n) in enumerate(zip(self.slots.starts(), self.slots.counts)):
            if d == 0 or n == 0:
                continue
            anchors = self.slots.anchor[start:start + n]
            links = table[1:d + 1, anchors]
            if bool((links < 0).any()):
                raise ValueError(f"a depth-{d} slot's chain misses an earlier depth: slots must hold (a, 1..d-1) "
                                 f"for every (a, d) (sampling.cod_sample keeps chains whole)")
            self.chains.append((start, start + n, list(links)))
        if backend == "reference":
            order = torch.argsort(self.query_doc, stable=True)
            self.order, self.inverse = order, torch.argsort(order)
            bounds = cu_seqlens.to(torch.long).tolist()
            per_doc = torch.bincount(self.query_doc, minlength=len(bounds) - 1).tolist()
            self.blocks = [(bounds[i], bounds[i + 1], n) for i, n in enumerate(per_doc)]
        else:
            self.block_mask = self._block_mask(device)

    def _block_mask(self, device: torch.device):
        doc, query_doc, anchor = self.doc, self.query_doc, self.slots.anchor

        def anchor_causal(b, h, q_idx, kv_idx):
            return (query_doc[q_idx] == doc[kv_idx]) & (kv_idx <= anchor[q_idx])

        return _compiled_flex("create_block_mask")(anchor_causal, None, None, anchor.numel(), self.tokens,
                                                   device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D]; k, v [N, Hkv, D] of every slot. Returns [N, Hq, D]."""
        if q.shape[0] != self.slots.anchor.numel() or k.shape[0] != q.shape[0]:
            raise ValueError(f"attention over {self.slots.anchor.numel()} slots got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        real_k, real_v = k[:self.tokens], v[:self.tokens]
        out, lse = (flex_with_lse(q, real_k, real_v, self.block_mask, self.scale) if self.backend == "flex"
                    else self._reference(q, real_k, real_v))
        parts = [out[:self.tokens].to(q.dtype)]
        for start, end, links in self.chains:
            parts.append(merge_diagonal(q[start:end], out[start:end], lse[start:end], [k[i] for i in links],
                                        [v[i] for i in links], self.scale))
        return torch.cat(parts)

    def _reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        dtype = torch.promote_types(q.dtype, torch.float32)
        group = q.shape[1] // k.shape[1]
        qh = q[self.order].to(dtype).transpose(0, 1)  # [Hq, N, D], sorted by sample
        anchor = self.slots.anchor[self.order]
        kh = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vh = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        outs, lses, first = [], [], 0
        for start, end, n in self.blocks:
            if n == 0:
                continue
            rows = slice(first, first + n)
            first += n
            scores = torch.matmul(qh[:, rows], kh[:, start:end].transpose(-1, -2)) * self.scale
            seen = torch.arange(start, end, device=q.device)[None, :] <= anchor[rows, None]
            scores = scores.masked_fill(~seen, float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)  # every slot sees its anchor's real slot
            outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vh[:, start:end]))
            lses.append(lse)
        out = torch.cat(outs, dim=1).transpose(0, 1)[self.inverse]
        return out, torch.cat(lses, dim=1).transpose(0, 1)[self.inverse]
