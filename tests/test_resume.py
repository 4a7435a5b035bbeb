"""Exact resume: k steps + restart + k steps equals 2k uninterrupted steps (fp32, CPU, real torchrun)."""
from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from tests.helpers import torchrun

pytestmark = pytest.mark.integration

BASE = ["train.max_steps=6", "engine.token_budget=384", "data.max_length=384", "eval.every=0", "train.log_every=1",
        "train.warmup_steps=2"]


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in (json.loads(x) for x in f if x.strip()) if "loss" in r]


def test_restart_continues_exactly(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    res = torchrun(2, [*BASE, f"run.dir={full}"])
    assert res.returncode == 0, res.stdout[-3000:]
    res = torchrun(2, [*BASE, f"run.dir={split}", "run.stop_after_steps=3"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert os.path.isfile(os.path.join(split, "checkpoints", "step-3", "meta.json"))
    assert [r["step"] for r in _rows(split)] == [1, 2, 3]
    res = torchrun(2, [*BASE, f"run.dir={split}", "checkpoint.resume=true"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout

    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["samples_seen"] == ra["samples_seen"]
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9)
    wa = load_file(os.path.join(full, "draft", "model.safetensors"))
    wb = load_file(os.path.join(split, "draft", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype
        assert (wa[name] == wb[name]).all(), name


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    res = torchrun(2, ["train.max_steps=1", "engine.token_budget=256", "data.max_length=256", "eval.every=0",
                       f"run.dir={tmp_path}", "checkpoint.resume=true"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "no complete checkpoint" in res.stdout
    assert [r["step"] for r in _rows(str(tmp_path))] == [1]
