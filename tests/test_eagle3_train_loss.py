"""`train.loss` (EAGLE-3 line): the row losses by their definitions, the unroll's reduction, train.compile
and the config key. The real run (torchrun, train.loss=lk) is tests/test_metric_sinks.py's TensorBoard
run, so the CPU suite starts no extra job for it.

Agreement with speculators' own loss functions (their values and gradients) is
tests/test_eagle3_loss_parity.py, in their environment. Here each loss is held to its formula written
with autograd in fp64: what the chunked forward and the hand-formed backward must give.
"""
from __future__ import annotations

import math

import pytest
import torch

import lib.drafts.eagle3.loss as loss_module
from lib.config import ConfigError, LaunchShape, TrainLoss, compose
from lib.config.check import validate
from lib.drafts.eagle3.loss import ROW_LOSSES, STEP_DECAY, row_loss, ttt_forward
from lib.drafts.eagle3.target_head import TargetHead
from tests.helpers import assert_same_steps, compiled_against_eager
from tests.test_eagle3_loss import make_draft, make_sample, pack

pytestmark = pytest.mark.unit

NEW_LOSSES = [n for n in ROW_LOSSES if n != "ce"]


def by_definition(name: str, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The row loss from its formula (q = softmax(logits), alpha = sum min(p, q)), for autograd."""
    log_q = torch.log_softmax(logits, -1)
    q = log_q.exp()
    alpha = torch.minimum(p, q).sum(-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    if name == "ce":
        return -(p * log_q).sum(-1)
    if name == "tv":
        return 1 - alpha
    if name == "lk":
        return -torch.log(alpha.clamp_min(1e-5))
    if name == "lk_hybrid":
        w = torch.exp(-3.0 * alpha.detach())
        return w * kl + (1 - w) * (1 - alpha)
    m = (p + q) / 2
    return 0.5 * ((torch.xlogy(p, p) - p * m.log()).sum(-1) + (q * (log_q - m.log())).sum(-1))


@pytest.mark.parametrize("chunk", [3, 1000])
@pytest.mark.parametrize("name", ROW_LOSSES)
def test_row_losses_and_gradients_match_their_definitions(monkeypatch, name, chunk):
    monkeypatch.setattr(loss_module, "CE_CHUNK_ROWS", chunk)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 11, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    probs = torch.softmax(torch.randn(9, 11, generator=gen, dtype=torch.float64) * 2, -1)
    probs[4] = torch.softmax(logits[2].detach() + 0.1 * torch.randn(11, generator=gen, dtype=torch.float64), -1)
    rows = torch.tensor([8, 0, 4, 3, 3, 5, 1])
    weights = torch.rand(7, generator=gen, dtype=torch.float64)
    ours = row_loss(logits, probs, rows, name)
    ref = by_definition(name, logits, probs[rows])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    g_ref, = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_lk_stops_at_the_clamp_and_jsd_takes_zero_target_mass():
    logits = torch.full((2, 5), -60.0, dtype=torch.float64)
    logits[:, 0] = 60.0
    logits.requires_grad_()
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    lk = row_loss(logits, probs, torch.tensor([0, 1]), "lk")
    assert lk[0].item() == pytest.approx(-math.log(1e-5)) and lk[1].item() == pytest.approx(math.log(2))
    grad, = torch.autograd.grad(lk.sum(), logits)
    assert grad[0].abs().max().item() == 0.0 and grad[1].abs().max().item() > 0  # no gradient below the clamp
    jsd = row_loss(logits, probs, torch.tensor([0, 1]), "jsd")  # p = 0 on most columns: finite, <= log 2
    assert torch.isfinite(jsd).all() and (jsd <= math.log(2) + 1e-12).all()
    assert torch.isfinite(torch.autograd.grad(jsd.sum(), logits)[0]).all()


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_unroll_reduces_every_loss_as_ce(name):
    """loss = sum_i 0.8^i * mean over step i's valid rows, whatever the row loss; the logged per-step sums
    are those rows' losses. ce is the default and unchanged."""
    ttt = 3
    draft, target_weight = make_draft(dtype=torch.float64, seed=2)
    head = TargetHead(target_weight, draft.d2t, probs_dtype=torch.float64)
    batch = pack([make_sample(10, 3), make_sample(8, 4)])
    loss, metrics = ttt_forward(draft, head, batch, ttt, loss=name)
    sums = metrics["sums"].double()
    expected = sum(STEP_DECAY ** i * sums[i] / sums[2 * ttt + i] for i in range(ttt))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    if name == "ce":
        default, default_metrics = ttt_forward(draft, head, batch, ttt)
        assert torch.equal(default, loss) and torch.equal(default_metrics["sums"], metrics["sums"])
    if name == "tv":
        assert ((sums[:ttt] >= 0) & (sums[:ttt] <= sums[2 * ttt:])).all()  # a TV distance is in [0, 1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_step_equals_eager_for_every_loss(device):
    """train.compile on each loss's chunk ops: the same loss, metric sums and gradients, over two batch
    sizes (dynamic shapes), also under train.recompute (whose backward reruns the compiled forward)."""
    from lib.drafts.eagle3 import fused

    ttt = 3
    draft, target_weight = make_draft(dtype=torch.float32, seed=6)
    draft = draft.to(device)
    head = TargetHead(target_weight.to(device), draft.d2t)
    batches = [pack([make_sample(9, 14, torch.float32), make_sample(12, 15, torch.float32)]),
               pack([make_sample(17, 16, torch.float32)])]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    params = draft.trainable_parameters()

    def run():
        out = []
        for name in NEW_LOSSES:
            for batch, recompute in zip(batches, (False, True)):
                loss, metrics = ttt_forward(draft, head, batch, ttt, recompute=recompute, loss=name)
                out.append((loss.detach(), metrics["sums"], torch.autograd.grad(loss, params)))
        return out

    eager, compiled = compiled_against_eager(fused, run)
    assert_same_steps(compiled, eager)


def test_train_loss_is_a_checked_choice_refused_outside_the_eagle3_line():
    assert tuple(m.value for m in TrainLoss) == ROW_LOSSES  # the config's choices are the implemented losses
    assert compose([]).train.loss == TrainLoss.ce
    assert compose(["train.loss=lk"]).train.loss == TrainLoss.lk
    with pytest.raises(ConfigError) as bad:
        compose(["train.loss=kl"])
    assert str(bad.value) == ("train.loss='kl': not one of ce, lk, lk_hybrid, tv, jsd. "
                              "Fix: pick one of those, e.g. train.loss=ce.")
    shape = LaunchShape(world_size=2, nproc_per_node=2, nnodes=1, gpus_per_node=0)
    for draft in ("eagle3", "eagle3_1"):
        cfg = compose([f"draft={draft}"])
        for member in TrainLoss:
            cfg.train.loss = member
            validate(cfg, shape)
    dflash = compose(["draft=dflash"])
    validate(dflash, shape)  # ce, its own loss, is fine
    dflash.train.loss = TrainLoss.lk
    with pytest.raises(ConfigError, match=r"^train\.loss=lk: .*draft=dflash does not: drop the key or set "
                                          r"train\.loss=ce$"):
        validate(dflash, shape)  # launch.sh runs the same check before it starts anything (tests/test_config.py)
