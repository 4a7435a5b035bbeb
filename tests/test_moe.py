"""MoE targets in the hf engine (CPU, fp32): the tiny Qwen3-MoE and gpt-oss targets of conf/target.

Real transformers models built from conf/target/tiny_moe.yaml and tiny_gpt_oss.yaml, saved and loaded
as the engine loads a checkpoint. The reference is transformers' own forward, each sample alone, with
its eager attention (gpt-oss: sinks, sliding-window layers) and its per-expert loop.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import assert_capture_as_accurate_as_plain_bf16, reference_capture
from lib.config import EngineConfig, MoeImpl, TargetConfig
from lib.data.batch import PackedBatch
from lib.engine import make_backend
from lib.engine.moe import grouped_experts_forward, experts_info, moe_experts

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ("tiny_moe", "tiny_gpt_oss")
# Longer than the tiny gpt-oss sliding window (8), so windowed and full layers really differ.
LENGTHS = (7, 30, 1, 19, 40)
CPU = torch.device("cpu")


def shape_of(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "target" / f"{name}.yaml").read_text())["hf_config"]


def build(name: str, experts: str = "eager"):
    cfg = shape_of(name)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", experts_implementation=experts)
    # Larger weights than the default init so errors are not hidden by tiny activations; sinks of O(1)
    # so that they change the attention noticeably.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("sinks"):
                p.normal_(0, 1.0)
            elif p.dim() >= 2 or pname.endswith("bias"):
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


def save_checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        build(name).save_pretrained(path)
        paths[name] = str(path)
    return paths


def random_batch(lengths, vocab, seed=0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randint(0, vocab, (n,), generator=g).tolist(), [True] * n) for n in lengths]
    return PackedBatch.from_samples(samples, list(range(len(lengths))))


def assert_close(got, ref, tol=1e-5):
    scale = ref.abs().max().item()
    assert scale > 0.1  # meaningful only on non-trivial activations
    err = (got - ref).abs().max().item()
    assert err <= tol * max(1.0, scale), f"max error {err:.3g} over scale {scale:.3g}"


@pytest.mark.parametrize("moe_impl", ["grouped", "hf", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_capture_equals_reference_forward(checkpoints, name, moe_impl):
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints[name]), EngineConfig(token_budget=128, moe_impl=moe_impl), CPU, None)
    assert backend.moe_impl is MoeImpl(moe_impl)
    batch = random_batch(LENGTHS, backend.vocab_size, seed=1)
    got = backend.capture(batch)
    ref_aux, ref_final = reference_capture(checkpoints[name], batch, backend.aux_layers,
                                           experts_implementation="eager")
    assert_close(got["aux_hidden"], ref_aux)
    assert_close(got["final_hidden"], ref_final)


@pytest.mark.integration
def test_compiled_capture_equals_reference_forward(checkpoints):
    """engine.compile on CPU in fp32 (inductor): the grouped op's compiled form is bf16-only, so the
    compiled layers run one matmul per expert there; the states still equal the reference's."""
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints["tiny_moe"]), EngineConfig(token_budget=128, compile=True), CPU, None)
    batch = random_batch(LENGTHS, backend.vocab_size, seed=1)
    got = backend.capture(batch)
    ref_aux, ref_final = reference_capture(checkpoints["tiny_moe"], batch, backend.aux_layers,
                                           experts_implementation="eager")
    assert_close(got["aux_hidden"], ref_aux)
    assert_close(got["final_hidden"], ref_final)


def test_gpt_oss_falls_back_to_eager_attention_with_a_warning(checkpoints, caplog):
    with caplog.at_level("WARNING", logger="specdraft.engine"):
        backend = make_backend("hf")
        backend.load(TargetConfig(path=checkpoints["tiny_gpt_oss"]), EngineConfig(token_budget=64), CPU, None)
    assert backend.attn_impl == "eager"
    assert any("attention sinks" in r.getMessage() and "eager" in r.getMessage() for r in caplog.records)


def test_sliding_window_layers_see_only_the_window(checkpoints):
    """The capture of a sample longer than the window differs from full attention in every layer."""
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints["tiny_gpt_oss"], aux_layers=[0, 1, 2]),
                 EngineConfig(token_budget=64), CPU, None)
    batch = random_batch((40,), backend.vocab_size, seed=2)
    windowed = backend.capture(batch)["aux_hidden"]
    backend._sliding_window = None  # every layer with the full causal mask
    full = backend.capture(batch)["aux_hidden"]
    window = 8
    h = backend.hidden_size
    # Within the first window both agree exactly; past it the sliding layer 0 already differs.
    torch.testing.assert_close(windowed[:window], full[:window], rtol=0, atol=1e-6)
    assert (windowed[window:, :h] - full[window:, :h]).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", [3, 50])
@pytest.mark.parametrize("name", FAMILIES)
def test_grouped_experts_equal_the_reference_moe_block(name, tokens):
    """Every MoE block of the tiny target: grouped path against transformers' per-expert loop, fp32.

    3 tokens with top-2 of 8 experts leave most experts without tokens (empty groups)."""
    model = build(name)
    g = torch.Generator().manual_seed(tokens)
    blocks = [layer.mlp for layer in model.model.layers]
    assert len(moe_experts(model.model.layers)) == len(blocks) == 4
    for block in blocks:
        x = torch.randn(1, tokens, model.config.hidden_size, generator=g)
        with torch.no_grad():
            ref = block(x)
            experts = moe_experts(torch.nn.ModuleList([block]))[0]
            experts.forward = lambda h, i, w, m=experts: grouped_experts_forward(m, experts_info(m), h, i, w)
            got = block(x)
            del experts.forward
        ref, got = (r[0] if isinstance(r, tuple) else r for r in (ref, got))
        assert_close(got, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_grouped_moe_block_traces_as_one_graph(name):
    """bf16 (the dtype torch._grouped_mm's compiled form takes): the whole MoE block, routing included,
    is captured by dynamo without a graph break, for any token count (dynamic shapes)."""
    from lib.engine.moe import install_moe_impl

    model = build(name).to(torch.bfloat16)
    install_moe_impl(model.model.layers, "grouped")
    block = model.model.layers[0].mlp
    compiled = torch.compile(block, fullgraph=True, backend="eager", dynamic=True)
    for tokens in (37, 11):
        x = torch.randn(1, tokens, model.config.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            ref, got = block(x), compiled(x)
        ref, got = (r[0] if isinstance(r, tuple) else r for r in (ref, got))
        assert torch.equal(got, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_decoder_layers_share_one_graph_per_layer_kind(name):
    """The engine compiles each decoder layer's forward; with the grouped experts installed, all
    layers of one kind (gpt-oss alternates sliding and full attention) must reuse one graph. A
    per-layer experts forward made every layer compile its own until dynamo's recompile limit sent
    the rest of the model to eager (the 30B-A3B capture ran at eager speed)."""
    from torch._dynamo.testing import CompileCounter

    from lib.engine.moe import install_moe_impl

    torch._dynamo.reset()
    model = build(name).to(torch.bfloat16)
    layers = model.model.layers
    install_moe_impl(layers, "grouped", fuse_residual=True)  # as HFBackend installs it without engine TP
    counter = CompileCounter()
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True, backend=counter)
    ids = torch.randint(0, model.config.vocab_size, (1, 21))
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
    kinds = {getattr(layer, "attention_type", None) for layer in layers}
    assert counter.frame_count == len(kinds) < len(layers), (counter.frame_count, kinds)


@pytest.mark.parametrize("name", FAMILIES)
def test_residual_fused_layers_equal_transformers_layers(name):
    """fuse_residual: Qwen3-MoE decoder layers get the engine forward whose combine adds the residual; the
    model's output equals transformers' (fp32). gpt-oss layers (not a known layer forward) keep theirs."""
    from lib.engine.moe import install_moe_impl

    model = build(name)
    ids = torch.randint(0, model.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.model(input_ids=ids, use_cache=False).last_hidden_state
        install_moe_impl(model.model.layers, "grouped", fuse_residual=True)
        got = model.model(input_ids=ids, use_cache=False).last_hidden_state
    swapped = [type(layer).__name__.startswith("ResidualFused") for layer in model.model.layers]
    assert swapped == [name == "tiny_moe"] * len(swapped)
    assert_close(got, want)


def test_dense_targets_are_left_alone():
    dense = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                 max_position_embeddings=128)
    backend = make_backend("hf")
    backend.load(TargetConfig(random_init=True, hf_config=dense), EngineConfig(token_budget=64), CPU, None)
    assert backend.moe_impl is None and backend.attn_impl == "sdpa"


def test_target_shapes_build_with_their_published_sizes():
    """The conf/target MoE shapes build (on the meta device) with the parameter counts their names say."""
    expected = {"qwen3_30b_a3b": 30.5e9, "qwen3_235b_a22b": 235.1e9, "gpt_oss_20b": 20.9e9, "gpt_oss_120b": 116.8e9}
    for name, count in expected.items():
        cfg = shape_of(name)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert abs(sum(p.numel() for p in model.parameters()) - count) < 0.01 * count, name


def test_active_flops_count_routed_experts_only():
    """bench/flops.py: active parameters per token (decoder matmuls + router, plus the published counts'
    embedding conventions) match the models' names: Qwen3 A3B / A22B (with embeddings and lm_head), gpt-oss
    3.6B / 5.1B active (with lm_head, without embeddings)."""
    from bench.flops import mlp_matmul_params

    published = {"qwen3_30b_a3b": (3.3e9, 2), "qwen3_235b_a22b": (22.2e9, 2), "gpt_oss_20b": (3.6e9, 1),
                 "gpt_oss_120b": (5.1e9, 1)}
    for name, (count, vocab_matrices) in published.items():
        cfg = shape_of(name)
        hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        h, heads, kv, d = hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
        attention = hf.num_hidden_layers * (h * (heads + 2 * kv) * d + heads * d * h)
        active = attention + mlp_matmul_params(hf) + vocab_matrices * hf.vocab_size * h
        assert abs(active - count) < 0.03 * count, (name, active)


def test_unknown_moe_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="moe"):
        make_backend("hf").load(TargetConfig(random_init=True, hf_config=shape_of("tiny_moe")),
                                EngineConfig(token_budget=64, moe_impl="megablocks"), CPU, None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_grouped_experts_err_no_more_than_transformers_bf16_experts(name, device):
    """Each MoE block alone in bf16 (router, experts, combine), grouped path against transformers' own
    experts, both against the fp32 block: isolates the experts from attention when the whole capture
    errs more than plain bf16 (the uncompiled gpt-oss case below). Mean error within 1.25x."""
    from lib.engine.moe import install_moe_impl

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    ref, grouped, plain = build(name).to(device), build(name).to(device, torch.bfloat16), \
        build(name).to(device, torch.bfloat16)
    install_moe_impl(grouped.model.layers, "grouped")
    g = torch.Generator().manual_seed(5)
    for i, layer in enumerate(ref.model.layers):
        x = torch.randn(1, 200, ref.config.hidden_size, generator=g).to(device)
        with torch.no_grad():
            want, got, base = (m.model.layers[i].mlp(t) for m, t in
                               ((ref, x), (grouped, x.bfloat16()), (plain, x.bfloat16())))
        want, got, base = ((r[0] if isinstance(r, tuple) else r).float() for r in (want, got, base))
        err, plain_err = (got - want).abs().mean().item(), (base - want).abs().mean().item()
        assert err <= 1.25 * plain_err, (i, err, plain_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,k,width", [(1000, 8, 2048), (333, 4, 2880), (7, 1, 100)])
def test_cuda_combine_kernel_sums_like_the_torch_formula(tokens, k, width, dtype):
    """The Triton combine (lib/engine/moe_kernels.py): each token's k gathered rows summed in fp32 and
    rounded once, as the torch formula does; eager and inside a whole-graph compile."""
    from lib.engine.moe_kernels import gather_rows, kernel_available, sum_gathered_rows, sum_gathered_rows_reference

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    gpu = torch.device("cuda")
    assert kernel_available(torch.empty(1, device=gpu)), "triton is part of every CUDA torch install"
    g = torch.Generator(device=gpu).manual_seed(0)
    src = torch.randn(tokens * k + 5, width, device=gpu, generator=g).to(dtype)
    index = torch.randperm(tokens * k + 5, device=gpu, generator=g)[:tokens * k]
    fp32_sum = src.float()[index].view(tokens, k, width).sum(1)
    ours = sum_gathered_rows(src, index, k)
    compiled = torch.compile(sum_gathered_rows, fullgraph=True, dynamic=True)(src, index, k)
    reference = sum_gathered_rows_reference(src, index, k)
    assert ours.dtype == dtype and ours.shape == (tokens, width)
    # Within one rounding of the fp32 sum (the sums' order may differ from the reference's in fp32).
    ulp = (fp32_sum.abs() * torch.finfo(dtype).eps).clamp_min(1e-6) + 1e-5 * (dtype == torch.float32)
    for got in (ours, compiled, reference):
        assert ((got.float() - fp32_sum).abs() <= ulp).all()
    torch.testing.assert_close(ours, compiled, rtol=0, atol=0)
    # With the layer's residual: bit for bit the rounded sum plus the residual as a separate add.
    residual = torch.randn(tokens, width, device=gpu, generator=g).to(dtype)
    assert torch.equal(sum_gathered_rows(src, index, k, residual), residual + ours)
    # The dispatch gather is the same kernel with one row per output: an exact copy.
    assert torch.equal(gather_rows(src, index), src[index])


# On an H200 (torch 2.11, transformers 5.17, 2026-11-29) the compiled cases and uncompiled Qwen3-MoE pass.
# Uncompiled gpt-oss errs 2.6x plain bf16 on the mean (0.0069 vs 0.0027) with the experts' sum in
# fp32 or not, while the bf16 MoE blocks alone err no more than transformers' on CPU and on the H200
# (the test above), so the gap lies outside the experts. Max bounds are fragile for MoE: a router
# top-k flip under bf16 moves one token a lot (on CPU, plain transformers bf16 forwards of this batch
# err 0.27 at one token against fp32).
@pytest.mark.gpu
@pytest.mark.parametrize("name,compile", [
    ("tiny_moe", False), ("tiny_moe", True), ("tiny_gpt_oss", True),
    # Eager only (engine.compile=false; the GPU default compiles): mean error 2.6x plain bf16's on an
    # H200 (0.0069 vs 0.0027) with or without the fp32 expert sum; the experts alone match
    # transformers' bf16 error on CPU, so the remaining suspects are GPU-side eager roundings.
    pytest.param("tiny_gpt_oss", False, marks=pytest.mark.xfail(reason="eager gpt-oss capture 2.6x plain bf16 "
                                                                       "mean error on an H200; cause open")),
])
def test_gpu_varlen_grouped_capture_is_as_accurate_as_plain_bf16_forwards(checkpoints, name, compile):
    """bf16 varlen (gpt-oss: sinks and sliding windows in the kernel path) with grouped experts, against
    fp32 per-sample eager forwards: no worse than transformers' own bf16 forwards of each sample."""
    gpu = torch.device("cuda")
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints[name], dtype="bfloat16"),
                 EngineConfig(token_budget=128, attn_impl="varlen", compile=compile, moe_impl="grouped"), gpu, None)
    assert backend.attn_impl == "varlen" and backend.moe_impl is MoeImpl.grouped
    batch = random_batch(LENGTHS, backend.vocab_size, seed=7)
    got = backend.capture(batch)
    assert_capture_as_accurate_as_plain_bf16(got, checkpoints[name], batch, backend.aux_layers, gpu,
                                             experts_implementation="eager")
