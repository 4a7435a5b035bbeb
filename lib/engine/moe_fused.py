"""The experts' first projection fused with its neighbours (CUDA with Triton): gather, gate/up GEMM, SwiGLU.

The grouped path otherwise runs three kernels per MoE layer before the down projection: the gather of
each routed row's token state (8x the tokens, written out), torch._grouped_mm over the gathered rows
(gate|up written out, 2x the intermediate width), and the SwiGLU x routing-weight kernel reading it
back. Here one Triton kernel does all three: a program takes a tile of one expert's routed rows and a
block of intermediate features, loads the rows' token states straight from the hidden states by index,
accumulates gate and up for the same features in fp32, and writes silu(gate) * up * weight once, in
the activation dtype.

Tiles never span two experts. The tile -> expert map is built on the device from the group ends with
a fixed number of tiles (an upper bound), so nothing about the routing reaches the host and a compiled
layer keeps one graph; tiles past the bound's real count exit at once.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _swiglu_tile(hidden_ptr, w_ptr, token_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, H, I,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rows = first_row + tl.arange(0, BLOCK_M)
        live = rows < group_end
        token = tl.load(token_ptr + rows, mask=live, other=0).to(tl.int64)
        n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        a_ptrs = hidden_ptr + token[:, None] * H + k[None, :]
        gate_ptrs = w_ptr + e.to(tl.int64) * 2 * I * H + n.to(tl.int64)[None, :] * H + k[:, None]
        up_ptrs = gate_ptrs + I * H
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if EVEN:
                a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
                gate = tl.load(gate_ptrs)
                up = tl.load(up_ptrs)
            else:
                in_k = (k0 + k) < H
                in_n = n < I
                a = tl.load(a_ptrs, mask=live[:, None] & in_k[None, :], other=0.0)
                gate = tl.load(gate_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
                up = tl.load(up_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc_gate = tl.dot(a, gate, acc_gate)
            acc_up = tl.dot(a, up, acc_up)
            a_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        w = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up * w[:, None]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * I + n[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & (n < I)[None, :])

    @triton.jit
    def _gathered_swiglu_kernel(hidden_ptr, w_ptr, token_ptr, weight_ptr, ends_ptr, tile_ends_ptr, expert_of_tile_ptr,
                                out_ptr, H, I, E, NUM_N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SMALL_TAILS: tl.constexpr):
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
                # An expert's last tile is mostly empty about as often as not; it runs at a quarter or half of
                # the rows when its rows fit (the same weight blocks, fewer rows loaded and multiplied).
                rows_left = group_end - first_row
                if rows_left <= BLOCK_M // 4:
                    _swiglu_tile(hidden_ptr, w_ptr, token_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n,
                                 H, I, BLOCK_M // 4, BLOCK_N, BLOCK_K, EVEN)
                elif rows_left <= BLOCK_M // 2:
                    _swiglu_tile(hidden_ptr, w_ptr, token_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n,
                                 H, I, BLOCK_M // 2, BLOCK_N, BLOCK_K, EVEN)
                else:
                    _swiglu_tile(hidden_ptr, w_ptr, token_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n,
                                 H, I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN)
            else:
                _swiglu_tile(hidden_ptr, w_ptr, token_ptr, weight_ptr, out_ptr, first_row, group_end, e, tile_n, H,
                             I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN)


def fused_available(hidden: torch.Tensor) -> bool:
    """The kernel runs on CUDA tensors of a 16-bit float type (tl.dot's inputs)."""
    return triton is not None and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)


# The tile shape measured fastest on the H200 for the Qwen3-30B-A3B layer (bench/moe_parts.py, 2026-11-29):
# 0.817 ms against 0.857 for gather + torch._grouped_mm + the SwiGLU kernel; smaller tiles were slower.
def gathered_swiglu(hidden: torch.Tensor, gate_up: torch.Tensor, token: torch.Tensor, weight: torch.Tensor,
                    ends: torch.Tensor, block_m: int = 128, block_n: int = 128, block_k: int = 64,
                    num_warps: int = 8, num_stages: int = 4, small_tails: bool = False) -> torch.Tensor:
    """hidden [T, H], gate_up [E, 2I, H] (gate rows, then up rows), token [R] (each routed row's token, rows
    grouped by expert), weight [R], ends [E] (int32 group ends) -> [R, I]: silu(x W_g) * (x W_u) * weight."""
    # Plain ints: the weights never change shape, and under torch.compile with dynamic shapes a symbolic
    # width passed to the kernel failed in dynamo (torch 2.11) when the weights were graph inputs.
    experts, two_i, width = (int(d) for d in gate_up.shape)
    inter, rows = two_i // 2, token.numel()
    out = hidden.new_empty(rows, inter)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tile_ends = torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0, dtype=torch.int32)
    max_tiles = triton.cdiv(rows, block_m) + experts
    expert_of_tile = torch.searchsorted(tile_ends, torch.arange(max_tiles, device=hidden.device, dtype=torch.int32),
                                        right=True, out_int32=True)
    num_n = triton.cdiv(inter, block_n)
    even = width % block_k == 0 and inter % block_n == 0
    _gathered_swiglu_kernel[(max_tiles * num_n,)](
        hidden.contiguous(), gate_up, token.contiguous(), weight.contiguous(), ends, tile_ends, expert_of_tile, out,
        width, inter, experts, num_n, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even,
        SMALL_TAILS=small_tails, num_warps=num_warps, num_stages=num_stages)
    return out
