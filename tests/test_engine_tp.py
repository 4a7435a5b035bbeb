"""Engine tensor parallelism on CPU: 2 real processes over gloo give the same states as TP=1.

Each member brings its own packed batch (uneven token and sample counts); the group forwards their
concatenation with sharded weights and each member gets exactly its own rows back.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

from lib.data.batch import PackedBatch
from lib.config import EngineConfig, TargetConfig
from lib.engine import EngineInputError, make_backend
from lib.engine.tp import tp_incompatibility

pytestmark = pytest.mark.integration

VOCAB = 300
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256)
BUDGET = 96
CPU = torch.device("cpu")


def batch_of(lengths, seed, first_id):
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randint(0, VOCAB, (n,), generator=g).tolist(), [True] * n) for n in lengths]
    return PackedBatch.from_samples(samples, list(range(first_id, first_id + len(lengths))))


MEMBER_BATCHES = [batch_of((7, 30, 1), seed=1, first_id=0), batch_of((19, 64), seed=2, first_id=10)]


def _member(rank: int, world: int, store_path: str, ckpt: str, out_dir: str, comm: str, dtype: str) -> None:
    """One engine of the TP group; the world is gloo as in production, the TP group gloo or NCCL."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if comm == "nccl" else CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        group = dist.new_group(list(range(world)), backend=comm, use_local_synchronization=True)
        backend = make_backend("hf")
        backend.load(TargetConfig(path=ckpt, dtype=dtype), EngineConfig(tp=world, token_budget=BUDGET), device, group)
        states = {k: v.cpu() for k, v in backend.capture(MEMBER_BATCHES[rank]).items()}
        shard_rows = backend.model.layers[0].mlp.gate_proj.weight.shape[0]

        # Member 1 brings a bad sample: both members raise together, then both retry and succeed.
        mine = MEMBER_BATCHES[rank]
        if rank == 1:
            mine = PackedBatch.from_samples(
                [(MEMBER_BATCHES[1].input_ids[:19].tolist(), [True] * 19), ([5, VOCAB + 1], [True, True])], [10, 99]
            )
        try:
            backend.capture(mine)
            raise AssertionError("a bad sample in one member's batch must fail the whole group's capture")
        except EngineInputError as err:
            report = {"sample_ids": err.sample_ids, "peer_bad": err.peer_bad, "shard_rows": shard_rows}
            retried = {k: v.cpu() for k, v in backend.capture(err.remaining(mine)).items()}
        torch.save({"states": states, "report": report, "retried": retried}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # leave together (gloo's teardown under a peer's last collective can abort it)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **SHAPE))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp("qwen3_tp")
    model.save_pretrained(path)
    return str(path)


def run_group(checkpoint, tmp_path, comm: str, device: torch.device):
    """TP=2 members (real processes) against one TP=1 engine, fp32, on the same device type."""
    mp.spawn(_member, args=(2, str(tmp_path / "store"), checkpoint, str(tmp_path), comm, "float32"), nprocs=2,
             join=True)
    single = make_backend("hf")
    single.load(TargetConfig(path=checkpoint, dtype="float32"), EngineConfig(token_budget=BUDGET), device, None)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    def close(got, ref):
        torch.testing.assert_close(got, ref.cpu(), rtol=1e-4, atol=1e-4)

    for rank, result in enumerate(results):
        expected = single.capture(MEMBER_BATCHES[rank])
        for name in ("aux_hidden", "final_hidden"):
            assert result["states"][name].shape == expected[name].shape
            close(result["states"][name], expected[name])
    half = SHAPE["intermediate_size"] // 2  # the weights really were split
    assert results[0]["report"] == {"sample_ids": [], "peer_bad": True, "shard_rows": half}
    assert results[1]["report"] == {"sample_ids": [99], "peer_bad": False, "shard_rows": half}
    close(results[0]["retried"]["final_hidden"], results[0]["states"]["final_hidden"])
    close(results[1]["retried"]["final_hidden"], results[1]["states"]["final_hidden"][:19])


def test_tp2_equals_tp1_and_members_get_their_own_rows(checkpoint, tmp_path):
    run_group(checkpoint, tmp_path, "gloo", CPU)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_over_nccl_equals_tp1_on_gpu(checkpoint, tmp_path):
    run_group(checkpoint, tmp_path, "nccl", torch.device("cuda", 0))


@pytest.mark.unit
def test_tp_that_does_not_divide_the_heads_is_refused():
    config = AutoConfig.for_model("qwen3", **SHAPE)
    assert tp_incompatibility(config, 2) is None
    assert tp_incompatibility(config, 4) is None  # 2 KV heads, each replicated on 2 members
    reason = tp_incompatibility(config, 8)
    assert reason is not None and "engine.tp=8" in reason and "num_attention_heads=4" in reason
