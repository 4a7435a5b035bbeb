"""Resume (fp32, CPU, real torchrun): k steps + restart + k steps equals 2k uninterrupted steps; a resume
on another number of pairs trains every sample once and continues loss and schedule; a used run dir is
refused unless resumed, and overwritten with run.overwrite=true."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from lib.data.packing import epoch_order
from lib.trainer.checkpoint import latest_checkpoint
from lib.trainer.loop import lr_lambda
from tests.helpers import TINY_RUN, TINY_RUN_STEPS, REPO, cpu_env, torchrun

pytestmark = pytest.mark.integration

BASE = [*TINY_RUN, f"train.max_steps={TINY_RUN_STEPS}"]


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in (json.loads(x) for x in f if x.strip()) if "loss" in r]


@pytest.fixture(scope="module")
def restart(tmp_path_factory, uninterrupted_tiny_run):
    """The uninterrupted run of the tiny default (tests/conftest.py, shared with tests/test_stop.py), and
    the same run stopped after 3 steps and resumed. The stopped run is started with run.overwrite=true
    into a copy of the finished uninterrupted run, so its first launch is also the overwrite case (the
    used run dir is replaced by a fresh run). The uninterrupted run is also the used run dir of the
    refusal test (copied there)."""
    tmp = tmp_path_factory.mktemp("restart")
    full, split = uninterrupted_tiny_run, str(tmp / "split")
    shutil.copytree(full, split)
    first = torchrun(2, [*BASE, f"run.dir={split}", "run.stop_after_steps=3", "run.overwrite=true"])
    assert first.returncode == 0, first.stdout[-3000:]
    first_rows = _rows(split)
    checkpoints_after_first = sorted(os.listdir(os.path.join(split, "checkpoints")))
    checkpoint_after_first = os.path.isfile(os.path.join(split, "checkpoints", "step-3", "meta.json"))
    resumed = torchrun(2, [*BASE, f"run.dir={split}", "checkpoint.resume=true"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    return {"full": full, "split": split, "first": first, "first_rows": first_rows,
            "checkpoints_after_first": checkpoints_after_first, "checkpoint_after_first": checkpoint_after_first,
            "resumed": resumed}


def test_restart_continues_exactly(restart):
    full, split = restart["full"], restart["split"]
    assert restart["checkpoint_after_first"]
    assert [r["step"] for r in restart["first_rows"]] == [1, 2, 3]
    assert "resumed from" in restart["resumed"].stdout

    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in b] == list(range(1, TINY_RUN_STEPS + 1))
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


def test_overwrite_replaces_a_used_run_dir_with_a_fresh_run(restart):
    first = restart["first"]
    assert "run.overwrite=true: removed the previous run's" in first.stdout, first.stdout[-3000:]
    assert "resumed from" not in first.stdout
    # Only the new run's checkpoint: the finished run's were removed with its metrics and exports.
    assert restart["checkpoints_after_first"] == ["step-3"]
    # Fresh: step 1 is the untrained step 1 of the uninterrupted run.
    rows, full = restart["first_rows"], _rows(restart["full"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-6)
    assert rows[0]["samples_seen"] == full[0]["samples_seen"]


RESHARD = ["train.max_steps=6", "engine.token_budget=256", "data.max_length=256", "eval.every=0", "train.log_every=1",
           "train.warmup_steps=2", "run.record_samples=true", "run.stop_after_steps=2"]


def _consumed(run_dir):
    """Every sample index the pairs consumed across all runs into run_dir (samples/rank-R.jsonl)."""
    ids = []
    for name in sorted(os.listdir(os.path.join(run_dir, "samples"))):
        with open(os.path.join(run_dir, "samples", name)) as f:
            for row in map(json.loads, f):
                ids += row["ids"] + row["refused"]
    return ids


def test_resume_on_another_number_of_pairs(tmp_path):
    """2 pairs for 2 steps, resume on 1 pair for 2, then on 2 again: DCP reshards the draft and its
    optimizer, the data continues from the global position, the schedule continues. The first launch
    already has checkpoint.resume=true (as an auto-resubmitted job has) in a fresh dir: with no checkpoint
    it starts fresh, which the rest of this test (data position, schedule) shows."""
    run = str(tmp_path / "run")
    for nproc, said in ((4, "no complete checkpoint"), (2, "with 1 pair(s) instead of 2"),
                        (4, "with 2 pair(s) instead of 1")):
        res = torchrun(nproc, [*RESHARD, f"run.dir={run}", "checkpoint.resume=true"])
        assert res.returncode == 0, res.stdout[-3000:]
        assert said in res.stdout, res.stdout[-3000:]
        assert ("resumed from" in res.stdout) == (said != "no complete checkpoint"), res.stdout[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

    ids = _consumed(run)
    with open(os.path.join(run, "checkpoints", "step-6", "meta.json")) as f:
        meta = json.load(f)
    position = meta["data_position"]
    assert position["epoch"] == 0 and position["index"] == len(ids)
    assert len(set(ids)) == len(ids), "a sample was trained on twice"
    # Nothing skipped: together the runs consumed exactly the start of epoch 0's fixed order.
    assert sorted(ids) == sorted(epoch_order(position["num_samples"], 0, 0)[:len(ids)].tolist())
    assert rows[-1]["samples_seen"] == len(ids)

    # No jump: the first step of each resumed run (0-based 2 and 4) goes on from where the last run
    # stopped (fp32 on CPU, so these numbers are deterministic), far below the untrained step-1 loss.
    losses = [r["loss"] for r in rows]
    first_drop = losses[0] - losses[1]
    for resumed in (2, 4):
        assert losses[resumed] < losses[resumed - 1] + 0.5 * first_drop, losses
    # The learning-rate schedule continued across both resumes (data=tiny: lr 1e-3, min_lr_ratio 0.1).
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * lr_lambda(s + 1, 2, 6, 0.1) for s in range(6)], rel=1e-9)


def test_a_reused_run_dir_is_refused_before_any_work(tmp_path, restart):
    """The issue's scenario: a second launch into a used run dir without checkpoint.resume=true."""
    run = str(tmp_path / "run")
    small = ["engine.token_budget=256", "data.max_length=256", "eval.every=0", "train.warmup_steps=0"]
    shutil.copytree(restart["full"], run)  # a finished run (with checkpoints) is the used run dir
    newest = os.path.basename(latest_checkpoint(run))
    assert len(os.listdir(os.path.join(run, "checkpoints"))) >= 1
    with open(os.path.join(run, "metrics.jsonl")) as f:
        before = f.read()

    # launch.sh checks once and exits 2 before torchrun starts; a bare torchrun fails on every rank.
    done = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "device=cpu", f"run.dir={run}", *small,
                           "train.max_steps=1"], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "already holds a run" in done.stderr and f"newest checkpoint: checkpoints/{newest}" in done.stderr
    assert "launch.sh: run dir" not in done.stderr  # the line it prints when it starts the ranks
    res = torchrun(2, [*small, "train.max_steps=1", f"run.dir={run}"])
    assert res.returncode != 0 and "config error: run.dir=" in res.stdout, res.stdout[-3000:]
    assert "resolved config" not in res.stdout  # failed in validation, before groups or any model
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert f.read() == before

    # run.overwrite=true replacing such a dir: test_overwrite_replaces_a_used_run_dir_with_a_fresh_run.
