"""`train.loss` against speculators 0.9.0's own loss functions, values and gradients, fp32 on the CPU.

What is compared (speculators/losses/{eager,utils}.py, speculators/models/eagle3/{core,metrics}.py):
  - per row: our `row_loss` against the eager function speculators' loss spec resolves the name to
    (`resolve_loss_config(name, "eager")`): lk = their `nla`, lk_hybrid, tv, jsd by name, and our ce
    against their `kl_div` (the same gradient; the value differs by the target's entropy, added back).
    Their functions take target logits and softmax them; we take the softmax. Rows drawn from far
    apart to nearly equal, and one whose overlap is below the 1e-5 clamp of -log(alpha).
  - the unroll: `ttt_forward(..., loss=name)` against their per-step reduction `loss_function`
    (masked sum / (masked count + 1e-5; the 1e-5 is taken back out), times `exp_loss_decay` 0.8^i,
    summed over steps, as their Eagle3DraftModel.forward does through compute_metrics) on the same
    logits of every step, with their targets the target head's logits sliced to the draft vocabulary
    (their `verifier_lm_head` keeps the t2d rows). Masked rows they receive (drawn logits) must not
    count. Gradients are compared on every draft parameter. Which rows count is ours
    (docs/draft_format.md); the alignment of the unroll itself is tests/test_reference_parity.py's.
speculators runs in its own virtual environment; without it the tests skip. Run them with
`PYTHONPATH=$PWD /work/refvenv/bin/python -m pytest -q -s tests/test_eagle3_loss_parity.py`.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

import lib.drafts.eagle3.loss as loss_module
from lib.drafts.eagle3.loss import STEP_DECAY, row_loss, ttt_forward, valid_positions
from lib.drafts.eagle3.target_head import TargetHead
from tests.eagle3_draws import drawn_draft, packed_inputs

pytestmark = pytest.mark.unit

# train.loss -> the name speculators' --loss-fn gives the same per-row function
THEIR_NAME = {"ce": "kl_div", "lk": "nla", "lk_hybrid": "lk_hybrid", "tv": "tv", "jsd": "jsd"}
ATOL = 1e-5


@pytest.fixture(scope="module")
def losses():
    return pytest.importorskip("speculators.losses", reason="speculators is not installed")


def their_fn(losses, name: str):
    ((spec_name, (fn, weight)),) = losses.resolve_loss_config(THEIR_NAME[name], "eager").items()
    assert spec_name == THEIR_NAME[name] and weight == 1.0
    return fn


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)


def drawn_rows(vocab: int = 48):
    """(draft logits [N, V] requiring grad, target logits [T, V], rows [N]): a spread of overlaps."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(9, vocab, generator=gen) * 3.0
    target[8] = -40.0
    target[8, 0] = 40.0  # a near point mass...
    rows = torch.tensor([0, 3, 3, 5, 1, 7, 2, 6, 4, 8, 8])
    logits = torch.randn(rows.numel(), vocab, generator=gen) * 3.0
    logits[1] = target[3] + 0.05 * torch.randn(vocab, generator=gen)  # nearly the target: high overlap
    logits[9] = -40.0
    logits[9, 1] = 40.0  # ...against another one: overlap ~e^-80, under the clamp
    logits[10] = target[8] * 0.5  # the same mode, softer
    return logits.requires_grad_(), target, rows


@pytest.mark.parametrize("name", list(THEIR_NAME))
def test_row_loss_matches_speculators(losses, name, monkeypatch):
    monkeypatch.setattr(loss_module, "CE_CHUNK_ROWS", 4)  # several chunks
    logits, target_logits, rows = drawn_rows()
    probs = torch.softmax(target_logits, dim=-1)
    weights = torch.rand(rows.numel(), generator=torch.Generator().manual_seed(1))

    ours = row_loss(logits, probs, rows, name)
    theirs = their_fn(losses, name)(logits.unsqueeze(0), target_logits[rows].unsqueeze(0)).squeeze(0)
    if name == "ce":
        theirs = theirs + entropy(probs[rows])  # soft CE = KL + H(p)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    grad_theirs, = torch.autograd.grad((theirs * weights).sum(), logits)

    d_value, d_grad = (ours - theirs).abs().max().item(), (grad_ours - grad_theirs).abs().max().item()
    print(f"\n{name} vs speculators {THEIR_NAME[name]}: max |d loss| {d_value:.2e}, max |d grad| {d_grad:.2e} "
          f"(losses up to {theirs.abs().max().item():.3g})")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=ATOL)
    if name == "lk":  # the clamped row: -log(1e-5) and no gradient, in both
        assert ours[9].item() == pytest.approx(-torch.log(torch.tensor(1e-5)).item())
        assert grad_ours[9].abs().max().item() == 0.0


def captured_logits(draft):
    """Wrap the draft's logits so each unroll step's [rows, V] logits (in the graph) are kept."""
    seen: list[torch.Tensor] = []
    compute = draft.compute_logits

    def keep(hidden):
        logits = compute(hidden)
        seen.append(logits)
        return logits
    draft.compute_logits = keep
    return seen


@pytest.mark.parametrize("name", list(THEIR_NAME))
def test_unroll_loss_matches_speculators_reduction(losses, name):
    ttt = 4
    draft = drawn_draft(None, target_hidden_size=24).train()
    ids, aux, positions, cu = packed_inputs(draft.config)
    tokens, vocab = ids.numel(), draft.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    target_weight = torch.randn(vocab, 32, generator=gen)
    head = TargetHead(target_weight, draft.d2t)
    final = torch.randn(tokens, 32, generator=gen)
    loss_mask = torch.rand(tokens, generator=gen) > 0.2
    batch = dict(input_ids=ids, loss_mask=loss_mask, position_ids=positions, cu_seqlens=cu, aux_hidden=aux,
                 final_hidden=final)
    target = head.target_probs(final)
    valid = valid_positions(loss_mask, cu, target.in_draft_vocab, ttt)
    assert (valid.sum(1) > 0).all() and not bool(target.in_draft_vocab.all())

    seen = captured_logits(draft)
    ours, metrics = ttt_forward(draft, head, batch, ttt, loss=name, attention_backend="reference")
    assert len(seen) == ttt

    # Their targets: the target head sliced to the draft vocabulary (t2d rows), as logits.
    target_logits = (final @ target_weight.T)[:, head.draft_to_target]
    fn, decay = their_fn(losses, name), partial(losses.exp_loss_decay, gamma=STEP_DECAY)
    theirs = torch.zeros(())
    for i, logits in enumerate(seen):
        labels = torch.nonzero(valid[i]).squeeze(1) + 1 + i
        # Drawn rows their mask must drop, after ours.
        filler = torch.randn(3, logits.shape[1], generator=gen)
        step_logits = torch.cat([logits, filler]).unsqueeze(0)
        step_targets = torch.cat([target_logits[labels], torch.randn(3, logits.shape[1], generator=gen)]).unsqueeze(0)
        mask = torch.cat([torch.ones(labels.numel(), dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]).unsqueeze(0)
        step = losses.loss_function(step_logits, step_targets, mask, torch.full_like(mask, i, dtype=torch.long),
                                    loss_fn=fn, decay_fn=decay)
        if name == "ce":  # their kl_div + the entropy of each counted row, reduced as they reduce
            step = step + STEP_DECAY ** i * entropy(torch.softmax(target_logits[labels], -1)).sum() / (
                labels.numel() + 1e-5)
        # Their count carries +1e-5 (a relative 1e-5 / count, ~2e-6 here); ours is the count itself.
        theirs = theirs + step * (labels.numel() + 1e-5) / labels.numel()

    params = [p for p in draft.parameters() if p.requires_grad]
    grads_ours = torch.autograd.grad(ours, params, retain_graph=True)
    grads_theirs = torch.autograd.grad(theirs, params)
    d_value = abs(ours.item() - theirs.item())
    d_grad = max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_theirs))
    print(f"\n{name}: TTT-{ttt} loss {ours.item():.6f} vs speculators {theirs.item():.6f}: |d| {d_value:.2e}, "
          f"max |d grad| over parameters {d_grad:.2e}")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=ATOL)
    for (param_name, _), a, b in zip([(n, p) for n, p in draft.named_parameters() if p.requires_grad],
                                     grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=ATOL, msg=param_name)
    # The logged per-step counts are the rows both sides reduced over.
    sums = metrics["sums"]
    assert sums[2 * ttt:].tolist() == valid.sum(1).float().tolist()
