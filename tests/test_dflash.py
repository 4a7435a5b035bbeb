"""DFlash (draft=dflash): blocks and their mask, the dense reference against per-block attention and
against flex attention (GPU), options and capture plan, export round trip, and block drafting in
speculative decoding (output equal to greedy)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lib.config import Config, ConfigError, DraftConfig, TargetConfig, TINY_TARGET_DIR
from lib.drafts.base import get_strategy
from lib.drafts.dflash.mask import IGNORE, build_blocks, dense_attention, dense_mask, flex_attention_fn, sample_anchors
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft
from lib.drafts.dflash.strategy import DFlashStrategy
from lib.drafts.dflash.trainer import DFlashOptions, block_loss, default_target_layers
from tests.block_fixtures import MASK, drawn_draft, packed, tiny_spec
from tests.helpers import assert_same_steps, compiled_against_eager

pytestmark = pytest.mark.unit


def tiny_config(**over) -> DFlashConfig:
    return DFlashConfig(**tiny_spec(**over))


def tiny_draft(c: DFlashConfig, seed: int = 0) -> DFlashDraft:
    return drawn_draft(DFlashDraft, c, seed, perturb=False, head_scale=0.1)


def test_blocks_put_the_anchor_first_mask_tokens_after_and_labels_inside_the_sequence():
    ids, loss_mask, positions, cu = packed()
    anchors = torch.tensor([1, 7, 9])
    b = build_blocks(ids, loss_mask, positions, cu, anchors, 4, MASK)
    assert b.ids.view(3, 4)[:, 0].tolist() == ids[anchors].tolist()
    assert (b.ids.view(3, 4)[:, 1:] == MASK).all()
    assert b.positions.view(3, 4).tolist() == [[1, 2, 3, 4], [7, 8, 9, 10], [0, 1, 2, 3]]
    labels = b.labels.view(3, 4)
    assert labels[0].tolist() == [IGNORE, *ids[2:5].tolist()]
    assert labels[1].tolist() == [IGNORE, ids[8].item(), IGNORE, IGNORE]  # the sequence ends at 9
    assert labels[2].tolist() == [IGNORE, *ids[10:13].tolist()]


def test_anchors_are_sampled_where_the_next_token_has_a_loss_and_without_repeats():
    ids, loss_mask, positions, cu = packed()
    a = sample_anchors(loss_mask, cu, 4, None, torch.Generator().manual_seed(0))
    assert a.numel() == 4 and a.unique().numel() == 4 and (a.sort().values == a).all()
    assert not set(a.tolist()) & {0, 8, 15}  # next token without loss, or in another sequence
    everything = sample_anchors(loss_mask, cu, 4, 100, torch.Generator().manual_seed(0))
    assert everything.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14]


def test_dense_mask_sees_the_own_sequence_before_the_anchor_and_the_whole_own_block():
    ids, loss_mask, positions, cu = packed()
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([3, 11]), 4, MASK)
    m = dense_mask(b)
    assert m.shape == (8, 16 + 8)
    for q in range(4):
        assert m[q, :16].nonzero().flatten().tolist() == [0, 1, 2]
        assert m[q, 16:].nonzero().flatten().tolist() == [0, 1, 2, 3]
    for q in range(4, 8):
        assert m[q, :16].nonzero().flatten().tolist() == [9, 10]
        assert m[q, 16:].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_packed_blocks_equal_each_block_run_alone_with_its_own_context():
    c = tiny_config()
    draft = tiny_draft(c).eval()
    ids, loss_mask, positions, cu = packed()
    aux = torch.randn(ids.shape[0], c.fc_in_features)
    anchors = torch.tensor([2, 6, 11, 13])
    b = build_blocks(ids, loss_mask, positions, cu, anchors, 4, MASK)
    out = draft(b.ids[None], b.positions[None], aux[None], positions[None], dense_attention(b))[0].view(4, 4, -1)
    for n, a in enumerate(anchors.tolist()):
        start = 0 if a < 9 else 9
        sl = slice(start, a)
        full = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        alone = draft(b.ids.view(4, 4)[n][None], b.positions.view(4, 4)[n][None], aux[sl][None],
                      positions[sl][None], full)[0]
        torch.testing.assert_close(out[n], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths,block,anchors,has_full_tiles", [
    ((300, 200, 157), 16, None, False),  # 42 blocks: the last query tile is partial
    ((640, 384), 16, None, True),  # 64 blocks: whole query tiles, key tiles wholly inside sequences
    ((129, 1, 513, 99), 4, None, True),  # short blocks, 32 per query tile; a one-token sequence
    ((700, 300), 32, 5, False),  # few anchors: most key tiles are invisible
    ((256, 256), 16, "starts", False),  # anchors at sequence starts see no context at all
])
def test_tile_built_block_mask_equals_the_one_from_every_query_key_pair(lengths, block, anchors, has_full_tiles):
    """flex_attention_fn's mask_mod is the dense reference mask, and its BlockMask, built from the block
    layout, is create_block_mask's (same partial and full tiles, same index order): flex computes
    exactly the attention of the CPU path."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from lib.drafts.dflash import mask as mask_lib

    ids, loss_mask, positions, cu = packed(lengths=lengths, seed=len(lengths))
    if anchors == "starts":
        picked = cu[:-1].long()
    else:
        picked = sample_anchors(loss_mask, cu, block, anchors, torch.Generator().manual_seed(block))
    b = build_blocks(ids, loss_mask, positions, cu, picked, block, MASK)
    tokens, queries = ids.shape[0], b.num_blocks * block
    mask_mod = mask_lib.flex_mask_mod(b)
    assert torch.equal(create_mask(mask_mod, 1, 1, queries, tokens + queries, device="cpu")[0, 0], dense_mask(b))
    got = mask_lib.tile_block_mask(b, mask_mod)
    want = create_block_mask(mask_mod, 1, None, queries, tokens + queries, device="cpu")
    for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert (int(want.full_kv_num_blocks.sum()) > 0) == has_full_tiles  # both kinds of tile are exercised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention path runs on CUDA")
def test_flex_attention_equals_the_dense_reference_on_cuda():
    c = tiny_config(hidden_size=64, head_dim=16, target_hidden_size=64, block_size=16)
    draft = tiny_draft(c).cuda().eval()
    ids, loss_mask, positions, cu = packed(lengths=(300, 200, 157))
    ids, loss_mask, positions = ids.cuda(), loss_mask.cuda(), positions.cuda()
    aux = torch.randn(ids.shape[0], c.fc_in_features, device="cuda")
    anchors = sample_anchors(loss_mask, cu, 16, None, torch.Generator().manual_seed(1))
    b = build_blocks(ids, loss_mask, positions, cu.cuda(), anchors, 16, MASK)
    dense = draft(b.ids[None], b.positions[None], aux[None], positions[None], dense_attention(b))
    flex = draft(b.ids[None], b.positions[None], aux[None], positions[None], flex_attention_fn(b))
    torch.testing.assert_close(flex, dense, rtol=2e-3, atol=2e-3)


def test_block_loss_weights_positions_by_decay_and_counts_per_position():
    c = tiny_config()
    draft = tiny_draft(c)
    ids, loss_mask, positions, cu = packed()
    aux = torch.randn(ids.shape[0], c.fc_in_features)
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([2, 6, 11]), 4, MASK)
    opts = DFlashOptions(block_size=4, loss_weights="decay", loss_gamma=0.5)  # the default gamma at block 4 is 2
    counts = b.valid().view(-1, 4)[:, 1:].float().sum(0)
    norm = (counts * opts.decay()).sum()
    batch = {"aux_hidden": aux, "position_ids": positions}
    loss, sums = block_loss(draft, batch, b, opts.decay(), norm, use_flex=False)
    ce, correct, count, weighted, counted = sums.view(5, 3)
    assert count.tolist() == counts.tolist() == [3.0, 3.0, 2.0]
    torch.testing.assert_close(loss, (ce * opts.decay()).sum() / norm)
    torch.testing.assert_close(weighted, ce * opts.decay())
    torch.testing.assert_close(counted.sum(), norm)
    loss.backward()
    assert draft.fc.weight.grad is not None and draft.lm_head.grad is None
    row = DFlashStrategy().summarize(sums)
    assert set(row) >= {"loss", "acc_0", "acc_1", "acc_2", "sim_accept_len"}
    # The logged loss is the trained one, also at a gamma other than the default (it used the
    # default's weights before the sums carried the loss's own numerator and denominator).
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)


def test_options_defaults_validation_and_target_layers():
    assert DFlashOptions().block_size == 16 and DFlashOptions().gamma == 7.0
    assert default_target_layers(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B: 36 layers
    assert default_target_layers(8, 5) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="block_size"):
        DFlashOptions(block_size=1)
    with pytest.raises(ValueError, match=r"unknown keys \['blocksize'\]"):
        DFlashOptions.from_mapping({"blocksize": 8})


def test_strategy_is_selected_by_draft_dflash_and_captures_one_layer_per_draft_layer():
    cfg = Config(target=TargetConfig(path=TINY_TARGET_DIR), draft=DraftConfig(name="dflash", options={"num_layers": 3}))
    strategy = get_strategy(cfg.draft.name)
    assert isinstance(strategy, DFlashStrategy)
    hf = AutoConfig.from_pretrained(TINY_TARGET_DIR)
    plan = strategy.capture_plan(hf, cfg)
    assert plan.layers == (1, 3, 5) and not plan.final_hidden
    assert list(plan.widths.values()) == [3 * hf.hidden_size]


def test_export_round_trip_and_layout(tmp_path):
    from lib.drafts.dflash.export import export_draft, load_draft
    import json

    c = tiny_config()
    draft = tiny_draft(c)
    out = export_draft(draft.state_dict(), c, str(tmp_path / "draft"), torch.float32)
    meta = json.load(open(f"{out}/config.json"))
    assert meta["architectures"] == ["DFlashDraftModel"] and meta["block_size"] == 4
    assert meta["dflash_config"] == {"mask_token_id": MASK, "target_layer_ids": [1, 3, 4]}
    loaded = load_draft(out)
    assert loaded.config == c
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_block_drafting_decodes_exactly_greedy_on_the_tiny_target():
    from lib.drafts.dflash.drafter import DFlashDrafter
    from lib.eval.spec_decode import speculative_decode
    from lib.target.weights import load_target_embedding, load_target_lm_head

    target = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32).eval()
    hf = target.config
    c = tiny_config(hidden_size=hf.hidden_size, target_hidden_size=hf.hidden_size, head_dim=32,
                    vocab_size=hf.vocab_size, num_target_layers=hf.num_hidden_layers, target_layer_ids=[1, 3, 5],
                    block_size=8)
    torch.manual_seed(0)
    draft = DFlashDraft(c).eval()
    draft.set_target_weights(load_target_embedding(target), None)  # lm_head bound from the runner
    prompts = [[5, 17, 33, 8, 90], [12, 7], [40, 41, 42, 43, 44, 45, 46]]
    result = speculative_decode(target, DFlashDrafter(draft), prompts, k=7, max_new_tokens=20, progress=False)
    assert result.matches_greedy
    assert all(len(o) == 20 for o in result.outputs)
    with pytest.raises(ValueError, match="eval.draft_tokens"):
        speculative_decode(target, DFlashDrafter(draft), prompts, k=8, max_new_tokens=4, progress=False)


@pytest.mark.parametrize("chunk", [4, 2048])
def test_chunked_cross_entropy_equals_autograd_through_the_whole_logits(chunk, monkeypatch):
    """The head's cross-entropy forms its hidden-state gradient in forward, chunk by chunk; value,
    gradient (under a per-row weighting, as the decayed loss applies) and argmax hits must equal
    plain autograd through the whole logits."""
    from lib.drafts.dflash import trainer

    monkeypatch.setattr(trainer, "CE_CHUNK_ROWS", chunk)
    c = tiny_config()
    draft = tiny_draft(c)
    hidden = torch.randn(9, c.hidden_size, requires_grad=True)
    labels = torch.randint(0, c.vocab_size, (9,))
    weights = torch.rand(9)
    logits = draft.logits(hidden)
    whole = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (g_whole,) = torch.autograd.grad((whole * weights).sum(), hidden)
    chunked, correct = trainer.chunked_ce(draft, hidden, labels)
    (g_chunked,) = torch.autograd.grad((chunked * weights).sum(), hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)
    assert torch.equal(correct, (logits.argmax(-1) == labels).float())
    with torch.no_grad():
        torch.testing.assert_close(trainer.chunked_ce(draft, hidden, labels)[0], whole)


def test_the_drafter_proposes_what_training_scores_for_the_same_anchor():
    """Train/serve consistency: the decode loop's block (context = verified slots before the bonus
    token, which is the anchor) gives the argmax of training's logits at block positions 1..B-1, also
    with rejected slots (holes) in the drafter's context."""
    from lib.drafts.dflash.drafter import DFlashDrafter
    from lib.drafts.drafting import VerifiedBlock

    c = tiny_config(block_size=6)
    draft = tiny_draft(c, seed=3).eval()
    ids, loss_mask, positions, cu = packed(lengths=(16,))
    aux = torch.randn(16, c.fc_in_features)
    anchor = 11
    b = build_blocks(ids, loss_mask, positions, cu, torch.tensor([anchor]), 6, MASK)
    with torch.no_grad():
        hidden = draft(b.ids[None], b.positions[None], aux[None], positions[None], dense_attention(b))[0]
        expected = draft.logits(hidden[1:]).argmax(-1)
    # Round 1 verified slots 0..6; round 2 slots 7..11 of which the last one was rejected (a hole),
    # so the newest kept slot is position 10 and the bonus token (the anchor) is ids[11].
    drafter = DFlashDrafter(draft)
    drafter.start()
    first = VerifiedBlock(ids[1:8][None], aux[:7][None], positions[:7][None], torch.ones(1, 7, dtype=torch.bool),
                          torch.tensor([6]))
    drafter._append(first)
    junk = torch.randn(1, 5, c.fc_in_features)
    junk[0, :4] = aux[7:11]
    second = VerifiedBlock(torch.cat([ids[8:12], ids[:1]])[None], junk, torch.arange(7, 12)[None],
                           torch.tensor([[True, True, True, True, False]]), torch.tensor([3]))
    proposed = drafter.propose(second, 5, [0], [0])
    assert proposed[0].tolist() == expected.tolist()


def test_draft_dflash_evaluates_whole_blocks_by_default_and_refuses_longer_drafts():
    from lib.config import compose

    cfg = compose(["draft=dflash"])
    assert cfg.draft.options["block_size"] == 16 and list(cfg.eval.draft_tokens) == [15]
    assert list(compose([]).eval.draft_tokens) == [3, 7]  # EAGLE-3's default is untouched
    bad = compose(["draft=dflash", "draft.options.block_size=8"])
    with pytest.raises(ConfigError, match=r"eval.draft_tokens=\[15\].*block_size=8.*<= 7"):
        get_strategy("dflash").capture_plan(AutoConfig.from_pretrained(TINY_TARGET_DIR), bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_elementwise_ops_give_the_eager_loss_metrics_and_gradients(device, monkeypatch):
    """train.compile=true fuses the norms (q/k norm with rotary), SiLU-multiply and the per-chunk
    cross-entropy; the step must not change. Two batches of different sizes (the compiled functions
    take dynamic shapes), the larger one over the checkpointed cross-entropy chunks."""
    from lib.drafts.dflash import fused, trainer

    monkeypatch.setattr(trainer, "CE_CHUNK_ROWS", 16)
    c = tiny_config(hidden_size=24, intermediate_size=40, target_hidden_size=24, head_dim=6, vocab_size=70)
    draft = tiny_draft(c, seed=2)
    with torch.no_grad():
        for p in draft.parameters():  # norms away from 1 so their weights matter
            p.add_(torch.randn(p.shape) * 0.1)
    draft = draft.to(device)
    draft.set_target_weights(draft.embed_tokens, draft.lm_head)
    opts = DFlashOptions(block_size=4, loss_weights="decay", loss_gamma=2.0)
    batches = []
    for lengths, seed in (((19, 14), 0), ((9,), 1)):
        ids, loss_mask, positions, cu = (t.to(device) for t in packed(lengths, vocab=c.vocab_size, seed=seed))
        anchors = sample_anchors(loss_mask, cu, 4, None, torch.Generator().manual_seed(seed))
        b = build_blocks(ids, loss_mask, positions, cu, anchors, 4, MASK)
        aux = torch.randn(ids.shape[0], c.fc_in_features, generator=torch.Generator().manual_seed(seed))
        batches.append(({"aux_hidden": aux.to(device), "position_ids": positions}, b))
    assert int(batches[0][1].valid().sum()) > 16 > int(batches[1][1].valid().sum())
    params = [p for p in draft.parameters() if p.requires_grad]
    decay = opts.decay(device)

    def run():
        out = []
        for batch, blocks in batches:
            loss, sums = block_loss(draft, batch, blocks, decay, torch.tensor(7.0, device=device), use_flex=False)
            out.append((loss.detach(), sums, torch.autograd.grad(loss, params)))
        return out

    eager, compiled = compiled_against_eager(fused, run)
    assert_same_steps(compiled, eager)
    again = run()  # eager once more: the switch is off, the numbers are eager's to the bit
    for (l_e, s_e, g_e), (l_a, s_a, g_a) in zip(eager, again):
        assert torch.equal(l_a, l_e) and torch.equal(s_a, s_e) and all(map(torch.equal, g_a, g_e))


@pytest.mark.parametrize("enabled", [True, False])
def test_the_trainer_bundle_follows_train_compile(enabled, monkeypatch):
    """build_bundle sets the switch from the resolved train.compile, as EAGLE-3's does (no graph is
    compiled here: the compiled functions are made lazily, on first call)."""
    from dataclasses import replace
    from types import SimpleNamespace

    import lib.launch.sharding
    from lib.config import TrainConfig
    from lib.drafts.dflash import fused

    monkeypatch.setattr(lib.launch.sharding, "shard", lambda module, group, device: module)
    cfg = Config(target=TargetConfig(path=TINY_TARGET_DIR), draft=DraftConfig(name="dflash", options={"num_layers": 1}),
                 train=replace(TrainConfig(), compile=enabled))
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), groups=SimpleNamespace(trainer=None),
                          is_trainer_leader=False)
    fused.use_compiled(not enabled)
    try:
        bundle = get_strategy("dflash").build(ctx)
        assert fused.compiled() is enabled and isinstance(bundle.model.draft, DFlashDraft)
    finally:
        fused.use_compiled(False)
