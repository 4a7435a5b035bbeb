"""lib.drafts.base.clip_grad_norm (DraftBundle.clip_grad_norm, the step benchmarks) against torch.nn.utils.clip_grad_norm_: the same norm and the same
gradients to the bit, below, at and above max_norm; gradients under the threshold are not rewritten."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib.drafts.base import DraftBundle

pytestmark = pytest.mark.unit


def _model_with_grads(scale: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    model[0].bias.requires_grad_(False)  # frozen parameters carry no gradient and stay out
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * scale
    return model


@pytest.mark.parametrize("scale", [1e-4, 0.05, 3.0])
def test_same_norm_and_gradients_as_torch(scale):
    ours, theirs = _model_with_grads(scale), _model_with_grads(scale)
    max_norm = 0.5
    norm = DraftBundle(ours).clip_grad_norm(max_norm)
    expect = torch.nn.utils.clip_grad_norm_([p for p in theirs.parameters() if p.requires_grad], max_norm)
    assert norm == float(expect)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    if float(expect) > max_norm:
        total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ours.parameters() if p.grad is not None))
        assert total == pytest.approx(max_norm, rel=1e-5)


def test_gradients_under_the_threshold_are_not_rewritten():
    model = _model_with_grads(1e-4)
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    versions = {name: p.grad._version for name, p in model.named_parameters() if p.grad is not None}
    DraftBundle(model).clip_grad_norm(1.0)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad._version == versions[name] and torch.equal(p.grad, before[name])


def test_a_non_finite_norm_is_returned_and_leaves_gradients_alone():
    model = _model_with_grads(1.0)
    model[1].weight.grad[0, 0] = float("inf")
    kept = model[0].weight.grad.clone()
    assert math.isinf(DraftBundle(model).clip_grad_norm(1.0))
    assert torch.equal(model[0].weight.grad, kept)  # the loop skips this step; nothing was scaled by nan
