"""Per-process run state handed to the role loops, and the small helpers every role needs."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.config import Config, Placement
from lib.launch.topology import Groups, RankInfo, Role, Topology


def memory_fraction(cfg: Config, placement: Placement, role: Role) -> float:
    """The share of its GPU's memory one process may allocate.

    train_frac and infer_frac split a GPU between the two roles that share it (colocate). A process
    alone on its GPU (either role under disaggregate, or sequential's process doing both) gets both
    shares, so moving between placements never strands memory.
    """
    if placement == Placement.colocate:
        return cfg.train_frac if role == Role.trainer else cfg.infer_frac
    return cfg.train_frac + cfg.infer_frac


def cap_process_memory(cfg: Config, placement: Placement, role: Role, device: torch.device) -> float:
    """Cap this process's CUDA caching allocator before any model touches the GPU; no-op on CPU."""
    frac = memory_fraction(cfg, placement, role)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(frac, device)
    return frac


@dataclass
class RunContext:
    cfg: Config
    topo: Topology
    info: RankInfo
    groups: Groups
    run_dir: str

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def is_trainer_leader(self) -> bool:
        """Rank 0 of the trainers writes the run's files and prints training progress."""
        return self.info.role in (Role.trainer, Role.both) and self.info.rank == self.topo.trainer_ranks[0]

    @property
    def is_engine_leader(self) -> bool:
        return self.info.role in (Role.engine, Role.both) and self.info.rank == self.topo.engine_ranks[0]

    @property
    def tokenizer_path(self) -> str:
        return self.cfg.target.tokenizer or self.cfg.target.path

    @property
    def cross_device_handoff(self) -> bool:
        """Disaggregated pairs sit on two GPUs: the trainer copies each slot to its own device."""
        return self.topo.placement == Placement.disaggregate and self.device.type == "cuda"

    def handoff_address(self) -> str:
        """A Unix socket path per pair, short enough for AF_UNIX (< 108 bytes), unique per run."""
        digest = hashlib.sha1(os.path.abspath(self.run_dir).encode()).hexdigest()[:12]
        return f"/tmp/specdraft-{digest}-pair{self.info.pair_index}.sock"

    def peer_name(self) -> str:
        if self.info.pair is None:
            return "self"
        peer = self.topo.rank_info(self.info.pair)
        # A pair always shares a node (lib/launch/topology.py), so the peer's host is this one.
        return f"{peer.role.value} rank {peer.rank} on host {socket.gethostname()}"


class _RankFormatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__("%(asctime)s " + prefix + " %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(prefix: str) -> logging.Logger:
    """Every line names the rank and role, so interleaved output from 2N processes stays readable."""
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_RankFormatter(prefix))
    root.addHandler(handler)
    root.setLevel(os.environ.get("SPECDRAFT_LOG_LEVEL", "INFO"))
    return logging.getLogger("specdraft")


def agree_run_dir(cfg: Config, groups: Groups) -> Config:
    """`cfg` (resolved) with rank 0's run.dir: under a bare torchrun with run.dir=auto each rank's
    lib.config.resolve picked its own fresh directory (clocks differ by a second); launch.sh passes
    one explicit run.dir, which this leaves as it is."""
    choice = [cfg.run.dir]
    dist.broadcast_object_list(choice, src=0, group=groups.meta)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=choice[0]))


def all_ranks_barrier(groups: Groups, timeout_s: float, what: str) -> None:
    """A barrier over every rank that names the ranks that did not arrive (gloo's monitored barrier)."""
    import datetime

    try:
        dist.monitored_barrier(group=groups.meta, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(f"barrier '{what}' failed: {exc}") from None


def peak_memory(device: torch.device) -> int:
    """Peak bytes this process allocated: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_threads(requested: int = 0) -> int:
    """Threads for torch's CPU kernels in the single-process tools (eval.py, tools/regenerate.py).

    0 picks one thread per two cores: torch's default (one per core) oversubscribes a machine whose
    cores are also busy with tokenisation or other jobs; on a busy 2-core machine one thread decoded
    the 135M target 4.5x faster than torch's default. Sets torch's count and returns it.
    """
    n = requested if requested > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    return n
