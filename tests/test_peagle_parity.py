"""Our P-EAGLE training forward against speculators 0.9.0's PEagleDraftModel (the class vLLM's format
comes from), on our speculators-format export.

The draft is drawn (every parameter, norm gains and mask_hidden too, two layers, a reduced draft
vocabulary), exported by lib/drafts/peagle/export.py and loaded by speculators' own from_pretrained.
Their forward runs on one packed batch of three samples, shifted as their data pipeline shifts it
(speculators.models.eagle3.data.shift_batch: hidden at t with token x[t+1]), with their dense-mask
("eager") attention, which its code supports next to flex attention. It draws its slots itself
(generate_cod_sample_indices, from torch's global generator): we draw the same ones by seeding that
generator identically, check them against the rotary positions their forward uses, map them to our
packed indices and run our forward (PEagleDraft.forward with ParallelAttention, the path training takes)
on them. Compared, at every slot of their forward: the logits (their lm_head output, read by a hook),
and then the loss and every parameter's gradient, with their eager KL loss (speculators' default loss
is KL; ours is the cross-entropy, which differs by the targets' entropy and has the same gradient).

Rope positions differ by a constant per sample (they rotate at the packed index, we at the position in
the sample), which rotary attention does not see. Run from the reference venv (skipped without it):
    PYTHONPATH=$PWD /work/refvenv/bin/python -m pytest -q -s tests/test_peagle_parity.py
"""
from __future__ import annotations

import pytest
import torch

from lib.drafts.eagle3.target_head import TargetHead
from lib.drafts.eagle3.vocab import build_vocab_map
from lib.drafts.peagle.attention import ParallelAttention
from lib.drafts.peagle.export import export_draft
from lib.drafts.peagle.model import PEagleDraft, PEagleDraftConfig
from lib.drafts.peagle.sampling import Slots
from lib.drafts.peagle.trainer import BatchContext, slot_loss

pytestmark = pytest.mark.unit

LENGTHS = (23, 31, 17)  # samples of the packed batch
DEPTHS = 4
MASK_ID = 7
ATOL = 1e-4


@pytest.fixture(scope="module")
def speculators_peagle():
    return pytest.importorskip("speculators.models.peagle", reason="speculators is not installed")


def drawn_draft(norm_before_residual: bool, fc_norm: bool) -> PEagleDraft:
    cfg = PEagleDraftConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, rms_norm_eps=1e-6, rope_theta=50.0, max_position_embeddings=128,
                            vocab_size=50, draft_vocab_size=20, target_hidden_size=32, aux_layer_ids=[0, 2, 3],
                            fc_norm=fc_norm, num_hidden_layers=2, mask_token_id=MASK_ID, num_depths=DEPTHS,
                            norm_before_residual=norm_before_residual)
    draft = PEagleDraft(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_gain = name.endswith("norm.weight") or name.startswith("fc_norm.")
            param.copy_(1.0 + 0.3 * noise if is_gain else noise if name == "mask_hidden" else 0.3 * noise)
        draft.set_vocab_map(*build_vocab_map(torch.rand(cfg.vocab_size, generator=gen), cfg.draft_vocab_size))
    return draft.eval()


def tiny_verifier(path, cfg: PEagleDraftConfig) -> str:
    """A Llama target on disk: speculators reads its final norm and lm_head for the loss's targets."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=6,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size, tie_word_embeddings=False))
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return str(path)


def load_speculators(module, path: str):
    config = module.PEagleSpeculatorConfig.from_pretrained(path)
    config.transformer_layer_config._attn_implementation = "eager"
    return module.PEagleDraftModel.from_pretrained(path, config=config, dtype=torch.float32).eval()


def packed_batch(cfg: PEagleDraftConfig):
    """Ours (ids, aux, final pre-norm hidden, positions, cu) and theirs: per sample, x[1:] with the
    hidden states [:-1], the final hidden states [1:] and a loss mask that is off for the first
    DEPTHS slots of each sample (so no chain of theirs crosses into the previous sample)."""
    gen = torch.Generator().manual_seed(1)
    total = sum(LENGTHS)
    ids = torch.randint(0, cfg.vocab_size, (total,), generator=gen)
    aux = torch.randn(total, cfg.fc_in_features, generator=gen)
    final = torch.randn(total, cfg.hidden_size, generator=gen) * 3
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    theirs = {key: [] for key in ("input_ids", "hidden_states", "verifier_last_hidden_states", "loss_mask",
                                  "document_ids")}
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = end - start - 1
        theirs["input_ids"].append(ids[start + 1:end])
        theirs["hidden_states"].append(aux[start:end - 1])
        theirs["verifier_last_hidden_states"].append(final[start + 1:end])
        mask = (torch.rand(n, generator=gen) < 0.8).float()
        mask[:DEPTHS] = 0
        theirs["loss_mask"].append(mask)
        theirs["document_ids"].append(torch.full((n,), i))
    theirs = {key: torch.cat(parts)[None] for key, parts in theirs.items()}
    return (ids, aux, final, positions, cu), theirs


def run_theirs(model, theirs: dict, seed: int):
    """Their forward with eager KL; returns (their slots (anchor, depth), logits per slot, loss)."""
    from speculators.losses import resolve_loss_config
    from speculators.models.peagle.data import generate_cod_sample_indices

    n = theirs["input_ids"].shape[1]
    torch.manual_seed(seed)
    anchor, depth = generate_cod_sample_indices(n, theirs["loss_mask"], num_depths=DEPTHS)
    logits, rotary_positions = [], []
    hooks = [model.lm_head.register_forward_hook(lambda _m, _a, out: logits.append(out[0])),
             model.rotary_emb.register_forward_hook(lambda _m, args, _o: rotary_positions.append(args[1][0]))]
    torch.manual_seed(seed)  # their forward draws the same slots again
    try:
        _, loss, _ = model(**theirs, num_depths=DEPTHS, loss_config=resolve_loss_config("kl_div", "eager"))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(rotary_positions[0], anchor + depth), "their forward drew other slots"
    return anchor, depth, logits[0], loss


def our_slots(anchor: torch.Tensor, depth: torch.Tensor, cu: torch.Tensor) -> tuple[Slots, torch.Tensor]:
    """Their slots in our packed indices, and for each of their slots our slot index. Their sample i
    starts i slots earlier than ours (each sample lost its first token to the shift); our extra real
    slot per sample (its last token) is no slot's context of theirs."""
    tokens = int(cu[-1])
    shifted_starts = cu[:-1] - torch.arange(len(LENGTHS))
    doc = torch.searchsorted(shifted_starts[1:], anchor, right=True)
    ours = anchor + doc
    counts = torch.bincount(depth).tolist()
    real = depth == 0
    slots = Slots(torch.cat([torch.arange(tokens), ours[~real]]), torch.cat([torch.zeros(tokens, dtype=torch.long),
                                                                              depth[~real]]), [tokens, *counts[1:]])
    index = torch.empty_like(anchor)
    index[real] = ours[real]
    index[~real] = tokens + torch.arange(int((~real).sum()))
    return slots, index


@pytest.mark.parametrize("norm_before_residual,fc_norm", [(True, False), (False, True)],
                         ids=["norm_before_residual", "fc_norm"])
def test_speculators_peagle_matches_our_forward_loss_and_gradients(speculators_peagle, norm_before_residual, fc_norm,
                                                                   tmp_path):
    draft = drawn_draft(norm_before_residual, fc_norm)
    cfg = draft.config
    verifier = tiny_verifier(tmp_path / "target", cfg)
    out = export_draft(draft.state_dict(), cfg, str(tmp_path / "draft"), torch.float32, verifier)
    model = load_speculators(speculators_peagle, out)
    assert model.mask_token_id == MASK_ID and model.config.norm_before_residual is norm_before_residual
    assert len(model.layers) == 2 and (model.fc_norm is not None) is fc_norm
    assert torch.equal(model.d2t, draft.d2t) and torch.equal(model.t2d, draft.t2d)
    assert torch.equal(model.mask_hidden, draft.mask_hidden)
    ours_in, theirs_in = packed_batch(cfg)
    ids, aux, final, positions, cu = ours_in
    for p in [*model.parameters(), *draft.parameters()]:
        p.requires_grad_(True)
    for p in (model.verifier_lm_head.weight, model.verifier_norm.weight):
        p.requires_grad_(False)

    anchor, depth, their_logits, their_loss = run_theirs(model, theirs_in, seed=3)
    assert int((depth > 0).sum()) > 0 and int(depth.max()) == DEPTHS - 1  # chains at every depth
    slots, index = our_slots(anchor, depth, cu)
    attention = ParallelAttention(slots, cu, draft.layers[0].self_attn.scale, "reference")
    slot_ids, slot_positions = slots.inputs(ids, positions, MASK_ID)
    our_logits = draft.compute_logits(draft(slot_ids, aux, slot_positions, lambda _i, q, k, v: attention(q, k, v)))
    gap = (our_logits[index] - their_logits).detach().abs()
    diffs = [float(gap[depth == d].max()) for d in range(DEPTHS)]
    print(f"\nspeculators PEagleDraftModel ({'norm_before_residual' if norm_before_residual else 'fc_norm'}): "
          f"{len(anchor)} slots, per depth {torch.bincount(depth).tolist()}, max |d logit| per depth "
          f"{['%.2e' % d for d in diffs]}")
    assert max(diffs) < ATOL, diffs

    # The loss over the slots their loss mask keeps, and its gradient: their KL + the targets' entropy
    # is our cross-entropy (the sums agree; their mean divides by count + 1e-5).
    their_valid = theirs_in["loss_mask"][0, anchor + depth].bool()
    valid = torch.zeros(slots.anchor.numel(), dtype=torch.bool)
    valid[index] = their_valid
    head = TargetHead(_verifier_head(verifier), draft.d2t)
    target = head.target_probs(model.verifier_norm(final).detach())
    count = valid.sum()
    loss, sums = slot_loss(draft, {"input_ids": ids, "aux_hidden": aux, "position_ids": positions, "cu_seqlens": cu},
                           BatchContext(slots, valid, target), count.float(), backend="reference")
    labels = slots.anchor[valid] + 1 + slots.depth[valid]
    entropy = -(target.probs[labels] * target.probs[labels].clamp_min(1e-30).log()).sum()
    ours_kl_sum, theirs_kl_sum = float(loss) * int(count) - float(entropy), float(their_loss) * (int(count) + 1e-5)
    print(f"loss over {int(count)} slots: sum of KL ours {ours_kl_sum:.6f}, theirs {theirs_kl_sum:.6f}")
    assert ours_kl_sum == pytest.approx(theirs_kl_sum, rel=1e-5)
    loss.backward()
    their_loss.backward()
    theirs_grads = dict(model.named_parameters())
    worst = 0.0
    for name, p in draft.named_parameters():
        g, ref = p.grad, theirs_grads[name].grad
        assert g is not None and ref is not None, name
        torch.testing.assert_close(g, ref * (int(count) + 1e-5) / int(count), rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, float((g - ref).abs().max()))
    print(f"gradients of {len(list(draft.parameters()))} tensors: max |d grad| {worst:.2e}")


def _verifier_head(path: str) -> torch.Tensor:
    from lib.target.weights import load_target_lm_head
    return load_target_lm_head(path)
