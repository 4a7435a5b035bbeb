"""The experts' GEMMs as Triton kernels over expert-grouped rows (CUDA): the first projection fused with
its neighbours (gather, gate/up GEMM, SwiGLU), and the down projection.

The grouped path otherwise runs three kernels per MoE layer before the down projection: the gather of
each routed row's token state (8x the tokens, written out), torch._grouped_mm over the gathered rows
(gate|up written out, 2x the intermediate width), and the SwiGLU x routing-weight kernel reading it
back. gathered_swiglu does all three in one kernel: a program takes a tile of one expert's routed rows
and a block of intermediate features, loads the rows' token states straight from the hidden states by
index, accumulates gate and up for the same features in fp32, and writes silu(gate) * up * weight once,
in the activation dtype. grouped_down is the same program without the gather and the gate: the rows'
SwiGLU outputs times the expert's down projection (an alternative to torch._grouped_mm, whose tiles
cannot shrink for an expert's last, mostly empty rows; see small_tails).

Tiles never span two experts. The tile -> expert map is built on the device from the group ends with
a fixed number of tiles (an upper bound), so nothing about the routing reaches the host and a compiled
layer keeps one graph; tiles past the bound's real count exit at once. With small_tails an expert's
last tile runs at a quarter or half of the rows when its rows fit: the same weight blocks, fewer rows
loaded and multiplied (with near-uniform routing about half the experts end a few rows past a full tile).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _tile(x_ptr, w_ptr, row_index_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, K, N,
              GATHER: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        """out[rows, n] for one tile: x rows (by index when GATHER) times w[e] ([N or 2N, K]: gate rows then up
        rows when GATED, whose epilogue is silu(gate) * up * the rows' weights)."""
        rows = first_row + tl.arange(0, BLOCK_M)
        live = rows < group_end
        if GATHER:
            source = tl.load(row_index_ptr + rows, mask=live, other=0).to(tl.int64)
        else:
            source = rows.to(tl.int64)
        n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + source[:, None] * K + k[None, :]
        if GATED:
            expert_stride = 2 * N * K
        else:
            expert_stride = N * K
        b_ptrs = w_ptr + e.to(tl.int64) * expert_stride + n.to(tl.int64)[None, :] * K + k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # Every load of the step before the dots: loading up after the gate's dot let the compiler
            # share their buffers (32 KB of shared memory instead of 48 for the 128x128x64 tile).
            if EVEN:
                a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
                b = tl.load(b_ptrs)
                if GATED:
                    up = tl.load(b_ptrs + N * K)
            else:
                in_k = (k0 + k) < K
                in_b = in_k[:, None] & (n < N)[None, :]
                a = tl.load(a_ptrs, mask=live[:, None] & in_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=in_b, other=0.0)
                if GATED:
                    up = tl.load(b_ptrs + N * K, mask=in_b, other=0.0)
            acc = tl.dot(a, b, acc)
            if GATED:
                acc_up = tl.dot(a, up, acc_up)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if GATED:
            w = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up * w[:, None]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & (n < N)[None, :])

    @triton.jit
    def _grouped_kernel(x_ptr, w_ptr, row_index_ptr, weight_ptr, ends_ptr, tile_ends_ptr, expert_of_tile_ptr, out_ptr,
                        K, N, E, NUM_N, GATHER: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SMALL_TAILS: tl.constexpr):
        pid = tl.program_id(0)
        tile_m = pid // NUM_N
        tile_n = pid % NUM_N
        e = tl.load(expert_of_tile_ptr + tile_m)
        if e < E:
            before = tl.maximum(e - 1, 0)
            group_start = tl.where(e > 0, tl.load(ends_ptr + before), 0)
            group_end = tl.load(ends_ptr + e)
            tile_start = tl.where(e > 0, tl.load(tile_ends_ptr + before), 0)
            first_row = group_start + (tile_m - tile_start) * BLOCK_M
            if SMALL_TAILS:
                rows_left = group_end - first_row
                if rows_left <= BLOCK_M // 4:
                    _tile(x_ptr, w_ptr, row_index_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, K, N,
                          GATHER, GATED, BLOCK_M // 4, BLOCK_N, BLOCK_K, EVEN)
                elif rows_left <= BLOCK_M // 2:
                    _tile(x_ptr, w_ptr, row_index_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, K, N,
                          GATHER, GATED, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN)
                else:
                    _tile(x_ptr, w_ptr, row_index_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, K, N,
                          GATHER, GATED, BLOCK_M, BLOCK_N, BLOCK_K, EVEN)
            else:
                _tile(x_ptr, w_ptr, row_index_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, K, N,
                      GATHER, GATED, BLOCK_M, BLOCK_N, BLOCK_K, EVEN)


class Tile(NamedTuple):
    """A launch shape: rows x features x reduction step per program, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class TileMap(NamedTuple):
    """Which expert each row tile belongs to, built on the device from the group ends (see the module doc);
    one map serves every launch over the same grouping with the same block_m."""

    block_m: int
    tile_ends: torch.Tensor  # [E] int32: cumulative tiles per expert
    expert_of_tile: torch.Tensor  # [max tiles] int32: E for tiles past the real count


def fused_available(hidden: torch.Tensor) -> bool:
    """The kernels run on CUDA tensors of a 16-bit float type (tl.dot's inputs)."""
    return triton is not None and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)


def tile_map(ends: torch.Tensor, rows: int, block_m: int) -> TileMap:
    """The tile -> expert map for `rows` rows grouped by expert (ends [E], int32 group ends)."""
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tile_ends = torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0, dtype=torch.int32)
    max_tiles = -(-rows // block_m) + int(ends.shape[0])  # each expert wastes at most one partial tile
    expert_of_tile = torch.searchsorted(tile_ends, torch.arange(max_tiles, device=ends.device, dtype=torch.int32),
                                        right=True, out_int32=True)
    return TileMap(block_m, tile_ends, expert_of_tile)


def _launch(x: torch.Tensor, w: torch.Tensor, row_index, weight, ends: torch.Tensor, rows: int, n: int, k: int,
            gated: bool, tile: Tile, small_tails: bool, tiles: Optional[TileMap]) -> torch.Tensor:
    if tiles is None or tiles.block_m != tile.block_m:
        tiles = tile_map(ends, rows, tile.block_m)
    out = x.new_empty(rows, n)
    num_n = triton.cdiv(n, tile.block_n)
    gather = row_index is not None
    _grouped_kernel[(tiles.expert_of_tile.shape[0] * num_n,)](
        x.contiguous(), w, row_index.contiguous() if gather else x, weight.contiguous() if gated else x, ends,
        tiles.tile_ends, tiles.expert_of_tile, out, k, n, int(w.shape[0]), num_n, GATHER=gather, GATED=gated,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN=k % tile.block_k == 0 and n % tile.block_n == 0, SMALL_TAILS=small_tails,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


# The tile shapes measured fastest on the H200 for the Qwen3-30B-A3B layer (bench/moe_parts.py, 2026-11-29,
# ninth session, two machines): first projection 0.817 / 0.830 ms at 128x128x64, 8 warps, 3 stages, small
# tails, against 0.850 / 0.855 at 4 stages without and 0.887 / 0.885 for gather + torch._grouped_mm + the
# SwiGLU kernel (2 stages: 1.20; 256-row tiles spill, tools/triton_sm90_check.py). Down projection 0.429 /
# 0.428 ms at 128x256x64/8/3 with small tails against torch._grouped_mm's 0.464 / 0.417: a draw, and the
# capture ran faster with torch's (lib/engine/moe.py's TRITON_DOWN_PROJECTION).
FIRST_PROJECTION_TILE = Tile(128, 128, 64, 8, 3)
DOWN_PROJECTION_TILE = Tile(128, 256, 64, 8, 3)


def gathered_swiglu(hidden: torch.Tensor, gate_up: torch.Tensor, token: torch.Tensor, weight: torch.Tensor,
                    ends: torch.Tensor, tile: Tile = FIRST_PROJECTION_TILE, small_tails: bool = True,
                    tiles: Optional[TileMap] = None) -> torch.Tensor:
    """hidden [T, H], gate_up [E, 2I, H] (gate rows, then up rows), token [R] (each routed row's token, rows
    grouped by expert), weight [R], ends [E] (int32 group ends) -> [R, I]: silu(x W_g) * (x W_u) * weight."""
    # Plain ints: the weights never change shape, and under torch.compile with dynamic shapes a symbolic
    # width passed to the kernel failed in dynamo (torch 2.11) when the weights were graph inputs.
    two_i, width = int(gate_up.shape[1]), int(gate_up.shape[2])
    return _launch(hidden, gate_up, token, weight, ends, token.numel(), two_i // 2, width, True, tile, small_tails,
                   tiles)


def grouped_down(h: torch.Tensor, down: torch.Tensor, ends: torch.Tensor, tile: Tile = DOWN_PROJECTION_TILE,
                 small_tails: bool = True, tiles: Optional[TileMap] = None) -> torch.Tensor:
    """h [R, I] (rows grouped by expert), down [E, H, I], ends [E] (int32 group ends) -> [R, H]: each row
    times its expert's down projection (torch._grouped_mm(h, down.transpose(1, 2), offs=ends))."""
    hidden, inter = int(down.shape[1]), int(down.shape[2])
    return _launch(h, down, None, None, ends, h.shape[0], hidden, inter, False, tile, small_tails, tiles)
