"""A dead rank ends the whole job quickly, naming the rank and its role; nothing is left running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


def _sigkill(tmp_path, victim_role: str) -> dict:
    """Launch a job, SIGKILL one rank of victim_role once it trains, and wait for the job to end."""
    run_dir = str(tmp_path / f"kill-{victim_role}")
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
    return {"returncode": proc.returncode, "out": out, "elapsed": elapsed, "ranks": ranks, "victim": victim}


# After a rank fails torchrun SIGTERMs the others and SIGKILLs, 30 s later, one that did not exit: a
# stopped (or hung) process cannot act on SIGTERM (torch 2.13's fixed grace on this path).
SHUTDOWN_S = 30
STALL_LOOP_TIMEOUT_S = 8


def _stall(tmp_path, victim_role: str, stopped: threading.Event) -> dict:
    """Launch a job, SIGSTOP one rank of victim_role once it trains (then set `stopped`), and wait for the
    job to end."""
    from tests.helpers import launch

    run_dir, loop_timeout = str(tmp_path / f"stall-{victim_role}"), STALL_LOOP_TIMEOUT_S
    proc = launch([f"run.dir={run_dir}", "train.max_steps=100000", "engine.token_budget=256", "data.max_length=256",
                   "eval.every=0", f"run.loop_timeout_s={loop_timeout}", "run.save_timeout_s=5"])
    try:
        ranks = _wait_for_training(run_dir, proc, 240)
        victim = next(r for r in ranks if r["role"] == victim_role)
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped_at = time.time()
        stopped.set()
        out, _ = proc.communicate(timeout=loop_timeout + SHUTDOWN_S + 40)
        elapsed = time.time() - stopped_at
    finally:
        stopped.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"returncode": proc.returncode, "out": out, "elapsed": elapsed, "ranks": ranks, "victim": victim}


ROLES = ("engine", "trainer")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The four killed/stalled jobs of this module, each an independent launch with its own run dir.

    After its SIGSTOP a stall job only waits (the loop timeout, then torchrun's 30 s grace), so the two
    stall jobs run side by side, and the two SIGKILL jobs run one after the other inside that wait. Each
    job's times are measured on its own. A job that failed is kept as its exception, raised by its test."""
    tmp_path = tmp_path_factory.mktemp("jobs")
    out = {}
    with ThreadPoolExecutor(len(ROLES)) as pool:
        stopped = {role: threading.Event() for role in ROLES}
        stalls = {role: pool.submit(_stall, tmp_path, role, stopped[role]) for role in ROLES}
        for role in ROLES:
            stopped[role].wait(300)
        for role in ROLES:
            try:
                out["sigkill", role] = _sigkill(tmp_path, role)
            except BaseException as e:  # noqa: BLE001 - pytest.fail is a BaseException
                out["sigkill", role] = e
        for role in ROLES:
            try:
                out["stall", role] = stalls[role].result()
            except BaseException as e:  # noqa: BLE001
                out["stall", role] = e
    return out


def _job(jobs, kind: str, role: str) -> dict:
    job = jobs[kind, role]
    if isinstance(job, BaseException):
        raise job
    return job


@pytest.mark.parametrize("victim_role", ROLES)
def test_sigkill_of_one_rank_ends_the_job_with_its_role_named(jobs, victim_role):
    job = _job(jobs, "sigkill", victim_role)
    out, victim, elapsed = job["out"], job["victim"], job["elapsed"]
    assert job["returncode"] != 0, out
    assert elapsed < 60, f"job took {elapsed:.0f}s to end after the kill"
    assert f"rank {victim['rank']}" in out and victim_role in out, out[-3000:]
    time.sleep(1)
    survivors = [r["pid"] for r in job["ranks"] if _alive(r["pid"])]
    assert not survivors, f"processes left running: {survivors}"


@pytest.mark.parametrize("victim_role", ROLES)
def test_a_stalled_peer_is_named_within_the_loop_timeout_and_nothing_is_left(jobs, victim_role):
    """SIGSTOP: alive but silent. Its partner's handoff gives up after run.loop_timeout_s naming it."""
    job, loop_timeout = _job(jobs, "stall", victim_role), STALL_LOOP_TIMEOUT_S
    out, victim, elapsed = job["out"], job["victim"], job["elapsed"]
    assert job["returncode"] not in (0, 75), out[-3000:]
    # The partner's error (from its error file) names the silent rank, its role and its host.
    assert f"{victim_role} rank {victim['rank']} on host {victim['host']} sent nothing within {loop_timeout} s" in out, \
        out[-3000:]
    assert "launch.sh: root cause: rank" in out, out[-3000:]
    assert elapsed < loop_timeout + SHUTDOWN_S + 20, f"{elapsed:.0f}s from the stall to the exit"
    time.sleep(1)
    assert not [r["pid"] for r in job["ranks"] if _alive(r["pid"])]
    print(f"stalled {victim_role}: exit {job['returncode']} after {elapsed:.1f}s (loop timeout {loop_timeout}s)")


def test_non_finite_gradients_skip_on_all_trainers_and_too_many_stop_the_run(tmp_path):
    """Trainer 1 of 2 gets NaN gradients at steps 2, 4 and 5; with max_consecutive_skips=2 step 5 ends the run."""
    from tests.helpers import launch, metric_rows

    run_dir = str(tmp_path / "run")
    proc = launch([f"run.dir={run_dir}", "train.max_steps=8", "engine.token_budget=256", "data.max_length=256",
                   "eval.every=0", "train.log_every=1", "train.max_consecutive_skips=2"],
                  {"NPROC": "4", "SPECDRAFT_TEST_NAN_GRAD": "1@2,4,5"})
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-3000:]
    rows = {r["step"]: r for r in metric_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    # One global norm: both trainers saw NaN and skipped together; metrics.jsonl counts every skip.
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert [rows[s]["grad_norm"] != rows[s]["grad_norm"] for s in range(1, 6)] == [False, True, False, True, True]
    assert ("launch.sh: root cause: rank " in out and "(trainer) on host " in out
            and "exit code 1: RuntimeError: step 5: 2 consecutive steps (from step 4)" in out), out[-3000:]
