"""The draft step's elementwise pieces, run eagerly or fused by torch.compile (`train.compile=true`).

Matmuls go to cuBLAS either way. What compiling removes are the chains of small memory-bound
kernels between them: the fp32 RMSNorms, rotary embedding, SiLU-multiply and the soft
cross-entropy's per-chunk math. On an H200 they are about a quarter of a TTT-7 step of a 32B-shaped
draft (docs/results/trainer_profile_qwen3_32b_h200.txt).

Callers go through `ops` (e.g. `ops.rms_norm(x, w, eps)`); `use_compiled(True)` swaps in compiled
versions for this process. Shapes vary from batch to batch (packed token counts, valid rows per
unroll step), so the functions are compiled with dynamic shapes once, not once per shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.drafts.op_table import OpTable


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos/sin [..., head_dim] (rotate-half layout, as HF Llama and sglang)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def soft_ce_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logsumexp) per row of one chunk: -sum_v p_v log softmax(logits)_v with p = probs[rows]
    (the gather inside, so a fused kernel reads the probability table rows directly)."""
    block, p = logits.to(dtype), probs[rows].to(dtype)
    lse = torch.logsumexp(block, dim=-1)
    return lse * p.sum(-1) - (p * block).sum(-1), lse


def soft_ce_grad_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor,
                       grad_loss: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of one chunk: (softmax(logits) * sum(p) - p) * grad_loss, in the logits' dtype."""
    block, p = logits.to(lse.dtype), probs[rows].to(lse.dtype)
    soft = torch.exp(block - lse[:, None])
    return ((soft * p.sum(-1, keepdim=True) - p) * grad_loss[:, None]).to(logits.dtype)


ops = OpTable(rms_norm=rms_norm, silu_mul=silu_mul, rope=rope, soft_ce_chunk=soft_ce_chunk,
              soft_ce_grad_chunk=soft_ce_grad_chunk)
use_compiled, compiled = ops.use_compiled, ops.compiled
