"""DFlash training blocks over one packed batch: anchors, block inputs/labels, and the attention mask.

Layout: the keys are [context (the T packed tokens' projected target states) ; the N*B block tokens],
the queries are the N*B block tokens, block n = [x[a_n], mask, ..., mask] at positions
pos[a_n] .. pos[a_n]+B-1. A query of block n sees
  - context token t iff t is in a_n's sequence and t < a_n (what the target has verified when x[a_n]
    is the newest token: at serving time the anchor is the bonus token, which has no target state yet);
  - every token of block n (bidirectional inside the block), and nothing of other blocks.
Block position j >= 1 predicts x[a_n + j]; it carries a loss iff a_n + j is inside the sequence and
loss_mask there is set. `dense_attention` builds that mask as a tensor (CPU, the reference);
`flex_attention_fn` expresses it as a flex-attention mask_mod (GPU); tests compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


def document_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """[T] index of each packed token's sequence."""
    cu = cu_seqlens.to(torch.long)
    return torch.bucketize(torch.arange(tokens, device=cu.device), cu[1:], right=True)


@dataclass
class Blocks:
    anchors: torch.Tensor  # [N] packed index of each block's anchor, ascending
    ids: torch.Tensor  # [N*B] draft input ids
    positions: torch.Tensor  # [N*B] rotary positions
    labels: torch.Tensor  # [N*B] target ids, IGNORE where no loss
    doc: torch.Tensor  # [T] sequence index of each context token
    block_size: int

    @property
    def num_blocks(self) -> int:
        return int(self.anchors.numel())

    def valid(self) -> torch.Tensor:
        return self.labels != IGNORE


def anchor_candidates(loss_mask: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """Packed indices a whose next token a+1 is in the same sequence and carries a loss."""
    tokens = loss_mask.shape[0]
    nxt = torch.arange(1, tokens + 1, device=loss_mask.device).clamp(max=tokens - 1)
    ok = (doc[nxt] == doc) & loss_mask.bool()[nxt]
    ok[-1] = False
    return ok.nonzero().flatten()


def sample_anchors(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int, max_anchors: Optional[int],
                   generator: torch.Generator) -> torch.Tensor:
    """Random anchors without replacement: max_anchors, default ceil(T / block_size) (as many block tokens
    as context tokens), at most the number of candidates; sorted ascending."""
    tokens = loss_mask.shape[0]
    doc = document_ids(cu_seqlens.to(loss_mask.device), tokens)
    cand = anchor_candidates(loss_mask, doc)
    limit = math.ceil(tokens / block_size) if max_anchors is None else int(max_anchors)
    count = min(limit, cand.numel())
    pick = torch.randperm(cand.numel(), generator=generator)[:count].to(cand.device)
    return cand[pick].sort().values


def build_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int) -> Blocks:
    tokens, device = input_ids.shape[0], input_ids.device
    doc = document_ids(cu_seqlens.to(device), tokens)
    anchors = anchors.to(device=device, dtype=torch.long)
    offsets = torch.arange(block_size, device=device)
    idx = anchors[:, None] + offsets[None]  # [N, B]
    inside = (idx < tokens)
    idx_c = idx.clamp(max=tokens - 1)
    inside &= doc[idx_c] == doc[anchors][:, None]
    has_loss = inside & loss_mask.bool()[idx_c] & (offsets[None] >= 1)
    labels = torch.where(has_loss, input_ids[idx_c], torch.full_like(idx_c, IGNORE))
    ids = torch.full_like(idx, mask_token_id)
    ids[:, 0] = input_ids[anchors]
    positions = position_ids[anchors][:, None] + offsets[None]
    return Blocks(anchors, ids.flatten(), positions.flatten(), labels.flatten(), doc, block_size)


def dense_mask(blocks: Blocks) -> torch.Tensor:
    """[N*B, T + N*B] bool, True = visible."""
    tokens, b = blocks.doc.shape[0], blocks.block_size
    q_block = torch.arange(blocks.num_blocks * b, device=blocks.doc.device) // b
    q_anchor = blocks.anchors[q_block]
    t = torch.arange(tokens, device=blocks.doc.device)
    ctx = (blocks.doc[None, :] == blocks.doc[q_anchor][:, None]) & (t[None, :] < q_anchor[:, None])
    own = q_block[:, None] == q_block[None, :]
    return torch.cat([ctx, own], 1)


def dense_attention(blocks: Blocks):
    """The reference: scaled dot-product attention under the materialised mask."""
    mask = dense_mask(blocks)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None],
                                              enable_gqa=q.shape[1] != k.shape[1])
    return attn


_COMPILED_FLEX = None
# Tuning knobs of the flex kernels, set before the first call (bench/dflash_trainer.py sweeps them):
# torch.compile's mode for flex_attention ("max-autotune-no-cudagraphs" lets Inductor time its tile
# configurations) and explicit kernel_options (e.g. {"BLOCK_M1": 64, "BLOCK_N1": 64}). None: torch's defaults.
FLEX_COMPILE_MODE: Optional[str] = None
FLEX_KERNEL_OPTIONS: Optional[dict] = None
FLEX_TILE = 128  # the BlockMask's tile (create_block_mask's default)


def context_starts(blocks: Blocks) -> torch.Tensor:
    """[N] packed index where each block's anchor's sequence starts: block n sees context [start, a_n)."""
    return torch.searchsorted(blocks.doc, blocks.doc[blocks.anchors])


def flex_mask_mod(blocks: Blocks):
    """dense_mask as a flex mask_mod. Only per-query values are looked up (the block's context interval),
    never per-key ones, so the kernel's partial tiles stay cheap; a key past the context (kv >= T) is
    never below the anchor, so the context test needs no bound of its own."""
    tokens, b, anchors, starts = blocks.doc.shape[0], blocks.block_size, blocks.anchors, context_starts(blocks)

    def mask_mod(_b, _h, q, kv):
        n = q // b
        ctx = (kv >= starts[n]) & (kv < anchors[n])
        own = (kv >= tokens) & ((kv - tokens) // b == n)
        return ctx | own
    return mask_mod


def _tiles_to_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Qt, Kt] bool -> (count [1, 1, Qt], ascending kv tile indices first [1, 1, Qt, Kt]), as BlockMask keeps them."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


def tile_block_mask(blocks: Blocks, mask_mod, tile: int = FLEX_TILE):
    """The BlockMask of `mask_mod` (flex_mask_mod's) built from the block layout, one entry per
    (query tile, key tile), instead of evaluating mask_mod on every (query, key) pair: that dense
    pass makes several [N*B, T + N*B] temporaries (GBs at 8k tokens) and Python work every step.

    A query tile holds tile/B whole blocks. Block n sees context keys [start of its sequence, a_n) and
    its own B keys, so a context key tile is visible if it meets any block's interval and full if it
    lies inside every block's (only for complete tiles); the own-key tiles are always partial.
    """
    from torch.nn.attention.flex_attention import BlockMask

    tokens, b, n, device = blocks.doc.shape[0], blocks.block_size, blocks.num_blocks, blocks.doc.device
    per_tile, q_len = tile // b, n * b
    kv_len = tokens + q_len
    q_tiles, kv_tiles = -(-q_len // tile), -(-kv_len // tile)
    slot = torch.arange(q_tiles * per_tile, device=device)
    exists = slot < n
    pick = slot.clamp(max=n - 1)
    lo = context_starts(blocks)[pick]
    hi = torch.where(exists, blocks.anchors[pick], lo)  # a missing block (past the last) sees no context
    lo, hi = lo.view(q_tiles, per_tile, 1), hi.view(q_tiles, per_tile, 1)
    start = torch.arange(kv_tiles, device=device) * tile
    end = start + tile
    in_ctx = end <= tokens  # wholly context keys
    meets = ((start < hi) & (end.clamp(max=tokens) > lo) & (start < tokens)).any(1)
    q_whole = (torch.arange(q_tiles, device=device) + 1) * tile <= q_len
    full = ((lo <= start) & (end <= hi)).all(1) & in_ctx & q_whole[:, None]
    own_start = tokens + torch.arange(q_tiles, device=device)[:, None] * tile
    own = (start < own_start + tile) & (end > own_start) & (start < kv_len)
    partial = (meets | own) & ~full
    return BlockMask.from_kv_blocks(*_tiles_to_indices(partial), *_tiles_to_indices(full), BLOCK_SIZE=tile,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def flex_attention_fn(blocks: Blocks, compiled: bool = True):
    """The same mask as a flex-attention BlockMask: only the tiles with visible keys are computed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _COMPILED_FLEX
    tokens, b = blocks.doc.shape[0], blocks.block_size
    queries = blocks.num_blocks * b
    mask_mod = flex_mask_mod(blocks)
    if FLEX_TILE % b == 0:
        block_mask = tile_block_mask(blocks, mask_mod)
    else:
        block_mask = create_block_mask(mask_mod, 1, None, queries, tokens + queries, device=blocks.doc.device,
                                       BLOCK_SIZE=FLEX_TILE)
    if compiled and _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True, mode=FLEX_COMPILE_MODE)
    fn = _COMPILED_FLEX if compiled else flex_attention

    def attn(q, k, v):
        return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
                  kernel_options=FLEX_KERNEL_OPTIONS)
    return attn
