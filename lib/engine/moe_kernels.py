"""Triton kernels for the grouped MoE path (CUDA with Triton only; elsewhere torch formulas).

Row gathers (dispatch and combine), the router's top-k and the experts' SwiGLU; each replaced a kernel
the H200 profile of the compiled Qwen3-30B-A3B capture showed well below the GPU's memory rate.

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

The kernels are launched from plain functions, not custom ops: dynamo traces a Triton launch into the
compiled decoder layer's graph (a user-defined Triton kernel) and Inductor's wrapper launches it
directly, where a torch.library custom op added its Python dispatch on every call (four calls per
layer). That saves host time only: the compiled 30B-A3B capture is GPU-bound (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula runs instead
    triton = None

_BLOCK_TOKENS = 16
_BLOCK_COLUMNS = 256


def sum_gathered_rows_reference(src: torch.Tensor, index: torch.Tensor, k: int,
                                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum over j < k of src[index[t*k + j]], in fp32, rounded to src's dtype; then + residual[t]
    when given (a separate add of two rounded tensors, as a decoder layer's residual add is)."""
    out = src[index].view(index.numel() // k, k, src.shape[1]).float().sum(1).to(src.dtype)
    return out if residual is None else residual + out


if triton is not None:

    @triton.jit
    def _sum_gathered_rows_kernel(src_ptr, index_ptr, residual_ptr, out_ptr, tokens, width, K: tl.constexpr,
                                  RESIDUAL: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
        token = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        live_token = token < tokens
        live = live_token[:, None] & (column < width)[None, :]
        acc = tl.zeros((BLOCK_TOKENS, BLOCK_COLUMNS), dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(index_ptr + token * K + j, mask=live_token, other=0).to(tl.int64)
            acc += tl.load(src_ptr + row[:, None] * width + column[None, :], mask=live, other=0.0).to(tl.float32)
        target = token.to(tl.int64)[:, None] * width + column[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:  # rounded sum + residual, rounded again: what the unfused add computes, bit for bit
            out = (tl.load(residual_ptr + target, mask=live, other=0.0).to(tl.float32) + out.to(tl.float32))
            out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + target, out, mask=live)

    def _launch_sum_gathered_rows(src: torch.Tensor, index: torch.Tensor, k: int,
                                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        src, index = src.contiguous(), index.contiguous()
        tokens, width = index.numel() // k, src.shape[1]
        out = src.new_empty(tokens, width)
        grid = (triton.cdiv(tokens, _BLOCK_TOKENS), triton.cdiv(width, _BLOCK_COLUMNS))
        _sum_gathered_rows_kernel[grid](src, index, src if residual is None else residual.contiguous(), out, tokens,
                                        width, K=k, RESIDUAL=residual is not None, BLOCK_TOKENS=_BLOCK_TOKENS,
                                        BLOCK_COLUMNS=_BLOCK_COLUMNS)
        return out


# The router's top-k. torch.topk on [8192, 128] fp32 probabilities (k=8) takes a radix-select kernel and a
# sort of the results: 74 us per layer on the H200, 2.8% of the compiled 30B-A3B capture, for 4 MB of
# input. Here each program holds a block of rows in registers and takes the k largest by k rounds of
# max-and-remove. The values are the input's own elements (no arithmetic), so the experts chosen and
# their weights are exactly torch.topk's; equal values go to the lowest column (torch leaves ties unordered).
_TOPK_BLOCK_ROWS = 16


def topk_rows_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(x, k, dim=-1)


if triton is not None:

    @triton.jit
    def _topk_rows_kernel(x_ptr, values_ptr, indices_ptr, rows, width, K: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr, BLOCK_WIDTH: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, BLOCK_WIDTH)
        live_row = row < rows
        in_row = (column < width)[None, :]
        x = tl.load(x_ptr + row.to(tl.int64)[:, None] * width + column[None, :], mask=live_row[:, None] & in_row,
                    other=float("-inf")).to(tl.float32)
        # NaN ranks above everything, as in torch.topk.
        x = tl.where(x != x, float("inf"), x)
        open_ = in_row & (row >= 0)[:, None]
        for j in tl.static_range(K):
            best = tl.max(tl.where(open_, x, float("-inf")), axis=1)
            pick = tl.min(tl.where(open_ & (x == best[:, None]), column[None, :], BLOCK_WIDTH), axis=1)
            chosen = column[None, :] == pick[:, None]
            value = tl.sum(tl.where(chosen, tl.load(x_ptr + row.to(tl.int64)[:, None] * width + column[None, :],
                                                    mask=live_row[:, None] & chosen, other=0.0), 0.0), axis=1)
            tl.store(values_ptr + row * K + j, value.to(values_ptr.dtype.element_ty), mask=live_row)
            tl.store(indices_ptr + row * K + j, pick.to(tl.int64), mask=live_row)
            open_ = open_ & ~chosen

    def _launch_topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        rows, width = x.numel() // x.shape[-1], x.shape[-1]
        values = x.new_empty(*x.shape[:-1], k)
        indices = torch.empty(*x.shape[:-1], k, dtype=torch.int64, device=x.device)
        if rows:
            _topk_rows_kernel[(triton.cdiv(rows, _TOPK_BLOCK_ROWS),)](
                x, values, indices, rows, width, K=k, BLOCK_ROWS=_TOPK_BLOCK_ROWS,
                BLOCK_WIDTH=triton.next_power_of_2(int(width)))
        return values, indices


_TOPK_MAX_WIDTH = 1024  # a row lives in one program's registers


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) (largest first, sorted) for router-sized rows."""
    if kernel_available(x) and x.shape[-1] <= _TOPK_MAX_WIDTH and 0 < k <= x.shape[-1]:
        return _launch_topk_rows(x, k)
    return topk_rows_reference(x, k)


# The experts' SwiGLU on the gate|up GEMM output, times each routed row's weight. Inductor's fused
# kernel for it indexes the flat [R, 2I] output and ran at 2.6 TB/s on the H200 (117 us per layer);
# here a program takes a block of rows and a block of features and loads gate and up as two
# contiguous blocks per row.
_SWIGLU_BLOCK_ROWS = 16
_SWIGLU_BLOCK_FEATURES = 256


def silu_mul_scaled_reference(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float() * weight.float()[:, None]).to(gate_up.dtype)


if triton is not None:

    @triton.jit
    def _silu_mul_scaled_kernel(gate_up_ptr, weight_ptr, out_ptr, rows, features,
                                BLOCK_ROWS: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        feature = tl.program_id(1) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
        live = (row < rows)[:, None] & (feature < features)[None, :]
        source = row.to(tl.int64)[:, None] * (2 * features) + feature[None, :]
        gate = tl.load(gate_up_ptr + source, mask=live, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + source + features, mask=live, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + row, mask=row < rows, other=0.0).to(tl.float32)
        h = gate / (1.0 + tl.exp(-gate)) * up * w[:, None]
        tl.store(out_ptr + row.to(tl.int64)[:, None] * features + feature[None, :],
                 h.to(out_ptr.dtype.element_ty), mask=live)

    def _launch_silu_mul_scaled(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate_up, weight = gate_up.contiguous(), weight.contiguous()
        rows, features = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, features)
        grid = (triton.cdiv(rows, _SWIGLU_BLOCK_ROWS), triton.cdiv(features, _SWIGLU_BLOCK_FEATURES))
        _silu_mul_scaled_kernel[grid](gate_up, weight, out, rows, features, BLOCK_ROWS=_SWIGLU_BLOCK_ROWS,
                                      BLOCK_FEATURES=_SWIGLU_BLOCK_FEATURES)
        return out


def silu_mul_scaled(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[R, 2I] gate|up rows, [R] weights -> silu(gate) * up * weight in fp32, rounded once to gate_up's dtype."""
    if kernel_available(gate_up):
        return _launch_silu_mul_scaled(gate_up, weight)
    return silu_mul_scaled_reference(gate_up, weight)


def kernel_available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def sum_gathered_rows(src: torch.Tensor, index: torch.Tensor, k: int,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[R, W] rows, [T*k] row indices -> [T, W]: each token's k rows summed in fp32, rounded once; plus
    residual [T, W] when given (in the same kernel: the decoder layer's residual add without its own pass)."""
    if kernel_available(src):
        return _launch_sum_gathered_rows(src, index, k, residual)
    return sum_gathered_rows_reference(src, index, k, residual)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src[index] for [R, W] rows: on CUDA the same kernel with k=1 (a one-row fp32 sum is the row)."""
    if kernel_available(src):
        return _launch_sum_gathered_rows(src, index, 1)
    return src[index]
