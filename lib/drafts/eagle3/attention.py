"""Attention of the EAGLE-3 draft: the training-time-test (TTT) attention and the cached inference one.

TTT attention (training). At unroll step i the query at packed position t attends
  - the step-0 keys k_0[s] of its own sample with s <= t (document-causal), and
  - the keys k_1[t] .. k_i[t] that steps 1..i produced at the same position t (the "diagonal").
The document-causal part is one attention call that also returns its log-sum-exp; the i diagonal
scores are merged into it exactly through that log-sum-exp, so no step ever attends over a
concatenated cache and nothing of size [heads, T, T] exists on the GPU path.

Two back ends compute the document-causal part: "reference" (explicit masked math, fp32 or wider,
materialises [heads, T, T]: CPU and tests) and "flex" (torch flex_attention, compiled, with a
block-sparse document-causal mask built once per batch: GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "flex")
# flex_attention's compiled kernel refuses smaller heads (torch 2.11 lowering); tiny drafts fall back.
FLEX_MIN_HEAD_DIM = 16
_compiled = {}


def document_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sample index of every packed position, without a host sync."""
    bounds = cu_seqlens[1:].to(torch.int64)
    return torch.searchsorted(bounds, torch.arange(num_tokens, device=bounds.device), right=True)


def _compiled_flex(name: str):
    """flex_attention / create_block_mask, compiled once for dynamic sequence length (packed batches
    change length every step)."""
    if name not in _compiled:
        from torch.nn.attention import flex_attention as flex
        _compiled[name] = torch.compile(getattr(flex, name), dynamic=True)
    return _compiled[name]


def flex_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float):
    """(out [N, Hq, D], lse [N, Hq]) of compiled flex_attention under block_mask; q [N, Hq, D], k, v
    [T, Hkv, D] (grouped heads when Hq != Hkv)."""
    from torch.nn.attention.flex_attention import AuxRequest
    out, aux = _compiled_flex("flex_attention")(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
    return out.squeeze(0).transpose(0, 1), aux.lse.squeeze(0).transpose(0, 1)


class TTTAttention:
    """Per-batch TTT attention: build once from cu_seqlens, call once per unroll step."""

    def __init__(self, cu_seqlens: torch.Tensor, num_tokens: int, scale: float, backend: str = "auto",
                 device: Optional[torch.device] = None, head_dim: Optional[int] = None):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend={backend!r}: use one of {list(BACKENDS)}")
        device = device if device is not None else cu_seqlens.device
        if backend == "auto":
            small_heads = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
            backend = "flex" if device.type == "cuda" and not small_heads else "reference"
        if int(cu_seqlens[-1]) != num_tokens:
            raise ValueError(f"cu_seqlens[-1]={int(cu_seqlens[-1])} != number of packed tokens {num_tokens}: "
                             f"cu_seqlens must end at the total token count")
        self.backend, self.scale, self.num_tokens = backend, scale, num_tokens
        self.doc = document_ids(cu_seqlens.to(device), num_tokens)
        self.bounds = [int(b) for b in cu_seqlens.tolist()] if backend == "reference" else []
        self.block_mask = self._build_block_mask(device) if backend == "flex" else None

    def _build_block_mask(self, device: torch.device):
        doc = self.doc

        def same_sample_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        return _compiled_flex("create_block_mask")(same_sample_causal, None, None, self.num_tokens, self.num_tokens,
                                                   device=device)

    def __call__(self, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """q [T, Hq, D]; keys/values: [k_0, k_1, .., k_i] each [T, Hkv, D] (k_0 = step 0). Returns [T, Hq, D]."""
        if len(keys) != len(values) or not keys:
            raise ValueError(f"TTT attention needs matching non-empty key/value lists, got {len(keys)} keys and "
                             f"{len(values)} values")
        if q.shape[1] % keys[0].shape[1]:
            raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {keys[0].shape[1]}")
        if self.backend == "flex":
            out, lse = flex_with_lse(q, keys[0], values[0], self.block_mask, self.scale)
        else:
            out, lse = self._reference(q, keys[0], values[0])
        if len(keys) == 1:
            return out.to(q.dtype)
        return merge_diagonal(q, out, lse, keys[1:], values[1:], self.scale)

    def _reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        dtype = torch.promote_types(q.dtype, torch.float32)
        group = q.shape[1] // k.shape[1]
        qh = q.to(dtype).transpose(0, 1)  # [Hq, T, D]
        kh = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vh = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        # One sample at a time: the cost is the sum of the squares of the sample lengths, not the
        # square of the packed length (a packed CPU batch holds many short samples).
        outs, lses = [], []
        for start, end in zip(self.bounds[:-1], self.bounds[1:]):
            if end == start:
                continue
            scores = torch.matmul(qh[:, start:end], kh[:, start:end].transpose(-1, -2)) * self.scale
            causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]; every row sees at least itself
            outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vh[:, start:end]))
            lses.append(lse)
        return torch.cat(outs, dim=1).transpose(0, 1), torch.cat(lses, dim=1).transpose(0, 1)


def merge_diagonal(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Exactly add same-position keys to an attention result known by its output and log-sum-exp.

    softmax over (A ∪ D) = exp(lse_A - lse) * softmax_A + sum_j exp(d_j - lse) * v_j, with
    lse = logsumexp(lse_A, d_1, ..); computed in fp32 (or wider) and returned in q's dtype.
    """
    tokens, heads, dim = q.shape
    kv_heads = keys[0].shape[1]
    group = heads // kv_heads
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(tokens, kv_heads, group, dim)
    scores = [lse.to(dtype)]
    for k in keys:
        scores.append((qg * k.to(dtype).unsqueeze(2)).sum(-1).reshape(tokens, heads) * scale)
    stacked = torch.stack(scores, dim=-1)  # [T, Hq, 1 + n]
    weights = torch.exp(stacked - torch.logsumexp(stacked, dim=-1, keepdim=True))
    merged = (weights[..., 0:1] * out.to(dtype)).view(tokens, kv_heads, group, dim)
    for j, v in enumerate(values, start=1):
        merged = merged + weights[..., j].reshape(tokens, kv_heads, group, 1) * v.to(dtype).unsqueeze(2)
    return merged.reshape(tokens, heads, dim).to(q.dtype)


class DraftKVCache:
    """Keys/values of earlier positions for inference; B rows share one length. truncate() rolls back
    rejected draft positions."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None  # [B, L, Hkv, D]
        self.values: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[1])

    def append(self, k: torch.Tensor, v: torch.Tensor):
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            if k.shape[0] != self.keys.shape[0]:
                raise ValueError(f"cache holds {self.keys.shape[0]} rows, got {k.shape[0]}: use one cache per batch")
            self.keys, self.values = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :length], self.values[:, :length]


def cached_causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, S, Hq, D] are the last S of the L cached positions; each attends to cached positions <= its own."""
    new, total = q.shape[1], keys.shape[1]
    query_pos = torch.arange(total - new, total, device=q.device)
    allowed = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]  # [S, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed, scale=scale, enable_gqa=q.shape[2] != keys.shape[2])
    return out.transpose(1, 2)
