"""engine.cuda_graph: the packed forward replayed from CUDA graphs (lib/engine/graphs.py).

CPU: the padding and bucketing rules, and the config error off the GPU. GPU: graphed captures of real
tiny checkpoints (dense Qwen3 with both varlen kernels, the tiny Qwen3-MoE and gpt-oss targets) against
fp32 per-sample forwards and against the same engine without graphs, over batches that take new and
already captured graphs in turn.
"""
from __future__ import annotations

import pytest
import torch

from lib.config import EngineConfig, TargetConfig
from lib.engine import make_backend
from lib.engine.cudnn_attention import MIN_BOUND, MIN_SAMPLES
from lib.engine.graphs import GraphKey, flash_cu_seqlens, padded_lengths
from tests.helpers import assert_capture_as_accurate_as_plain_bf16
from tests import test_engine_hf, test_moe
from tests.test_engine_hf import SHAPES, random_batch
from tests.test_moe import random_batch as moe_batch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory):
    return test_engine_hf.save_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    return test_moe.save_checkpoints(tmp_path_factory)


@pytest.mark.parametrize("lengths,budget", [([5, 130, 1], 1024), ([1024], 1024), ([3] * 20, 64), ([700, 90], 8192)])
def test_padding_fills_the_budget_with_samples_no_longer_than_the_bound(lengths, budget):
    padded, key = padded_lengths(lengths, budget)
    assert padded[:len(lengths)] == lengths and sum(padded) == budget
    assert key.bound >= max(lengths) and key.bound >= MIN_BOUND and key.bound & (key.bound - 1) == 0
    assert all(1 <= m <= key.bound for m in padded)
    assert key.samples >= max(len(padded), MIN_SAMPLES) and key.samples & (key.samples - 1) == 0


def test_batches_of_other_lengths_share_a_key_when_their_buckets_agree():
    assert padded_lengths([300, 200, 17], 4096)[1] == padded_lengths([500, 400], 4096)[1] == GraphKey(16, 512)
    with pytest.raises(ValueError, match="totalling <= 64"):
        padded_lengths([40, 30], 64)
    with pytest.raises(ValueError, match=">= 1 token"):
        padded_lengths([4, 0], 64)


def test_flash_offsets_end_with_empty_samples():
    assert flash_cu_seqlens([3, 5, 2], 8).tolist() == [0, 3, 8, 10, 10, 10, 10, 10, 10]


def test_cuda_graph_off_the_gpu_is_a_clear_error():
    backend = make_backend("hf")
    with pytest.raises(ValueError, match="engine.cuda_graph=true needs a GPU"):
        backend.load(TargetConfig(random_init=True, hf_config=SHAPES["qwen3"]), EngineConfig(cuda_graph=True),
                     torch.device("cpu"), None)


def _graphed_against_plain(path: str, batches, budget: int, **engine) -> None:
    gpu = torch.device("cuda")
    graphed, plain = make_backend("hf"), make_backend("hf")
    target = TargetConfig(path=path, dtype="bfloat16")
    graphed.load(target, EngineConfig(token_budget=budget, attn_impl="varlen", cuda_graph=True, **engine), gpu, None)
    plain.load(target, EngineConfig(token_budget=budget, attn_impl="varlen", **engine), gpu, None)
    for i, batch in enumerate(batches):
        got, want = graphed.capture(batch), plain.capture(batch)
        for name in want:
            # The padded batch runs other GEMM shapes, so equal up to bf16 rounding, not bit for bit.
            torch.testing.assert_close(got[name], want[name], atol=3e-2, rtol=3e-2)
        if i == 0:
            assert_capture_as_accurate_as_plain_bf16(got, path, batch, graphed.aux_layers, gpu,
                                                     attn_implementation="eager")
    keys = graphed._graphs.keys
    assert len(keys) >= 2, keys  # the batches took more than one graph
    again = graphed.capture(batches[0])  # an earlier key replayed after others: the same rows exactly
    first = graphed.capture(batches[0])
    for name in again:
        assert torch.equal(again[name], first[name])


@pytest.mark.gpu
@pytest.mark.parametrize("compile,kernel", [(True, "flash"), (True, "cudnn"), (False, "flash")])
def test_gpu_graphed_dense_capture_equals_the_plain_engine(dense_checkpoints, compile, kernel):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    batches = [random_batch(lengths, seed=i) for i, lengths in
               enumerate([(7, 30, 1, 19, 64), (200,), (7, 30, 1, 19, 64), [3] * 40, (129, 2)])]
    _graphed_against_plain(dense_checkpoints["qwen3"], batches, 256, compile=compile, varlen_kernel=kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny_moe", "tiny_gpt_oss"])
def test_gpu_graphed_moe_capture_equals_the_plain_engine(moe_checkpoints, name):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(moe_checkpoints[name]).vocab_size
    batches = [moe_batch(lengths, vocab, seed=i) for i, lengths in enumerate([(7, 30, 1, 19, 40), (100,), (5, 5)])]
    _graphed_against_plain(moe_checkpoints[name], batches, 128, compile=True, moe_impl="grouped")
