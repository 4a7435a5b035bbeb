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


def _worker(rank: int, world: int, init: str, batch_seeds: list[list[int]], nan_rank: int, out: str,
            recompute: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = dist.group.WORLD
    bundle = _bundle(group, recompute)
    mine = [_batch(s, nan=(rank == nan_rank)) for s in batch_seeds[rank]]
    # The loss step as the trainer loop runs it, through the strategy.
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
    torch.save({"grads": grads, "norm": norm, "applied": applied, "changed": changed}, f"{out}-{rank}.pt")
    dist.barrier()  # leave together: gloo's teardown while a peer is still in the last collective aborted it once
    dist.destroy_process_group()


def _run(tmp_path, world: int, batch_seeds, nan_rank: int = -1, recompute: bool = False) -> list[dict]:
    out = str(tmp_path / f"w{world}-{recompute}")
    init = f"file://{tmp_path}/store-{world}-{nan_rank}-{recompute}"
    mp.start_processes(_worker, args=(world, init, batch_seeds, nan_rank, out, recompute), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(f"{out}-{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The single trainer's step on both batches: the reference of both parametrizations below."""
    return _run(tmp_path_factory.mktemp("one"), 1, [[10, 11]])[0]


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "two_recompute"])
def test_two_trainers_produce_the_gradient_of_one_with_the_same_global_batch(tmp_path, one, recompute):
    """Also with train.recompute on the two sharded trainers (FSDP2 regathers the weights for the rerun)."""
    two = _run(tmp_path, 2, [[10], [11]], recompute=recompute)
    assert one["applied"] and all(r["applied"] for r in two)
    assert one["grads"].keys() == two[0]["grads"].keys() and one["grads"]
    for name, g in one["grads"].items():
        for r in two:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert two[0]["norm"] == pytest.approx(one["norm"], rel=1e-5)


def test_non_finite_gradient_on_one_rank_skips_the_update_on_all(tmp_path):
    res = _run(tmp_path, 2, [[10], [11]], nan_rank=1)
    for r in res:
        assert not r["applied"]
        assert not r["changed"]
    assert all(r["norm"] != r["norm"] for r in res)  # NaN on both ranks
