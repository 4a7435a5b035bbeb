"""Qwen3's q/k norm + rope in one call (lib/engine/qk_norm_rope.py) and the engine attention built on it.

On CPU: the torch formula against transformers' own q_norm module and apply_rotary_pos_emb, and the
swapped attention modules and whole models against transformers' forward (fp32). On a GPU: the Triton
kernel within one bf16 rounding of the fp32 formula, eager and compiled.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from lib.engine.qk_norm_rope import install_fast_attention, qk_norm_rope, qk_norm_rope_reference

pytestmark = pytest.mark.unit

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=256)
FAMILIES = {
    "qwen3": {},
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
}
ATTENTION = {"qwen3": "Qwen3Attention", "qwen3_moe": "Qwen3MoeAttention"}


def build(family: str, attn: str = "sdpa", seed: int = 0):
    config = AutoConfig.for_model(family, **TINY, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, attn_implementation=attn)
    with torch.no_grad():  # non-trivial norm weights, so a wrong weight or head would show
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3 if name.endswith("norm.weight") else 0.08)
    return model.eval()


def rope(model, hidden: torch.Tensor, positions: torch.Tensor):
    return model.rotary_emb(hidden, positions[None])


def packed_positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5):
    scale = want.abs().max().item()
    assert scale > 0.05  # meaningful only on non-trivial values
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, scale), f"max error {err:.3g} over scale {scale:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_equals_transformers_norm_and_rope(family):
    """The torch formula against the model's own q_norm/k_norm modules and transformers' apply_rotary_pos_emb."""
    import importlib

    apply_rotary_pos_emb = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    model = build(family)
    attn = model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    tokens, d = 37, attn.head_dim
    hidden = torch.randn(1, tokens, TINY["hidden_size"], generator=g)
    cos, sin = rope(model, hidden, packed_positions([20, 17]))
    q = 3 * torch.randn(tokens, TINY["num_attention_heads"] * d, generator=g)
    k = 3 * torch.randn(tokens, TINY["num_key_value_heads"] * d, generator=g)
    with torch.no_grad():
        want_q, want_k = apply_rotary_pos_emb(attn.q_norm(q.view(1, tokens, -1, d)).transpose(1, 2),
                                              attn.k_norm(k.view(1, tokens, -1, d)).transpose(1, 2), cos, sin)
        eps = attn.q_norm.variance_epsilon
        for qi, ki, c, s in ((q, k, cos, sin), (q[None], k[None], cos[0], sin[0]),
                             (q.view(tokens, -1, d), k.view(tokens, -1, d), cos, sin)):
            got_q, got_k = qk_norm_rope_reference(qi, ki, attn.q_norm.weight, attn.k_norm.weight, eps, c, s)
            assert got_q.shape == (tokens, 4, d) and got_k.shape == (tokens, 2, d)
            assert got_q.is_contiguous() and got_k.is_contiguous()
            assert_close(got_q, want_q[0].transpose(0, 1))
            assert_close(got_k, want_k[0].transpose(0, 1))
        # On CPU the public function is the formula.
        got_q, got_k = qk_norm_rope(q, k, attn.q_norm.weight, attn.k_norm.weight, eps, cos, sin)
        assert_close(got_q, want_q[0].transpose(0, 1))
        assert_close(got_k, want_k[0].transpose(0, 1))


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_attention_equals_transformers_attention(family, attn_impl):
    model = build(family, attn_impl)
    layers = model.layers
    attn = layers[1].self_attn
    original = type(attn)
    g = torch.Generator().manual_seed(5)
    tokens = 29
    hidden = torch.randn(1, tokens, TINY["hidden_size"], generator=g)
    batch = torch.randn(2, tokens, TINY["hidden_size"], generator=g)  # the general-batch path
    positions = packed_positions([11, 18])
    pe = rope(model, hidden, positions)
    pe_batch = model.rotary_emb(batch, torch.arange(tokens)[None].expand(2, -1))
    with torch.no_grad():
        want, want_weights = attn(hidden, pe, None)
        want_batch, _ = attn(batch, pe_batch, None)
        assert install_fast_attention(layers) == len(layers)
        assert type(attn) is not original and isinstance(attn, original)
        got, got_weights = attn(hidden, pe, None)
        got_batch, _ = attn(batch, pe_batch, None)
        got_none, _ = attn(hidden, pe, None, cache=None, past_key_values=None)
    assert got.shape == want.shape == (1, tokens, TINY["hidden_size"])
    assert_close(got, want)
    assert torch.equal(got_none, got)
    assert_close(got_batch, want_batch)
    if attn_impl == "eager":  # the probabilities come back as transformers returns them
        assert_close(got_weights, want_weights)
    else:
        assert got_weights is None and want_weights is None


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_unchanged_by_install(family):
    model = build(family)
    g = torch.Generator().manual_seed(7)
    lengths = [13, 30, 1, 20]
    ids = torch.randint(0, TINY["vocab_size"], (1, sum(lengths)), generator=g)
    positions = packed_positions(lengths)[None]
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        assert install_fast_attention(model.layers) == TINY["num_hidden_layers"]
        got = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    assert_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_a_kv_cache_is_transformers_decoding(family):
    """The online evaluation decodes with the engine's model and a KV cache: a prefill then one-token steps
    give what they gave before the swap."""
    from lib.eval.target import _cache_kwarg, _output_cache

    model = build(family)
    ids = torch.randint(0, TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(11))

    def decode():
        out = model(input_ids=ids[:, :20], use_cache=True)
        states = [out.last_hidden_state]
        for t in range(20, 24):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{_cache_kwarg(model): _output_cache(out)})
            states.append(out.last_hidden_state)
        return torch.cat(states, dim=1)

    with torch.no_grad():
        want = decode()
        assert install_fast_attention(model.layers) == len(model.layers)
        got = decode()
    assert got.shape == (1, 24, TINY["hidden_size"])
    assert_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_install_is_idempotent_and_shares_one_class(family):
    model = build(family)
    hooked = []
    model.layers[0].self_attn.register_forward_hook(lambda m, args, out: hooked.append(out[0].shape))
    n = len(model.layers)
    assert install_fast_attention(model.layers) == n
    classes = {type(layer.self_attn) for layer in model.layers}
    assert len(classes) == 1  # one class for all layers: one compiled graph
    cls = classes.pop()
    assert cls.__name__ == f"Engine{ATTENTION[family]}"
    assert install_fast_attention(model.layers) == n  # twice keeps the classes
    assert {type(layer.self_attn) for layer in model.layers} == {cls}
    other = build(family, seed=1)  # another model of the family shares the class too
    assert install_fast_attention(other.layers) == n
    assert {type(layer.self_attn) for layer in other.layers} == {cls}
    with torch.no_grad():
        model(input_ids=torch.arange(9)[None], use_cache=False)
    assert hooked == [(1, 9, TINY["hidden_size"])]  # hooks on the module survive the swap


def test_other_attention_classes_are_left_alone():
    config = AutoConfig.for_model("llama", **{k: v for k, v in TINY.items()})
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    before = [type(layer.self_attn) for layer in model.layers]
    assert install_fast_attention(model.layers) == 0
    assert [type(layer.self_attn) for layer in model.layers] == before
    qwen = build("qwen3")
    del qwen.layers[0].self_attn.k_norm  # a module without the attributes the engine forward reads
    original = type(qwen.layers[0].self_attn)
    assert install_fast_attention(qwen.layers) == 1
    assert type(qwen.layers[0].self_attn) is original


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    return torch.device("cuda")


def _inputs(tokens: int, q_heads: int, k_heads: int, d: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    q = (2 * torch.randn(1, tokens, q_heads * d, device=device, generator=g)).bfloat16()
    k = (2 * torch.randn(1, tokens, k_heads * d, device=device, generator=g)).bfloat16()
    q_weight = (1 + 0.3 * torch.randn(d, device=device, generator=g)).bfloat16()
    k_weight = (1 + 0.3 * torch.randn(d, device=device, generator=g)).bfloat16()
    # transformers' rope: the same frequencies for both halves, positions restarting per packed sample.
    positions = (torch.arange(tokens, device=device) % 1000).float()
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    angles = torch.cat([positions[:, None] * inv_freq[None]] * 2, dim=-1)
    return q, k, q_weight, k_weight, angles.cos()[None].bfloat16(), angles.sin()[None].bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("tokens", [1, 37, 8192 + 5])
def test_gpu_kernel_is_within_one_rounding_of_fp32(tokens, d):
    from lib.engine.qk_norm_rope import kernel_available

    device = _gpu()
    q, k, q_weight, k_weight, cos, sin = _inputs(tokens, 32, 4, d, device, seed=tokens + d)
    assert kernel_available(q, q_weight)
    with torch.inference_mode():
        got_q, got_k = qk_norm_rope(q, k, q_weight, k_weight, 1e-6, cos, sin)
        want_q, want_k = qk_norm_rope_reference(q.float(), k.float(), q_weight, k_weight, 1e-6, cos.float(),
                                                sin.float())
        # [T, H, D] views in give the same result.
        again_q, again_k = qk_norm_rope(q.view(tokens, 32, d), k.view(tokens, 4, d), q_weight, k_weight, 1e-6, cos[0],
                                        sin[0])
    for got, want, heads in ((got_q, want_q, 32), (got_k, want_k, 4)):
        assert got.dtype == torch.bfloat16 and got.shape == (tokens, heads, d) and got.is_contiguous()
        # One bf16 rounding (2^-9 relative) with room for fp32 arithmetic's ulps near zero.
        bound = want.abs() * 2 ** -8 + 1e-4
        assert ((got.float() - want).abs() <= bound).all()
    assert torch.equal(again_q, got_q) and torch.equal(again_k, got_k)


@pytest.mark.gpu
def test_gpu_kernel_compiled_in_a_module_equals_eager():
    """Under torch.compile(dynamic=True) with the norm weights as parameters, as the decoder layer holds them."""
    device = _gpu()

    class NormRope(torch.nn.Module):
        def __init__(self, q_weight, k_weight):
            super().__init__()
            self.q_weight = torch.nn.Parameter(q_weight, requires_grad=False)
            self.k_weight = torch.nn.Parameter(k_weight, requires_grad=False)

        def forward(self, q, k, cos, sin):
            return qk_norm_rope(q, k, self.q_weight, self.k_weight, 1e-6, cos, sin)

    eager = compiled = None
    for tokens in (300, 1029, 77):  # new lengths reuse the dynamic graph
        q, k, q_weight, k_weight, cos, sin = _inputs(tokens, 32, 4, 128, device, seed=tokens)
        if eager is None:
            eager = NormRope(q_weight, k_weight)
            compiled = torch.compile(NormRope(q_weight, k_weight), fullgraph=True, dynamic=True)
        with torch.inference_mode():
            want = eager(q, k, cos, sin)
            got = compiled(q, k, cos, sin)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_swapped_attention_in_bf16_stays_within_bf16_of_fp32(family):
    """bf16 on the GPU: the kernel's attention is as close to the fp32 module as transformers' bf16 forward."""
    device = _gpu()
    model = build(family).to(device)
    attn = model.layers[0].self_attn
    g = torch.Generator(device=device).manual_seed(11)
    hidden = torch.randn(1, 300, TINY["hidden_size"], device=device, generator=g)
    pe = rope(model, hidden, packed_positions([100, 200]).to(device))
    with torch.inference_mode():
        exact, _ = attn(hidden, pe, None)
        attn.bfloat16()
        pe16 = tuple(t.bfloat16() for t in pe)
        plain, _ = attn(hidden.bfloat16(), pe16, None)
        install_fast_attention(model.layers)
        ours, _ = attn(hidden.bfloat16(), pe16, None)
    plain_err = (plain.float() - exact).abs().max().item()
    ours_err = (ours.float() - exact).abs().max().item()
    assert ours_err <= 1.5 * plain_err + 1e-3, (ours_err, plain_err)
