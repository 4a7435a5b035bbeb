"""The draft's optimizer and its clipped step.

AdamW is fused on CUDA (one kernel over all parameters, as the step benchmarks measure it; the
foreach form makes several passes). Clipping by the global norm would be one more pass over every
gradient: torch.nn.utils.clip_grad_norm_ multiplies each by the clamped coefficient, 1.0 included
(2.3 ms of the 154 ms Qwen3-8B-shape DFlash step on an H200, and the norm exceeds the default
train.grad_clip at nearly every step of the runs measured). With the fused optimizer the coefficient
goes into the step instead: torch's fused Adam(W) kernels divide each gradient by
`optimizer.grad_scale` while they read it. That attribute is the protocol torch.amp.GradScaler uses
with fused optimizers (set before step(), deleted after); this module is the one place that relies
on it, and tests/test_grad_clip.py checks the result against clip_grad_norm_ followed by a step. The
unfused optimizer (CPU) clips the gradients themselves, only when the coefficient is below 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

_CLIP_EPS = 1e-6  # clip_grads_with_norm_'s: its coefficient is max_norm / (norm + eps), clamped to 1


def build_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=device.type == "cuda")


def clipped_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 max_norm: float) -> tuple[float, bool]:
    """Clip by the global norm and step, then clear the gradients; returns (norm, stepped).

    A non-finite norm skips the step: every rank sees the same global norm, so all skip together.
    """
    sharded = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    total = sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded  # the same on every rank
    norm = float(total)
    stepped = math.isfinite(norm)
    if stepped:
        coefficient = max_norm / (total + _CLIP_EPS)  # fp32 on the norm's device, as torch computes it
        clip = float(coefficient) < 1.0
        fused = bool(optimizer.defaults.get("fused"))
        if clip and not fused:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, sharded, foreach=True)
        if clip and fused:
            optimizer.grad_scale = 1.0 / coefficient  # the kernel divides each gradient by it
        try:
            optimizer.step()
        finally:
            if hasattr(optimizer, "grad_scale"):
                del optimizer.grad_scale
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped
