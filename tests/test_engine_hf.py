"""hf engine backend: packed capture equals each sample run alone, out views, bad inputs.

Real small transformers models (Qwen3 and Llama, 6 layers, hidden 64) saved to disk and loaded the
way the engine loads a checkpoint; the reference is a plain full forward with output_hidden_states.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import assert_capture_as_accurate_as_plain_bf16, reference_capture
from lib.data.batch import PackedBatch
from lib.config import EngineConfig, TargetConfig
from lib.engine import EngineInputError, make_backend
from lib.drafts.eagle3.strategy import eagle3_aux_layers
from lib.engine.worker import capture_skipping_bad

pytestmark = pytest.mark.unit

VOCAB = 500
SHAPES = {
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                  max_position_embeddings=512),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512),
}
LENGTHS = (7, 30, 1, 19, 64)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


def save_checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        cfg = dict(shape)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        # Larger weights than the default init so errors are not hidden by tiny activations.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


def random_batch(lengths, seed=0, first_id=100) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), [i % 2 == 0 for i in range(n)]) for n in lengths]
    return PackedBatch.from_samples(samples, list(range(first_id, first_id + len(lengths))))


def load(path, attn="auto", budget=256, aux=None):
    backend = make_backend("hf")
    backend.load(TargetConfig(path=path, aux_layers=aux), EngineConfig(token_budget=budget, attn_impl=attn), CPU, None)
    return backend


def assert_matches(got, ref):
    scale = ref.abs().max().item()
    assert scale > 0.1  # the comparison is meaningful only on non-trivial activations
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, scale)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_capture_equals_each_sample_alone(checkpoints, arch, attn):
    backend = load(checkpoints[arch], attn=attn)
    assert (backend.hidden_size, backend.num_layers, backend.vocab_size) == (64, 6, VOCAB)
    assert backend.aux_layers == [1, 2, 2]
    batch = random_batch(LENGTHS)
    got = backend.capture(batch)
    ref_aux, ref_final = reference_capture(checkpoints[arch], batch, backend.aux_layers)
    assert got["aux_hidden"].shape == (sum(LENGTHS), 3 * 64)
    assert got["final_hidden"].shape == (sum(LENGTHS), 64)
    assert_matches(got["aux_hidden"], ref_aux)
    assert_matches(got["final_hidden"], ref_final)


def test_explicit_aux_layers_pick_those_layers(checkpoints):
    backend = load(checkpoints["qwen3"], aux=[0, 4, 3])
    batch = random_batch((12, 5))
    ref_aux, _ = reference_capture(checkpoints["qwen3"], batch, [0, 4, 3])
    assert_matches(backend.capture(batch)["aux_hidden"], ref_aux)


def test_capture_writes_in_place_into_out_views(checkpoints):
    backend = load(checkpoints["llama"])
    batch = random_batch(LENGTHS, seed=3)
    n = batch.num_tokens
    slot = {
        "aux_hidden": torch.full((256, 3 * 64), float("nan")),
        "final_hidden": torch.full((256, 64), float("nan")),
    }
    got = backend.capture(batch, out=slot)
    fresh = backend.capture(batch)
    for name in slot:
        assert got[name].data_ptr() == slot[name].data_ptr() and got[name].shape[0] == n
        assert torch.equal(slot[name][:n], fresh[name])
        assert torch.isnan(slot[name][n:]).all()  # rows past T are left alone


def test_out_views_of_the_wrong_shape_or_dtype_are_refused(checkpoints):
    backend = load(checkpoints["qwen3"])
    batch = random_batch((10,))
    with pytest.raises(ValueError, match="payload_specs"):
        backend.capture(batch, out={"aux_hidden": torch.empty(5, 192), "final_hidden": torch.empty(5, 64)})
    with pytest.raises(ValueError, match="engine's dtype"):
        backend.capture(batch, out={"aux_hidden": torch.empty(10, 192, dtype=torch.bfloat16),
                                    "final_hidden": torch.empty(10, 64)})


def test_bad_samples_raise_naming_them_and_the_rest_still_runs(checkpoints):
    backend = load(checkpoints["qwen3"], budget=64)
    good = random_batch((9, 20), seed=5)
    samples = [
        (good.input_ids[:9].tolist(), [True] * 9),
        ([], []),  # empty
        ([1] * 80, [True] * 80),  # over the 64-token budget
        ([3, VOCAB, 4, VOCAB + 7], [True] * 4),  # out-of-vocab ids
        (good.input_ids[9:].tolist(), [True] * 20),
    ]
    batch = PackedBatch.from_samples(samples, [70, 71, 72, 73, 74])
    with pytest.raises(EngineInputError) as info:
        backend.capture(batch)
    err = info.value
    assert err.sample_ids == [71, 72, 73]
    text = str(err)
    assert "sample id 71" in text and "no tokens" in text
    assert "sample id 72" in text and "engine.token_budget=64" in text
    assert "sample id 73" in text and f"outside [0, {VOCAB})" in text
    rest = err.remaining(batch)
    assert rest.sample_ids == [70, 74]
    got = backend.capture(rest)
    expected = backend.capture(PackedBatch.from_samples([samples[0], samples[4]], [70, 74]))
    assert torch.equal(got["aux_hidden"], expected["aux_hidden"])


def test_engine_loop_skips_bad_samples_with_a_warning_and_counts_them(checkpoints, caplog):
    """docs/engine.md: one bad sample is dropped (warning naming its id and reason), the rest is captured;
    a batch left empty is replaced by the next one."""
    backend = load(checkpoints["qwen3"], budget=64)
    good = random_batch((9, 20), seed=5)
    samples = [(good.input_ids[:9].tolist(), [True] * 9), ([3, VOCAB, 4], [True] * 3),
               (good.input_ids[9:].tolist(), [True] * 20)]
    batch = PackedBatch.from_samples(samples, [80, 81, 82])
    slot = {"aux_hidden": torch.full((64, 3 * 64), float("nan")), "final_hidden": torch.full((64, 64), float("nan"))}
    with caplog.at_level("WARNING", logger="specdraft.engine"):
        captured, states, dropped = capture_skipping_bad(backend, batch, slot, lambda: pytest.fail("not needed"))
    assert [p.sample_id for p in dropped] == [81] and captured.sample_ids == [80, 82]
    assert any("sample id 81" in r.getMessage() and "outside [0, 500)" in r.getMessage() for r in caplog.records)
    expected = backend.capture(PackedBatch.from_samples([samples[0], samples[2]], [80, 82]))
    assert torch.equal(states["aux_hidden"], expected["aux_hidden"])
    assert torch.equal(slot["final_hidden"][:captured.num_tokens], expected["final_hidden"])

    only_bad = PackedBatch.from_samples([([VOCAB + 1] * 4, [True] * 4), ([], [])], [90, 91])
    captured, states, dropped = capture_skipping_bad(backend, only_bad, None, lambda: good)
    assert [p.sample_id for p in dropped] == [90, 91] and captured.sample_ids == good.sample_ids
    assert states["final_hidden"].shape == (good.num_tokens, 64)


def test_malformed_batch_is_a_clear_error(checkpoints):
    backend = load(checkpoints["qwen3"])
    batch = random_batch((5, 6))
    batch.position_ids = torch.arange(11)  # not restarting at the second sample
    with pytest.raises(ValueError, match="position_ids must restart"):
        backend.capture(batch)


def test_random_init_from_hf_config_is_deterministic():
    shape = dict(SHAPES["llama"])
    target = TargetConfig(random_init=True, hf_config=shape)
    outs = []
    for _ in range(2):
        backend = make_backend("hf")
        backend.load(target, EngineConfig(token_budget=128), CPU, None)
        outs.append(backend.capture(random_batch((10, 4)))["final_hidden"])
    assert torch.equal(outs[0], outs[1])
    bad = TargetConfig(random_init=True, hf_config={k: v for k, v in shape.items() if k != "model_type"})
    with pytest.raises(ValueError, match="model_type"):
        make_backend("hf").load(bad, EngineConfig(), CPU, None)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="engine.backend='vllm'"):
        make_backend("vllm")
    with pytest.raises(ValueError, match="target.path"):
        make_backend("hf").load(TargetConfig(), EngineConfig(), CPU, None)
    with pytest.raises(ValueError, match="engine.attn_impl='flex'"):
        make_backend("hf").load(TargetConfig(random_init=True, hf_config=SHAPES["qwen3"]),
                                EngineConfig(attn_impl="flex"), CPU, None)
    with pytest.raises(ValueError, match="engine.attn_impl=varlen"):
        make_backend("hf").load(TargetConfig(random_init=True, hf_config=SHAPES["qwen3"]),
                                EngineConfig(attn_impl="varlen"), CPU, None)
    with pytest.raises(ValueError, match="engine.tp=2"):
        make_backend("hf").load(TargetConfig(random_init=True, hf_config=SHAPES["qwen3"]), EngineConfig(tp=2), CPU, None)
    with pytest.raises(ValueError, match="target.aux_layers"):
        eagle3_aux_layers([1, 6], 6)
    with pytest.raises(ValueError, match="target.aux_layers"):
        eagle3_aux_layers(None, 3)


# engine.varlen_kernel=cudnn is optional: its package (nvidia-cudnn-frontend, compiled per Python) may be
# absent on a GPU machine; the error users then get is tested on its own below.
needs_cudnn_frontend = pytest.mark.skipif(importlib.util.find_spec("cudnn") is None,
                                          reason="nvidia-cudnn-frontend is not installed (engine.varlen_kernel=cudnn)")


@pytest.mark.gpu
@pytest.mark.parametrize("attn,compile,kernel", [("varlen", False, "flash"), ("varlen", True, "flash"),
                                                 pytest.param("varlen", False, "cudnn", marks=needs_cudnn_frontend),
                                                 pytest.param("varlen", True, "cudnn", marks=needs_cudnn_frontend),
                                                 ("sdpa", False, "flash")])
def test_gpu_packed_capture_is_as_accurate_as_plain_bf16_forwards(checkpoints, attn, compile, kernel):
    """Against fp32 per-sample forwards, the packed bf16 capture errs no more than plain bf16 forwards do.

    Attention leaking across samples would put the later samples' states off by O(1), far beyond that.
    """
    gpu = torch.device("cuda")
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints["qwen3"], dtype="bfloat16"),
                 EngineConfig(token_budget=256, attn_impl=attn, compile=compile, varlen_kernel=kernel), gpu, None)
    batch = random_batch(LENGTHS, seed=7)
    got = backend.capture(batch)
    assert_capture_as_accurate_as_plain_bf16(got, checkpoints["qwen3"], batch, backend.aux_layers, gpu,
                                             attn_implementation="sdpa")


def test_varlen_longest_sample_argument_per_kernel():
    """flash gets the exact longest sample; cuDNN a power-of-two bound (>= 128) its plans are keyed on."""
    from lib.config import VarlenKernel
    from lib.engine.varlen import max_seqlen_arg

    for longest in (1, 7, 128, 129, 3974, 4096, 4097):
        assert max_seqlen_arg(longest, VarlenKernel.flash) == longest
        bound = max_seqlen_arg(longest, VarlenKernel.cudnn)
        assert bound >= max(longest, 128) and bound & (bound - 1) == 0 and bound < 2 * max(longest, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", pytest.param("cudnn", marks=needs_cudnn_frontend)])
def test_gpu_compiled_capture_keeps_one_graph_across_batches_of_other_lengths(checkpoints, kernel):
    """Batches whose longest samples differ reuse the compiled layer: a value derived from the batch's
    longest sample inside the layer made dynamo recompile per batch (cuDNN path, 2026-11-29)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # an earlier test's graph of the same layer code would be reused and not counted
    counters.clear()
    backend = make_backend("hf")
    backend.load(TargetConfig(path=checkpoints["qwen3"], dtype="bfloat16"),
                 EngineConfig(token_budget=256, attn_impl="varlen", compile=True, varlen_kernel=kernel),
                 torch.device("cuda"), None)
    for seed, lengths in enumerate([(7, 30, 1, 19, 64), (200, 3), (90, 90, 40), (33,), (250,)]):
        backend.capture(random_batch(lengths, seed=seed))
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_cudnn_ragged_metadata_pads_with_empty_samples_at_the_batch_end():
    """The sample count rounds up to a power of two (>= 8) so few cuDNN graphs serve a run; the padding
    samples are empty and start where the batch ends, so they cover no token."""
    from lib.engine.cudnn_attention import MIN_SAMPLES, ragged_metadata

    for lengths in ([5], [3, 9, 1], list(range(1, 10)), [7] * 16):
        cu, seq = ragged_metadata(lengths)
        n = len(lengths)
        assert seq.numel() == max(MIN_SAMPLES, 1 << (n - 1).bit_length()) and cu.numel() == seq.numel() + 1
        assert seq[:n].tolist() == lengths and not seq[n:].any()
        assert cu[0] == 0 and (cu[1:] - cu[:-1]).tolist() == seq.tolist() and (cu[n:] == sum(lengths)).all()


def test_cudnn_kernel_without_its_package_names_the_key_and_the_fix():
    import importlib.util

    from lib.engine.cudnn_attention import missing_reason

    if importlib.util.find_spec("cudnn") is not None:
        pytest.skip("nvidia-cudnn-frontend is installed here")
    reason = missing_reason()
    assert "engine.varlen_kernel=cudnn" in reason and "nvidia-cudnn-frontend" in reason
    assert "engine.varlen_kernel=flash" in reason


def test_cudnn_kernel_refuses_a_batch_its_int32_offsets_cannot_address():
    from lib.engine.cudnn_attention import packed_causal_attention

    tokens = 2 ** 31 // (64 * 128)
    q = torch.empty(tokens, 64, 128, device="meta")
    kv = torch.empty(tokens, 8, 128, device="meta")
    seq = torch.empty(8, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=f"engine.token_budget below {tokens}"):
        packed_causal_attention(q, kv, kv, seq, seq, seq, 1 << 18, 0.1)


@pytest.mark.gpu
@needs_cudnn_frontend
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 4, 128), (16, 8, 64)])
def test_gpu_cudnn_packed_attention_equals_per_sample_causal_attention(heads, kv_heads, dim):
    """The cached cuDNN graph, padding samples included, against fp32 causal attention run per sample;
    a second batch of other lengths reuses or adds graphs and stays right."""
    from lib.engine.cudnn_attention import MIN_BOUND, packed_causal_attention, pow2_at_least, ragged_metadata

    gen = torch.Generator().manual_seed(0)
    for lengths in ([5, 130, 1, 77], [300, 2, 64, 64, 9, 1, 40, 100, 33]):
        total = sum(lengths)
        q = torch.randn(total, heads, dim, generator=gen).cuda().bfloat16()
        k = torch.randn(total, kv_heads, dim, generator=gen).cuda().bfloat16()
        v = torch.randn(total, kv_heads, dim, generator=gen).cuda().bfloat16()
        cu, seq = (t.cuda() for t in ragged_metadata(lengths))
        got = packed_causal_attention(q, k, v, cu * (heads * dim), cu * (kv_heads * dim), seq,
                                      pow2_at_least(max(lengths), MIN_BOUND), dim ** -0.5)
        start = 0
        for n in lengths:
            part = [t[start:start + n].float().transpose(0, 1) for t in (q, k, v)]
            want = torch.nn.functional.scaled_dot_product_attention(
                *part, is_causal=True, enable_gqa=True).transpose(0, 1)
            torch.testing.assert_close(got[start:start + n].float(), want, atol=2e-2, rtol=2e-2)
            start += n
