"""Engine TP over MoE targets on CPU: 2 real processes over gloo capture what one engine captures.

The tiny Qwen3-MoE and gpt-oss targets of conf/target (every layer an MoE layer; gpt-oss with sinks and
sliding-window layers). Each member brings its own packed batch; the group forwards their
concatenation with attention heads and every expert's intermediate features split across members.
"""
from __future__ import annotations

import os
import pathlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from transformers import AutoConfig

from lib.config import EngineConfig, TargetConfig
from lib.data.batch import PackedBatch
from lib.engine import make_backend
from lib.engine.moe import dense_parts_beside_experts, experts_info, moe_experts
from lib.engine.tp import tp_incompatibility

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUDGET = 96
CPU = torch.device("cpu")


def shape_of(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "target" / f"{name}.yaml").read_text())["hf_config"]


def batch_of(lengths, seed, first_id, vocab=512):
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randint(0, vocab, (n,), generator=g).tolist(), [True] * n) for n in lengths]
    return PackedBatch.from_samples(samples, list(range(first_id, first_id + len(lengths))))


MEMBER_BATCHES = [batch_of((7, 30, 1), seed=1, first_id=0), batch_of((19, 35), seed=2, first_id=10),
                  batch_of((12,), seed=3, first_id=20), batch_of((3, 9, 25), seed=4, first_id=30)]


def _member(rank: int, world: int, store_path: str, cases: list[tuple[str, str]], out_dir: str) -> None:
    """One member of a TP group; `cases` (checkpoint, moe_impl) run one after another in this one start."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        group = dist.new_group(list(range(world)), backend="gloo", use_local_synchronization=True)
        for i, (ckpt, moe_impl) in enumerate(cases):
            backend = make_backend("hf")
            backend.load(TargetConfig(path=ckpt, dtype="float32"),
                         EngineConfig(tp=world, token_budget=BUDGET, moe_impl=moe_impl), CPU, group)
            states = backend.capture(MEMBER_BATCHES[rank])
            info = experts_info(moe_experts(backend.model.layers)[0])
            torch.save({"states": states, "intermediate": info.intermediate}, os.path.join(out_dir, f"{i}-{rank}.pt"))
        dist.barrier()  # leave together (gloo's teardown under a peer's last collective can abort it)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tests.test_moe import FAMILIES, build  # the same scaled-weight tiny targets

    paths = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name + "_tp")
        build(name).save_pretrained(path)
        paths[name] = str(path)
    return paths


CASES = [("tiny_moe", "grouped", 2), ("tiny_gpt_oss", "grouped", 2), ("tiny_moe", "eager", 2),
         ("tiny_gpt_oss", "grouped", 4)]  # 4 members, 2 KV heads: each KV head on 2 members


@pytest.fixture(scope="module")
def captured(checkpoints, tmp_path_factory) -> dict[tuple[str, str, int], list[dict]]:
    """Each case's per-member captures; the cases of one group size share one start of its processes
    (spawning them costs more than the captures)."""
    out = {}
    for tp in sorted({tp for *_, tp in CASES}):
        cases = [(name, moe_impl) for name, moe_impl, size in CASES if size == tp]
        tmp = tmp_path_factory.mktemp(f"tp{tp}")
        mp.spawn(_member, args=(tp, str(tmp / "store"), [(checkpoints[n], m) for n, m in cases], str(tmp)),
                 nprocs=tp, join=True)
        for i, (name, moe_impl) in enumerate(cases):
            out[name, moe_impl, tp] = [torch.load(tmp / f"{i}-{rank}.pt") for rank in range(tp)]
    return out


@pytest.mark.parametrize("name,moe_impl,tp", CASES)
def test_tp_equals_tp1_on_moe_targets(checkpoints, captured, name, moe_impl, tp):
    ckpt = checkpoints[name]
    single = make_backend("hf")
    single.load(TargetConfig(path=ckpt, dtype="float32"), EngineConfig(token_budget=BUDGET, moe_impl=moe_impl),
                CPU, None)
    full_intermediate = experts_info(moe_experts(single.model.layers)[0]).intermediate
    for rank, result in enumerate(captured[name, moe_impl, tp]):
        assert result["intermediate"] == full_intermediate // tp  # every expert really was split
        expected = single.capture(MEMBER_BATCHES[rank])
        for key in ("aux_hidden", "final_hidden"):
            assert result["states"][key].shape == expected[key].shape
            torch.testing.assert_close(result["states"][key], expected[key], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_tp_must_divide_the_expert_width():
    shape = shape_of("tiny_moe")
    config = AutoConfig.for_model(shape.pop("model_type"), **dict(shape, num_key_value_heads=4, moe_intermediate_size=30))
    assert tp_incompatibility(config, 2) is None
    reason = tp_incompatibility(config, 4)
    assert reason is not None and "engine.tp=4" in reason and "moe_intermediate_size" in reason
    # 4 members over 2 KV heads replicate them; 8 over 6 KV heads (neither divides the other) cannot.
    assert tp_incompatibility(AutoConfig.for_model("qwen3_moe", **dict(shape)), 4) is None
    six = AutoConfig.for_model("qwen3_moe", **dict(shape, num_attention_heads=24, num_key_value_heads=6,
                                                    moe_intermediate_size=64))
    reason = tp_incompatibility(six, 8)
    assert reason is not None and "num_key_value_heads=6" in reason


@pytest.mark.unit
def test_shared_experts_are_named_as_not_sharded():
    """Qwen3-MoE and gpt-oss blocks are experts + router only; a Qwen2-MoE block's shared expert is
    reported (engine TP refuses such targets rather than summing the shared expert twice)."""
    from tests.test_moe import build
    from transformers import AutoModel

    for name in ("tiny_moe", "tiny_gpt_oss"):
        assert dense_parts_beside_experts(build(name).model.layers[0].mlp) == []
    config = AutoConfig.for_model("qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    parts = dense_parts_beside_experts(AutoModel.from_config(config).layers[0].mlp)
    assert "shared_expert.gate_proj" in parts and "shared_expert_gate" in parts
