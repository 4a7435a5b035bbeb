"""Resumable checkpoints on the trainer group (torch.distributed.checkpoint), written atomically.

Layout: checkpoints/step-N/ holds the DCP shards (model + optimizer), one `rank-R.pt` per trainer
with what is private to its pair (data position, RNG), and `meta.json`, written last. meta.json also
holds the global data position (lib/data/packing.py), so a run resumes on another number of pairs:
DCP reshards model and optimizer, and the new pairs continue the data stream from that position. A directory
is complete only when it carries meta.json and has its final name: it is written as step-N.tmp and
renamed by the leader after every trainer finished, so a crash mid-write is never picked up.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lib.launch.stopping import fault_pause_in_save


class _WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner unpickles the non-tensor entries (optimizer param groups) with
    weights_only=False; a checkpoint must never be able to run code, so they pass weights_only=True first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # raises on anything but tensors and plain data
        checked = io.BytesIO()
        torch.save(obj, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_checkpoint(run_dir: str) -> Optional[str]:
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
             and os.path.isfile(os.path.join(root, name, "meta.json"))]
    return os.path.join(root, max(steps)[1]) if steps else None


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], private: dict[str, Any], group: dist.ProcessGroup, keep: int) -> str:
    """Collective over the trainer (gloo) group; returns the final directory."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step-{step}")
    tmp = final + ".tmp"
    leader = dist.get_rank(group) == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group=group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, process_group=group)
    torch.save(private, os.path.join(tmp, f"rank-{dist.get_rank(group)}.pt"))
    fault_pause_in_save(step)  # test-only: a kill lands here, between the shards and meta.json
    dist.barrier(group=group)
    if leader:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world": dist.get_world_size(group), **meta}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier(group=group)
    return final


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    group: dist.ProcessGroup) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Restores model and optimizer in place (resharded by DCP when the trainer count changed); returns
    (meta, this rank's private state), the private state None when the checkpoint had another count."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    same_world = meta["world"] == dist.get_world_size(group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, process_group=group, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if not same_world:
        return meta, None
    # weights_only: the file holds tensors and plain data (RNG state, data position), never code to run.
    private = torch.load(os.path.join(path, f"rank-{dist.get_rank(group)}.pt"), weights_only=True)
    return meta, private


def _prune(root: str, keep: int) -> None:
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, f"step-{step}"), ignore_errors=True)
