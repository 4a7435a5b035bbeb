"""Who is who: roles, pairs, devices of every rank, and the process groups built from them.

The layout is a pure function of (nnodes, nproc_per_node, placement, engine.tp), so every rank
computes the same answer without talking, and tests can check it without processes. Process groups
are built once, before the step loop, from explicit rank lists (trainer global ranks are not
contiguous on several nodes).
"""
from __future__ import annotations

import datetime
import enum
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from lib.config import Placement, ProcessLayout


class Role(str, enum.Enum):
    trainer = "trainer"
    engine = "engine"
    both = "both"  # placement=sequential: one process does the forward, then the draft step


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    node: int
    role: Role
    pair: Optional[int]  # global rank of the paired process (None in sequential placement)
    pair_index: int  # global index of the engine/trainer pair = the data shard
    device: str  # "cuda:N" or "cpu"


@dataclass(frozen=True)
class Topology:
    nnodes: int
    nproc_per_node: int
    placement: Placement
    use_cuda: bool
    engine_tp: int = 1

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ValueError(f"nnodes={self.nnodes}, nproc_per_node={self.nproc_per_node}: both must be >= 1")
        ProcessLayout(self.placement, self.nproc_per_node)  # the placement's process-count rule (lib/config/launch.py)
        if self.engines_per_node % self.engine_tp:
            raise ValueError(f"engine.tp={self.engine_tp} must divide the {self.engines_per_node} engines of a node")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def pairs_per_node(self) -> int:
        return ProcessLayout(self.placement, self.nproc_per_node).pairs

    @property
    def engines_per_node(self) -> int:
        return self.pairs_per_node

    @property
    def num_pairs(self) -> int:
        return self.nnodes * self.pairs_per_node

    def rank_info(self, rank: int) -> RankInfo:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        node, local = divmod(rank, self.nproc_per_node)
        half = self.pairs_per_node
        if self.placement == Placement.sequential:
            role, pair, slot = Role.both, None, local
        elif local < half:
            role, pair, slot = Role.trainer, rank + half, local
        else:
            role, pair, slot = Role.engine, rank - half, local - half
        if not self.use_cuda:
            device = "cpu"
        elif self.placement == Placement.disaggregate:
            device = f"cuda:{local}"
        else:
            device = f"cuda:{slot}"
        return RankInfo(rank, local, node, role, pair, node * half + slot, device)

    @property
    def trainer_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if self.rank_info(r).role in (Role.trainer, Role.both)]

    @property
    def engine_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if self.rank_info(r).role in (Role.engine, Role.both)]

    @property
    def engine_tp_groups(self) -> list[list[int]]:
        """Consecutive engines of one node; never across nodes, so TP traffic stays on NVLink."""
        engines = self.engine_ranks
        return [engines[i:i + self.engine_tp] for i in range(0, len(engines), self.engine_tp)]


@dataclass
class Groups:
    """Every process group this rank is a member of; None where it is not a member."""

    meta: dist.ProcessGroup  # gloo, all ranks: control, shutdown, agreement
    trainer: Optional[dist.ProcessGroup] = None  # NCCL on GPU (FSDP2 mesh), gloo on CPU
    trainer_gloo: Optional[dist.ProcessGroup] = None  # barriers, DCP metadata, metrics
    engine: Optional[dist.ProcessGroup] = None  # NCCL on GPU, gloo on CPU
    engine_tp: Optional[dist.ProcessGroup] = None
    all_groups: list[dist.ProcessGroup] = field(default_factory=list)


def init_world(startup_timeout_s: float) -> None:
    """The default group is gloo: NCCL refuses two ranks of one communicator on one GPU."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=startup_timeout_s))


def build_groups(topo: Topology, info: RankInfo, startup_timeout_s: float) -> Groups:
    """Create all groups in one fixed global order (shared first, then role groups).

    Role-only groups use local synchronization, so a rank never enters creation of a group it is
    not in (an engine cannot block on the trainers' group). They start with the long start-up
    timeout; `enter_loop_timeouts` shortens it once models are loaded.
    """
    timeout = datetime.timedelta(seconds=startup_timeout_s)
    fast = "nccl" if topo.use_cuda else "gloo"
    rank = info.rank
    groups = Groups(meta=dist.new_group(list(range(topo.world_size)), backend="gloo", timeout=timeout))
    groups.all_groups.append(groups.meta)

    def member_group(ranks: list[int], backend: str) -> Optional[dist.ProcessGroup]:
        if rank not in ranks:
            return None
        g = dist.new_group(ranks, backend=backend, timeout=timeout, use_local_synchronization=True)
        groups.all_groups.append(g)
        return g

    trainers, engines = topo.trainer_ranks, topo.engine_ranks
    groups.trainer = member_group(trainers, fast)
    groups.trainer_gloo = member_group(trainers, "gloo") if fast != "gloo" else groups.trainer
    groups.engine = member_group(engines, fast)
    if topo.engine_tp > 1:
        for tp_ranks in topo.engine_tp_groups:
            g = member_group(tp_ranks, fast)
            if g is not None:
                groups.engine_tp = g
    return groups


def enter_loop_timeouts(groups: Groups, loop_timeout_s: float) -> None:
    """From here on a dead peer must surface within the loop timeout, not the start-up one."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # private, stable since 2.3

    for g in groups.all_groups:
        _set_pg_timeout(datetime.timedelta(seconds=loop_timeout_s), g)


def topology_record(info: RankInfo) -> dict:
    rec = asdict(info)
    rec["role"] = info.role.value
    rec["host"] = socket.gethostname()
    rec["pid"] = os.getpid()
    return rec


def gather_topology(groups: Groups, info: RankInfo) -> list[dict]:
    """All ranks' records, gathered on the meta group (every rank holds the full list)."""
    out: list = [None] * dist.get_world_size(groups.meta)
    dist.all_gather_object(out, topology_record(info), group=groups.meta)
    return sorted(out, key=lambda r: r["rank"])


def check_groups(topo: Topology, groups: Groups, info: RankInfo) -> dict[str, int]:
    """Dry-run check: one collective on each group and one send/recv per pair.

    Each all-reduce sums the member ranks, so a wrong membership shows as a wrong sum.
    """
    device = torch.device(info.device)
    sums: dict[str, int] = {}

    def reduce_ranks(name: str, g: Optional[dist.ProcessGroup], members: list[int], dev: torch.device) -> None:
        if g is None:
            return
        t = torch.tensor([info.rank], dtype=torch.int64, device=dev)
        dist.all_reduce(t, group=g)
        if int(t.item()) != sum(members):
            raise RuntimeError(f"group {name}: sum of ranks {int(t.item())} != expected {sum(members)} "
                               f"for members {members}")
        sums[name] = int(t.item())

    reduce_ranks("meta", groups.meta, list(range(topo.world_size)), torch.device("cpu"))
    reduce_ranks("trainer", groups.trainer, topo.trainer_ranks, device)
    if groups.trainer_gloo is not groups.trainer:
        reduce_ranks("trainer_gloo", groups.trainer_gloo, topo.trainer_ranks, torch.device("cpu"))
    reduce_ranks("engine", groups.engine, topo.engine_ranks, device)
    if groups.engine_tp is not None:
        tp = next(g for g in topo.engine_tp_groups if info.rank in g)
        reduce_ranks("engine_tp", groups.engine_tp, tp, device)
    if info.pair is not None:
        # Point to point on the meta group: only the pair takes part.
        mine = torch.tensor([info.rank], dtype=torch.int64)
        theirs = torch.empty(1, dtype=torch.int64)
        if info.role == Role.trainer:
            dist.send(mine, info.pair, group=groups.meta)
            dist.recv(theirs, info.pair, group=groups.meta)
        else:
            dist.recv(theirs, info.pair, group=groups.meta)
            dist.send(mine, info.pair, group=groups.meta)
        if int(theirs.item()) != info.pair:
            raise RuntimeError(f"pair check: rank {info.rank} expected {info.pair}, got {int(theirs.item())}")
        sums["pair"] = int(theirs.item())
    return sums


def destroy(groups: Optional[Groups]) -> None:
    """Tear down this rank's process groups: each subgroup in `groups`, then the default group.

    Subgroups go first, each on its own, so their backends (NCCL communicators on GPU) shut down
    explicitly instead of inside the default group's teardown. Safe to call again, with None (a rank
    that failed before building its groups), or after the default group is gone, which already took
    every subgroup with it.
    """
    subgroups: list[dist.ProcessGroup] = []
    if groups is not None:
        subgroups, groups.all_groups = groups.all_groups, []  # emptied first: a second call has nothing left
    if not dist.is_initialized():
        return
    seen: set[int] = set()
    for group in subgroups:
        if id(group) not in seen:
            seen.add(id(group))
            dist.destroy_process_group(group)
    dist.destroy_process_group()
