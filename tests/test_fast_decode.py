"""The lean decode path (lib/eval/fast_decode.py) against the transformers forward it replaces: the same
logits for prefill and decode steps with left padding, rows leaving and joining, and the KV buffers
growing; the same greedy tokens through sample_stream; unsupported targets keep the transformers forward."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lib.eval.fast_decode import KVCache, LeanDecoder, unsupported_reason
from lib.eval.sampling import SamplingConfig, _prefill, sample_stream
from lib.drafts.drafting import visible_keys
from lib.eval.target import TargetRunner

pytestmark = pytest.mark.unit

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=97, max_position_embeddings=512)
# Llama with llama3 rope scaling: the lean path must take transformers' rotary tables as they are.
LLAMA_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _model(model_type: str, dtype=torch.float32, device="cpu", seed: int = 0, **extra):
    torch.manual_seed(seed)
    kwargs = dict(SHAPE, **extra)
    if model_type == "llama":
        kwargs.setdefault("rope_parameters", LLAMA_ROPE)
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()


PROMPTS = [[5, 9, 3, 7, 11], [4, 8], [6, 6, 6, 1, 2, 3, 4, 5, 6, 7], [12, 40], [7], [3, 3, 9, 27, 81, 2]]


def _drive(step, device, steps: int = 6):
    """A fixed schedule through sampling's batch (the one sample_stream keeps): prefill three rows, decode,
    drop the first row (its leading slots are cut), join three new rows, decode, drop two more, decode.
    Returns the logits [B, V] after every call, in order."""
    g = torch.Generator().manual_seed(1)
    batch = _prefill(step, PROMPTS[:3], [0, 1, 2], device)
    seen = [batch.logits]

    def decode(n):
        for _ in range(n):
            tokens = torch.randint(0, SHAPE["vocab_size"], (len(batch.keys),), generator=g).to(device)
            batch.valid = torch.cat([batch.valid, torch.ones(len(batch.keys), 1, dtype=torch.bool, device=device)], 1)
            batch.logits, batch.cache = step(tokens[:, None], batch.next_position[:, None],
                                             visible_keys(batch.valid, 1), batch.cache)
            batch.next_position = batch.next_position + 1
            seen.append(batch.logits)

    decode(steps)
    batch.keep([1, 2])  # the longest row (10 prompt tokens) leaves: the leading slots are cut
    decode(2)
    batch.join(_prefill(step, PROMPTS[3:], [3, 4, 5], device))
    seen.append(batch.logits)
    decode(steps)
    batch.keep([0, 3, 4])
    decode(2)
    return seen, batch


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_lean_logits_equal_the_transformers_forward(model_type):
    runner = TargetRunner.from_causal_lm(_model(model_type))
    lean = runner.lean_decoder()
    assert isinstance(lean, LeanDecoder), unsupported_reason(runner.base)
    with runner.decoding():
        want, hf_batch = _drive(runner.last_logits, runner.device)
        got, lean_batch = _drive(lean.last_logits, runner.device)
    assert isinstance(lean_batch.cache, KVCache) and not isinstance(hf_batch.cache, KVCache)
    assert lean_batch.cache.length == lean_batch.valid.shape[1] == hf_batch.cache.get_seq_length()
    assert len(got) == len(want) == 18
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert (a - b).abs().max() < 1e-4, (i, float((a - b).abs().max()))


def test_cache_grows_in_place_and_keeps_what_it_holds():
    """Decoding past the preallocated capacity grows the buffers (no copy per step) with equal logits."""
    runner = TargetRunner.from_causal_lm(_model("qwen3"))
    lean = runner.lean_decoder()
    ids = torch.tensor([[0, 0, 5, 9], [1, 2, 3, 4]])
    valid = torch.tensor([[False, False, True, True], [True] * 4])
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    with runner.decoding():
        _, cache = lean.last_logits(ids, positions, visible_keys(valid, 4), None)
        _, hf = runner.last_logits(ids, positions, visible_keys(valid, 4), None)
        first = cache.capacity
        capacities, buffers = {first}, {cache.keys[0].data_ptr()}
        for t in range(first + 5):
            token = torch.tensor([[t % 90 + 1], [t % 70 + 2]])
            pos = positions[:, -1:] + 1 + t
            valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1)
            got, cache = lean.last_logits(token, pos, visible_keys(valid, 1), cache)
            want, hf = runner.last_logits(token, pos, visible_keys(valid, 1), hf)
            assert (got - want).abs().max() < 1e-4, t
            capacities.add(cache.capacity)
            buffers.add(cache.keys[0].data_ptr())
    assert cache.length == valid.shape[1] > first
    assert len(capacities) == 2 and len(buffers) == 2  # one growth, otherwise written in place
    assert torch.equal(cache.keys[1][:, :, :cache.length], hf.layers[1].keys)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_sample_stream_greedy_tokens_are_the_same_with_and_without_the_lean_path(model_type):
    runner = TargetRunner.from_causal_lm(_model(model_type, seed=3))
    assert runner.lean_decoder() is not None
    budgets = [12, 5, 20, 3, 16, 9]
    results = {}
    for lean in (True, False):
        pending = [(i, p, b) for i, (p, b) in enumerate(zip(PROMPTS, budgets))]

        def feed(n):
            taken = pending[:n]
            del pending[:n]
            return taken

        results[lean] = dict(sample_stream(runner, feed, [13], SamplingConfig(max_new_tokens=20), 3, lean=lean))
    assert results[True] == results[False]
    assert sum(len(g.tokens) for g in results[True].values()) > 30  # not all stopped at once


@pytest.mark.parametrize("case", [
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "layer types"),
    ("mistral", dict(sliding_window=4096), "sliding_window=4096"),
    ("qwen3_moe", dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2), "model_type 'qwen3_moe'"),
])
def test_unsupported_targets_keep_the_transformers_forward(case):
    model_type, extra, reason = case
    runner = TargetRunner.from_causal_lm(_model(model_type, **extra))
    assert reason in unsupported_reason(runner.base)
    assert runner.lean_decoder() is None
    with pytest.raises(ValueError, match="lean=False"):
        LeanDecoder(runner.base, runner.lm_head)
    pending = [(0, [5, 9, 3], 4), (1, [7], 4)]
    out = dict(sample_stream(runner, lambda n: [pending.pop(0) for _ in range(min(n, len(pending)))], [],
                             SamplingConfig(max_new_tokens=4), 2))
    assert sorted(out) == [0, 1] and all(len(g.tokens) == 4 for g in out.values())


def test_mistral_without_a_window_and_a_sharded_projection():
    assert unsupported_reason(_model("mistral", sliding_window=None).model) is None
    base = _model("qwen3").model
    # An engine.tp shard holds part of the heads: the lean path must not run it as the whole model.
    base.layers[1].self_attn.k_proj = torch.nn.Linear(64, 16, bias=False)
    assert "self_attn.k_proj does not produce 32" in unsupported_reason(base)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_lean_logits_match_the_transformers_forward_on_cuda(compile):
    """bf16 on CUDA: both paths round differently (a fused norm, other kernels for the same attention),
    so exact equality is not expected. Bound: bf16 keeps 8 significant bits (a relative step of 2^-8 =
    0.4%); rounding differences of that size in each of the 3 layers' residual adds and in the final
    norm move a logit by a few of those steps of its own size, so |lean - hf| <= 5% of the largest
    logit allows ~12 steps and still fails on any real error (a wrong rope, mask or cache slot moves
    logits by their own magnitude). Top-1 agrees except where two logits are within that noise.
    Compiled decode steps (compile=True) fuse more, so they round differently again: the same bound."""
    runner = TargetRunner.from_causal_lm(_model("qwen3", dtype=torch.bfloat16, device="cuda"))
    lean = runner.lean_decoder(compile)
    assert lean is not None and (lean.compiled is not None) == compile
    with runner.decoding():
        want, _ = _drive(runner.last_logits, runner.device)
        got, _ = _drive(lean.last_logits, runner.device)
    agree = total = 0
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 0.05 * b.abs().max(), float((a - b).abs().max())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    assert agree >= 0.9 * total, (agree, total)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_compiled_decode_steps_equal_the_eager_lean_path_with_one_graph_for_every_layer(model_type):
    """--compile: the one-token steps run compiled (lib/eval/compiled_decode.py). Same logits as the eager
    lean path through prefill, rows leaving and joining and the cache growing; and one graph per function
    serves all layers and every step (a batch of one row may add its own), never one per layer."""
    from torch._dynamo.utils import counters

    runner = TargetRunner.from_causal_lm(_model(model_type, num_hidden_layers=6))
    eager, compiled = runner.lean_decoder(), runner.lean_decoder(compile=True)
    assert eager.compiled is None and compiled.compiled is not None
    torch._dynamo.reset()  # graphs another test compiled from the same functions would be reused
    counters.clear()
    with runner.decoding():
        want, _ = _drive(eager.last_logits, runner.device, steps=70)  # past the first capacity (64 + prompt)
        got, batch = _drive(compiled.last_logits, runner.device, steps=70)
    assert batch.cache.capacity > 64 + len(PROMPTS[2])
    assert len(got) == len(want) > 140
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max() < 1e-4, (i, float((a - b).abs().max()))
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 4, dict(counters["stats"])  # compiled per layer: 12 or more


def test_compile_falls_back_to_eager_for_layers_it_cannot_write():
    runner = TargetRunner.from_causal_lm(_model("llama", hidden_act="gelu"))
    assert runner.lean_decoder(compile=True).compiled is None  # logged; the eager lean path decodes
