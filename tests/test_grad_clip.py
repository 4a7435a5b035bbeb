"""lib/trainer/optim.py clipped_step against torch's clip_grad_norm_ followed by AdamW's step: the same
norm and the same parameters (to the bit unfused; within fp32 rounding fused, where the coefficient
rides in the kernel's grad_scale), below and above max_norm; a non-finite norm skips the step; FSDP2
DTensor gradients on a real gloo group."""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lib.trainer.optim import build_optimizer, clipped_step

pytestmark = pytest.mark.unit


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    model[0].bias.requires_grad_(False)  # frozen parameters carry no gradient and stay out
    return model


def _set_grads(model: nn.Module, scale: float, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g) * scale


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 3.0])
def test_same_norm_and_update_as_torch(scale, fused):
    ours, theirs = _model(), _model()
    opt_ours = torch.optim.AdamW(_trainable(ours), lr=1e-2, fused=fused)
    opt_theirs = torch.optim.AdamW(_trainable(theirs), lr=1e-2, fused=fused)
    for step in range(3):
        _set_grads(ours, scale, step)
        _set_grads(theirs, scale, step)
        norm, stepped = clipped_step(opt_ours, _trainable(ours), 0.5)
        expect = torch.nn.utils.clip_grad_norm_(_trainable(theirs), 0.5)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        assert stepped and norm == float(expect)
        assert not hasattr(opt_ours, "grad_scale")
        assert all(p.grad is None for p in ours.parameters())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if fused:  # gradient / (1 / coefficient) in the kernel instead of gradient * coefficient
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_non_finite_norm_skips_the_step(fused):
    model = _model()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2, fused=fused)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, 1.0, 0)
    model[1].weight.grad[0, 0] = float("inf")
    norm, stepped = clipped_step(opt, _trainable(model), 1.0)
    assert math.isinf(norm) and not stepped
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and not hasattr(opt, "grad_scale")


def test_the_optimizer_is_fused_on_cuda_only():
    params = _trainable(_model())
    assert not build_optimizer(params, 1e-3, 0.0, torch.device("cpu")).defaults["fused"]
    if torch.cuda.is_available():
        assert build_optimizer([nn.Parameter(torch.zeros(2, device="cuda"))], 1e-3, 0.0,
                               torch.device("cuda")).defaults["fused"]


def _fsdp_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=1)
    results = []
    for ours in (True, False):
        model = _model()
        fully_shard(model)
        opt = torch.optim.AdamW(_trainable(model), lr=1e-2, fused=True)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            model(torch.randn(5, 16, generator=g)).pow(2).sum().backward()
            if ours:
                clipped_step(opt, _trainable(model), 0.1)
            else:
                torch.nn.utils.clip_grad_norm_(_trainable(model), 0.1)
                opt.step()
                opt.zero_grad(set_to_none=True)
        results.append([p.full_tensor().detach().clone() for p in model.parameters()])
    torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.integration
def test_fsdp2_dtensor_gradients_with_the_fused_step(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.start_processes(_fsdp_worker, args=(f"file://{tmp_path}/store", out), nprocs=1, join=True,
                       start_method="spawn")
    ours, theirs = torch.load(out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, _model().state_dict()[k]) for a, k in zip(ours, _model().state_dict()))
