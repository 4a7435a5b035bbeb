"""Decoding's attention (lib/eval/target.py _grouped_query_attention) against transformers' own sdpa
attention on a real Qwen3 attention module: the same output for decode steps and verify chunks under
hole masks (left padding, holes in the middle), in fp32 and bf16, and decoding routes through it."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from lib.config import TINY_TARGET_DIR
from lib.drafts.drafting import visible_keys
from lib.eval import target as target_module
from lib.eval.target import TargetRunner, _grouped_query_attention

pytestmark = pytest.mark.unit


def _attention_case(dtype: torch.dtype, queries: int, cached: int, batch: int = 3, seed: int = 0):
    config = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=64)
    module = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 8, queries, 16, generator=g).to(dtype)
    k, v = (torch.randn(batch, 2, cached, 16, generator=g).to(dtype) for _ in range(2))
    # Rows with left padding and a hole in the middle; every query sees at least its own slot.
    valid = torch.rand(batch, cached, generator=g) > 0.3
    valid[0, :cached // 3] = False
    valid[:, -queries:] = True
    mask = torch.zeros(batch, 1, queries, cached, dtype=dtype)
    mask.masked_fill_(~visible_keys(valid, queries)[:, None], torch.finfo(dtype).min)
    return module, q, k, v, mask


@pytest.mark.parametrize("queries", [1, 4, 16])
def test_grouped_attention_equals_transformers_sdpa(queries):
    module, q, k, v, mask = _attention_case(torch.float32, queries, cached=37)
    ours, _ = _grouped_query_attention(module, q, k, v, mask, scaling=module.scaling)
    # The reference copies each key head per query head, as transformers 5.17's sdpa does.
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=module.scaling).transpose(1, 2)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    assert ours.shape == (3, queries, 8, 16)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grouped_attention_in_bf16_errs_as_little_as_sdpa(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    module, q, k, v, mask = (t.to(device) for t in _attention_case(torch.bfloat16, 4, cached=64, seed=1))
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), repeat_kv(k, 4).double(), repeat_kv(v, 4).double(), attn_mask=mask.double(),
        scale=module.scaling).transpose(1, 2)
    ours, _ = _grouped_query_attention(module, q, k, v, mask, scaling=module.scaling)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    ours_err, their_err = ((x.double() - exact).abs().mean().item() for x in (ours, theirs))
    assert ours_err <= 1.5 * their_err + 1e-6, (ours_err, their_err)


def test_long_queries_take_transformers_sdpa(monkeypatch):
    module, q, k, v, mask = _attention_case(torch.float32, 17, cached=40)
    calls = []
    monkeypatch.setattr(target_module, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(a[1].shape) or sdpa_attention_forward(*a, **kw))
    out, _ = _grouped_query_attention(module, q, k, v, mask, scaling=module.scaling)
    assert calls == [q.shape] and out.shape == (3, 17, 8, 16)


def test_decoding_runs_the_grouped_attention_and_restores_the_model(monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32)
    runner = TargetRunner.from_causal_lm(model)
    before = model.config._attn_implementation
    seen = []
    original = target_module._grouped_query_attention
    from transformers import AttentionInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, target_module._DECODE_ATTN,
                        lambda *a, **kw: seen.append(a[1].shape[2]) or original(*a, **kw))
    ids = torch.tensor([[5, 9, 3, 7]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    with runner.decoding():
        greedy, _, cache = runner.forward(ids, torch.arange(4)[None], visible_keys(valid[:, :4], 4), None)
        runner.forward(greedy[:, -1:], torch.tensor([[4]]), visible_keys(valid, 1), cache)
    layers = model.config.num_hidden_layers
    assert seen == [4] * layers + [1] * layers
    assert model.config._attn_implementation == before


def test_decode_attention_without_grouped_heads_equals_transformers_sdpa():
    """Every head with its own keys (MHA): the fold is the identity and the result is sdpa's."""
    config = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=64)
    module = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (4, 20, 20))
    valid = torch.rand(2, 20, generator=g) > 0.3
    valid[:, -4:] = True
    mask = torch.zeros(2, 1, 4, 20).masked_fill_(~visible_keys(valid, 4)[:, None], torch.finfo(torch.float32).min)
    ours, _ = _grouped_query_attention(module, q, k, v, mask, scaling=module.scaling)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
