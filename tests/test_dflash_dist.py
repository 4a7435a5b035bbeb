"""DFlash's distributed update with real gloo groups and FSDP2: 1 trainer with two micro-batches has
the gradient of 2 trainers with one each (the global normaliser, and anchors that depend on the batch
alone, not on which rank draws them), under both position weightings (decay: the weighted count;
dpace: per-row weights from each block's own forward, over the plain count)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.drafts.base import get_strategy
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft
from lib.drafts.dflash.trainer import DFlashBundle, DFlashModule, DFlashOptions
from lib.launch.sharding import shard

pytestmark = pytest.mark.integration

VOCAB, HIDDEN, BLOCK = 96, 32, 4


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 14, 6]
    t = sum(lengths)
    return {
        "input_ids": torch.randint(0, VOCAB, (t,), generator=g),
        "loss_mask": torch.rand(t, generator=g) < 0.8,
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "cu_seqlens": torch.tensor([0, 9, 23, 29], dtype=torch.int32),
        "aux_hidden": torch.randn(t, 2 * HIDDEN, generator=g),
    }


WEIGHTINGS = ("decay", "dpace")


def _bundle(group, weighting: str) -> DFlashBundle:
    c = DFlashConfig(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=128, vocab_size=VOCAB, target_hidden_size=HIDDEN, num_target_layers=6,
                     target_layer_ids=[1, 3], block_size=BLOCK, mask_token_id=1)
    torch.manual_seed(0)
    draft = DFlashDraft(c)
    g = torch.Generator().manual_seed(1)
    draft.set_target_weights(torch.randn(VOCAB, HIDDEN, generator=g), torch.randn(VOCAB, HIDDEN, generator=g))
    options = DFlashOptions(block_size=BLOCK, loss_weights=weighting)
    module = DFlashModule(draft, options, use_flex=False)
    return DFlashBundle(shard(module, group, torch.device("cpu")), draft_config=c, options=options, seed=0)


def _steps(group, world: int, mine: list[dict]) -> dict:
    """Both weightings' gradients and metric row for this trainer's batches `mine`."""
    strategy = get_strategy("dflash")
    result = {}
    for weighting in WEIGHTINGS:
        bundle = _bundle(group, weighting)
        contexts, norm = strategy.prepare(bundle, mine)
        norm = norm.float()
        dist.all_reduce(norm, group=group)
        sums = None
        for b, ctx in zip(mine, contexts):
            loss, s = strategy.micro_loss(bundle, b, ctx, norm, float(world))
            loss.backward()
            sums = s if sums is None else sums + s
        dist.all_reduce(sums, group=group)
        grads = {n: p.grad.full_tensor().clone() for n, p in bundle.model.named_parameters() if p.grad is not None}
        result[weighting] = {"grads": grads, "row": strategy.summarize(sums)}
    return result


def _worker(rank: int, init: str, out: str) -> None:
    """One start of 2 processes for every case (spawning dominates this test's time): the single trainer
    with both batches runs on rank 0 over a group of its own, then the two trainers with one each."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    alone = dist.new_group([0])  # every rank takes part in creating a group, members or not
    result = {}
    if rank == 0:
        result["one"] = _steps(alone, 1, [_batch(10), _batch(11)])
    result["two"] = _steps(dist.group.WORLD, 2, [_batch(10 + rank)])
    torch.save(result, f"{out}-{rank}.pt")
    # Both ranks leave together: a rank tearing gloo down while its peer is still in the last
    # collective's cleanup aborted the peer once (std::terminate in gloo's pair threads).
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path) -> list[dict]:
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(f"file://{tmp_path}/store", out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}-{r}.pt") for r in range(2)]


def test_two_trainers_produce_the_gradient_of_one_with_the_same_global_batch(tmp_path):
    results = _run(tmp_path)
    ones, twos = results[0]["one"], [r["two"] for r in results]
    for weighting in WEIGHTINGS:
        one, two = ones[weighting], [r[weighting] for r in twos]
        assert one["grads"] and one["grads"].keys() == two[0]["grads"].keys()
        for name, g in one["grads"].items():
            for r in two:
                torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-7, msg=f"{weighting}: {name}")
        assert two[0]["row"]["loss"] == pytest.approx(one["row"]["loss"], rel=1e-5)
        assert two[0]["row"]["acc_0"] == pytest.approx(one["row"]["acc_0"])
    # The two weightings train differently on the same batches.
    assert ones["dpace"]["row"]["loss"] != pytest.approx(ones["decay"]["row"]["loss"], rel=1e-3)
