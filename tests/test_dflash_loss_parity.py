"""DFlash's loss against speculators 0.9.0's, fp32 on the CPU (skipped where speculators is not
importable). Run it from the reference venv:
    PYTHONPATH=$PWD /work/refvenv/bin/python -m pytest -q -s tests/test_dflash_loss_parity.py

- On the same logits: our block loss under loss_weights=dpace equals speculators' DFlash loss
  (models/dflash/metrics.compute_metrics with per_position_loss_weight=dpace and CE), value and
  gradients; our D-PACE weights equal its dpace_loss_decay's. Under loss_weights=decay the two differ
  by the normaliser only: speculators divides by the count of valid rows, we by the decay-weighted
  count (the DFlash recipe); that relation is asserted, so a change on either side shows.
- Whole class: speculators' DFlashDraftModel (our export converted by its converter) runs its own
  forward (anchors, mask, verifier targets, D-PACE loss) on a packed batch; ours, on the same anchors,
  gives the same logits, loss and gradients. Its labels are the verifier's argmax, ours the data's
  next tokens: the batch is the verifier's own greedy continuation, where the two agree.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.drafts.dflash.export import export_draft
from lib.drafts.dflash.mask import build_blocks, dense_attention
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft
from lib.drafts.dflash.trainer import DFlashOptions, block_loss, dpace_weights

pytestmark = pytest.mark.unit
ALPHA = 0.5


def _draft(vocab: int, hidden: int, block: int, mask_id: int, seed: int = 0) -> DFlashDraft:
    c = DFlashConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=hidden // 4, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=1024, vocab_size=vocab, target_hidden_size=hidden, num_target_layers=8,
                     target_layer_ids=[1, 3, 5], block_size=block, mask_token_id=mask_id)
    torch.manual_seed(seed)
    draft = DFlashDraft(c)
    with torch.no_grad():
        for p in draft.parameters():  # norms off 1 too, so a mixed-up norm shows
            p.add_(torch.randn_like(p) * 0.05)
    return draft


def _packed(lengths, prompt: int, vocab: int, seed: int):
    """A packed batch whose sequences start with a prompt of `prompt` tokens (no loss) and have a few
    loss holes inside (rows without a loss in the middle of a block)."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    ids = torch.randint(5, vocab, (tokens,), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    loss_mask = torch.rand(tokens, generator=g) > 0.1
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for s in starts[:-1]:
        loss_mask[s:s + prompt] = False
    return ids, loss_mask, positions, torch.tensor(starts, dtype=torch.int32)


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def test_dpace_loss_weights_and_gradients_equal_speculators_on_the_same_logits():
    pytest.importorskip("speculators.models.dflash")
    from speculators.losses import dpace_loss_decay, eager
    from speculators.models.dflash.metrics import compute_metrics

    block, vocab = 8, 97
    draft = _draft(vocab, 32, block, mask_id=1)
    g = torch.Generator().manual_seed(1)
    draft.set_target_weights(torch.randn(vocab, 32, generator=g), torch.randn(vocab, 32, generator=g) * 0.3)
    ids, loss_mask, positions, cu = _packed((37, 29, 22), prompt=block - 1, vocab=vocab, seed=2)
    anchors = torch.tensor([8, 12, 20, 27, 44, 50, 57, 73, 78])
    blocks = build_blocks(ids, loss_mask, positions, cu, anchors, block, 1)
    aux = torch.randn(ids.shape[0], 3 * 32, generator=g)
    batch = {"aux_hidden": aux, "position_ids": positions}
    valid = blocks.valid()
    count = valid.sum().float()
    params = [p for p in draft.parameters() if p.requires_grad]

    def theirs(weighting: str, gamma: float = 4.0):
        hidden = draft(blocks.ids[None], blocks.positions[None], aux[None], positions[None], dense_attention(blocks))
        logits = draft.logits(hidden)
        # Their CE labels are argmax(targets): one-hot targets at our labels (rows without a loss: any).
        targets = F.one_hot(blocks.labels.clamp_min(0), vocab).float()[None]
        loss, _ = compute_metrics(logits, targets, valid[None].float(), block, gamma=gamma,
                                  loss_config={"ce": (eager.ce_loss, 1.0)}, per_position_loss_weight=weighting,
                                  dpace_alpha=ALPHA)
        return loss, logits[0]

    ours = block_loss(draft, batch, blocks, DFlashOptions(block_size=block, loss_weights="dpace").position_weights(),
                      count, use_flex=False, dpace_alpha=ALPHA)[0]
    ref, logits = theirs("dpace")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # they add 1e-5 to the count, we do not
    worst = 0.0
    for a, b in zip(_grads(ours, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        worst = max(worst, float((a - b).abs().max()))

    ce = F.cross_entropy(logits.detach(), blocks.labels.clamp_min(0), reduction="none") * valid
    pos = (torch.arange(valid.numel()) % block)[None].float()
    their_w = dpace_loss_decay(pos, loss_mask=valid[None].float(), block_size=block, dpace_alpha=ALPHA,
                               elementwise_loss=ce[None])[0]
    rows = valid.nonzero().flatten()
    our_w = dpace_weights(ce[rows], rows, blocks.num_blocks, block, ALPHA)
    torch.testing.assert_close(our_w, their_w[rows], rtol=1e-6, atol=1e-6)
    assert float(their_w[~valid].abs().max()) == 0.0
    print(f"\nD-PACE vs speculators, same logits: |d loss| {float((ours - ref).detach().abs()):.2e}, max |d grad| "
          f"{worst:.2e}, max |d weight| {float((our_w - their_w[rows]).abs().max()):.2e} over {rows.numel()} rows")

    # decay: the same weights exp(-j/gamma) at drafted index j; speculators divides by the count,
    # we by the weighted count.
    opts = DFlashOptions(block_size=block, loss_weights="decay", loss_gamma=4.0)
    j = (torch.arange(valid.numel()) % block - 1)[valid]
    weighted_count = opts.decay()[j].sum()
    ours_decay = block_loss(draft, batch, blocks, opts.decay(), weighted_count, use_flex=False)[0]
    ref_decay, _ = theirs("fixed-exp-decay", gamma=4.0)
    torch.testing.assert_close(ours_decay * weighted_count / count, ref_decay, rtol=1e-5, atol=1e-7)


def test_speculators_dflash_class_gives_our_logits_loss_and_gradients_under_dpace(tmp_path):
    pytest.importorskip("speculators.models.dflash")
    from speculators.convert.dflash.converter import DFlashConverter
    from speculators.losses import eager
    from speculators.models.dflash import DFlashDraftModel as SpecDFlash
    from speculators.models.dflash.utils import select_anchors
    from transformers import AutoConfig

    from lib.config import TINY_TARGET_DIR
    from lib.target.weights import load_target_embedding, load_target_lm_head

    hf = AutoConfig.from_pretrained(TINY_TARGET_DIR)
    block, hidden, vocab = 4, hf.hidden_size, hf.vocab_size
    draft = _draft(vocab, hidden, block, mask_id=4)
    draft.set_target_weights(load_target_embedding(TINY_TARGET_DIR), load_target_lm_head(TINY_TARGET_DIR))
    ours_dir = export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), torch.float32)
    spec_dir = str(tmp_path / "draft_speculators")
    DFlashConverter().convert(ours_dir, spec_dir, base_model=TINY_TARGET_DIR, validate=False)
    config = SpecDFlash.config_class.from_pretrained(spec_dir)
    config.transformer_layer_config._attn_implementation = "sdpa"  # a dense mask on the CPU
    theirs = SpecDFlash.from_pretrained(spec_dir, config=config).float()

    lengths, prompt = (40, 30, 26), block - 1
    ids, loss_mask, positions, cu = _packed(lengths, prompt, vocab, seed=5)
    tokens = ids.shape[0]
    g = torch.Generator().manual_seed(6)
    aux = torch.randn(1, tokens, 3 * hidden, generator=g)
    last = torch.randn(1, tokens, hidden, generator=g)
    with torch.no_grad():  # the data is the verifier's greedy continuation: their labels are ours
        greedy = theirs.verifier_lm_head(theirs.verifier_norm(last))[0].argmax(-1)
    ids[1:] = greedy[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    kwargs = dict(hidden_states=aux, input_ids=ids[None], loss_mask=loss_mask[None].long(),
                  verifier_last_hidden_states=last, document_ids=doc, position_ids=positions[None])
    num_anchors = 12

    torch.manual_seed(7)
    anchors, anchor_valid = select_anchors(loss_mask[None].long(), num_anchors, block)
    assert bool(anchor_valid.all())
    torch.manual_seed(7)
    _, ref_logits, targets, their_mask, _ = theirs._backbone_forward(**kwargs, max_anchors=num_anchors)
    torch.manual_seed(7)  # their forward draws the same anchors again
    _, ref_loss, _ = theirs(**kwargs, loss_config={"ce": (eager.ce_loss, 1.0)}, max_anchors=num_anchors,
                            per_position_loss_weight="dpace", dpace_alpha=ALPHA)

    blocks = build_blocks(ids, loss_mask, positions, cu, anchors, block, 4)
    valid = blocks.valid()
    assert torch.equal(their_mask[0].bool(), valid)
    assert torch.equal(targets[0].argmax(-1)[valid], blocks.labels[valid])
    ours_hidden = draft(blocks.ids[None], blocks.positions[None], aux, positions[None], dense_attention(blocks))[0]
    d_logit = (draft.logits(ours_hidden) - ref_logits[0]).detach().abs().amax(-1).view(-1, block).amax(0)
    print(f"\nspeculators DFlashDraftModel vs ours, max |d logit| per block position (0 = anchor): "
          f"{[f'{x:.1e}' for x in d_logit.tolist()]}")
    assert float(d_logit.max()) < 1e-4

    ours_loss = block_loss(draft, {"aux_hidden": aux[0], "position_ids": positions}, blocks,
                           torch.ones(block - 1), valid.sum().float(), use_flex=False, dpace_alpha=ALPHA)[0]
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-5, atol=1e-7)
    names = [n for n, p in draft.named_parameters() if p.requires_grad]
    mine = dict(zip(names, _grads(ours_loss, [p for p in draft.parameters() if p.requires_grad])))
    their_params = dict(theirs.named_parameters())
    shared = [n for n in names if n in their_params]
    assert len(shared) == len(names), sorted(set(names) - set(their_params))
    ref_grads = dict(zip(shared, _grads(ref_loss, [their_params[n] for n in shared])))
    worst = 0.0
    for n in names:
        torch.testing.assert_close(mine[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        worst = max(worst, float((mine[n] - ref_grads[n]).abs().max()))
    print(f"loss {float(ours_loss.detach()):.6f} vs {float(ref_loss.detach()):.6f}; max |d grad| {worst:.2e} over "
          f"{len(names)} tensors")
