"""DFlash's elementwise pieces, run eagerly or fused by torch.compile (`train.compile=true`).

As for EAGLE-3 (lib/drafts/eagle3/fused.py): matmuls and attention stay as they are; compiling fuses
the memory-bound chains between them (RMSNorms, the per-head q/k norm followed by rotary,
SiLU-multiply, and the cross-entropy of each chunk of logits rows with its gradient). Callers go through `ops`;
`use_compiled(True)` swaps in versions compiled with dynamic shapes (anchor counts and context
lengths change from batch to batch), once per process.

The eager functions are exactly the formulas the DFlash model always ran, so `train.compile=false`
(and the parity tests against SpecForge/speculators) keep their numbers bit for bit. DFlash's
RMSNorm rounds to the input dtype before the weight, cast to that dtype, multiplies: the rounding of
its reference classes, which differs from EAGLE-3's norm and is why the norm is not shared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rotary (rotate-half) and SiLU-multiply are the same formulas in both families.
from lib.drafts.eagle3.fused import rope, silu_mul
from lib.drafts.op_table import OpTable


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Two casts, as the reference classes write it: in bf16 each cast's gradient is rounded back
    # separately, so sharing one cast would change the eager backward in the last bit.
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight.to(x.dtype)


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen3's per-head norm then rotary, x [..., S, H, D], cos/sin [..., S, D]: one function so that a
    compiled version reads the projected heads once and writes the rotated ones once."""
    return rope(rms_norm(x, weight, eps), cos, sin)


def ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, argmax == label as float) per row, in fp32 whatever the logits' dtype."""
    wide = logits.float()
    return F.cross_entropy(wide, labels, reduction="none"), (wide.argmax(-1) == labels).float()


def ce_rows_with_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ce_rows plus d(ce_row)/d(logits) = softmax - one_hot, in the logits' dtype (one pass over a chunk)."""
    wide = logits.float()
    lse = torch.logsumexp(wide, -1)
    picked = wide.gather(-1, labels[:, None])[:, 0]
    grad = torch.exp(wide - lse[:, None])
    grad.scatter_add_(-1, labels[:, None], torch.full_like(picked[:, None], -1.0))
    return lse - picked, (wide.argmax(-1) == labels).float(), grad.to(logits.dtype)


ops = OpTable(rms_norm=rms_norm, norm_rope=norm_rope, silu_mul=silu_mul, ce_rows=ce_rows,
              ce_rows_with_grad=ce_rows_with_grad)
use_compiled, compiled = ops.use_compiled, ops.compiled
