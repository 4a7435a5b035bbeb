"""A draft=dspark export loads into speculators 0.9.0's DSparkDraftModel, and its own training forward
on a packed batch gives our draft logits and confidence logits at every block slot, and our loss
(skipped where speculators is not importable). Run it from the reference venv:
    PYTHONPATH=$PWD /work/refvenv/bin/python -m pytest -q -s tests/test_dspark_parity.py

speculators' forward returns only (loss, metrics); its logits are read where it hands them to its
own compute_metrics (a spy that calls the real function), and its anchors where it draws them.
"""
from __future__ import annotations

import pytest
import torch

from lib.config import TINY_TARGET_DIR
from lib.drafts.dflash.mask import dense_attention, dense_mask
from lib.drafts.dspark.blocks import build_dspark_blocks
from lib.drafts.dspark.export import export_draft
from lib.drafts.dspark.loss import block_loss
from lib.drafts.dspark.model import DSparkConfig, DSparkDraft
from lib.drafts.dspark.trainer import DSparkOptions

pytestmark = pytest.mark.unit

BLOCK, MASK_ID, LENGTHS = 4, 4, (13, 11, 9)
LOSS_DIFFERENCE = """\
Our loss_mask[t] says token t is trained; speculators' says the prediction made at t is. With the
raw mask, speculators trains slot k on loss_mask[a+k] (the token before the one predicted) and draws
anchors where loss_mask[a] is set, also anchors whose next token is a prompt token or the next
sequence's first token, and can keep slots whose row crossed into the next sequence (their targets are
that sequence's distributions, which the block cannot see). Ours trains slot k iff the token it
predicts, x[a+k+1], is in the anchor's sequence and under the loss mask. Given the mask shifted to
its convention, on a batch whose sequences start with prompts longer than a block (no crossing slot
is trained), speculators computes our loss."""


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = sum(LENGTHS)
    ids = torch.randint(5, 1600, (tokens,), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    loss_mask = torch.ones(tokens, dtype=torch.bool)
    for start in cu[:-1].tolist():
        loss_mask[start:start + BLOCK + 1] = False  # prompts longer than a block
    loss_mask[20] = False  # and a hole inside an answer
    aux = torch.randn(tokens, 3 * 128, generator=g)
    pre_norm = torch.randn(tokens, 128, generator=g) * 3  # the target's last layer output, before its norm
    return ids, positions, doc, cu, loss_mask, aux, pre_norm


def _shifted(loss_mask, doc):
    """Our mask in speculators' convention: row t is trained iff token t+1 is, in t's sequence."""
    nxt = torch.arange(1, doc.numel() + 1).clamp(max=doc.numel() - 1)
    shifted = loss_mask[nxt] & (doc[nxt] == doc)
    shifted[-1] = False
    return shifted


class _Spy:
    """Records what speculators' DSpark forward passes on, calling the real functions."""

    def __init__(self, monkeypatch):
        import speculators.models.dflash.core as dflash_core
        import speculators.models.dspark.core as dspark_core

        self.seen: dict = {}
        real_metrics, real_anchors = dspark_core.compute_metrics, dflash_core.select_anchors

        def metrics(*args, **kwargs):
            self.seen["logits"], self.seen["targets"], self.seen["confidence"], self.seen["mask"] = args[:4]
            loss, out = real_metrics(*args, **kwargs)
            self.seen["loss"] = loss
            return loss, out

        def anchors(*args, **kwargs):
            self.seen["anchors"] = real_anchors(*args, **kwargs)
            return self.seen["anchors"]

        monkeypatch.setattr(dspark_core, "compute_metrics", metrics)
        monkeypatch.setattr(dflash_core, "select_anchors", anchors)


def _run_theirs(theirs, spy, loss_mask, ids, positions, doc, aux, pre_norm, gamma, alpha, grad=False):
    from speculators.losses import eager, resolve_loss_config

    anchors = loss_mask.clone()
    anchors[-BLOCK:] = False  # speculators' candidates; asking for all of them makes its draw deterministic
    with torch.set_grad_enabled(grad):
        theirs(hidden_states=aux[None], input_ids=ids[None], loss_mask=loss_mask[None].long(),
               verifier_last_hidden_states=pre_norm[None], document_ids=doc[None], position_ids=positions[None],
               loss_config=resolve_loss_config("kl_div", "eager"), tv_loss_fn=eager.tv_loss, gamma=gamma,
               confidence_head_alpha=alpha, max_anchors=int(anchors.sum()))
    chosen, valid = spy.seen["anchors"]
    assert bool(valid.all())
    return chosen


@pytest.mark.parametrize("head_type,with_markov", [("vanilla", True), ("gated", True), ("rnn", True),
                                                   ("vanilla", False)])
def test_speculators_dspark_gives_our_logits_confidences_and_loss(tmp_path, monkeypatch, head_type, with_markov):
    pytest.importorskip("speculators.models.dspark")
    from speculators.models.dflash.attention import create_anchor_block_mask_mod
    from speculators.models.dspark import DSparkDraftModel
    from torch.nn.attention.flex_attention import create_mask
    from transformers import AutoModelForCausalLM

    from lib.target.weights import load_target_embedding, load_target_lm_head

    target = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32).eval()
    c = DSparkConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=1024, vocab_size=1600, target_hidden_size=128, num_target_layers=8,
                     target_layer_ids=[1, 3, 5], block_size=BLOCK, mask_token_id=MASK_ID, markov_rank=16,
                     markov_head_type=head_type, confidence_head_with_markov=with_markov)
    torch.manual_seed(0)
    draft = DSparkDraft(c)
    with torch.no_grad():
        for p in draft.parameters():  # every weight drawn: norms and biases off their initial values
            p.add_(torch.randn(p.shape) * 0.05)
        draft.markov_head.markov_w2.weight.mul_(20)  # a Markov bias large enough to matter
    draft.set_target_weights(load_target_embedding(target), load_target_lm_head(target))
    draft.eval()
    out = export_draft(draft.state_dict(), c, str(tmp_path / "draft"), torch.float32, TINY_TARGET_DIR)

    theirs = DSparkDraftModel.from_pretrained(out).float().eval()
    assert theirs.target_layer_ids == [2, 4, 6] and theirs.block_size == BLOCK and theirs.mask_token_id == MASK_ID
    ours_state = draft.state_dict()
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours_state.items())
    # Dense masks on the CPU (speculators' default builds flex BlockMasks with a compiled function).
    theirs.config.transformer_layer_config._attn_implementation = "sdpa"
    theirs._create_mask_fn = create_mask

    ids, positions, doc, cu, loss_mask, aux, pre_norm = _batch()
    opts = DSparkOptions(block_size=BLOCK, loss_gamma=3.0, confidence_alpha=0.6)
    spy = _Spy(monkeypatch)
    anchors = _run_theirs(theirs, spy, _shifted(loss_mask, doc), ids, positions, doc, aux, pre_norm, 3.0, 0.6,
                          grad=True)
    blocks = build_dspark_blocks(ids, loss_mask, positions, cu, anchors, BLOCK, MASK_ID)
    n = blocks.num_blocks
    assert n == anchors.numel() > 8 and (blocks.target_rows.view(n, BLOCK)[:, -1] >= cu[1:][doc[anchors]]).any()

    their_mask_mod, q_len, kv_len = create_anchor_block_mask_mod(doc, doc.numel(), anchors, BLOCK)
    assert torch.equal(create_mask(their_mask_mod, None, None, q_len, kv_len, device="cpu")[0, 0],
                       dense_mask(blocks.blocks))

    with torch.no_grad():
        hidden = draft(blocks.blocks.ids[None], blocks.blocks.positions[None], aux[None], positions[None],
                       dense_attention(blocks.blocks))[0]
        logits, conf = draft.block_logits(hidden.view(n, BLOCK, -1), blocks.prev_ids.view(n, BLOCK))
        bias = draft.markov_head.bias(draft.markov_head.features(draft.prev_embedding(blocks.prev_ids.view(n, BLOCK)),
                                                                 hidden.view(n, BLOCK, -1)))
    d_logit = (logits.reshape(1, n * BLOCK, -1) - spy.seen["logits"]).abs().amax(-1)[0]
    d_conf = (conf.reshape(1, -1) - spy.seen["confidence"]).abs()[0]
    print(f"\n{head_type} markov->confidence={with_markov}: {n * BLOCK} slots, max |d logit| {d_logit.max():.3g} "
          f"(per slot {[f'{v:.2g}' for v in d_logit.view(n, BLOCK).amax(0).tolist()]}), max |d confidence logit| "
          f"{d_conf.max():.3g}; Markov bias up to {bias.abs().max():.3g}")
    assert d_logit.max() < 1e-4 and d_conf.max() < 1e-4 and bias.abs().max() > 0.3
    assert torch.equal(spy.seen["mask"][0].bool(), blocks.valid())

    # The loss: speculators' on our mask in its convention, ours on ours (one micro-batch: the global
    # count is this batch's). Its targets are its verifier norm + head on the pre-norm states; the
    # engine hands us the post-norm states, so ours get the target's own final norm.
    batch = {"aux_hidden": aux, "position_ids": positions, "final_hidden": target.model.norm(pre_norm).detach()}
    ours, _ = block_loss(draft, batch, blocks, opts.decay(), 0.6, blocks.valid().float().sum(), use_flex=False)
    theirs_loss = spy.seen["loss"]
    ours.backward()
    theirs_loss.backward()
    their_params = dict(theirs.named_parameters())
    d_grad = {name: (p.grad - their_params[name].grad).abs().max().item() / their_params[name].grad.abs().max().item()
              for name, p in draft.named_parameters() if p.requires_grad}
    worst = max(d_grad, key=d_grad.get)
    print(f"loss: ours {ours.item():.7f}, speculators {theirs_loss.item():.7f} (mask in its convention); gradients "
          f"of all {len(d_grad)} tensors: max |d| / max |g| {d_grad[worst]:.2g} ({worst})")
    torch.testing.assert_close(ours.detach(), theirs_loss.detach().float(), rtol=2e-6, atol=1e-6)
    assert d_grad[worst] < 1e-4

    # The same batch with our mask passed as it is: the difference is the convention (LOSS_DIFFERENCE).
    spy_raw = _Spy(monkeypatch)
    _run_theirs(theirs, spy_raw, loss_mask, ids, positions, doc, aux, pre_norm, 3.0, 0.6)
    raw = spy_raw.seen["loss"]
    print(f"loss with our mask unshifted: speculators {raw.item():.7f} vs ours {ours.item():.7f}: why:\n"
          f"{LOSS_DIFFERENCE}")
    assert abs(raw.item() - ours.item()) > 1e-3
