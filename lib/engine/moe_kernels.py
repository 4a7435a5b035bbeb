"""A Triton kernel for the grouped MoE path's row gathers (CUDA with Triton only; elsewhere torch formulas).

The combine sums each token's k expert rows, which sit at scattered rows of the grouped GEMM's output.
Compiled as torch code, Inductor fuses the row gather into the reduction but cannot prove that a
gathered row's elements are contiguous, so it loads them one bf16 at a time: 0.39 ms per layer on
the H200 for the 65k rows of 4 KB of a 8192-token Qwen3-30B-A3B batch, about four times the time
their bytes need. Here a program takes a block of tokens and a block of columns, looks up each
token's k source rows, and loads each row's columns as one contiguous block (vectorised loads).
The sum is in fp32 in slot order and rounded once, like the torch formula.

The dispatch (each routed row's token states, 8x the tokens) is the same gather with k=1. Inductor
had fused it with the RMSNorm before it, recomputing the norm per routed row and loading elementwise
(0.13 ms per layer); as an opaque op the norm runs once per token and the rows move as blocks.

It is an opaque custom op (torch.library.custom_op), so a compiled decoder layer calls it as one
kernel without a graph break.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula runs instead
    triton = None

_BLOCK_TOKENS = 16
_BLOCK_COLUMNS = 256


def sum_gathered_rows_reference(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = sum over j < k of src[index[t*k + j]], in fp32, rounded to src's dtype."""
    return src[index].view(index.numel() // k, k, src.shape[1]).float().sum(1).to(src.dtype)


if triton is not None:

    @triton.jit
    def _sum_gathered_rows_kernel(src_ptr, index_ptr, out_ptr, tokens, width, K: tl.constexpr,
                                  BLOCK_TOKENS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
        token = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        live_token = token < tokens
        live = live_token[:, None] & (column < width)[None, :]
        acc = tl.zeros((BLOCK_TOKENS, BLOCK_COLUMNS), dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(index_ptr + token * K + j, mask=live_token, other=0).to(tl.int64)
            acc += tl.load(src_ptr + row[:, None] * width + column[None, :], mask=live, other=0.0).to(tl.float32)
        target = token.to(tl.int64)[:, None] * width + column[None, :]
        tl.store(out_ptr + target, acc.to(out_ptr.dtype.element_ty), mask=live)

    @torch.library.custom_op("specdraft::sum_gathered_rows", mutates_args=())
    def _sum_gathered_rows_op(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
        src, index = src.contiguous(), index.contiguous()
        tokens, width = index.numel() // k, src.shape[1]
        out = src.new_empty(tokens, width)
        grid = (triton.cdiv(tokens, _BLOCK_TOKENS), triton.cdiv(width, _BLOCK_COLUMNS))
        _sum_gathered_rows_kernel[grid](src, index, out, tokens, width, K=k, BLOCK_TOKENS=_BLOCK_TOKENS,
                                        BLOCK_COLUMNS=_BLOCK_COLUMNS)
        return out

    @_sum_gathered_rows_op.register_fake
    def _(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
        return src.new_empty(index.numel() // k, src.shape[1])


def kernel_available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def sum_gathered_rows(src: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """[R, W] rows, [T*k] row indices -> [T, W]: each token's k rows summed in fp32, rounded once."""
    if kernel_available(src):
        return _sum_gathered_rows_op(src, index, k)
    return sum_gathered_rows_reference(src, index, k)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src[index] for [R, W] rows: on CUDA the same kernel with k=1 (a one-row fp32 sum is the row)."""
    if kernel_available(src):
        return _sum_gathered_rows_op(src, index, 1)
    return src[index]
