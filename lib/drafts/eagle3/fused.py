"""The draft step's elementwise pieces, run eagerly or fused by torch.compile (`train.compile=true`).

Matmuls go to cuBLAS either way. What compiling removes are the chains of small memory-bound
kernels between them: the fp32 RMSNorms, rotary embedding, SiLU-multiply and the per-chunk math of
the row loss (`train.loss`: soft cross-entropy, or one of speculators' acceptance-aligned losses).
On an H200 they are about a quarter of a TTT-7 step of a 32B-shaped draft
(docs/results/trainer_profile_qwen3_32b_h200.txt).

Callers go through `ops` (e.g. `ops.rms_norm(x, w, eps)`); `use_compiled(True)` swaps in compiled
versions for this process. Shapes vary from batch to batch (packed token counts, valid rows per
unroll step), so the functions are compiled with dynamic shapes once, not once per shape.
"""
from __future__ import annotations

import math

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


# ---- train.loss other than ce: speculators 0.9.0's per-row definitions (speculators/losses/eager.py) --------
# With q = softmax(logits) and p the target rows: alpha = sum_v min(p_v, q_v) is the probability that a
# draft token sampled from q is accepted against p. tv = 1 - alpha, lk = -log(max(alpha, LK_EPS)) and
# lk_hybrid = w KL(p||q) + (1 - w) tv with w = exp(-LK_HYBRID_ETA alpha) (a weight only: not
# differentiated) are all made of two per-row statistics, KL and alpha, and their gradients of two
# vocabulary-wide terms, so one forward and one backward chunk op serve the three (fewer graphs to
# compile); the [N]-sized composition is `overlap_loss` / `overlap_scales`. Backward ops get the
# logsumexp back and form d loss / d logits from the logits and the target rows again: no [N, V]
# tensor is kept between forward and backward.

LK_EPS = 1e-5  # -log(alpha) is taken at max(alpha, LK_EPS); below it the row has no gradient (as theirs)
LK_HYBRID_ETA = 3.0  # lk_hybrid's blend temperature: speculators' default (their loss spec does not expose it)
OVERLAP_LOSSES = ("lk", "lk_hybrid", "tv")


def _draft_and_target(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype):
    """(log q, q, p, logsumexp) of one chunk, in `dtype`."""
    block, p = logits.to(dtype), probs[rows].to(dtype)
    lse = torch.logsumexp(block, dim=-1)
    log_q = block - lse[:, None]
    return log_q, torch.exp(log_q), p, lse


def overlap_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(p||q) with 0 log 0 = 0, alpha, logsumexp) per row of one chunk."""
    log_q, q, p, lse = _draft_and_target(logits, probs, rows, dtype)
    return (torch.xlogy(p, p) - p * log_q).sum(-1), torch.minimum(q, p).sum(-1), lse


def overlap_grad_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor,
                       kl_scale: torch.Tensor, tv_scale: torch.Tensor) -> torch.Tensor:
    """kl_scale * d KL / d logits + tv_scale * d tv / d logits (per-row scales [N]), in the logits' dtype.

    d KL / d logits = q sum(p) - p. d tv / d q_v = -1 where q_v < p_v, -1/2 on a tie (autograd's rule for
    torch.minimum), else 0; through the softmax that is q * (g - sum_v q_v g_v)."""
    block, p = logits.to(lse.dtype), probs[rows].to(lse.dtype)
    q = torch.exp(block - lse[:, None])
    g = -((q < p).to(q.dtype) + 0.5 * (q == p).to(q.dtype))
    kl = q * p.sum(-1, keepdim=True) - p
    tv = q * (g - (q * g).sum(-1, keepdim=True))
    return (kl * kl_scale[:, None] + tv * tv_scale[:, None]).to(logits.dtype)


def overlap_loss(name: str, kl: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The row loss `name` (one of OVERLAP_LOSSES) from its rows' KL and alpha."""
    if name == "tv":
        return 1.0 - alpha
    if name == "lk":
        return -torch.log(alpha.clamp_min(LK_EPS))
    w = torch.exp(-LK_HYBRID_ETA * alpha)
    return w * kl + (1.0 - w) * (1.0 - alpha)


def overlap_scales(name: str, alpha: torch.Tensor, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl_scale, tv_scale) for overlap_grad_chunk: the row loss's d/d KL and d/d tv times grad_loss."""
    grad_loss = grad_loss.contiguous()  # a sum's backward hands an expanded (stride-0) one: keep one compiled graph
    zero = torch.zeros_like(grad_loss)
    if name == "tv":
        return zero, grad_loss
    if name == "lk":
        # d(-log alpha) = d tv / alpha: the acceptance gradient amplified where overlap is small.
        return zero, torch.where(alpha >= LK_EPS, grad_loss / alpha.clamp_min(LK_EPS), zero)
    w = torch.exp(-LK_HYBRID_ETA * alpha)
    return w * grad_loss, (1.0 - w) * grad_loss


def _log_mixture(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """log m, m = (p + q) / 2, in log space (p = 0 gives log q - log 2)."""
    return torch.logaddexp(log_q, torch.log(p)) - math.log(2.0)


def jsd_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Jensen-Shannon divergence (KL(p||m) + KL(q||m)) / 2, logsumexp) per row of one chunk."""
    log_q, q, p, lse = _draft_and_target(logits, probs, rows, dtype)
    log_m = _log_mixture(log_q, p)
    target_term = torch.where(p > 0, p * (torch.log(p) - log_m), torch.zeros_like(p)).sum(-1)
    return 0.5 * (target_term + (q * (log_q - log_m)).sum(-1)), lse


def jsd_grad_chunk(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor,
                   grad_loss: torch.Tensor) -> torch.Tensor:
    """d JSD / d logits of one chunk: with g_v = d JSD / d q_v = (log q_v - log m_v) / 2 (the mixture's own
    terms cancel), q * (g - sum_v q_v g_v), times grad_loss."""
    block, p = logits.to(lse.dtype), probs[rows].to(lse.dtype)
    log_q = block - lse[:, None]
    q, g = torch.exp(log_q), 0.5 * (log_q - _log_mixture(log_q, p))
    return (q * (g - (q * g).sum(-1, keepdim=True)) * grad_loss[:, None]).to(logits.dtype)


ops = OpTable(rms_norm=rms_norm, silu_mul=silu_mul, rope=rope, soft_ce_chunk=soft_ce_chunk,
              soft_ce_grad_chunk=soft_ce_grad_chunk, overlap_chunk=overlap_chunk,
              overlap_grad_chunk=overlap_grad_chunk, jsd_chunk=jsd_chunk, jsd_grad_chunk=jsd_grad_chunk)
use_compiled, compiled = ops.use_compiled, ops.compiled
