"""The trainer's distributed update with real gloo groups: 1 trainer == 2 trainers, NaN skips on all."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen3Config

from lib.drafts.base import get_strategy
from lib.drafts.eagle3.trainer import Eagle3Bundle, TTTModule
from lib.launch.sharding import shard
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import TargetHead
from lib.trainer.loop import apply_update

pytestmark = pytest.mark.integration

VOCAB, DRAFT_VOCAB, HIDDEN, TTT = 96, 64, 32, 3


def _target_config():
    return Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _batch(seed: int, nan: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 12, 5]
    t = sum(lengths)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (t,), generator=g),
        "loss_mask": torch.rand(t, generator=g) < 0.8,
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "cu_seqlens": torch.tensor([0, 7, 19, 24], dtype=torch.int32),
        "aux_hidden": torch.randn(t, 3 * HIDDEN, generator=g),
        "final_hidden": torch.randn(t, HIDDEN, generator=g),
    }
    if nan:
        batch["aux_hidden"][3, 5] = float("nan")
    return batch


def _bundle(group, recompute: bool = False) -> Eagle3Bundle:
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig.from_target(_target_config(), DRAFT_VOCAB, [1, 2, 2], {})
    draft = Eagle3Draft(cfg)
    d2t = torch.zeros(DRAFT_VOCAB, dtype=torch.long)
    t2d = torch.arange(VOCAB) < DRAFT_VOCAB
    draft.set_vocab_map(d2t, t2d)
    head = TargetHead(torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1)), draft.d2t)
    module = TTTModule(draft, TTT, head=head, recompute=recompute)
    return Eagle3Bundle(shard(module, group, torch.device("cpu")), draft_config=cfg, target_head=head, ttt_length=TTT)


def _step(group, world: int, rank: int, seeds: list[int], nan: bool = False, recompute: bool = False) -> dict:
    """One trainer's update as the trainer loop runs it (through the strategy), on the batches of `seeds`."""
    bundle = _bundle(group, recompute)
    mine = [_batch(s, nan=nan) for s in seeds]
    strategy = get_strategy("eagle3")
    targets, counts = strategy.prepare(bundle, mine)
    counts = counts.float()
    dist.all_reduce(counts, group=group)
    for b, t in zip(mine, targets):
        loss, _ = strategy.micro_loss(bundle, b, t, counts, float(world))
        loss.backward()
    grads = {n: p.grad.full_tensor().clone() for n, p in bundle.model.named_parameters() if p.grad is not None}
    opt = torch.optim.AdamW(bundle.trainable_params(), lr=1e-2)
    before = {n: p.full_tensor().clone() for n, p in bundle.model.named_parameters()}
    norm, applied = apply_update(bundle, opt, max_norm=1e9)
    after = {n: p.full_tensor().clone() for n, p in bundle.model.named_parameters()}
    changed = any(not torch.equal(before[n], after[n]) for n in before)
    return {"grads": grads, "norm": norm, "applied": applied, "changed": changed}


def _worker(rank: int, init: str, out: str) -> None:
    """Every case in one start of 2 processes (spawning them dominates this module's time): the single
    trainer with both batches runs on rank 0 over a group of its own, the two-trainer cases on both."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    alone = dist.new_group([0])  # every rank takes part in creating a group, members or not
    result = {}
    if rank == 0:
        result["one"] = _step(alone, 1, 0, [10, 11])
    world = dist.group.WORLD
    result["plain"] = _step(world, 2, rank, [10 + rank])
    result["two_recompute"] = _step(world, 2, rank, [10 + rank], recompute=True)
    result["nan"] = _step(world, 2, rank, [10 + rank], nan=(rank == 1))
    torch.save(result, f"{out}-{rank}.pt")
    dist.barrier()  # leave together: gloo's teardown while a peer is still in the last collective aborted it once
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("dist")
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(f"file://{tmp_path}/store", out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}-{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one(results) -> dict:
    """The single trainer's step on both batches: the reference of both parametrizations below."""
    return results[0]["one"]


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "two_recompute"])
def test_two_trainers_produce_the_gradient_of_one_with_the_same_global_batch(results, one, recompute):
    """Also with train.recompute on the two sharded trainers (FSDP2 regathers the weights for the rerun)."""
    two = [r["two_recompute" if recompute else "plain"] for r in results]
    assert one["applied"] and all(r["applied"] for r in two)
    assert one["grads"].keys() == two[0]["grads"].keys() and one["grads"]
    for name, g in one["grads"].items():
        for r in two:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert two[0]["norm"] == pytest.approx(one["norm"], rel=1e-5)


def test_non_finite_gradient_on_one_rank_skips_the_update_on_all(results):
    res = [r["nan"] for r in results]
    for r in res:
        assert not r["applied"]
        assert not r["changed"]
    assert all(r["norm"] != r["norm"] for r in res)  # NaN on both ranks
