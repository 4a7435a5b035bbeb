"""Preemption: SIGTERM stops the run at a checkpoint of the step in flight and the resume is exact; a
rank dying inside a checkpoint write leaves the previous checkpoint usable; a hung save is ended by its
bound.

Real launch.sh / torchrun processes on CPU (docs/reliability.md quotes the times these measure).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lib.trainer.checkpoint import latest_checkpoint
from tests.helpers import TINY_RUN, TINY_RUN_STEPS, REPO, cpu_env, launch, metric_rows, torchrun

pytestmark = pytest.mark.integration

EXIT_STOPPED = 75


def _wait_rows(run_dir: str, proc: subprocess.Popen, n: int, deadline_s: float = 240) -> None:
    end = time.time() + deadline_s
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"job ended before {n} steps:\n{proc.stdout.read()[-4000:]}")
        if len(metric_rows(run_dir)) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"fewer than {n} steps within {deadline_s}s")


def _ranks(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "topology.json")) as f:
        return json.load(f)["ranks"]


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_launch_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path, uninterrupted_tiny_run):
    steps, full, split = TINY_RUN_STEPS, uninterrupted_tiny_run, str(tmp_path / "split")

    proc = launch([*TINY_RUN, f"train.max_steps={steps}", f"run.dir={split}"])
    _wait_rows(split, proc, 2)
    ranks = _ranks(split)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, 60)
    elapsed = time.time() - sent
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    with open(os.path.join(split, "stopped.json")) as f:
        record = json.load(f)
    stopped_at = record["step"]
    assert record["signal"] == "SIGTERM" and 2 <= stopped_at < steps, record
    # The checkpoint is the step in flight: every trained step is kept, none after it was started.
    assert latest_checkpoint(split).endswith(f"step-{stopped_at}")
    assert [r["step"] for r in metric_rows(split)] == list(range(1, stopped_at + 1))
    assert not [r["pid"] for r in ranks if _alive(r["pid"])]
    print(f"SIGTERM to launch.sh: stopped at step {stopped_at}, exit {proc.returncode} after {elapsed:.1f}s")

    resume_line = next(line for line in out.splitlines() if "resume with: " in line)
    resume = shlex.split(resume_line.split("resume with: ", 1)[1])
    assert resume[-2:] == [f"run.dir={split}", "checkpoint.resume=true"], resume
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    res = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert f"resumed from {split}/checkpoints/step-{stopped_at} at step {stopped_at}" in res.stdout

    a, b = metric_rows(full), metric_rows(split)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert rb["loss"] == ra["loss"], (ra["step"], ra["loss"], rb["loss"])
        assert rb["samples_seen"] == ra["samples_seen"]  # the data position continued exactly
        assert rb["lr"] == ra["lr"]
    wa = load_file(os.path.join(full, "draft", "model.safetensors"))
    wb = load_file(os.path.join(split, "draft", "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize("target", ["engine", "torchrun"])
def test_sigterm_to_one_rank_or_to_torchrun_stops_the_job_at_a_checkpoint(tmp_path, target):
    run_dir = str(tmp_path / "run")
    proc = launch([*TINY_RUN, "train.max_steps=100000", f"run.dir={run_dir}"])
    _wait_rows(run_dir, proc, 2)
    ranks = _ranks(run_dir)
    if target == "torchrun":
        pid = int(subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "tools/torchrun.py"], capture_output=True,
                                 text=True).stdout.split()[0])
    else:
        pid = next(r["pid"] for r in ranks if r["role"] == target)
    sent = time.time()
    os.kill(pid, signal.SIGTERM)
    out = _finish(proc, 60)
    elapsed = time.time() - sent
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    with open(os.path.join(run_dir, "stopped.json")) as f:
        stopped_at = json.load(f)["step"]
    assert latest_checkpoint(run_dir).endswith(f"step-{stopped_at}")
    assert "resume with: " in out
    assert not [r["pid"] for r in ranks if _alive(r["pid"])]
    print(f"SIGTERM to {target}: stopped at step {stopped_at}, exit {proc.returncode} after {elapsed:.1f}s")


def test_a_save_that_dies_mid_write_keeps_the_previous_checkpoint_and_a_hung_one_ends_within_its_bound(tmp_path):
    """The step-4 save hangs between its shards and meta.json; run.save_timeout_s ends the trainer there
    (os._exit inside the write, as abrupt as a SIGKILL: no cleanup runs), so one launch shows both: the
    bound ends a hung save naming the cause, and the half-written checkpoint is ignored while the previous
    one resumes. (A rank SIGKILLed from outside ending the job: tests/test_failures.py.)"""
    run_dir = str(tmp_path / "run")
    proc = launch([*TINY_RUN, "train.max_steps=100000", "checkpoint.every=2", "run.save_timeout_s=3",
                   f"run.dir={run_dir}"], {"SPECDRAFT_TEST_SAVE_PAUSE": "4:600"})
    _wait_rows(run_dir, proc, 4)  # step 4's row is written before its save starts
    seen = time.time()
    out = _finish(proc, 90)
    elapsed = time.time() - seen
    assert proc.returncode == 1, out[-3000:]
    # launch.sh's summary comes from the rank's error file: rank, role, host, exit code and the message.
    assert ("launch.sh: root cause: rank 0 (trainer) on host " in out and ", exit code 1: TimeoutError: the "
            "checkpoint save at step 4 did not finish within run.save_timeout_s=3" in out), out[-3000:]
    assert elapsed < 3 + 20, f"{elapsed:.0f}s from the step to the exit"
    print(f"hung save: exit {proc.returncode} {elapsed:.1f}s after the step (bound 3 s)")
    ckpts = os.path.join(run_dir, "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, "step-4.tmp"))  # the half-written one is there ...
    assert not os.path.exists(os.path.join(ckpts, "step-4.tmp", "meta.json"))
    assert latest_checkpoint(run_dir) == os.path.join(ckpts, "step-2")  # ... and ignored

    res = torchrun(2, [*TINY_RUN, "train.max_steps=3", f"run.dir={run_dir}", "checkpoint.resume=true"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"resumed from {ckpts}/step-2 at step 2" in res.stdout
    assert metric_rows(run_dir)[-1]["step"] == 3


FORKED_CHILDREN_OF_A_RANK = """
import os, signal, time
from concurrent.futures.process import BrokenProcessPool
from lib.data.datasets import tokenizer_pool
from lib.launch.stopping import install_stop_handlers, stop_requested

install_stop_handlers()
child = os.fork()
if child == 0:  # a forked worker that has not yet run any initializer
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    os._exit(0)
_, status = os.waitpid(child, 0)
print("child killed by", signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else "nothing")
os.kill(os.getpid(), signal.SIGTERM)
print("rank noted", stop_requested())

def dies_at_five(i):
    if i == 5:  # as the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return i

try:
    with tokenizer_pool(2) as pool:
        list(pool.map(dies_at_five, range(64)))
except BrokenProcessPool:
    print("a killed worker breaks the pool")
"""


def test_forked_children_of_a_rank_die_of_sigterm_and_a_killed_tokenizer_worker_is_an_error():
    """A rank notes SIGTERM instead of dying of it; a child it forks (tokenizer workers) must still die of
    it, or a parent that terminates its workers and joins them waits forever (CI once hung 400 s in
    multiprocessing.Pool's exit). A worker killed mid-run breaks the pool with an error, no hang."""
    res = subprocess.run([sys.executable, "-c", FORKED_CHILDREN_OF_A_RANK], cwd=REPO, env=cpu_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "child killed by SIGTERM" in res.stdout
    assert "rank noted SIGTERM" in res.stdout
    assert "a killed worker breaks the pool" in res.stdout
