"""The engine's packed-batch attention (engine.attn_impl=varlen): one causal attention over a batch of
samples laid end to end, kept inside each sample by cu_seqlens, with no mask tensor at all.

Two kernels behind one transformers attention interface (engine.varlen_kernel):
- flash: torch's FlashAttention-2 kernel, called through aten directly (stable across torch 2.4+,
  GQA native, sliding windows as its left window; gpt-oss sinks rescale its output, below);
- cudnn: cuDNN's fused attention over the same packed rows (lib/engine/cudnn_attention.py, cached
  cudnn-frontend graphs): NVIDIA's Hopper kernel, about twice FA2's speed on the capture's attention.
  It has no sliding window or sink here, so gpt-oss's layers keep flash. The longest-sample argument
  is rounded up to a power of two (any bound above the true longest is valid) to keep the number of
  cuDNN graphs small; the rounding happens where the batch's arguments are built (HFBackend), outside
  the compiled layers: rounded inside, dynamo specialised each layer on the batch's longest sample
  and recompiled per batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface

from lib.config import VarlenKernel
from lib.engine.cudnn_attention import MIN_BOUND, packed_causal_attention, pow2_at_least

VARLEN_ATTN_NAME = "engine_varlen"


@torch.library.custom_op("specdraft::cudnn_varlen_attention", mutates_args=())
def cudnn_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, off_q: torch.Tensor,
                           off_kv: torch.Tensor, seq: torch.Tensor, bound: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], causal within each sample of cudnn_attention.ragged_metadata -> [T, Hq, D];
    off_q/off_kv: the samples' starts in elements of q and of k/v.

    An opaque op, so torch.compile leaves the cuDNN graph's execution to the runtime."""
    return packed_causal_attention(q, k, v, off_q, off_kv, seq, bound, scale)


@cudnn_varlen_attention.register_fake
def _(q, k, v, off_q, off_kv, seq, bound, scale):
    return torch.empty_like(q)


def max_seqlen_arg(longest: int, kernel: VarlenKernel) -> int:
    """The longest-sample argument of the kernel: exact for flash (it sizes its grid), for cuDNN the
    next power of two of at least 128 (the bound its plans are keyed on)."""
    if kernel is VarlenKernel.cudnn:
        return pow2_at_least(longest, MIN_BOUND)
    return int(longest)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    engine_cu_seqlens: Optional[torch.Tensor] = None,
    engine_max_seqlen: Optional[int] = None,
    engine_varlen_kernel: str = VarlenKernel.flash.value,
    engine_cudnn_cu: Optional[torch.Tensor] = None,
    engine_cudnn_seq: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: [1, H, T, D] q/k/v of a packed batch -> [1, T, H, D].

    gpt-oss: a sliding window of W (a query sees itself and W-1 earlier tokens) is flash's left window;
    its per-head sink logits (s_aux) join the softmax's denominator only, so the sink-free output is
    rescaled by sum(exp(scores)) / (sum(exp(scores)) + exp(sink)) = sigmoid(lse - sink), lse from flash.
    """
    if engine_cu_seqlens is None:
        raise RuntimeError("the varlen attention runs only inside HFBackend.capture (it needs the batch's cu_seqlens)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if engine_varlen_kernel == VarlenKernel.cudnn.value and not sliding_window and s_aux is None:
        scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        # The starts in elements, computed here so a compiled layer fuses them into its own kernels.
        off_q, off_kv = (engine_cudnn_cu * (t.shape[1] * t.shape[2]) for t in (q, k))
        out = cudnn_varlen_attention(q, k, v, off_q, off_kv, engine_cudnn_seq, engine_max_seqlen, scale)
        return out.unsqueeze(0), None
    window = {} if not sliding_window else {"window_size_left": int(sliding_window) - 1, "window_size_right": 0}
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, engine_cu_seqlens, engine_cu_seqlens, engine_max_seqlen, engine_max_seqlen,
        0.0, True, False, scale=scaling, **window,
    )[:2]
    if s_aux is not None:
        if tuple(lse.shape) != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"varlen attention with sinks expects the kernel's logsumexp as [heads, tokens] = "
                               f"{(q.shape[1], q.shape[0])}, got {tuple(lse.shape)}; use engine.attn_impl=eager")
        keep = torch.sigmoid(lse - s_aux.float()[:, None]).transpose(0, 1)[..., None]
        out = (out.float() * keep).to(out.dtype)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTN_NAME, varlen_attention)
