"""draft=peagle in-process: the COD slot sampler, the drafter against the training forward (the same
logits for the k proposals of a round, across rounds with rejected slots, in a batch, one draft forward
per round), the export round trip and family recognition, option errors, and the GPU attention against
the reference one. The training forward itself is held to speculators' class by
tests/test_peagle_parity.py; decoding on the tiny target equal to greedy by tests/test_peagle_train.py."""
from __future__ import annotations

import json

import pytest
import torch

from lib.config import ConfigError
from lib.drafts.base import family_of_export
from lib.drafts.drafting import VerifiedBlock
from lib.drafts.eagle3.loss import valid_positions
from lib.drafts.eagle3.vocab import build_vocab_map
from lib.drafts.peagle.attention import ParallelAttention
from lib.drafts.peagle.drafter import PEagleDrafter
from lib.drafts.peagle.export import export_draft, load_draft
from lib.drafts.peagle.model import PEagleDraft, PEagleDraftConfig
from lib.drafts.peagle.sampling import all_slots, batch_generator, cod_sample
from lib.drafts.peagle.trainer import PEagleOptions

pytestmark = pytest.mark.unit

DEPTHS = 4


def drawn_draft(hidden=32, vocab=60, draft_vocab=24, layers=2, seed=0, **extra) -> PEagleDraft:
    """Every parameter drawn (norm gains around one), two layers, norm_before_residual and fc_norm on."""
    fields = dict(hidden_size=hidden, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=hidden // 4, rms_norm_eps=1e-6, rope_theta=100.0, max_position_embeddings=256,
                  vocab_size=vocab, draft_vocab_size=draft_vocab, target_hidden_size=hidden, aux_layer_ids=[0, 1, 2],
                  num_hidden_layers=layers, mask_token_id=5, num_depths=DEPTHS, norm_before_residual=True,
                  fc_norm=True)
    draft = PEagleDraft(PEagleDraftConfig(**{**fields, **extra}))
    cfg = draft.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") or name.startswith("fc_norm.") else 0.3 * noise)
        draft.set_vocab_map(*build_vocab_map(torch.rand(vocab, generator=gen), draft_vocab))
    return draft.eval()


# ---- sampling ----------------------------------------------------------------------------------

def test_cod_keeps_every_real_slot_and_whole_valid_chains_thinned_per_depth():
    lengths = [300, 200, 260]
    cu = torch.tensor([0, 300, 500, 760])
    gen = torch.Generator().manual_seed(0)
    loss_mask = torch.rand(760, generator=gen) < 0.7
    valid = valid_positions(loss_mask, cu, torch.rand(760, generator=gen) < 0.95, DEPTHS)
    slots = cod_sample(valid, 0.7, 0.2, None, batch_generator(1, torch.arange(760)))
    assert slots.counts[0] == 760 and torch.equal(slots.anchor[:760], torch.arange(760))
    seeds, kept = int(valid[1].sum()), valid[1].nonzero().flatten()
    for d in range(1, DEPTHS):  # (n - d) * max(r^d, r_min) of the chains whose depth-d slot has a loss
        pool = kept[valid[d, kept]]
        assert slots.counts[d] == min(int((seeds - d) * max(0.7 ** d, 0.2)), pool.numel()), (d, slots.counts)
        kept = slots.anchor[slots.depth == d]
        assert bool(torch.isin(kept, pool).all())
    mask_slots = slots.depth > 0
    assert bool(valid[slots.depth[mask_slots], slots.anchor[mask_slots]].all())  # every mask slot has a loss
    table = slots.chain_index()
    for d in range(2, DEPTHS):
        anchors = slots.anchor[slots.depth == d]
        assert bool((table[1:d, anchors] >= 0).all())  # its chain is whole
    end = torch.repeat_interleave(cu[1:], torch.tensor(lengths))
    assert bool((slots.anchor + 2 + slots.depth < end[slots.anchor])[mask_slots].all())  # never past its sample
    # Reproducible from the seed and the tokens alone; another batch draws other chains; max_anchors caps.
    again = cod_sample(valid, 0.7, 0.2, None, batch_generator(1, torch.arange(760)))
    assert torch.equal(again.anchor, slots.anchor) and again.counts == slots.counts
    other = cod_sample(valid, 0.7, 0.2, None, batch_generator(1, torch.arange(760).flip(0)))
    assert not torch.equal(other.anchor, slots.anchor)
    capped = cod_sample(valid, 0.7, 0.2, 50, batch_generator(1, torch.arange(760)))
    assert capped.counts[1] == int((50 - 1) * 0.7)
    assert all(n <= int((50 - d) * max(0.7 ** d, 0.2)) for d, n in enumerate(capped.counts[2:], start=2))


# ---- drafter against training ------------------------------------------------------------------

def training_logits(draft: PEagleDraft, ids: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """[depths, T, V]: the training forward's logits of every (anchor, depth) of one sample."""
    tokens = ids.numel()
    slots = all_slots(tokens, DEPTHS)
    cu = torch.tensor([0, tokens])
    attention = ParallelAttention(slots, cu, draft.layers[0].self_attn.scale, "reference")
    slot_ids, positions = slots.inputs(ids, torch.arange(tokens), draft.config.mask_token_id)
    with torch.no_grad():
        hidden = draft(slot_ids, aux, positions, lambda _i, q, k, v: attention(q, k, v))
        return draft.compute_logits(hidden).view(DEPTHS, tokens, -1)


def block(seqs, auxes, starts, widths, valid, last) -> VerifiedBlock:
    """Rows' slots at positions start..start+width-1 (the token after each, the aux state at each);
    slots marked invalid get other tokens and states, which must not matter."""
    width = max(widths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    aux = torch.zeros(len(seqs), width, auxes[0].shape[1])
    positions = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, (seq, a, start, w) in enumerate(zip(seqs, auxes, starts, widths)):
        positions[b, :w] = torch.arange(start, start + w)
        ids[b, :w] = seq[start + 1:start + 1 + w]
        aux[b, :w] = a[start:start + w]
        bad = ~torch.tensor(valid[b])
        ids[b, bad] = 3
        aux[b, bad] = torch.randn(int(bad.sum()), aux.shape[2])
    return VerifiedBlock(ids, aux, positions, torch.tensor(valid), torch.tensor(last))


def test_drafter_proposes_what_training_predicts_at_every_depth_across_rounds_with_holes():
    draft = drawn_draft()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 60, (16,), generator=gen) for _ in range(2)]
    auxes = [torch.randn(16, draft.config.fc_in_features, generator=gen) for _ in range(2)]
    drafter = PEagleDrafter(draft)
    drafter.start()
    # Round 1: the prompts. Round 2: four slots each, of which row 0 keeps two (two holes). Round 3:
    # each row continues right after its last kept slot.
    rounds = [(
        [0, 0], [6, 6], [[True] * 6, [True] * 6], [5, 5]), (
        [6, 6], [4, 4], [[True, True, False, False], [True] * 4], [1, 3]), (
        [8, 10], [3, 3], [[True] * 3, [True] * 3], [2, 2])]
    for k in (DEPTHS, 2):
        drafter.start()
        for starts, widths, valid, last in rounds:
            out = drafter.draft_logits(block(seqs, auxes, starts, widths, valid, last), k)
            for b in range(2):
                anchor = starts[b] + last[b]
                expected = training_logits(draft, seqs[b][:anchor + 2], auxes[b][:anchor + 2])[:k, anchor]
                torch.testing.assert_close(out[b], expected, rtol=1e-4, atol=1e-4)
    assert drafter.forwards == 2 * len(rounds)  # one draft forward per round
    with pytest.raises(ValueError, match=r"k=5 draft tokens: this P-EAGLE draft proposes 1 to 4 per forward"):
        drafter.draft_logits(block(seqs, auxes, [11, 13], [1, 1], [[True], [True]], [0, 0]), 5)


# ---- export and options ------------------------------------------------------------------------

def test_export_round_trips_and_only_peagle_claims_it(tmp_path):
    draft = drawn_draft(norm_before_residual=False, fc_norm=False)
    out = export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), torch.float32, None)
    again = load_draft(out)
    assert again.config == draft.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), draft.state_dict().values()))
    assert family_of_export(out) == "peagle"
    written = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert written["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == DEPTHS
    assert written["transformer_layer_config"]["num_hidden_layers"] == 2 and written["mask_token_id"] == 5
    with pytest.raises(ConfigError, match=r"draft=eagle3 disagrees with the export: .* is the peagle family's"):
        family_of_export(out, "eagle3")


def test_options_name_the_bad_key():
    with pytest.raises(ValueError, match=r"draft.options.num_depths=0 must be an integer >= 1"):
        PEagleOptions(num_depths=0)
    with pytest.raises(ValueError, match=r"unknown keys \['ttt_length'\]"):
        PEagleOptions.from_mapping({"ttt_length": 3})
    with pytest.raises(ValueError, match=r"down_sample_ratio=1.5 must be in \(0, 1\]"):
        PEagleOptions(down_sample_ratio=1.5)


@pytest.mark.gpu
def test_flex_attention_equals_the_reference_on_cuda():
    device = torch.device("cuda")
    tokens = 2100
    cu = torch.tensor([0, 700, 1000, 2100])
    valid = valid_positions(torch.ones(tokens, dtype=torch.bool), cu, torch.ones(tokens, dtype=torch.bool), 8)
    slots = cod_sample(valid, 0.7, 0.2, 512, batch_generator(0, torch.arange(tokens))).to(device)
    n = slots.anchor.numel()
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(n, heads, 64, device=device, generator=gen) for heads in (8, 2, 2))
    flex = ParallelAttention(slots, cu, 0.125, "flex", device)(q, k, v)
    reference = ParallelAttention(slots, cu, 0.125, "reference", device)(q, k, v)
    torch.testing.assert_close(flex, reference, rtol=2e-4, atol=2e-4)
