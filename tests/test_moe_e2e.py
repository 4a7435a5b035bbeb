"""MoE targets end to end on CPU: real torchrun runs of train.py with the tiny MoE targets of conf/target.

Colocated and sequential runs of the tiny Qwen3-MoE target (2 pairs each) train the same draft; engine.tp=2
trains like engine.tp=1 (the engines shard every expert); the tiny gpt-oss target (sinks, sliding windows,
untruncated YaRN rope) trains colocated and exports a draft whose config carries that rope.
"""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.helpers import metric_rows, torchrun

pytestmark = pytest.mark.integration

SMALL = ["eval.every=0", "train.log_every=1", "engine.token_budget=256", "data.max_length=256",
         "target.tokenizer=assets/tiny_target"]


def train(tmp_path, name: str, nproc: int, *overrides: str) -> list[dict]:
    run_dir = str(tmp_path / name)
    res = torchrun(nproc, [f"run.dir={run_dir}", *SMALL, *overrides], timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "experts run with engine.moe_impl=grouped" in res.stdout + res.stderr
    return metric_rows(run_dir)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """Two colocated pairs (4 ranks) of the tiny MoE target with engine.tp=1: the reference of both tests
    below (engine.tp=2 must match it, and so must sequential with 2 shards, i.e. the same 2 pairs)."""
    return train(tmp_path_factory.mktemp("moe"), "tp1", 4, "target=tiny_moe", "engine.tp=1", "train.max_steps=2")


def test_tiny_moe_trains_the_same_colocated_and_sequential(tmp_path, tp1):
    sequential = train(tmp_path, "sequential", 2, "target=tiny_moe", "placement=sequential", "train.max_steps=2")
    assert len(tp1) == 2 and len(sequential) == 2
    for a, b in zip(tp1, sequential):
        assert math.isfinite(a["loss"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_tiny_moe_engine_tp2_trains_like_tp1(tmp_path, tp1):
    losses = {1: [r["loss"] for r in tp1],
              2: [r["loss"] for r in train(tmp_path, "tp2", 4, "target=tiny_moe", "engine.tp=2", "train.max_steps=2")]}
    assert len(losses[1]) == 2
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_tiny_gpt_oss_trains_colocated(tmp_path):
    rows = train(tmp_path, "gpt_oss", 2, "target=tiny_gpt_oss", "placement=colocate", "train.max_steps=3")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(tmp_path, "gpt_oss", "draft", "config.json")) as f:
        rope = json.load(f)["rope_scaling"]
    # gpt-oss's own rope, as transformers' GptOssConfig defines it: servers build the draft's rotary from this.
    assert rope["rope_type"] == "yarn" and rope["factor"] == 32.0 and rope["truncate"] is False
    assert rope["original_max_position_embeddings"] == 4096
