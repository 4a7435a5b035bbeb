"""Topology and process groups: the pure layout, and real torchrun + gloo dry runs."""
from __future__ import annotations

import json
import os

import pytest

from lib.config import Placement
from lib.launch.topology import Role, Topology
from tests.helpers import free_port, torchrun

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("pairs", [1, 2, 4])
@pytest.mark.parametrize("nnodes", [1, 2])
def test_colocate_layout_pairs_share_a_gpu_and_never_cross_nodes(pairs, nnodes):
    topo = Topology(nnodes, 2 * pairs, Placement.colocate, use_cuda=True)
    infos = [topo.rank_info(r) for r in range(topo.world_size)]
    assert sorted(i.pair_index for i in infos if i.role == Role.trainer) == list(range(topo.num_pairs))
    for i in infos:
        peer = topo.rank_info(i.pair)
        assert peer.pair == i.rank and peer.role != i.role
        assert peer.node == i.node and peer.device == i.device and peer.pair_index == i.pair_index
        assert (i.local_rank < pairs) == (i.role == Role.trainer)
    assert len(topo.trainer_ranks) == len(topo.engine_ranks) == pairs * nnodes


def test_disaggregate_puts_each_role_on_its_own_gpu():
    topo = Topology(1, 4, Placement.disaggregate, use_cuda=True)
    assert [topo.rank_info(r).device for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert topo.rank_info(0).pair == 2


def test_sequential_has_one_process_per_shard_playing_both_roles():
    topo = Topology(2, 2, Placement.sequential, use_cuda=False)
    assert [topo.rank_info(r).role for r in range(4)] == [Role.both] * 4
    assert topo.trainer_ranks == topo.engine_ranks == [0, 1, 2, 3]
    assert [topo.rank_info(r).pair_index for r in range(4)] == [0, 1, 2, 3]


def test_engine_tp_groups_are_consecutive_engines_of_one_node():
    topo = Topology(2, 8, Placement.colocate, use_cuda=True, engine_tp=2)
    assert topo.engine_tp_groups == [[4, 5], [6, 7], [12, 13], [14, 15]]
    with pytest.raises(ValueError, match="engine.tp=3"):
        Topology(1, 8, Placement.colocate, use_cuda=True, engine_tp=3)


def _check_dry_run(run_dir: str, nnodes: int, nproc: int) -> None:
    topo = Topology(nnodes, nproc, Placement.colocate, use_cuda=False)
    with open(os.path.join(run_dir, "topology.json")) as f:
        records = json.load(f)["ranks"]
    assert [r["rank"] for r in records] == list(range(topo.world_size))
    for rec in records:
        info = topo.rank_info(rec["rank"])
        assert rec["role"] == info.role.value and rec["pair"] == info.pair and rec["local_rank"] == info.local_rank
        assert {"host", "device", "pid"} <= rec.keys()
        with open(os.path.join(run_dir, "dry_run", f"rank-{rec['rank']}.json")) as f:
            sums = json.load(f)["sums"]
        members = topo.trainer_ranks if info.role == Role.trainer else topo.engine_ranks
        assert sums["meta"] == sum(range(topo.world_size))
        assert sums[info.role.value] == sum(members)
        assert sums["pair"] == info.pair
        other = "engine" if info.role == Role.trainer else "trainer"
        assert other not in sums  # never entered the other role's group


# 1 pair (2 ranks, one node) is test_launch_sh_dry_run_on_cpu's run; an 8-rank world of 4 pairs is the two-node
# run's; the pure layouts of 1, 2 and 4 pairs on 1 and 2 nodes are checked above without processes.
@pytest.mark.integration
@pytest.mark.parametrize("pairs", [2])
def test_dry_run_single_node(tmp_path, pairs):
    out = torchrun(2 * pairs, ["train.max_steps=0", f"run.dir={tmp_path}"], timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_dry_run(str(tmp_path), 1, 2 * pairs)


@pytest.mark.integration
def test_dry_run_two_nodes_on_localhost(tmp_path):
    port = free_port()
    procs = [torchrun(4, ["train.max_steps=0", f"run.dir={tmp_path}"], nnodes=2, node_rank=n, port=port, wait=False)
             for n in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    _check_dry_run(str(tmp_path), 2, 4)


@pytest.mark.integration
def test_launch_sh_dry_run_on_cpu(tmp_path):
    """`bash launch.sh train.max_steps=0` on a machine without GPU: 1 pair on CPU, groups checked."""
    import subprocess

    from tests.helpers import REPO, cpu_env

    env = cpu_env()
    out = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "train.max_steps=0", f"run.dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check_dry_run(str(tmp_path), 1, 2)


def _destroy_member(rank: int, port: int, out: str) -> None:
    """One rank of a real 2-process gloo world: build the production groups, then destroy them twice."""
    import torch.distributed as dist

    from lib.launch.topology import build_groups, check_groups, destroy, init_world

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    init_world(60)
    topo = Topology(1, 2, Placement.colocate, use_cuda=False)
    info = topo.rank_info(rank)
    groups = build_groups(topo, info, 60)
    check_groups(topo, groups, info)
    names = {id(groups.meta): "meta", id(groups.trainer): "trainer", id(groups.engine): "engine"}
    real, calls = dist.destroy_process_group, []

    def recording(group=None):  # the real teardown, with a note of which group it was given
        calls.append("default" if group is None else names[id(group)])
        real(group)

    dist.destroy_process_group = recording
    destroy(groups)
    first = {"calls": list(calls), "initialized": dist.is_initialized(), "left": len(groups.all_groups)}
    destroy(groups)
    destroy(None)
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump({"first": first, "calls": calls}, f)


@pytest.mark.integration
def test_destroy_tears_down_each_given_group_then_the_world_once(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "destroy")
    mp.start_processes(_destroy_member, args=(free_port(), out), nprocs=2, join=True, start_method="spawn")
    for rank, role in ((0, "trainer"), (1, "engine")):
        with open(f"{out}-{rank}.json") as f:
            seen = json.load(f)
        assert seen["first"] == {"calls": ["meta", role, "default"], "initialized": False, "left": 0}, rank
        assert seen["calls"] == ["meta", role, "default"], "a second destroy() must do nothing"
