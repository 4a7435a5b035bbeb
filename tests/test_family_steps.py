"""The trainer-step benchmark's FLOP counts (lib/drafts/<family>/flops.py) and its family table
(bench/trainer.py --variants all): EAGLE-3's count against the earlier bench's (bench/flops.py), the
DFlash and P-EAGLE attention pairs against their masks built explicitly, every family on disk in the table.
The benchmark itself runs on GPU (`bash bench/gpu_suite.sh family_steps`); its CPU smoke run is in
bench/trainer.py's docstring."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from bench.flops import draft_step_flops
from bench.trainer import VARIANTS, chosen_variants, markdown_table, sample_lengths, target_config
from lib.config.choices import draft_families
from lib.drafts.dflash.flops import visible_pairs
from lib.drafts.dflash.mask import build_blocks, dense_mask, sample_anchors
from lib.drafts.eagle3.flops import step_flops as eagle3_step_flops
from lib.drafts.eagle3.flops import ttt_step_flops
from lib.drafts.eagle3.loss import valid_positions
from lib.drafts.eagle3.model import Eagle3DraftConfig
from lib.drafts.eagle3.target_head import TargetDistribution
from lib.drafts.peagle.flops import slot_pairs
from lib.drafts.peagle.sampling import batch_generator, cod_sample

pytestmark = pytest.mark.unit


def packed(seed: int, tokens: int = 300):
    lengths = sample_lengths(tokens, 20, 120, random.Random(seed))
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return lengths, cu, torch.rand(tokens, generator=gen) < 0.7, gen


def test_eagle3_count_is_the_earlier_benchs_less_what_the_step_never_computes():
    """With every row given logits the count is bench/flops.py's minus fc's input gradient (the captured
    states need none); with the batch's own valid rows, also minus the head on the rows without a loss."""
    hf = target_config("tiny")
    dc = Eagle3DraftConfig.from_target(hf, 1000, [1, 3, 4], {})
    ttt = 4
    lengths, cu, loss_mask, gen = packed(0)
    tokens = sum(lengths)
    fc_input_grad = 2.0 * tokens * dc.fc_in_features * dc.hidden_size
    old = draft_step_flops(dc, lengths, ttt, hf.vocab_size)
    assert ttt_step_flops(dc, lengths, ttt, hf.vocab_size, [tokens] * ttt) == pytest.approx(old - fc_input_grad,
                                                                                               rel=1e-12)
    argmax = torch.randint(-1, 1000, (tokens,), generator=gen)  # -1: the target's argmax is outside the draft vocab
    context = TargetDistribution(torch.zeros(tokens, 1000), argmax)
    batch = {"loss_mask": loss_mask, "cu_seqlens": cu}
    bundle = SimpleNamespace(draft_config=dc, ttt_length=ttt, target_head=SimpleNamespace(vocab_size=hf.vocab_size))
    rows = valid_positions(loss_mask, cu, argmax >= 0, ttt).sum(1)
    assert 0 < int(rows.min()) and int(rows.max()) < tokens
    unused_head = 3 * 2.0 * dc.hidden_size * dc.draft_vocab_size * float((tokens - rows).sum())
    assert eagle3_step_flops(bundle, batch, context) == pytest.approx(old - fc_input_grad - unused_head, rel=1e-12)


def test_dflash_pairs_are_the_block_masks():
    lengths, cu, loss_mask, gen = packed(1)
    tokens = sum(lengths)
    ids = torch.randint(0, 50, (tokens,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    for block in (4, 16):
        anchors = sample_anchors(loss_mask, cu, block, None, torch.Generator().manual_seed(block))
        blocks = build_blocks(ids, loss_mask, positions, cu, anchors, block, 0)
        assert blocks.num_blocks > 5
        assert visible_pairs(blocks) == int(dense_mask(blocks).sum())


def test_peagle_pairs_are_the_parallel_attentions():
    """Slot (a, d) sees the real slots of a's sample up to a and its chain's mask slots (a, 1..d)."""
    lengths, cu, loss_mask, gen = packed(2)
    tokens = sum(lengths)
    valid = valid_positions(loss_mask, cu, torch.rand(tokens, generator=gen) < 0.9, 5)
    slots = cod_sample(valid, 0.7, 0.2, None, batch_generator(0, torch.arange(tokens)))
    assert slots.depths > 2
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    chain = {(int(a), int(d)) for a, d in zip(slots.anchor, slots.depth)}
    explicit = 0
    for a, d in zip(slots.anchor.tolist(), slots.depth.tolist()):
        start = max(s for s in starts[:-1] if s <= a)
        explicit += sum(1 for k in range(start, tokens) if k <= a)  # real slots
        explicit += sum(1 for e in range(1, d + 1) if (a, e) in chain)  # own chain's mask slots
    assert slot_pairs(slots.anchor, slots.depth, cu) == explicit


def test_the_family_table_lists_every_family_on_disk():
    variants = chosen_variants("all")
    assert {draft for _, draft, _ in variants} >= set(draft_families())
    assert {label for label, _, _ in variants} >= set(VARIANTS)
    results = [{"label": label, "draft": draft, "overrides": list(over), "step_ms": 1.0, "tokens_per_s": 2.0,
                "tflops": None, "mfu": None, "flops_per_step": None, "peak_alloc_gib": None}
               for label, draft, over in variants]
    table = markdown_table(results).splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == [label for label, _, _ in variants]
