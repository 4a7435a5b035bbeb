"""DSpark (draft=dspark): blocks, the flex mask against the dense one on CPU, the chunked loss against
plain autograd through whole logits, options and capture plan, the export in speculators' layout,
train/serve consistency of the Markov chain, and decoding with the confidence schedule equal to greedy."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from lib.config import Config, ConfigError, DraftConfig, TargetConfig, TINY_TARGET_DIR, compose
from lib.drafts.base import family_of_export, get_strategy
from lib.drafts.dflash.mask import IGNORE, dense_attention, flex_attention_fn, sample_anchors
from lib.drafts.drafting import NOT_PROPOSED
from lib.drafts.dspark import loss as dspark_loss
from lib.drafts.dspark.blocks import build_dspark_blocks
from lib.drafts.dspark.drafter import DSparkDrafter, schedule_lengths
from lib.drafts.dspark.model import DSparkConfig, DSparkDraft
from lib.drafts.dspark.trainer import DSparkOptions
from tests.block_fixtures import MASK, drawn_draft, packed, tiny_spec

pytestmark = pytest.mark.unit


def tiny_config(**over) -> DSparkConfig:
    return DSparkConfig(**tiny_spec(**{"markov_rank": 8, **over}))


def tiny_draft(c: DSparkConfig, seed: int = 0) -> DSparkDraft:
    return drawn_draft(DSparkDraft, c, seed)


def test_every_slot_predicts_the_token_after_it_from_the_target_row_it_stands_at():
    ids, loss_mask, positions, cu = packed()
    b = build_dspark_blocks(ids, loss_mask, positions, cu, torch.tensor([1, 6, 9]), 4, MASK)
    assert b.blocks.ids.view(3, 4)[:, 0].tolist() == ids[[1, 6, 9]].tolist()
    assert (b.blocks.ids.view(3, 4)[:, 1:] == MASK).all()
    assert b.blocks.positions.view(3, 4).tolist() == [[1, 2, 3, 4], [6, 7, 8, 9], [0, 1, 2, 3]]
    labels = b.blocks.labels.view(3, 4)
    assert labels[0].tolist() == ids[2:6].tolist()  # slot 0 predicts the token after the anchor
    assert labels[1].tolist() == [ids[7].item(), ids[8].item(), IGNORE, IGNORE]  # the sequence ends at 9
    assert labels[2].tolist() == ids[10:14].tolist()
    assert b.target_rows.view(3, 4).tolist() == [[1, 2, 3, 4], [6, 7, 8, 9], [9, 10, 11, 12]]
    assert b.prev_ids.tolist() == ids[b.target_rows].tolist()  # teacher forcing: the data token before


# flex_attention uncompiled on the CPU warns that it is unfused: here it is the point (the mask's semantics).
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_the_tile_block_mask_equals_the_dense_mask_on_cpu():
    """DSpark blocks attend through DFlash's masks; flex (eager, on the CPU) with the BlockMask built from
    the block layout gives the dense reference's hidden states, over packed sequences and full tiles."""
    c = tiny_config(block_size=8)
    draft = tiny_draft(c).eval()
    ids, loss_mask, positions, cu = packed(lengths=(130, 40, 21), seed=1)
    anchors = sample_anchors(loss_mask, cu, 8, None, torch.Generator().manual_seed(0))
    b = build_dspark_blocks(ids, loss_mask, positions, cu, anchors, 8, MASK).blocks
    aux = torch.randn(ids.shape[0], c.fc_in_features)
    with torch.no_grad():
        dense = draft(b.ids[None], b.positions[None], aux[None], positions[None], dense_attention(b))
        flex = draft(b.ids[None], b.positions[None], aux[None], positions[None], flex_attention_fn(b, compiled=False))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def _reference_loss(draft, batch, blocks, decay, alpha, norm):
    """The loss written plainly: whole logits, KL and TV by their definitions, autograd for everything."""
    n, b = blocks.num_blocks, blocks.block_size
    hidden = draft(blocks.blocks.ids[None], blocks.blocks.positions[None], batch["aux_hidden"][None],
                   batch["position_ids"][None], dense_attention(blocks.blocks))[0]
    logits, conf = draft.block_logits(hidden.view(n, b, -1), blocks.prev_ids.view(n, b))
    logits, conf = logits.reshape(n * b, -1), conf.reshape(-1)
    target = batch["final_hidden"][blocks.target_rows] @ draft.lm_head.t()
    p, logq = target.softmax(-1), logits.log_softmax(-1)
    kl = (p * (p.log() - logq)).sum(-1)
    overlap = torch.minimum(p, logq.exp()).sum(-1).detach()
    bce = F.binary_cross_entropy_with_logits(conf, overlap, reduction="none")
    w = decay.repeat(n) * blocks.valid().float()
    return ((w * kl).sum() + alpha * (w * bce).sum()) / norm


@pytest.mark.parametrize("head_type,chunk", [("vanilla", 5), ("gated", 2048), ("rnn", 7)])
def test_chunked_loss_and_gradients_equal_plain_autograd_through_whole_logits(head_type, chunk, monkeypatch):
    monkeypatch.setattr(dspark_loss, "CHUNK_ROWS", chunk)
    c = tiny_config(markov_head_type=head_type)
    draft = tiny_draft(c, seed=1)
    ids, loss_mask, positions, cu = packed(lengths=(19, 14), seed=2)
    blocks = build_dspark_blocks(ids, loss_mask, positions, cu, torch.tensor([2, 5, 9, 16, 20, 27]), 4, MASK)
    g = torch.Generator().manual_seed(3)
    batch = {"aux_hidden": torch.randn(33, c.fc_in_features, generator=g), "position_ids": positions,
             "final_hidden": torch.randn(33, 32, generator=g)}
    decay, norm = DSparkOptions(block_size=4).decay(), torch.tensor(11.0)
    params = [p for p in draft.parameters() if p.requires_grad]
    loss, sums = dspark_loss.block_loss(draft, batch, blocks, decay, 0.7, norm, use_flex=False)
    grads = torch.autograd.grad(loss, params)
    want = _reference_loss(draft, batch, blocks, decay, 0.7, norm)
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for (name, _), got, ref in zip(((n, p) for n, p in draft.named_parameters() if p.requires_grad), grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert any(p is draft.markov_head.markov_w2.weight for p in params) and draft.lm_head.grad is None
    row = get_strategy("dspark").summarize(sums)
    assert row["loss"] == pytest.approx(loss.item() * 11.0 / blocks.valid().sum().item(), rel=1e-5)
    assert {"acc_0", "acc_3", "overlap_0", "sim_accept_len", "tv_accept_len", "conf_abs_err"} <= set(row)


def test_options_conf_and_capture_plan():
    cfg = compose(["draft=dspark"])
    opts = DSparkOptions.from_mapping(cfg.draft.options)
    assert opts == DSparkOptions() and opts.block_size == 8 and list(cfg.eval.draft_tokens) == [8]
    assert opts.decay().tolist()[:2] == pytest.approx([1.0, 0.7788], rel=1e-4)  # exp(-k/4): slot 0 weighs 1
    plan = get_strategy("dspark").capture_plan(AutoConfig.from_pretrained(TINY_TARGET_DIR), cfg)
    assert plan.layers == (1, 2, 3, 4, 5) and plan.final_hidden  # the loss needs the target's distribution
    with pytest.raises(ValueError, match="markov_head_type='lstm'"):
        DSparkOptions(markov_head_type="lstm")
    with pytest.raises(ValueError, match="needs the confidence head"):
        DSparkOptions(confidence_head=False, confidence_threshold=0.5)
    with pytest.raises(ValueError, match="confidence_head_with_markov=true needs markov_rank > 0"):
        DSparkOptions(markov_rank=0)
    with pytest.raises(ConfigError, match=r"unknown keys \['rank'\]"):
        get_strategy("dspark").options(compose(["draft=dspark", "+draft.options.rank=3"]))
    with pytest.raises(ConfigError, match=r"eval.draft_tokens=\[8\].*block_size=4.*<= 4"):
        get_strategy("dspark").options(compose(["draft=dspark", "draft.options.block_size=4"]))


def test_export_is_speculators_layout_reads_back_and_is_claimed_by_dspark_alone(tmp_path):
    from lib.drafts.dspark.export import export_draft, load_draft

    c = tiny_config(markov_head_type="gated", confidence_threshold=0.25)
    draft = tiny_draft(c)
    out = export_draft(draft.state_dict(), c, str(tmp_path / "draft"), torch.float32, TINY_TARGET_DIR)
    meta = json.load(open(f"{out}/config.json"))
    assert meta["speculators_model_type"] == "dspark" and meta["architectures"] == ["DSparkDraftModel"]
    assert meta["aux_hidden_state_layer_ids"] == [2, 4, 5] and meta["sample_from_anchor"] is True
    assert meta["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert meta["speculators_config"]["verifier"] == {"name_or_path": TINY_TARGET_DIR,
                                                      "architectures": ["Qwen3ForCausalLM"]}
    loaded = load_draft(out)
    assert loaded.config == c and all(torch.equal(loaded.state_dict()[k], v) for k, v in draft.state_dict().items())
    assert family_of_export(out) == "dspark"
    for key, value, message in (("sample_from_anchor", False, "DFlash's block layout"),
                                ("draft_vocab_size", 32, "reduced draft vocabularies")):
        json.dump({**meta, key: value}, open(f"{out}/config.json", "w"))
        with pytest.raises(ValueError, match=message):
            load_draft(out)


def test_the_drafter_proposes_what_training_scores_along_its_own_chain():
    """Train/serve consistency: the drafter's block (context = verified slots before the bonus token,
    which is the anchor) and Markov chain give, at every slot, the argmax and confidence of training's
    teacher-forced heads when the teacher tokens are the drafter's own choices."""
    from lib.drafts.drafting import VerifiedBlock

    for head_type in ("vanilla", "rnn"):
        c = tiny_config(block_size=5, markov_head_type=head_type)
        draft = tiny_draft(c, seed=4).eval()
        with torch.no_grad():  # a strong Markov bias, so the chain's choices depend on it
            draft.markov_head.markov_w2.weight.mul_(30)
        ids, loss_mask, positions, cu = packed(lengths=(16,))
        aux = torch.randn(16, c.fc_in_features)
        anchor = 11
        drafter = DSparkDrafter(draft)
        # Verified slots 0..10: slot p pairs the target's state at p with token p+1, so the bonus is the anchor.
        block = VerifiedBlock(ids[1:12][None], aux[:11][None], positions[:11][None],
                              torch.ones(1, 11, dtype=torch.bool), torch.tensor([10]))
        proposed = drafter.propose(block, 5, [0], [0])[0]
        chain = torch.cat([ids[anchor:anchor + 1], proposed])
        b = build_dspark_blocks(ids, loss_mask, positions, cu, torch.tensor([anchor]), 5, MASK)
        with torch.no_grad():
            hidden = draft(b.blocks.ids[None], b.blocks.positions[None], aux[None], positions[None],
                           dense_attention(b.blocks))[0]
            logits, conf = draft.block_logits(hidden[None], chain[:5][None])
            _, chain_conf = draft.draft_chain(hidden[None], chain[:1], 5)
        assert logits[0].argmax(-1).tolist() == proposed.tolist(), head_type
        torch.testing.assert_close(chain_conf, conf)
        with torch.no_grad():
            plain = draft.logits(hidden).argmax(-1)
        assert plain.tolist() != proposed.tolist(), "the Markov bias should change some choice here"


def test_schedule_keeps_confident_prefixes_and_shares_a_budget_by_running_confidence():
    survival = torch.tensor([[0.9, 0.8, 0.3, 0.2], [0.6, 0.5, 0.45, 0.1], [0.2, 0.1, 0.05, 0.01]])
    assert schedule_lengths(survival, 0.0, None).tolist() == [4, 4, 4]
    assert schedule_lengths(survival, 0.4, None).tolist() == [2, 3, 0]
    assert schedule_lengths(survival, 0.0, 2.0).tolist() == [3, 3, 0]  # the 6 highest running confidences
    assert schedule_lengths(survival, 0.55, 1.0).tolist() == [2, 1, 0]


def test_speculative_decoding_with_the_confidence_schedule_equals_greedy():
    """Whatever the schedule keeps, the output is the target's greedy decoding; the schedule only
    changes how many draft tokens each round has verified (none at threshold 1: plain decoding)."""
    from lib.eval.spec_decode import greedy_decode, speculative_decode
    from lib.target.weights import load_target_embedding

    target = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32).eval()
    hf = target.config
    c = tiny_config(hidden_size=hf.hidden_size, target_hidden_size=hf.hidden_size, head_dim=32,
                    vocab_size=hf.vocab_size, num_target_layers=hf.num_hidden_layers, target_layer_ids=[1, 3, 5],
                    block_size=6, markov_rank=16)
    torch.manual_seed(0)
    draft = DSparkDraft(c).eval()
    with torch.no_grad():
        draft.confidence_head.proj.bias.fill_(1.0)  # confidences spread around 0.7
        draft.confidence_head.proj.weight.normal_(std=0.3)
    draft.set_target_weights(load_target_embedding(target), None)  # lm_head bound from the runner
    prompts = [[5, 17, 33, 8, 90], [40, 41, 42, 43, 44, 45, 46]]
    greedy = greedy_decode(target, prompts, 12)
    verified = {}
    for threshold, budget in ((0.0, None), (0.3, None), (0.0, 2.0), (1.0, None)):
        draft.config.confidence_threshold, draft.config.verify_budget = threshold, budget
        drafter = DSparkDrafter(draft)
        result = speculative_decode(target, drafter, prompts, k=6, max_new_tokens=12, check_greedy=False,
                                    progress=False)
        assert result.outputs == greedy, (threshold, budget)
        verified[threshold, budget] = (drafter.verified_per_round, result.tau)
    assert verified[0.0, None][0] == 6
    assert 0 < verified[0.3, None][0] < 6 and 0 < verified[0.0, 2.0][0] <= 2.0
    assert verified[1.0, None] == (0.0, 1.0)  # nothing confident enough: each round keeps the bonus token alone
    with pytest.raises(ValueError, match="eval.draft_tokens"):
        speculative_decode(target, drafter, prompts, k=7, max_new_tokens=4, progress=False)
    assert NOT_PROPOSED < 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled ops are checked on CUDA")
def test_compiled_kl_ops_give_the_eager_loss_and_gradients():
    from tests.helpers import assert_same_steps, compiled_against_eager

    from lib.drafts.dflash import fused as dflash_fused

    c = tiny_config()
    draft = tiny_draft(c, seed=2).cuda()
    draft.set_target_weights(draft.embed_tokens, draft.lm_head)
    ids, loss_mask, positions, cu = (t.cuda() for t in packed(lengths=(19, 14), seed=2))
    blocks = build_dspark_blocks(ids, loss_mask, positions, cu, torch.tensor([2, 5, 9, 16, 20, 27]).cuda(), 4, MASK)
    batch = {"aux_hidden": torch.randn(33, c.fc_in_features, device="cuda"), "position_ids": positions,
             "final_hidden": torch.randn(33, 32, device="cuda")}
    params = [p for p in draft.parameters() if p.requires_grad]
    decay = DSparkOptions(block_size=4).decay("cuda")

    def run():
        loss, sums = dspark_loss.block_loss(draft, batch, blocks, decay, 1.0, torch.tensor(9.0, device="cuda"), False)
        return [(loss.detach(), sums, torch.autograd.grad(loss, params))]

    dflash_fused.use_compiled(True)
    try:
        eager, compiled = compiled_against_eager(dspark_loss, run)
    finally:
        dflash_fused.use_compiled(False)
    assert_same_steps(compiled, eager)


def test_strategy_registered_by_name_with_options_from_the_draft_group():
    cfg = Config(target=TargetConfig(path=TINY_TARGET_DIR), draft=DraftConfig(name="dspark", options={"num_layers": 3}))
    plan = get_strategy(cfg.draft.name).capture_plan(AutoConfig.from_pretrained(TINY_TARGET_DIR), cfg)
    assert plan.layers == (1, 3, 5)
