"""EAGLE-3's lm_head starts as the target's rows of the draft vocabulary (draft.options.head_init=target,
the default, as speculators 0.9.0 loads the verifier's lm_head), or N(0, 0.02) with head_init=random.

The check goes through TargetHead, the trainer's own (independent) reading of the vocab map: at init the
draft's head over any hidden state gives exactly the target's distribution over the draft vocabulary.
"""
from __future__ import annotations

import pytest
import torch

from lib.drafts.eagle3.target_head import TargetHead
from lib.drafts.eagle3.trainer import Eagle3Options
from tests.eagle3_draws import drawn_draft

pytestmark = pytest.mark.unit


def test_head_init_option_is_checked():
    assert Eagle3Options.from_mapping({}).head_init == "target"
    assert Eagle3Options.from_mapping({"head_init": "random"}).head_init == "random"
    with pytest.raises(ValueError, match=r"draft.options.head_init='copy': use one of \['target', 'random'\]"):
        Eagle3Options.from_mapping({"head_init": "copy"})


def test_loaded_head_gives_the_target_distribution_over_the_draft_vocab():
    draft = drawn_draft(None)
    cfg = draft.config
    assert int(draft.d2t.abs().sum()) > 0, "the drawn vocab map must shift ids, or the offsets go untested"
    target_lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    draft.load_head_rows(target_lm_head)
    hidden = torch.randn(17, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    draft_probs = torch.softmax(draft.lm_head(hidden).float(), dim=-1)
    expected = TargetHead(target_lm_head, draft.d2t).target_probs(hidden).probs
    torch.testing.assert_close(draft_probs, expected, rtol=1e-5, atol=1e-6)


def test_load_head_rows_refuses_another_targets_head():
    draft = drawn_draft(None)
    with pytest.raises(ValueError, match=r"target lm_head has shape \(49, 32\), the draft expects \(50, 32\)"):
        draft.load_head_rows(torch.zeros(49, 32))
