"""Qwen3's per-head q/k RMSNorm and rotary embedding as one kernel (CUDA with Triton; elsewhere a torch formula).

Why: on the H200 profile of the compiled Qwen3-30B-A3B capture, the Inductor kernel that applies the q
norm and rope took 52 us per layer for an 8192-token batch (67 MB read, 67 MB written: ~2.6 TB/s, where
the GPU copies similar tensors at ~3.8 TB/s), and the k one another 9 us. Here one launch covers both:
a program takes a block of consecutive head rows (of q, or of k), loads each row once as its two
contiguous halves, normalises it, rotates it with its token's cos/sin and writes it once.

What, per head row x of length D (weight w of the head's RMSNorm, cos/sin of the row's token):
    n = w * (x * rsqrt(mean(x^2) + eps))            in fp32
    out = n * cos + rotate_half(n) * sin            rotate_half(n) = cat(-n[D/2:], n[:D/2])
rounded once to the activations' dtype. transformers' eager forward rounds to that dtype after the norm
and after each rope product; the compiled layer's Inductor kernel already kept fp32 throughout, so one
rounding is what the compiled capture computed before this kernel, and the torch fallback does the same.

The kernel is launched from a plain function, not a custom op, for the reason in lib/engine/moe_kernels.py
(dynamo traces it into the compiled decoder layer as a user-defined Triton kernel).

install_fast_attention gives transformers' Qwen3 and Qwen3-MoE attention modules a forward that computes
what theirs does with norm + rope through qk_norm_rope (tests/test_qk_norm_rope.py holds them equal).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from torch import nn

from lib.engine.forward_swap import ForwardSwap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch formula runs instead
    triton = None

# Elements of q/k one program handles: 32 head rows of 128 at 4 warps. The first version (a program per
# block of tokens x 8 heads, [tokens, heads, D/2] tiles) took 87 us per 30B-A3B layer on the H200, slower
# than Inductor's 52 + 9 us for the two kernels it replaced.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 4


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch formula of qk_norm_rope (differentiable; fp32 throughout, rounded once)."""
    d = int(q_weight.shape[-1])
    cos32 = cos.reshape(-1, 1, d).float()
    sin32 = sin.reshape(-1, 1, d).float()
    tokens = cos32.shape[0]

    def one(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.reshape(tokens, -1, d).float()
        n = weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))
        rotated = torch.cat((-n[..., d // 2:], n[..., :d // 2]), dim=-1)
        return (n * cos32 + rotated * sin32).to(x.dtype).contiguous()

    return one(q, q_weight), one(k, k_weight)


if triton is not None:

    @triton.jit
    def _norm_rope_rows(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, block, tokens, row_stride, cos_stride, sin_stride,
                        EPS: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr):
        # Head rows in token-major order (row = token * HEADS + head), so a block's rows are contiguous in
        # both the input and the [T, HEADS, D] output; each row is loaded as its two halves, once.
        row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        token = row // HEADS
        live = (token < tokens)[:, None]
        d = tl.arange(0, HALF)[None, :]
        # int64: token * row_stride passes 2^31 for long batches of wide rows.
        src = token.to(tl.int64)[:, None] * row_stride + (row % HEADS)[:, None] * D + d
        x1 = tl.load(x_ptr + src, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + src + HALF, mask=live, other=0.0).to(tl.float32)
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + EPS)[:, None]
        n1 = tl.load(w_ptr + d).to(tl.float32) * (x1 * r)
        n2 = tl.load(w_ptr + HALF + d).to(tl.float32) * (x2 * r)
        c = token.to(tl.int64)[:, None] * cos_stride + d
        s = token.to(tl.int64)[:, None] * sin_stride + d
        cos1 = tl.load(cos_ptr + c, mask=live, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + c + HALF, mask=live, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + s, mask=live, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + s + HALF, mask=live, other=0.0).to(tl.float32)
        dst = row.to(tl.int64)[:, None] * D + d
        tl.store(out_ptr + dst, (n1 * cos1 - n2 * sin1).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(out_ptr + dst + HALF, (n2 * cos2 + n1 * sin2).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, tokens,
                             q_stride, k_stride, cos_stride, sin_stride, q_blocks, EPS: tl.constexpr,
                             Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        # The first q_blocks programs take q's head rows, the rest k's: one launch for both. eps is a
        # constant: passed as an argument, the compiled layer's launcher typed it fp64 (the eager launch
        # fp32), and the two rounded differently (H200 test, 2026-11-29).
        pid = tl.program_id(0)
        if pid < q_blocks:
            _norm_rope_rows(q_ptr, qw_ptr, q_out_ptr, cos_ptr, sin_ptr, pid, tokens, q_stride, cos_stride, sin_stride,
                            EPS, Q_HEADS, D, HALF, BLOCK_ROWS)
        else:
            _norm_rope_rows(k_ptr, kw_ptr, k_out_ptr, cos_ptr, sin_ptr, pid - q_blocks, tokens, k_stride, cos_stride,
                            sin_stride, EPS, K_HEADS, D, HALF, BLOCK_ROWS)

    def _rows(t: torch.Tensor, tokens) -> torch.Tensor:
        """[T, width] with unit column stride; a row stride of its own is fine (e.g. a slice of fused qkv)."""
        t = t.reshape(tokens, -1)
        return t if t.stride(1) == 1 else t.contiguous()

    def _launch_qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin):
        # Plain ints for everything but the token count: the widths are fixed per model, and symbolic
        # widths from weights held as graph inputs failed in dynamo before (lib/engine/moe_fused.py).
        d = int(q_weight.shape[-1])
        cos2d = cos.reshape(-1, d)
        tokens = cos2d.shape[0]
        cos2d, sin2d = _rows(cos2d, tokens), _rows(sin.reshape(-1, d), tokens)
        q2, k2 = _rows(q, tokens), _rows(k, tokens)
        q_heads, k_heads = int(q2.shape[1]) // d, int(k2.shape[1]) // d
        q_out = q2.new_empty(tokens, q_heads, d)
        k_out = k2.new_empty(tokens, k_heads, d)
        if tokens == 0:
            return q_out, k_out
        block_rows = max(1, _TILE_ELEMENTS // d)
        q_blocks = triton.cdiv(tokens * q_heads, block_rows)
        grid = (q_blocks + triton.cdiv(tokens * k_heads, block_rows),)
        _qk_norm_rope_kernel[grid](
            q2, k2, q_weight.contiguous(), k_weight.contiguous(), cos2d, sin2d, q_out, k_out, tokens,
            int(q2.stride(0)), int(k2.stride(0)), int(cos2d.stride(0)), int(sin2d.stride(0)), q_blocks,
            EPS=float(eps), Q_HEADS=q_heads, K_HEADS=k_heads, D=d, HALF=d // 2, BLOCK_ROWS=block_rows,
            num_warps=_NUM_WARPS)
        return q_out, k_out


def kernel_available(q: torch.Tensor, q_weight: torch.Tensor) -> bool:
    """CUDA tensors with a power-of-two head size, and no gradient wanted (the kernel has no backward)."""
    d = int(q_weight.shape[-1])
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or q_weight.requires_grad)
    return triton is not None and q.is_cuda and 16 <= d <= 256 and d & (d - 1) == 0 and not wants_grad


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq*D] and k [T, Hk*D] (or [1, T, H*D], [T, H, D] views), RMSNorm weights [D], cos/sin [1, T, D]
    or [T, D] -> q_out [T, Hq, D], k_out [T, Hk, D], contiguous, in the activations' dtype.

    The token count is taken from cos (a [1, T, D] k of one head reads the same as a [T, H, D] one)."""
    if kernel_available(q, q_weight):
        return _launch_qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, eps, cos, sin)


# The attention classes whose forward is q/k/v projections, per-head q/k RMSNorm, rope, the attention
# interface and o_proj, in that order (transformers 5.x). Known by name: other families (Llama, gpt-oss)
# have no per-head norm and keep their own forward.
ATTENTION_CLASSES = ("Qwen3Attention", "Qwen3MoeAttention")



def _fits(m: nn.Module) -> bool:
    """The attributes the engine forward reads, with the shapes it assumes."""
    head_dim = getattr(m, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim % 2:
        return False
    if not all(isinstance(getattr(m, name, None), nn.Module) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if not all(hasattr(m, name) for name in ("scaling", "sliding_window", "config")):
        return False
    if not callable(getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None)):
        return False
    norms = [getattr(m, name, None) for name in ("q_norm", "k_norm")]
    for norm in norms:
        weight = getattr(norm, "weight", None)
        if not type(norm).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor):
            return False
        if tuple(weight.shape) != (head_dim,) or not isinstance(getattr(norm, "variance_epsilon", None), (int, float)):
            return False
    return norms[0].variance_epsilon == norms[1].variance_epsilon  # one eps for both in the kernel


def _engine_forward(base: type) -> Callable:
    """The forward of `base` with norm + rope through qk_norm_rope, for packed batches (batch size 1)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager_attention_forward = sys.modules[base.__module__].eager_attention_forward

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None, cache=None, past_key_values=None, **kwargs):
        if cache is not None or past_key_values is not None or hidden_states.shape[0] != 1:
            # Decoding with a KV cache (the online evaluation runs the engine's model that way) and batches of
            # several rows are transformers' own forward; the capture is one packed row without a cache.
            given = {name: c for name, c in (("cache", cache), ("past_key_values", past_key_values)) if c is not None}
            return base.forward(self, hidden_states, position_embeddings, attention_mask, **given, **kwargs)
        input_shape = hidden_states.shape[:-1]
        cos, sin = position_embeddings
        q, k = qk_norm_rope(self.q_proj(hidden_states), self.k_proj(hidden_states), self.q_norm.weight,
                            self.k_norm.weight, self.q_norm.variance_epsilon, cos, sin)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        # [T, H, D] -> the [1, H, T, D] views transformers passes; the varlen interface undoes them for free.
        attn_output, attn_weights = attention_interface(
            self,
            q.unsqueeze(0).transpose(1, 2),
            k.unsqueeze(0).transpose(1, 2),
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    return forward


_SWAP = ForwardSwap("Engine", _engine_forward)


def fast_attention_modules(layers: nn.ModuleList) -> list[nn.Module]:
    return [m for layer in layers for m in layer.modules()
            if _SWAP.swapped(m) or (type(m).__name__ in ATTENTION_CLASSES and _fits(m))]


# bench/engine.py --variants previous turns the swap off to measure transformers' forward in the same process.
FUSED_ATTENTION = True


def install_fast_attention(layers: nn.ModuleList) -> int:
    """Give every known attention module under `layers` the qk_norm_rope forward (lib/engine/forward_swap.py);
    returns how many run it."""
    if not FUSED_ATTENTION:
        return 0
    found = fast_attention_modules(layers)
    _SWAP.apply(found)
    return len(found)
