"""A draft=dflash2 export loaded by speculators 0.9.0's own DFlash2DraftModel gives our logits and
selector scores at every output position of a packed batch, and our training loss, metrics and
parameter gradients on the same blocks (skipped where speculators is not importable; CI has none). Run it from the reference venv:
    PYTHONPATH=$PWD /work/refvenv/bin/python -m pytest -q -s tests/test_dflash2_parity.py

Where the losses differ, on purpose:
- speculators keeps a block that runs past the end of its anchor's document and trains its rows
  after the boundary on the next document's tokens and target distributions (the block's context is
  still the anchor's document: an objective no served block has). Ours masks those rows (DFlash's
  build_blocks). With no loss on the first block_size-1 tokens of each document the two agree; the
  last test shows the rows speculators adds when there is.
- Normalisation: speculators divides each batch by its own count of valid rows plus 1e-5; ours by
  the global count over micro-batches and trainers (equal here: one batch, eps below fp32 noise).
- Anchors: which ones are drawn differs by design (ours from the seed and the batch's tokens, with a
  loss on the next token; theirs from the global RNG, with a loss on the anchor itself); the tests
  feed both the anchors speculators draws.
"""
from __future__ import annotations

import pytest
import torch

from lib.config import TINY_TARGET_DIR
from lib.drafts.dflash.mask import build_blocks, dense_attention
from lib.drafts.dflash2.export import export_speculators
from lib.drafts.dflash2.loss import block_loss
from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft
from lib.drafts.dflash2.trainer import DFlash2Options

pytestmark = pytest.mark.unit

BLOCK, MASK_ID, TOP_K = 4, 4, 6
LENGTHS = (23, 17, 20)


def _ours():
    from transformers import AutoConfig

    from lib.target.weights import load_target_embedding, load_target_lm_head

    hf = AutoConfig.from_pretrained(TINY_TARGET_DIR)
    # rope_theta and eps away from transformers' Qwen3 defaults: their model must read ours from the export.
    c = DFlash2Config(hidden_size=hf.hidden_size, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=50000.0,
                      max_position_embeddings=1024, vocab_size=hf.vocab_size, target_hidden_size=hf.hidden_size,
                      num_target_layers=hf.num_hidden_layers, target_layer_ids=[1, 3, 5], block_size=BLOCK,
                      mask_token_id=MASK_ID, conv_kernel_size=3, conv_group_size=16, selector_rank=8,
                      selector_top_k=TOP_K)
    torch.manual_seed(0)
    draft = DFlash2Draft(c)
    with torch.no_grad():  # drawn weights: identity convolutions, unit norms and zero projections would hide mix-ups
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 3 else 0.05))
    draft.set_target_weights(load_target_embedding(TINY_TARGET_DIR), load_target_lm_head(TINY_TARGET_DIR))
    return draft.eval()


def _batch(vocab: int, prompt_masked: bool):
    """A packed batch of three documents; without a loss on each document's first BLOCK-1 tokens when
    prompt_masked (no block of speculators' then trains across a document boundary)."""
    g = torch.Generator().manual_seed(1)
    tokens = sum(LENGTHS)
    ids = torch.randint(5, vocab, (tokens,), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    loss_mask = torch.ones(tokens, dtype=torch.bool)
    loss_mask[position_ids < (BLOCK - 1 if prompt_masked else 2)] = False
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    aux = torch.randn(tokens, 3 * 128, generator=g)
    last = torch.randn(tokens, 128, generator=g) * 3  # the target's last layer output, before its final norm
    return ids, position_ids, doc, loss_mask, cu, aux, last


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("speculators.models.dflash2")
    from speculators.models.attention import create_float_mask
    from speculators.models.dflash2 import DFlash2DraftModel

    draft = _ours()
    out = export_speculators(draft.state_dict(), draft.config, str(tmp_path_factory.mktemp("dflash2") / "spec"),
                             torch.float32, verifier_path=TINY_TARGET_DIR)
    theirs = DFlash2DraftModel.from_pretrained(out).float().eval()
    # CPU: their masks as dense float masks and eager attention (flex attention is their GPU path).
    theirs.config.transformer_layer_config._attn_implementation = "eager"
    theirs._attn_impl, theirs._create_mask_fn = "eager", create_float_mask
    return draft, theirs


def _their_inputs(batch):
    ids, position_ids, doc, loss_mask, _, aux, last = batch
    return dict(hidden_states=aux[None], input_ids=ids[None], loss_mask=loss_mask[None].long(),
                verifier_last_hidden_states=last[None], document_ids=doc[None], position_ids=position_ids[None])


def _anchors(loss_mask: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    from speculators.models.dflash.utils import select_anchors

    torch.manual_seed(seed)
    anchors, valid = select_anchors(loss_mask[None].long(), count, BLOCK)
    assert bool(valid.all())
    return anchors


def _our_step(draft, theirs, batch, anchors):
    ids, position_ids, _, loss_mask, cu, aux, last = batch
    blocks = build_blocks(ids, loss_mask, position_ids, cu, anchors, BLOCK, MASK_ID)
    with torch.no_grad():
        final = theirs.verifier_norm(last)  # what our engine captures: the last layer after the final norm
    ours = {"aux_hidden": aux, "final_hidden": final, "position_ids": position_ids, "input_ids": ids}
    options = DFlash2Options(block_size=BLOCK, selector_top_k=TOP_K, loss_gamma=4.0, selector_loss_alpha=0.7)
    loss, sums = block_loss(draft, ours, blocks, options.decay(), 0.7, blocks.valid().float().sum(), use_flex=False)
    return blocks, loss, sums


def test_their_model_gives_our_logits_and_selector_scores_at_every_position(pair):
    draft, theirs = pair
    assert theirs.block_size == BLOCK and theirs.target_layer_ids == [2, 4, 6]  # speculators: input of layer k
    batch = _batch(draft.config.vocab_size, prompt_masked=False)
    ids, position_ids, _, loss_mask, cu, aux, _ = batch
    anchors = _anchors(loss_mask, 12, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        hidden_t, logits_t, _, _, index = theirs._backbone_forward(**_their_inputs(batch), max_anchors=12)
        blocks = build_blocks(ids, loss_mask, position_ids, cu, anchors, BLOCK, MASK_ID)
        assert torch.equal(index, (anchors[:, None] + torch.arange(BLOCK)).flatten())
        hidden_o = draft(blocks.ids[None], blocks.positions[None], aux[None], position_ids[None],
                         dense_attention(blocks))
        logits_o = draft.logits(hidden_o)
        # Selector scores of every position's unary top-K, after its block's previous true token.
        predecessors = torch.cat([ids[anchors][:, None], ids[index].view(-1, BLOCK)[:, :-1]], 1).flatten()[None]
        candidates = logits_t.topk(TOP_K, -1).indices
        scores_t = theirs.candidate_selector.score_candidates(logits_t, hidden_t, predecessors, candidates)
        scores_o = draft.candidate_selector.scores(logits_o.gather(-1, candidates), hidden_o, predecessors, candidates)
    d_logit = (logits_o - logits_t).abs().amax(-1)[0]  # per output position (all blocks x BLOCK)
    d_score = (scores_o - scores_t).abs().amax(-1)[0]
    print(f"\ndflash2 parity vs speculators 0.9.0 (fp32 CPU, {d_logit.numel()} positions): max |d logit| "
          f"{float(d_logit.max()):.2e} (per position: {[float(f'{x:.1e}') for x in d_logit]}), max |d selector score| "
          f"{float(d_score.max()):.2e}, logits' scale {float(logits_t.abs().max()):.1f}")
    assert d_logit.numel() == 12 * BLOCK and float(d_logit.max()) < 1e-4 and float(d_score.max()) < 1e-4


def test_their_loss_metrics_and_gradients_equal_ours_when_no_block_trains_across_documents(pair):
    from speculators.losses import eager

    draft, theirs = pair
    batch = _batch(draft.config.vocab_size, prompt_masked=True)
    anchors = _anchors(batch[3], 10, seed=5)
    draft.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    blocks, loss_o, sums_o = _our_step(draft, theirs, batch, anchors)
    loss_o.backward()
    torch.manual_seed(5)
    _, loss_t, metrics = theirs(**_their_inputs(batch), loss_config={"kl_div": (eager.kl_div_loss, 1.0)},
                                tv_loss_fn=eager.tv_loss, gamma=4.0, max_anchors=10, selector_loss_alpha=0.7)
    loss_t.backward()
    n = BLOCK - 1
    kl, ce, picked, _, recall, count = sums_o[1:].view(6, n)
    theirs_params = dict(theirs.named_parameters())
    d_grad = {name: float((p.grad - theirs_params[name].grad).abs().max() / theirs_params[name].grad.abs().max())
              for name, p in draft.named_parameters() if p.requires_grad}
    worst = max(d_grad, key=d_grad.get)
    print(f"\ndflash2 loss: ours {float(loss_o.detach()):.7f}, speculators {float(loss_t.detach()):.7f} over {int(count.sum())} rows; "
          f"gradients of all {len(d_grad)} trained tensors: max |d grad| / max |grad| {d_grad[worst]:.1e} ({worst})")
    assert int(count.sum()) == int(metrics[f"unary_candidate_recall_at_{TOP_K}_total"])
    torch.testing.assert_close(loss_o.detach(), loss_t.detach(), rtol=1e-5, atol=0)
    assert float(recall.sum()) == float(metrics[f"unary_candidate_recall_at_{TOP_K}_sum"])
    assert float(picked.sum()) == float(metrics["teacher_forced_selector_acc_sum"])
    assert d_grad[worst] < 1e-4


def test_speculators_trains_rows_past_a_document_boundary_that_ours_masks(pair):
    """The documented difference: with a loss right from a document's third token, speculators'
    blocks near a document's end put loss on the next document's first tokens; ours has no row there."""
    draft, theirs = pair
    batch = _batch(draft.config.vocab_size, prompt_masked=False)
    ids, position_ids, doc, loss_mask, cu, _, _ = batch
    anchors = _anchors(loss_mask, 40, seed=7)
    torch.manual_seed(7)
    with torch.no_grad():
        *_, mask_t, index = theirs._backbone_forward(**_their_inputs(batch), max_anchors=40)
    blocks = build_blocks(ids, loss_mask, position_ids, cu, anchors, BLOCK, MASK_ID)
    crossing = doc[index] != doc[anchors].repeat_interleave(BLOCK)
    assert int((mask_t[0].bool() & crossing).sum()) > 0  # rows speculators trains on another document
    assert not bool((blocks.valid() & crossing).any())  # none of ours
    assert torch.equal(mask_t[0].bool() & ~crossing, blocks.valid())  # and otherwise the same rows
