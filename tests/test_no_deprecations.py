"""A default run prints no third-party deprecation warnings: the target's KV cache goes by the name the
installed transformers expects (`cache` now, `past_key_values` on 5.17, the GPU image's version)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from lib.config import TINY_TARGET_DIR
from lib.drafts.drafting import visible_keys
from lib.eval.target import TargetRunner

pytestmark = pytest.mark.unit


def test_cached_decoding_warns_nothing_and_matches_a_full_forward(caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32)
    runner = TargetRunner.from_causal_lm(model)
    ids = torch.tensor([[5, 9, 3, 7]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="transformers"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning/DeprecationWarning fails the test
        with runner.decoding():
            greedy, _, cache = runner.forward(ids, torch.arange(4)[None], visible_keys(valid[:, :4], 4), None, [1])
            step, _, cache = runner.forward(greedy[:, -1:], torch.tensor([[4]]), visible_keys(valid, 1), cache, [1])
            whole = (torch.cat([ids, greedy[:, -1:]], 1), torch.arange(5)[None], visible_keys(valid, 5), None)
            full, _, _ = runner.forward(*whole, [1])
            logits, _ = runner.last_logits(*whole)
    assert cache.get_seq_length() == 5
    assert step[0, -1] == full[0, -1]
    assert logits.shape == (1, runner.vocab_size) and logits.dtype == torch.float32
    assert logits.argmax(-1) == full[0, -1]
    deprecations = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert deprecations == []
