"""A dead rank ends the whole job quickly, naming the rank and its role; nothing is left running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import REPO, cpu_env

pytestmark = pytest.mark.integration

LOOP_TIMEOUT_S = 30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_training(run_dir: str, proc: subprocess.Popen, deadline_s: float) -> list[dict]:
    end = time.time() + deadline_s
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"job ended before training started:\n{proc.stdout.read()}")
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            with open(os.path.join(run_dir, "topology.json")) as f:
                return json.load(f)["ranks"]
        time.sleep(0.5)
    pytest.fail("no training step within the deadline")


@pytest.mark.parametrize("victim_role", ["engine", "trainer"])
def test_sigkill_of_one_rank_ends_the_job_with_its_role_named(tmp_path, victim_role):
    run_dir = str(tmp_path / "run")
    cmd = ["bash", os.path.join(REPO, "launch.sh"), f"run.dir={run_dir}", "train.max_steps=100000",
           "engine.token_budget=512", "data.max_length=512", f"run.loop_timeout_s={LOOP_TIMEOUT_S}",
           "train.log_every=1000"]
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        ranks = _wait_for_training(run_dir, proc, 240)
        victim = next(r for r in ranks if r["role"] == victim_role)
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=LOOP_TIMEOUT_S + 30)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    assert elapsed < 60, f"job took {elapsed:.0f}s to end after the kill"
    assert f"rank {victim['rank']}" in out and victim_role in out, out[-3000:]
    time.sleep(1)
    survivors = [r["pid"] for r in ranks if _alive(r["pid"])]
    assert not survivors, f"processes left running: {survivors}"
