"""DFlash's D-PACE position weights (draft.options.loss_weights=dpace): each row's weight is the
derivative of the block's expected accepted length in that row's log-confidence, the loss divides by
the plain count of valid rows, the logged loss is the trained one, and the options refuse the other
weighting's knobs. Equality with speculators' own loss: tests/test_dflash_loss_parity.py."""
from __future__ import annotations

import pytest
import torch

from lib.config import compose
from lib.drafts.base import get_strategy
from lib.drafts.dflash.mask import dense_attention
from lib.drafts.dflash.strategy import DFlashStrategy
from lib.drafts.dflash.trainer import (DFlashBundle, DFlashModule, DFlashOptions, LossWeights, block_loss,
                                       dpace_weights)
from tests.block_fixtures import MASK, packed
from tests.test_dflash import tiny_config, tiny_draft

pytestmark = pytest.mark.unit


def _expected_accepted_length(log_s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum over blocks and valid positions m of prod_{i <= m, i valid} s_i, written as plain loops."""
    total = log_s.new_zeros(())
    for n in range(valid.shape[0]):
        running = log_s.new_zeros(())
        for m in range(valid.shape[1]):
            if valid[n, m]:
                running = running + log_s[n, m]
                total = total + running.exp()
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_dpace_weight_is_the_derivative_of_the_expected_accepted_length(alpha):
    """w_k = d E[accepted] / d log s_k with s = (1 - alpha) exp(-CE) + alpha; a row without a loss in
    the middle of a block neither ends the chain nor counts (alpha = 0: the unsmoothed expected length,
    alpha = 1: every position certain, so w_k counts the valid positions from k on)."""
    blocks, size = 3, 5
    valid = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    rows = valid.flatten().nonzero().flatten()
    ce = torch.rand(rows.numel(), generator=torch.Generator().manual_seed(0)) * 3
    got = dpace_weights(ce, rows, blocks, size, alpha)

    log_s = torch.zeros(blocks, size, dtype=torch.float64)
    log_s.view(-1)[rows] = torch.log((1 - alpha) * torch.exp(-ce.double()) + alpha)
    log_s.requires_grad_(True)
    (grad,) = torch.autograd.grad(_expected_accepted_length(log_s, valid), log_s)
    torch.testing.assert_close(got.double(), grad.view(-1)[rows], rtol=1e-6, atol=1e-7)
    if alpha == 1.0:
        assert got.tolist() == [4, 3, 2, 1, 3, 2, 1, 2, 1]


def test_dpace_block_loss_divides_by_the_count_and_logs_the_trained_loss():
    c = tiny_config()
    draft = tiny_draft(c)
    ids, loss_mask, positions, cu = packed()
    aux = torch.randn(ids.shape[0], c.fc_in_features)
    batch = {"input_ids": ids, "loss_mask": loss_mask, "position_ids": positions, "cu_seqlens": cu,
             "aux_hidden": aux}
    options = DFlashOptions(block_size=4, loss_weights="dpace")
    assert options.loss_weights is LossWeights.DPACE and options.alpha == 0.5
    bundle = DFlashBundle(DFlashModule(draft, options, use_flex=False), draft_config=c, options=options, seed=3)
    strategy = DFlashStrategy()
    (blocks,), norm = strategy.prepare(bundle, [batch])
    assert float(norm) == float(blocks.valid().sum())  # the plain count, as speculators divides
    loss, sums = strategy.micro_loss(bundle, batch, blocks, norm, 1.0)
    _, _, count, _, counted = sums.view(5, 3)
    assert torch.equal(counted, count)
    assert strategy.summarize(sums)["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)

    # The same step by plain autograd through whole logits, the weights taken as constants.
    params = [p for p in draft.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    hidden = draft(blocks.ids[None], blocks.positions[None], aux[None], positions[None], dense_attention(blocks))[0]
    rows = blocks.valid().nonzero().flatten()
    whole = torch.nn.functional.cross_entropy(draft.logits(hidden[rows]), blocks.labels[rows], reduction="none")
    w = dpace_weights(whole.detach(), rows, blocks.num_blocks, 4, 0.5)
    want = torch.autograd.grad((whole * w).sum() / rows.numel(), params)
    torch.testing.assert_close(loss, (whole * w).sum() / rows.numel())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Under dpace the weights differ from the decay's: the option reaches the loss.
    decay = block_loss(draft, batch, blocks, DFlashOptions(block_size=4).decay(), norm, use_flex=False)[0]
    assert not torch.allclose(decay, loss)


def test_loss_weights_option_choices_and_the_other_weightings_knobs_refused():
    # D-PACE is the default (it accepted more than decay on the real target); decay is one option away.
    assert DFlashOptions().loss_weights is LossWeights.DPACE and DFlashOptions().alpha == 0.5
    decay = DFlashOptions(block_size=4, loss_weights="decay")
    assert decay.alpha is None and torch.equal(decay.position_weights(), decay.decay())
    assert DFlashOptions(loss_weights="dpace", dpace_alpha=0.25).alpha == 0.25
    with pytest.raises(ValueError, match=r"loss_weights='uniform' is not one of \['decay', 'dpace'\]"):
        DFlashOptions(loss_weights="uniform")
    with pytest.raises(ValueError, match="loss_gamma=4.0 applies to loss_weights=decay only"):
        DFlashOptions(loss_weights="dpace", loss_gamma=4.0)
    with pytest.raises(ValueError, match="dpace_alpha=0.5 applies to loss_weights=dpace only"):
        DFlashOptions(loss_weights="decay", dpace_alpha=0.5)
    with pytest.raises(ValueError, match=r"dpace_alpha=0.0 must be in \(0, 1\]"):
        DFlashOptions(loss_weights="dpace", dpace_alpha=0.0)
    cfg = compose(["draft=dflash", "draft.options.loss_weights=dpace", "draft.options.dpace_alpha=0.3"])
    options = get_strategy("dflash").options(cfg)
    assert options.loss_weights is LossWeights.DPACE and options.alpha == 0.3
    assert get_strategy("dflash").options(compose(["draft=dflash"])).loss_weights is LossWeights.DPACE
    decay = get_strategy("dflash").options(compose(["draft=dflash", "draft.options.loss_weights=decay"]))
    assert decay.loss_weights is LossWeights.DECAY and decay.gamma == 7.0
