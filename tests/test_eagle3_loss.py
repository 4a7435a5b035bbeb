"""TTT unroll and loss against a slow per-sample, per-position reference; packing; normalisers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lib.drafts.eagle3.loss as loss_module
from lib.drafts.eagle3.attention import TTTAttention
from lib.drafts.eagle3.loss import count_valid_positions, sim_accept_len, soft_cross_entropy, ttt_forward, valid_positions
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import TargetHead
from lib.drafts.eagle3.vocab import build_vocab_map
from tests.helpers import assert_same_steps, compiled_against_eager

pytestmark = pytest.mark.unit

VOCAB, DRAFT_VOCAB, HIDDEN = 40, 16, 24


def make_draft(dtype=torch.float64, seed=0) -> tuple[Eagle3Draft, torch.Tensor]:
    cfg = Eagle3DraftConfig(hidden_size=HIDDEN, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                            vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB, target_hidden_size=HIDDEN,
                            aux_layer_ids=[0, 1, 2])
    gen = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        for p in draft.parameters():  # norms away from 1 so their weights matter
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 1.0) + (p.dim() == 1))
    d2t, t2d = build_vocab_map(torch.randint(0, 50, (VOCAB,), generator=gen), DRAFT_VOCAB)
    draft.set_vocab_map(d2t, t2d)
    return draft.to(dtype), torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype)


def make_sample(length: int, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, VOCAB, (length,), generator=gen),
                loss_mask=torch.rand(length, generator=gen) > 0.25,
                aux_hidden=torch.randn(length, 3 * HIDDEN, generator=gen, dtype=dtype),
                final_hidden=torch.randn(length, HIDDEN, generator=gen, dtype=dtype))


def pack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    lengths = [s["input_ids"].numel() for s in samples]
    batch = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])
    batch["cu_seqlens"] = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return batch


def reference_unroll(draft: Eagle3Draft, target_weight: torch.Tensor, sample: dict, ttt_length: int):
    """Straight from the definition, one sample, one position and one head at a time.

    Returns per step (sum of soft CE over valid positions, correct argmaxes, valid count)."""
    cfg, P = draft.config, dict(draft.named_parameters())
    ids, mask, n = sample["input_ids"], sample["loss_mask"], sample["input_ids"].numel()
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rotate(x, pos):  # x [heads, dim]: pairs (j, j + dim/2) rotated by pos * theta^(-2j/dim)
        freqs = pos * cfg.rope_theta ** (-torch.arange(0, dim, 2, dtype=x.dtype) / dim)
        a, b = x[:, : dim // 2], x[:, dim // 2:]
        return torch.cat([a * freqs.cos() - b * freqs.sin(), b * freqs.cos() + a * freqs.sin()], dim=-1)

    draft_ids = torch.arange(cfg.draft_vocab_size) + draft.d2t
    full_logits = sample["final_hidden"] @ target_weight.T
    h = sample["aux_hidden"] @ P["fc.weight"].T
    keys, values, out = [], [], []
    for i in range(ttt_length):
        emb = P["embed_tokens.weight"][[int(ids[t + 1 + i]) if t + 1 + i < n else 0 for t in range(n)]]
        x = torch.cat([rms(emb, P["midlayer.input_layernorm.weight"]), rms(h, P["midlayer.hidden_norm.weight"])], -1)
        q = (x @ P["midlayer.self_attn.q_proj.weight"].T).view(n, heads, dim)
        k = (x @ P["midlayer.self_attn.k_proj.weight"].T).view(n, kv_heads, dim)
        keys.append(torch.stack([rotate(k[t], t + i) for t in range(n)]))
        values.append((x @ P["midlayer.self_attn.v_proj.weight"].T).view(n, kv_heads, dim))
        rows = []
        for t in range(n):
            qt = rotate(q[t], t + i)
            per_head = []
            for hq in range(heads):
                g = hq // (heads // kv_heads)
                ks = [keys[0][s, g] for s in range(t + 1)] + [keys[j][t, g] for j in range(1, i + 1)]
                vs = [values[0][s, g] for s in range(t + 1)] + [values[j][t, g] for j in range(1, i + 1)]
                w = torch.softmax(torch.stack([qt[hq] @ kk for kk in ks]) / math.sqrt(dim), dim=0)
                per_head.append((w[:, None] * torch.stack(vs)).sum(0))
            rows.append(torch.cat(per_head))
        mid = h + torch.stack(rows) @ P["midlayer.self_attn.o_proj.weight"].T
        u = rms(mid, P["midlayer.post_attention_layernorm.weight"])
        mlp = (F.silu(u @ P["midlayer.mlp.gate_proj.weight"].T) * (u @ P["midlayer.mlp.up_proj.weight"].T))
        h = mid + mlp @ P["midlayer.mlp.down_proj.weight"].T
        ce_sum, correct, count = torch.zeros((), dtype=h.dtype), 0, 0
        for t in range(n):
            src = t + 1 + i
            if t + 2 + i >= n or not mask[t + 2 + i] or not draft.t2d[full_logits[src].argmax()]:
                continue
            p = torch.softmax(full_logits[src][draft_ids], dim=0)
            logq = torch.log_softmax(rms(h[t], P["norm.weight"]) @ P["lm_head.weight"].T, dim=0)
            ce_sum = ce_sum - (p * logq).sum()
            correct += int(logq.argmax() == p.argmax())
            count += 1
        out.append((ce_sum, correct, count))
    return out


def test_ttt_matches_reference_loss_metrics_and_gradients():
    ttt = 3
    draft, target_weight = make_draft()
    samples = [make_sample(9, 1), make_sample(12, 2)]
    batch = pack(samples)
    head = TargetHead(target_weight, draft.d2t, probs_dtype=torch.float64)
    in_vocab = head.target_probs(batch["final_hidden"]).in_draft_vocab
    assert not bool(in_vocab.all()), "the test must cover targets outside the draft vocab"

    loss, metrics = ttt_forward(draft, head, batch, ttt)
    grads = torch.autograd.grad(loss, draft.trainable_parameters())

    per_sample = [reference_unroll(draft, target_weight, s, ttt) for s in samples]
    ce = [sum(r[i][0] for r in per_sample) for i in range(ttt)]
    correct = [sum(r[i][1] for r in per_sample) for i in range(ttt)]
    count = [sum(r[i][2] for r in per_sample) for i in range(ttt)]
    assert all(c > 0 for c in count)
    ref_loss = sum(0.8 ** i * ce[i] / count[i] for i in range(ttt))
    ref_grads = torch.autograd.grad(ref_loss, draft.trainable_parameters())

    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    sums = metrics["sums"].double()
    torch.testing.assert_close(sums[:ttt], torch.stack(ce).detach(), rtol=1e-6, atol=1e-6)
    assert sums[ttt:2 * ttt].tolist() == correct and sums[2 * ttt:].tolist() == count
    for name_grad, g, r in zip([n for n, p in draft.named_parameters() if p.requires_grad], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name_grad)


def test_packing_gives_each_sample_its_own_terms():
    ttt = 4
    draft, target_weight = make_draft(dtype=torch.float32, seed=3)
    head = TargetHead(target_weight, draft.d2t)
    samples = [make_sample(11, 5, torch.float32), make_sample(3, 6, torch.float32), make_sample(14, 7, torch.float32)]
    _, packed = ttt_forward(draft, head, pack(samples), ttt)
    alone = sum(ttt_forward(draft, head, pack([s]), ttt)[1]["sums"] for s in samples)
    torch.testing.assert_close(packed["sums"], alone, rtol=1e-5, atol=1e-5)


def test_global_denominators_make_micro_batches_sum_to_the_full_batch_gradient():
    ttt = 3
    draft, target_weight = make_draft(seed=4)
    head = TargetHead(target_weight, draft.d2t)
    a, b = [make_sample(10, 8), make_sample(7, 9)], [make_sample(13, 10)]
    counts = count_valid_positions(head, pack(a), ttt) + count_valid_positions(head, pack(b), ttt)
    params = draft.trainable_parameters()
    full = torch.autograd.grad(ttt_forward(draft, head, pack(a + b), ttt)[0], params)
    parts = [torch.autograd.grad(ttt_forward(draft, head, pack(s), ttt, denominators=counts)[0], params)
             for s in (a, b)]
    for g_full, g_a, g_b in zip(full, *parts):
        torch.testing.assert_close(g_a + g_b, g_full, rtol=1e-9, atol=1e-12)


def test_valid_positions_never_reach_past_a_sample_end():
    in_vocab = torch.ones(9, dtype=torch.bool)
    cu = torch.tensor([0, 1, 3, 9], dtype=torch.int32)
    valid = valid_positions(torch.ones(9, dtype=torch.bool), cu, in_vocab, 3)
    ends = {t: int(cu[1:][(cu[1:] > t).nonzero()[0]]) for t in range(9)}
    for i in range(3):
        for t in range(9):
            assert bool(valid[i, t]) == (t + 2 + i < ends[t])
    masked = valid_positions(torch.zeros(9, dtype=torch.bool), cu, in_vocab, 3)
    assert not masked.any()


@pytest.mark.parametrize("chunk", [2, 1000])
def test_soft_cross_entropy_matches_autograd_definition(monkeypatch, chunk):
    monkeypatch.setattr(loss_module, "CE_CHUNK_ROWS", chunk)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(torch.randn(9, 7, generator=gen, dtype=torch.float64), -1)
    rows = torch.tensor([8, 0, 3, 3, 5])
    weights = torch.rand(5, generator=gen, dtype=torch.float64)
    ours = soft_cross_entropy(logits, probs, rows)
    ref = -(probs[rows] * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    g_ref, = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.gradcheck(lambda x: soft_cross_entropy(x, probs, rows), (logits,))


def test_sim_accept_len_properties():
    assert sim_accept_len([1.0] * 5) == 5.0
    assert sim_accept_len([0.0, 1.0, 1.0]) == 0.0
    assert sim_accept_len([0.9, 0.8]) < sim_accept_len([0.9, 0.8, 0.5]) < sim_accept_len([0.9, 0.8, 0.6])


def test_batch_errors_name_the_problem():
    draft, target_weight = make_draft()
    head = TargetHead(target_weight, draft.d2t)
    batch = pack([make_sample(6, 1)])
    with pytest.raises(KeyError, match="cu_seqlens"):
        ttt_forward(draft, head, {k: v for k, v in batch.items() if k != "cu_seqlens"}, 2)
    with pytest.raises(ValueError, match="denominators"):
        ttt_forward(draft, head, batch, 2, denominators=torch.ones(3))


@pytest.mark.gpu  # flex attention path needs CUDA
def test_flex_attention_matches_reference_with_gradients():
    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 70, 75, 300, 301, 520], dtype=torch.int32, device="cuda")
    tokens, heads, kv_heads, dim = 520, 8, 2, 64
    q = torch.randn(tokens, heads, dim, device="cuda", generator=gen, requires_grad=True)
    keys = [torch.randn(tokens, kv_heads, dim, device="cuda", generator=gen, requires_grad=True) for _ in range(3)]
    values = [torch.randn(tokens, kv_heads, dim, device="cuda", generator=gen, requires_grad=True) for _ in range(3)]
    weight = torch.randn(tokens, heads, dim, device="cuda", generator=gen)
    results = {}
    for backend in ("reference", "flex"):
        out = TTTAttention(cu, tokens, dim ** -0.5, backend)(q, keys, values)
        results[backend] = (out, torch.autograd.grad((out * weight).sum(), [q] + keys + values))
    torch.testing.assert_close(results["flex"][0], results["reference"][0], rtol=2e-3, atol=2e-3)
    for g_flex, g_ref in zip(results["flex"][1], results["reference"][1]):
        torch.testing.assert_close(g_flex, g_ref, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_elementwise_ops_give_the_eager_loss_and_gradients(device):
    """train.compile=true fuses the norms, rotary, SiLU-multiply and soft CE; the step must not change.
    Two batches of different sizes: the compiled functions take dynamic shapes. Also under
    train.recompute, whose backward reruns the compiled functions."""
    from lib.drafts.eagle3 import fused

    ttt = 3
    draft, target_weight = make_draft(dtype=torch.float32, seed=5)
    draft = draft.to(device)
    head = TargetHead(target_weight.to(device), draft.d2t)
    batches = [pack([make_sample(9, 11, torch.float32), make_sample(12, 12, torch.float32)]),
               pack([make_sample(17, 13, torch.float32)])]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    params = draft.trainable_parameters()

    def run():
        out = []
        for batch in batches:
            for recompute in (False, True):
                loss, metrics = ttt_forward(draft, head, batch, ttt, recompute=recompute)
                out.append((loss.detach(), metrics["sums"], torch.autograd.grad(loss, params)))
        return out

    eager, compiled = compiled_against_eager(fused, run)
    assert_same_steps(compiled, eager)


def _saved_activation_widths(fn, weights: list[torch.Tensor]) -> tuple:
    """fn()'s result, and the last-dimension sizes of the activations autograd keeps for its backward
    (tensors sharing storage with `weights` (parameters, the target table) left out: they exist anyway)."""
    owned = {w.untyped_storage().data_ptr() for w in weights}
    widths: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.untyped_storage().data_ptr() not in owned:
            widths.append(t.shape[-1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, widths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recompute_gives_the_same_step_and_keeps_no_mlp_or_vocab_wide_activation(dtype):
    """train.recompute: the same loss, metrics and gradients, while no MLP-wide or vocab-wide tensor is kept
    for backward (those are most of a long context's memory: 2 GiB of logits per step at 32k tokens)."""
    ttt = 4
    draft, target_weight = make_draft(dtype=dtype, seed=7)
    head = TargetHead(target_weight, draft.d2t)
    batch = pack([make_sample(13, 21, dtype), make_sample(9, 22, dtype)])
    params = draft.trainable_parameters()
    wide = {draft.config.intermediate_size, draft.config.draft_vocab_size}
    target = head.target_probs(batch["final_hidden"])
    weights = [*draft.parameters(), target.probs]
    runs = {}
    for recompute in (False, True):
        (loss, metrics), widths = _saved_activation_widths(
            lambda: ttt_forward(draft, head, batch, ttt, target=target, recompute=recompute), weights)
        runs[recompute] = (loss.detach(), metrics["sums"], torch.autograd.grad(loss, params), widths)
    assert any(w in wide for w in runs[False][3])  # the plain unroll keeps them: the check can see them
    assert not [w for w in runs[True][3] if w in wide]
    (l_a, s_a, g_a, _), (l_b, s_b, g_b, _) = runs[False], runs[True]
    torch.testing.assert_close(l_b, l_a, rtol=0, atol=0)
    torch.testing.assert_close(s_b, s_a, rtol=0, atol=0)
    for a, b in zip(g_a, g_b):
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
