"""MoE targets end to end on CPU: real torchrun runs of train.py with the tiny MoE targets of conf/target.

Colocated and sequential runs of the tiny Qwen3-MoE target train the same draft; engine.tp=2 trains
like engine.tp=1 (the engines shard every expert); the tiny gpt-oss target (sinks, sliding windows)
trains colocated once its YaRN rope is swapped for the default one: the EAGLE-3 draft has no YaRN yet.
"""
from __future__ import annotations

import math

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


def test_tiny_moe_trains_the_same_colocated_and_sequential(tmp_path):
    runs = {p: train(tmp_path, p, n, "target=tiny_moe", f"placement={p}", "train.max_steps=3")
            for p, n in (("sequential", 1), ("colocate", 2))}
    assert len(runs["sequential"]) == 3
    for a, b in zip(runs["colocate"], runs["sequential"]):
        assert math.isfinite(a["loss"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_tiny_moe_engine_tp2_trains_like_tp1(tmp_path):
    losses = {tp: [r["loss"] for r in train(tmp_path, f"tp{tp}", 4, "target=tiny_moe", f"engine.tp={tp}",
                                            "train.max_steps=2")]
              for tp in (1, 2)}
    assert len(losses[1]) == 2
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_tiny_gpt_oss_trains_colocated(tmp_path):
    rows = train(tmp_path, "gpt_oss", 2, "target=tiny_gpt_oss", "placement=colocate", "train.max_steps=3",
                 "+target.hf_config.rope_parameters={rope_type:default,rope_theta:150000.0}")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
