"""The three placements share engine and trainer code: same data, same seed, same losses (fp32, CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lib.trainer.metrics import MIN_PLOTTED_ROWS
from tests.helpers import torchrun

pytestmark = pytest.mark.integration

STEPS = 4
# Online evaluation every 2 steps rides along in every run (it does not touch training: the placements
# must still train the same draft), so the evaluation test needs no launches of its own.
SMALL = [f"train.max_steps={STEPS}", "engine.token_budget=384", "data.max_length=384", "eval.every=2",
         "eval.num_prompts=2", "eval.max_new_tokens=8", "train.log_every=1"]


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(run_dir: str) -> list[dict]:
    return [r for r in _rows(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    out = {}
    for placement, nproc in (("sequential", 1), ("colocate", 2), ("disaggregate", 2)):
        run_dir = str(tmp_path_factory.mktemp(placement))
        res = torchrun(nproc, [f"placement={placement}", f"run.dir={run_dir}", *SMALL], timeout=400)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        out[placement] = run_dir
    return out


@pytest.fixture(scope="module")
def runs(run_dirs):
    return {placement: _losses(run_dir) for placement, run_dir in run_dirs.items()}


def test_all_placements_train_the_same_draft(runs):
    ref = runs["sequential"]
    assert len(ref) == STEPS
    for placement in ("colocate", "disaggregate"):
        rows = runs[placement]
        assert [r["step"] for r in rows] == [r["step"] for r in ref]
        for a, b in zip(rows, ref):
            assert a["samples_seen"] == b["samples_seen"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), placement
            assert a["acc_0"] == pytest.approx(b["acc_0"], abs=1e-9), placement


def test_loss_moves_and_metrics_are_complete(runs):
    rows = runs["colocate"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    keys = {"step", "loss", "acc_0", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "handoff_ms",
            "peak_alloc_bytes", "samples_seen"}
    assert keys <= rows[0].keys()


@pytest.mark.parametrize("placement", ["colocate", "sequential", "disaggregate"])
def test_online_evaluation_rows_before_during_and_after_training(run_dirs, placement):
    """The trainer pushes weights to its engine (or evaluates in-process when sequential); the
    acceptance-length rows land in metrics.jsonl, starting from the untrained draft."""
    run_dir = run_dirs[placement]
    evals = [r for r in _rows(run_dir) if "accept_len" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 1.0 <= r["accept_len"] <= 4.0  # k=3: at most 3 accepted + the bonus token
        assert r["accept_len_k3"] == r["accept_len"] and "accept_rate_0" in r
    # Curves are drawn from MIN_PLOTTED_ROWS training rows on (tests/test_plots.py); this run is shorter.
    assert os.path.isfile(os.path.join(run_dir, "accept_len.png")) == (STEPS >= MIN_PLOTTED_ROWS)


@pytest.mark.unit
@pytest.mark.parametrize("placement,role,expected", [
    ("colocate", "trainer", 0.3), ("colocate", "engine", 0.55),
    ("disaggregate", "trainer", 0.85), ("disaggregate", "engine", 0.85), ("sequential", "both", 0.85)])
def test_memory_fraction_splits_a_shared_gpu_and_gives_a_lone_process_both_shares(placement, role, expected):
    from lib.config import Placement, compose
    from lib.launch.runtime import memory_fraction
    from lib.launch.topology import Role

    cfg = compose(["train_frac=0.3", "infer_frac=0.55"])
    assert memory_fraction(cfg, Placement(placement), Role(role)) == pytest.approx(expected)


@pytest.mark.gpu
def test_cap_process_memory_sets_the_allocator_limit_on_gpu():
    from lib.config import Placement, compose
    from lib.launch.runtime import cap_process_memory
    from lib.launch.topology import Role

    cfg = compose(["train_frac=0.3", "infer_frac=0.55"])
    device = torch.device("cuda", 0)
    before = torch.cuda.get_per_process_memory_fraction(device)
    try:
        assert cap_process_memory(cfg, Placement.colocate, Role.trainer, device) == pytest.approx(0.3)
        assert torch.cuda.get_per_process_memory_fraction(device) == pytest.approx(0.3)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.35 * torch.cuda.get_device_properties(device).total_memory), dtype=torch.uint8,
                        device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)
