"""The launch's shape and the placement -> process-count rule (lib/config/__init__.py re-exports both)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lib.config.choices import Placement
from lib.config.values import _fail


@dataclass(frozen=True)
class ProcessLayout:
    """Processes per node for a placement, and the GPUs they need: the only place this rule lives.

    launch.sh asks it (`python -m lib.config.check nproc`), validate() checks a launch against it and
    lib/launch/topology.py lays ranks out by it.
    """

    placement: Placement
    nproc: int  # processes on one node
    key: str = field(default="nproc_per_node", compare=False)  # how the caller spells nproc in errors

    def __post_init__(self) -> None:
        if self.nproc < 1:
            _fail(self.key, self.nproc, "must be >= 1")
        if self.placement != Placement.sequential and self.nproc % 2:
            _fail(self.key, self.nproc, f"placement={Placement(self.placement).value} needs an even process "
                  "count per node (trainer r pairs with engine r + P/2); use 2x the number of pairs")

    @property
    def pairs(self) -> int:
        """Trainer/engine pairs on the node (= engines = data shards of the node)."""
        return self.nproc if self.placement == Placement.sequential else self.nproc // 2

    @property
    def gpus_needed(self) -> int:
        # colocate: a pair shares a GPU; disaggregate: one GPU per process; sequential: one per process.
        return self.pairs if self.placement == Placement.colocate else self.nproc

    @staticmethod
    def for_gpus(placement: Placement, gpus: int) -> "ProcessLayout":
        """The default layout of a node with `gpus` visible GPUs (0: one pair, or one process, on CPU)."""
        if gpus == 0:
            return ProcessLayout(placement, 1 if placement == Placement.sequential else 2)
        if placement == Placement.disaggregate and gpus % 2:
            _fail("placement", Placement.disaggregate, f"needs an even number of GPUs per node (found {gpus}); set "
                  "CUDA_VISIBLE_DEVICES to an even count or use placement=colocate")
        return ProcessLayout(placement, 2 * gpus if placement == Placement.colocate else gpus)


@dataclass(frozen=True)
class LaunchShape:
    """What torchrun started, read from its environment: the config must fit it."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    gpus_per_node: int  # visible CUDA devices on this node (0 without CUDA)

    @staticmethod
    def from_env(gpus_per_node: int) -> "LaunchShape":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        return LaunchShape(world, local, max(1, world // max(local, 1)), gpus_per_node)

