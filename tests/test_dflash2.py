"""DFlash2 (draft=dflash2) on the CPU: the dynamic convolution against a per-row reference and as the
identity at initialisation (a new draft is DFlash), flex attention's mask and output against the dense
reference, the chunked head loss against autograd, train.compile against eager, the drafter's walk
against the training layout (tests/test_dflash2_train.py decodes the tiny target with eval.py: equal
to greedy decoding, tokens per target forward), exports in both layouts found by eval's family
lookup, options and capture plan."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from lib.config import Config, ConfigError, DraftConfig, TargetConfig, TINY_TARGET_DIR
from lib.drafts.base import family_of_export, get_strategy
from lib.drafts.dflash.mask import build_blocks, dense_attention, dense_mask, flex_attention_fn, flex_mask_mod, \
    sample_anchors
from lib.drafts.dflash.model import DFlashDraft
from lib.drafts.dflash2 import fused, loss as loss_lib
from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft
from lib.drafts.dflash2.trainer import DFlash2Options
from tests.block_fixtures import MASK, drawn_draft, packed, tiny_spec
from tests.helpers import assert_same_steps, compiled_against_eager

pytestmark = pytest.mark.unit


def config(**over) -> DFlash2Config:
    sizes = dict(conv_kernel_size=2, conv_group_size=8, selector_rank=6, selector_top_k=5)
    return DFlash2Config(**tiny_spec(**{**sizes, **over}))


def drawn(c: DFlash2Config, seed: int = 0) -> DFlash2Draft:
    """A draft with every weight drawn (the identity convolutions and unit norms moved off)."""
    return drawn_draft(DFlash2Draft, c, seed)


def batch_for(c: DFlash2Config, ids, positions, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"aux_hidden": torch.randn(ids.shape[0], c.fc_in_features, generator=g),
            "final_hidden": torch.randn(ids.shape[0], c.target_hidden_size, generator=g),
            "position_ids": positions, "input_ids": ids}


def test_grouped_conv_is_causal_inside_each_block_and_shares_taps_by_group():
    torch.manual_seed(0)
    block, taps, groups, size = 5, 3, 3, 4
    x = torch.randn(2, 3 * block, groups * size)
    delta = torch.randn(2, 3 * block, taps, groups)
    base = torch.randn(taps, groups * size)
    want = torch.zeros_like(x)
    for s in range(3 * block):
        for t in range(min(s % block, taps - 1) + 1):
            coefficient = base[t] + delta[:, s, t].repeat_interleave(size, -1)
            want[:, s] += x[:, s - t] * coefficient
    torch.testing.assert_close(fused.grouped_conv(x, delta, base, block), want)


def test_a_new_dflash2_draft_computes_what_dflash_does_with_the_same_weights():
    """The method's initialisation: identity convolutions, so only the selector is new."""
    c = config()
    torch.manual_seed(0)
    new = DFlash2Draft(c)
    base = DFlashDraft(c)
    base.load_state_dict({k: v for k, v in new.state_dict().items() if "conv" not in k and "selector" not in k})
    embedding = torch.randn(c.vocab_size, c.hidden_size)
    for draft in (new, base):
        draft.set_target_weights(embedding, None)
    ids, loss_mask, positions, cu = packed()
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([2, 6, 11]), 4, MASK)
    aux = torch.randn(1, ids.shape[0], c.fc_in_features)
    with torch.no_grad():
        torch.testing.assert_close(new(b.ids[None], b.positions[None], aux, positions[None], dense_attention(b)),
                                   base(b.ids[None], b.positions[None], aux, positions[None], dense_attention(b)))


def test_flex_attention_mask_and_output_equal_the_dense_reference_on_cpu():
    from torch.nn.attention.flex_attention import create_mask

    c = config(block_size=8, conv_kernel_size=3)
    draft = drawn(c).eval()
    ids, loss_mask, positions, cu = packed(lengths=(40, 23, 31))
    anchors = sample_anchors(loss_mask, cu, 8, None, torch.Generator().manual_seed(1))
    b = build_blocks(ids, loss_mask, positions, cu, anchors, 8, MASK)
    queries = b.num_blocks * 8
    mask = create_mask(flex_mask_mod(b), 1, 1, queries, ids.shape[0] + queries, device="cpu")[0, 0]
    assert torch.equal(mask, dense_mask(b))
    aux = torch.randn(1, ids.shape[0], c.fc_in_features)
    with torch.no_grad():
        dense = draft(b.ids[None], b.positions[None], aux, positions[None], dense_attention(b))
        flex = draft(b.ids[None], b.positions[None], aux, positions[None], flex_attention_fn(b, compiled=False))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_the_flex_attention_step_equals_the_dense_one_on_cuda():
    """The GPU path (compiled flex attention over the tile-built BlockMask) gives the dense path's
    loss and gradients (fp32)."""
    c = config(hidden_size=64, head_dim=16, target_hidden_size=64, block_size=16, conv_group_size=16, vocab_size=300)
    draft = drawn(c).cuda()
    draft.set_target_weights(draft.embed_tokens, draft.lm_head)
    ids, loss_mask, positions, cu = packed(lengths=(300, 200, 157), vocab=300)
    anchors = sample_anchors(loss_mask, cu, 16, None, torch.Generator().manual_seed(1))
    b = build_blocks(ids.cuda(), loss_mask.cuda(), positions.cuda(), cu.cuda(), anchors, 16, MASK)
    batch = {k: v.cuda() for k, v in batch_for(c, ids, positions).items()}
    decay = DFlash2Options(block_size=16).decay("cuda")
    params = [p for p in draft.parameters() if p.requires_grad]
    steps = []
    for flex in (False, True):
        loss, sums = loss_lib.block_loss(draft, batch, b, decay, 1.0, b.valid().float().sum(), use_flex=flex)
        steps.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l_dense, g_dense), (l_flex, g_flex) = steps
    torch.testing.assert_close(l_flex, l_dense, rtol=2e-3, atol=2e-3)
    for a, e in zip(g_flex, g_dense):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("chunk", [3, 2048])  # rows over several chunks, and in one
def test_chunked_head_loss_equals_autograd_through_the_whole_logits(chunk, monkeypatch):
    """KL to the target, the selector's CE over the unary top-K (target injected where missing) and
    their gradient through the hidden states: as plain autograd over the full logits."""
    monkeypatch.setattr(loss_lib, "CHUNK_ROWS", chunk)
    c = config()
    draft = drawn(c)
    hidden = torch.randn(11, c.hidden_size, requires_grad=True)
    final = torch.randn(11, c.hidden_size)
    predecessors = torch.randint(0, c.vocab_size, (11,))
    weights = torch.rand(11)

    def objective(kl, unary, candidates, slot):
        scores = draft.candidate_selector.scores(unary, hidden, predecessors, candidates)
        ce = torch.nn.functional.cross_entropy(scores, slot, reduction="none")
        return (weights * (kl + 0.5 * ce)).sum()

    logits = draft.logits(hidden)
    target = draft.logits(final)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target.softmax(-1), reduction="none").sum(-1)
    candidates = logits.topk(c.selector_top_k, -1).indices
    target_ids = target.argmax(-1)
    contains = (candidates == target_ids[:, None]).any(-1)
    assert 0 < int(contains.sum()) < 11  # both cases: target among the candidates, and injected
    candidates[~contains, -1] = target_ids[~contains]
    slot = (candidates == target_ids[:, None]).long().argmax(-1)
    (g_whole,) = torch.autograd.grad(objective(kl, logits.gather(-1, candidates), candidates, slot), hidden)
    got = loss_lib.head_unary(draft, hidden, final)
    assert torch.equal(got[2], candidates) and torch.equal(got[3], slot) and torch.equal(got[4], contains)
    (g_chunked,) = torch.autograd.grad(objective(got[0], got[1], got[2], got[3]), hidden)
    torch.testing.assert_close(got[0], kl)
    torch.testing.assert_close(g_chunked, g_whole)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_new_layers_give_the_eager_loss_metrics_and_gradients(device):
    """train.compile=true fuses DFlash2's own chains (the convolutions, the selector's transitions and
    the loss chunks): the step must not change. Two batches of different sizes (dynamic shapes).
    DFlash's ops it also switches (norms, rotary, SiLU-multiply) are held to eager by test_dflash.py;
    here they stay eager so that only the new compiled graphs are built (CPU compile time)."""
    c = config(hidden_size=24, intermediate_size=40, target_hidden_size=24, head_dim=6, vocab_size=70, conv_kernel_size=3)
    draft = drawn(c, seed=2).to(device)
    draft.set_target_weights(draft.embed_tokens, draft.lm_head)
    options = DFlash2Options(block_size=4, selector_top_k=5)
    batches = []
    for lengths, seed in (((19, 14), 0), ((9,), 1)):
        ids, loss_mask, positions, cu = packed(lengths, vocab=c.vocab_size, seed=seed)
        anchors = sample_anchors(loss_mask, cu, 4, None, torch.Generator().manual_seed(seed))
        b = build_blocks(*(t.to(device) for t in (ids, loss_mask, positions, cu)), anchors, 4, MASK)
        batches.append(({k: v.to(device) for k, v in batch_for(c, ids, positions, seed).items()}, b))
    params = [p for p in draft.parameters() if p.requires_grad]

    def run():
        out = []
        for batch, blocks in batches:
            loss, sums = loss_lib.block_loss(draft, batch, blocks, options.decay(device), 0.8,
                                             torch.tensor(9.0, device=device), use_flex=False)
            out.append((loss.detach(), sums, torch.autograd.grad(loss, params)))
        return out

    eager, compiled = compiled_against_eager(fused.ops, run)
    assert_same_steps(compiled, eager)


def test_train_compile_switches_the_new_chains_and_dflashs_together(monkeypatch):
    """build_bundle sets the switch from the resolved train.compile; it covers both op tables (the
    compiled functions are made lazily, on first call, so nothing is compiled here)."""
    from dataclasses import replace
    from types import SimpleNamespace

    import lib.launch.sharding
    from lib.config import TrainConfig
    from lib.drafts.dflash import fused as dflash_fused

    monkeypatch.setattr(lib.launch.sharding, "shard", lambda module, group, device: module)
    for enabled in (True, False):
        cfg = Config(target=TargetConfig(path=TINY_TARGET_DIR),
                     draft=DraftConfig(name="dflash2", options={"num_layers": 1, "selector_rank": 4}),
                     train=replace(TrainConfig(), compile=enabled))
        ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), groups=SimpleNamespace(trainer=None),
                              is_trainer_leader=False)
        try:
            bundle = get_strategy("dflash2").build(ctx)
            assert fused.ops.compiled() is enabled and dflash_fused.compiled() is enabled and fused.compiled() is enabled
            assert isinstance(bundle.model.draft, DFlash2Draft) and bundle.draft_config.target_layer_ids == [4]
        finally:
            fused.use_compiled(False)


def test_block_loss_is_the_decayed_kl_plus_selector_ce_over_the_valid_rows():
    c = config()
    draft = drawn(c)
    ids, loss_mask, positions, cu = packed()
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([2, 6, 11]), 4, MASK)
    options = DFlash2Options(block_size=4, loss_gamma=2.0)
    count = b.valid().float().sum()
    loss, sums = loss_lib.block_loss(draft, batch_for(c, ids, positions), b, options.decay(), 0.5, count, False)
    kl, ce, picked, unary_ok, recall, rows = sums[1:].view(6, 3)
    assert rows.tolist() == [3.0, 3.0, 2.0] and float(count) == 8.0
    torch.testing.assert_close(loss.detach(), (options.decay() * (kl + 0.5 * ce)).sum() / count)
    loss.backward()
    assert draft.candidate_selector.successor_codebook.grad is not None and draft.lm_head.grad is None
    assert draft.layers[0].attention_conv.kernel_projection.weight.grad.abs().sum() > 0
    row = get_strategy("dflash2").summarize(sums)
    assert row["loss"] == pytest.approx(float(loss.detach())) and {"acc_2", "unary_acc_2", "recall_at_k"} <= set(row)
    assert bool((picked <= recall).all())  # a served-path hit needs the target among the unary top-K


def test_the_drafter_walks_the_training_layouts_block_for_the_same_anchor():
    """Train/serve consistency: the decode loop's block (context = verified slots before the bonus
    token, the anchor; a rejected slot as a hole) gives the training forward's hidden states, and the
    proposals are the selector's greedy walk over them."""
    from lib.drafts.dflash2.drafter import DFlash2Drafter
    from lib.drafts.drafting import VerifiedBlock

    c = config(block_size=6, conv_kernel_size=3)
    draft = drawn(c, seed=3).eval()
    ids, loss_mask, positions, cu = packed(lengths=(16,))
    aux = torch.randn(16, c.fc_in_features)
    anchor = 11
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([anchor]), 6, MASK)
    with torch.no_grad():
        hidden = draft(b.ids[None], b.positions[None], aux[None], positions[None], dense_attention(b))
        expected = draft.walk(hidden[:, 1:], ids[anchor][None])[0]
    drafter = DFlash2Drafter(draft)
    drafter.start()
    drafter._append(VerifiedBlock(ids[1:8][None], aux[:7][None], positions[:7][None],
                                  torch.ones(1, 7, dtype=torch.bool), torch.tensor([6])))
    junk = torch.randn(1, 5, c.fc_in_features)
    junk[0, :4] = aux[7:11]
    second = VerifiedBlock(torch.cat([ids[8:12], ids[:1]])[None], junk, torch.arange(7, 12)[None],
                           torch.tensor([[True, True, True, True, False]]), torch.tensor([3]))
    assert drafter.propose(second, 5, [0], [0])[0].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="eval.draft_tokens"):
        drafter.propose(second, 6, [0], [0])  # a block of 6 drafts at most 5
    # The walk is the method's: each step's best candidate given the token the previous step chose.
    logits = draft.logits(hidden[0, 1:])
    unary, candidates = logits.topk(c.selector_top_k, -1)
    previous = ids[anchor]
    for step in range(5):
        scores = draft.candidate_selector.scores(unary[step], hidden[0, 1 + step], previous, candidates[step])
        previous = candidates[step, scores.argmax()]
        assert int(previous) == int(expected[step])


def test_both_export_layouts_round_trip_and_only_dflash2_claims_them(tmp_path):
    from lib.drafts.dflash2.export import export_draft, export_speculators, load_draft

    c = config()
    draft = drawn(c)
    research = export_draft(draft.state_dict(), c, str(tmp_path / "draft"), torch.float32)
    speculators = export_speculators(draft.state_dict(), c, str(tmp_path / "draft_speculators"), torch.float32)
    meta = json.load(open(f"{research}/config.json"))
    assert meta["architectures"] == ["DFlash2DraftModel"] and meta["dflash_config"] == {
        "mask_token_id": MASK, "target_layer_ids": [1, 3, 4], "block_size": 4, "conv_kernel_size": 2,
        "conv_group_size": 8, "selector_rank": 6, "selector_top_k": 5}
    spec = json.load(open(f"{speculators}/config.json"))
    assert spec["speculators_model_type"] == "dflash2" and spec["aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert spec["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    for out in (research, speculators):
        assert family_of_export(out) == "dflash2"
        loaded = load_draft(out)
        assert loaded.config.target_layer_ids == c.target_layer_ids and loaded.config.selector_rank == 6
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in draft.state_dict().items())


def test_options_capture_plan_and_default_evaluation():
    from lib.config import compose

    cfg = Config(target=TargetConfig(path=TINY_TARGET_DIR), draft=DraftConfig(name="dflash2", options={"num_layers": 3}))
    plan = get_strategy("dflash2").capture_plan(AutoConfig.from_pretrained(TINY_TARGET_DIR), cfg)
    assert plan.layers == (1, 3, 5) and plan.final_hidden  # the target's distribution is the label
    composed = compose(["draft=dflash2"])
    assert composed.draft.options["block_size"] == 8 and list(composed.eval.draft_tokens) == [7]
    with pytest.raises(ConfigError, match=r"eval.draft_tokens=\[7\].*block_size=4.*<= 3"):
        get_strategy("dflash2").options(compose(["draft=dflash2", "draft.options.block_size=4"]))
    with pytest.raises(ValueError, match="selector_top_k"):
        DFlash2Options(selector_top_k=1)
    with pytest.raises(ValueError, match="conv_group_size=12 must divide hidden_size=32"):
        config(conv_group_size=12)
