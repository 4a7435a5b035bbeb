"""Draft config, layers, inference API, target weights, target head and vocab map."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lib.drafts.eagle3.attention import DraftKVCache
from lib.drafts.eagle3.loss import ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig, apply_rope
from lib.drafts.eagle3.rope import rope_inverse_frequencies
from lib.drafts.eagle3.target_head import TargetHead, load_target_embedding, load_target_lm_head
from lib.drafts.eagle3.vocab import (VOCAB_MAP_FILENAME, build_vocab_map, check_vocab_map, ensure_vocab_map,
                              load_vocab_map, save_vocab_map)

pytestmark = pytest.mark.unit

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# gpt-oss's released rope (untruncated YaRN); a Qwen-style YaRN extension; DeepSeek-style magnitude keys.
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": False}
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
MSCALE_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707,
               "mscale_all_dim": 1.0}


def tiny_qwen3(**kw) -> Qwen3Config:
    return Qwen3Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_hidden_layers=4, vocab_size=60, max_position_embeddings=256, **kw)


def tiny_draft(seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig.from_target(tiny_qwen3(), draft_vocab_size=24, aux_layer_ids=[0, 1, 2])
    draft = Eagle3Draft(cfg)
    draft.load_embedding(torch.randn(cfg.vocab_size, cfg.hidden_size))
    draft.set_vocab_map(*build_vocab_map(torch.randint(0, 9, (cfg.vocab_size,)), cfg.draft_vocab_size))
    return draft


def test_from_target_qwen3_keeps_explicit_head_dim_and_clips_the_draft_vocab():
    cfg = Eagle3DraftConfig.from_target(tiny_qwen3(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                                        draft_vocab_size=1000, aux_layer_ids=[1, 1, 0],
                                        overrides={"intermediate_size": 20, "num_key_value_heads": None})
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.intermediate_size) == (16, 2, 20)
    assert cfg.draft_vocab_size == cfg.vocab_size == 60
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.aux_layer_ids, cfg.fc_in_features) == (1e6, None, [1, 1, 0], 96)


def test_from_target_llama_without_head_dim_and_with_llama3_rope():
    legacy = SimpleNamespace(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
                             rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=LLAMA3_ROPE, max_position_embeddings=512,
                             vocab_size=100, hidden_act="silu")
    cfg = Eagle3DraftConfig.from_target(legacy, 32, [1, 2, 3])
    assert cfg.head_dim == 8 and cfg.rope_theta == 5e5 and cfg.rope_scaling == LLAMA3_ROPE
    fewer_heads = Eagle3DraftConfig.from_target(legacy, 32, [1, 2, 3], {"num_attention_heads": 2})
    assert (fewer_heads.num_attention_heads, fewer_heads.num_key_value_heads, fewer_heads.head_dim) == (2, 2, 24)


@pytest.mark.parametrize("overrides, error", [
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"hidden_size": 16}, "hidden_size"),
    ({"dropout": 0.1}, "dropout"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "original_max_position_embeddings"),
    ({"rope_scaling": {**QWEN_YARN, "attention_factor": 1.2}}, "attention_factor"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_errors_name_the_key(overrides, error):
    with pytest.raises(ValueError, match=error):
        Eagle3DraftConfig.from_target(tiny_qwen3(), 24, [0, 1, 2], overrides)


def test_config_rejects_a_draft_vocab_larger_than_the_target():
    fields = Eagle3DraftConfig.from_target(tiny_qwen3(), 24, [0, 1, 2]).to_dict()
    with pytest.raises(ValueError, match="draft_vocab_size=61"):
        Eagle3DraftConfig.from_dict({**fields, "draft_vocab_size": 61})
    with pytest.raises(ValueError, match="aux_layer_ids"):
        Eagle3DraftConfig.from_dict({**fields, "aux_layer_ids": []})


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE, GPT_OSS_YARN, QWEN_YARN, MSCALE_YARN])
def test_rotary_embedding_matches_transformers_llama(rope):
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=512,
                     rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": 5e5})
    draft = Eagle3Draft(Eagle3DraftConfig.from_target(hf, 20, [0, 1, 2]))
    hf_rope = LlamaRotaryEmbedding(hf)
    c = draft.config
    inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).float()
    torch.testing.assert_close(inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)
    positions = torch.tensor([[0, 1, 7, 63, 64, 200, 511]])
    x = torch.randn(1, 4, 7, 16)
    cos_ref, sin_ref = hf_rope(x, positions)
    cos, sin = draft.rope(positions, torch.float32)
    # Both compute angles in fp32; one-ulp frequency differences grow with the position.
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-4)
    q_ref, _ = apply_rotary_pos_emb(x, x, cos_ref, sin_ref)
    torch.testing.assert_close(apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2), q_ref, rtol=0, atol=1e-3)


def test_draft_of_a_gpt_oss_target_rotates_as_the_target_does():
    """gpt-oss ships untruncated YaRN (factor 32); the draft derived from its config must rotate with the
    same frequencies and the same cos/sin magnitude as the target's own rotary class."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    target = GptOssConfig(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, num_hidden_layers=2, vocab_size=50, num_local_experts=2, max_position_embeddings=2048)
    assert target.rope_parameters["rope_type"] == "yarn" and target.rope_parameters.get("truncate") is False
    draft = Eagle3Draft(Eagle3DraftConfig.from_target(target, 20, [0, 1, 1]))
    positions = torch.tensor([[0, 3, 100, 1000, 2047]])
    cos_ref, sin_ref = GptOssRotaryEmbedding(target)(torch.randn(1, 5, 16), positions)
    cos, sin = draft.rope(positions, torch.float32)
    assert cos_ref.abs().max() > 1.2  # YaRN's magnitude is in play (1 + 0.1 ln 32)
    half = cos.shape[-1] // 2  # gpt-oss keeps one copy of the per-pair angles; the rotate-half layout two
    torch.testing.assert_close(cos[..., :half], cos_ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(sin[..., half:], sin_ref, rtol=0, atol=2e-4)


def test_incremental_inference_with_cache_and_rollback_matches_one_prefill():
    draft = tiny_draft()
    ids, aux = torch.randint(0, 60, (2, 9)), torch.randn(2, 9, 96)
    pos = torch.arange(9).expand(2, 9)
    full_logits, full_hidden, _ = draft.forward_infer(ids, aux, False, pos)
    logits, hidden, cache = draft.forward_infer(ids[:, :5], aux[:, :5], False, pos[:, :5])
    for t in range(5, 9):
        step_logits, step_hidden, cache = draft.forward_infer(ids[:, t:t + 1], aux[:, t:t + 1], False, pos[:, t:t + 1],
                                                              cache)
        logits, hidden = torch.cat([logits, step_logits], 1), torch.cat([hidden, step_hidden], 1)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, full_hidden, rtol=1e-5, atol=1e-5)
    # Draft two speculative tokens from its own hidden, reject them, and redo the real continuation.
    draft.forward_infer(torch.randint(0, 60, (2, 2)), hidden[:, -2:], True, pos[:, -2:] + 2, cache)
    assert cache.length == 11
    cache.truncate(7)
    redo_logits, _, cache = draft.forward_infer(ids[:, 7:], aux[:, 7:], False, pos[:, 7:], cache)
    torch.testing.assert_close(redo_logits, full_logits[:, 7:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(10)
    with pytest.raises(ValueError, match="aux hidden width 32"):
        draft.forward_infer(ids[:, :1], hidden[:, :1], False, pos[:, :1])
    with pytest.raises(ValueError, match="is_projected"):
        draft.forward_infer(ids[:, :1], aux[:, :1], True, pos[:, :1])
    assert isinstance(cache, DraftKVCache)


def test_training_step_zero_equals_inference_prefill():
    """TTT step 0 at position t is the draft run on (x[t+1], aux[t]) at position t, as servers prefill."""
    draft = tiny_draft(seed=1)
    n = 12
    ids, mask = torch.randint(0, 60, (n,)), torch.rand(n) > 0.2
    aux, final = torch.randn(n, 96), torch.randn(n, 32)
    head = TargetHead(torch.randn(60, 32), draft.d2t)
    batch = dict(input_ids=ids, loss_mask=mask, position_ids=torch.arange(n), aux_hidden=aux, final_hidden=final,
                 cu_seqlens=torch.tensor([0, n], dtype=torch.int32))
    _, metrics = ttt_forward(draft, head, batch, 1)
    logits, _, _ = draft.forward_infer(ids[None, 1:], aux[None, :-1], False, torch.arange(n - 1)[None])
    target = head.target_probs(final)
    valid = [t for t in range(n - 2) if mask[t + 2] and target.in_draft_vocab[t + 1]]
    assert valid
    ce = sum(-(target.probs[t + 1] * torch.log_softmax(logits[0, t], -1)).sum() for t in valid)
    correct = sum(int(logits[0, t].argmax() == target.draft_argmax[t + 1]) for t in valid)
    torch.testing.assert_close(metrics["sums"], torch.tensor([float(ce), correct, len(valid)]), rtol=1e-5, atol=1e-5)


def test_only_trainable_parameters_receive_gradients():
    draft = tiny_draft(seed=2)
    head = TargetHead(torch.randn(60, 32), draft.d2t)
    n = 20
    batch = dict(input_ids=torch.randint(0, 60, (n,)), loss_mask=torch.ones(n, dtype=torch.bool),
                 position_ids=torch.cat([torch.arange(8), torch.arange(12)]), aux_hidden=torch.randn(n, 96),
                 final_hidden=torch.randn(n, 32), cu_seqlens=torch.tensor([0, 8, 20], dtype=torch.int32))
    embedding, d2t = draft.embed_tokens.weight.clone(), draft.d2t.clone()
    ttt_forward(draft, head, batch, 3)[0].backward()
    assert draft.embed_tokens.weight.grad is None and not draft.embed_tokens.weight.requires_grad
    trainable = dict((n, p) for n, p in draft.named_parameters() if p.requires_grad)
    assert "embed_tokens.weight" not in trainable and len(trainable) == 13
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.equal(draft.embed_tokens.weight, embedding) and torch.equal(draft.d2t, d2t)


def test_target_weights_load_from_checkpoints(tmp_path):
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(tiny_qwen3(tie_word_embeddings=False))
    qwen.save_pretrained(tmp_path / "qwen")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                         num_hidden_layers=2, vocab_size=60, tie_word_embeddings=True))
    llama.save_pretrained(tmp_path / "llama", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists()
    for model, path in ((qwen, tmp_path / "qwen"), (llama, tmp_path / "llama")):
        embedding = model.get_input_embeddings().weight
        assert torch.equal(load_target_embedding(str(path)), embedding)
        assert torch.equal(load_target_embedding(model), embedding)
        assert torch.equal(load_target_lm_head(str(path)), model.get_output_embeddings().weight)
        assert torch.equal(load_target_lm_head(model), model.get_output_embeddings().weight)
    assert not torch.equal(load_target_lm_head(str(tmp_path / "qwen")), qwen.get_input_embeddings().weight)
    assert torch.equal(load_target_lm_head(str(tmp_path / "llama")), llama.get_input_embeddings().weight)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_target_embedding(str(tmp_path))


def test_target_head_chunks_equal_the_full_computation():
    gen = torch.Generator().manual_seed(0)
    weight, final = torch.randn(60, 32, generator=gen), torch.randn(23, 32, generator=gen)
    d2t, t2d = build_vocab_map(torch.randint(0, 9, (60,), generator=gen), 24)
    logits = final @ weight.T
    draft_ids = torch.arange(24) + d2t
    in_vocab = t2d[logits.argmax(-1)]
    assert in_vocab.any() and not in_vocab.all()
    for chunk in (1, 5, 1000):
        dist = TargetHead(weight, d2t, chunk_rows=chunk).target_probs(final)
        torch.testing.assert_close(dist.probs, torch.softmax(logits[:, draft_ids], -1))
        assert torch.equal(dist.in_draft_vocab, in_vocab)
        assert torch.equal(draft_ids[dist.draft_argmax[in_vocab]], logits.argmax(-1)[in_vocab])


def test_vocab_map_picks_most_frequent_ids_with_ties_to_the_lower_id():
    counts = torch.tensor([5, 0, 9, 5, 1, 5, 0, 9])
    d2t, t2d = build_vocab_map(counts, 4)
    check_vocab_map(d2t, t2d)
    chosen = torch.arange(4) + d2t
    assert chosen.tolist() == sorted(chosen.tolist()) and bool((d2t >= 0).all())
    assert chosen.tolist() == [0, 2, 3, 7]  # 9, 9, then the two lowest ids among the 5s
    sparse_d2t, _ = build_vocab_map(torch.tensor([0, 0, 3, 0, 0, 1]), 4)  # only two ids ever seen
    assert (torch.arange(4) + sparse_d2t).tolist() == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="draft_vocab_size=9"):
        build_vocab_map(counts, 9)


def test_vocab_map_is_saved_once_and_reused(tmp_path):
    calls = []

    def count_tokens():
        calls.append(1)
        return torch.arange(30) % 7

    d2t, t2d = ensure_vocab_map(str(tmp_path), 10, 30, count_tokens)
    assert (tmp_path / VOCAB_MAP_FILENAME).exists()
    again = ensure_vocab_map(str(tmp_path), 10, 30, count_tokens)
    assert len(calls) == 1 and torch.equal(again[0], d2t) and torch.equal(again[1], t2d)
    assert all(torch.equal(a, b) for a, b in zip(load_vocab_map(str(tmp_path)), (d2t, t2d)))
    with pytest.raises(ValueError, match="draft_vocab_size=12"):
        ensure_vocab_map(str(tmp_path), 12, 30, count_tokens)
    other = build_vocab_map(torch.arange(30), 10)
    with pytest.raises(FileExistsError, match="different vocab map"):
        save_vocab_map(str(tmp_path), *other)
    with pytest.raises(ValueError, match="inconsistent"):
        check_vocab_map(d2t, other[1])
