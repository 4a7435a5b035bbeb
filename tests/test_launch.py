"""lib/launch/mps.py and launch.sh's MPS lifecycle and failure reporting on a CPU machine.

The MPS lifecycle and failure reporting run the real launcher, the real torchrun and real worker
processes, with stand-ins for the GPU tools (tests/launch_stand_ins.py says which and why); the launch
plan (`--print-plan`) and slurm/train.sbatch are checked in tests/test_launch_plan.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from lib.launch.mps import MpsDaemon, MpsError, daemon_alive, mps_status
from tests.launch_stand_ins import LAUNCH, REPO, tools  # noqa: F401 - tools: a fixture

pytestmark = pytest.mark.integration

# What torchrun runs in place of train.py: records what a rank sees, writes topology.json like
# train.py does, then fails / sleeps as the test asks through `fake.*` overrides.
ENTRY = r'''
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
run_dir = args["run.dir"]
seen = {k: os.environ.get(k) for k in ("SPECDRAFT_MPS", "CUDA_MPS_PIPE_DIRECTORY", "OMP_NUM_THREADS")}
seen.update(pid=os.getpid(), argv=sys.argv[1:])
if rank == 0:
    half = world // 2
    records = [dict(rank=r, local_rank=r, host="h", role="trainer" if r < half else "engine",
                    pair=r + half if r < half else r - half, device="cuda:0", pid=0) for r in range(world)]
    with open(os.path.join(run_dir, "topology.json"), "w") as f:
        json.dump({"ranks": records}, f)
with open(os.path.join(run_dir, f"seen-{rank}.json"), "w") as f:
    json.dump(seen, f)
if args.get("fake.cuda") == "1":
    import torch
    torch.cuda.set_device(0)
    assert torch.ones(1024, device="cuda").sum().item() == 1024
time.sleep(float(args.get("fake.sleep", 0)))
sys.exit(3 if str(rank) == args.get("fake.fail_rank") else 0)
'''


@pytest.fixture
def mps_dirs(monkeypatch):
    """Short pipe/log paths (Unix socket paths are limited to ~107 bytes); stops leftover stand-ins."""
    base = tempfile.mkdtemp(prefix="sdmps", dir="/tmp")
    pipe, log = os.path.join(base, "pipe"), os.path.join(base, "log")
    yield pipe, log
    pid_file = os.path.join(pipe, "nvidia-cuda-mps-control.pid")
    if os.path.exists(pid_file):
        os.kill(int(open(pid_file).read()), signal.SIGTERM)
    shutil.rmtree(base, ignore_errors=True)


def _events(log_dir: str) -> list[str]:
    path = os.path.join(log_dir, "control.log")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


# ---------------------------------------------------------------- lib/launch/mps.py


def _daemon(env_path: str, monkeypatch, pipe: str, log: str, **kw) -> MpsDaemon:
    monkeypatch.setenv("PATH", env_path)
    return MpsDaemon(pipe_dir=pipe, log_dir=log, probe_command=kw.pop("probe", ["true"]), **kw)


def test_daemon_started_is_quit_and_reused_is_left(tools, mps_dirs, monkeypatch):
    pipe, log = mps_dirs
    first = _daemon(tools["PATH"], monkeypatch, pipe, log)
    with first:
        assert first.active and first.started_here and daemon_alive(pipe)
        assert mps_status({"CUDA_MPS_PIPE_DIRECTORY": pipe}) == "on"
        env = first.client_env({})
        assert (env["CUDA_MPS_PIPE_DIRECTORY"], env["SPECDRAFT_MPS"]) == (pipe, "on")
        with _daemon(tools["PATH"], monkeypatch, pipe, log, mode="on") as second:
            assert second.active and not second.started_here
        assert daemon_alive(pipe), "a reused daemon must not be quit"
    assert _events(log) == ["start", "quit"]
    assert not daemon_alive(pipe)
    assert mps_status({"CUDA_MPS_PIPE_DIRECTORY": pipe}) == "off"
    assert mps_status({"CUDA_MPS_PIPE_DIRECTORY": pipe, "SPECDRAFT_MPS": "on"}) == "unknown"


def test_daemon_auto_falls_back_and_quits_what_it_started(tools, mps_dirs, monkeypatch, capfd):
    pipe, log = mps_dirs
    daemon = _daemon(tools["PATH"], monkeypatch, pipe, log, probe=[sys.executable, "-c", "raise SystemExit(7)"])
    assert daemon.start() is False
    assert "probe client failed" in daemon.fallback_reason and "time-slice" in capfd.readouterr().err
    assert _events(log) == ["start", "quit"] and not daemon_alive(pipe)
    env = daemon.client_env({"CUDA_MPS_PIPE_DIRECTORY": pipe, "OTHER": "1"})
    assert "CUDA_MPS_PIPE_DIRECTORY" not in env and env["SPECDRAFT_MPS"] == "off" and env["OTHER"] == "1"


def test_daemon_on_fails_with_log_tail(tools, mps_dirs, monkeypatch):
    pipe, log = mps_dirs
    monkeypatch.setenv("FAKE_MPS_START_ERROR", "operation not supported")
    with pytest.raises(MpsError, match="(?s)mps=on.*fake start failure: operation not supported"):
        _daemon(tools["PATH"], monkeypatch, pipe, log, mode="on").start()
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no control tool at all
    with pytest.raises(MpsError, match="not on PATH"):
        MpsDaemon("on", pipe_dir=pipe, log_dir=log).start()
    assert MpsDaemon("auto", pipe_dir=pipe, log_dir=log).start() is False


@pytest.mark.unit
def test_daemon_rejects_bad_mode():
    with pytest.raises(ValueError, match="mps='sometimes'.*auto, on, off"):
        MpsDaemon("sometimes")


# Run in a fresh interpreter: apply_role_mps_env refuses to run once CUDA is initialised, and other
# tests of the same pytest process (the GPU machine runs them all in one) may have initialised it.
MPS_ENV_CHECKS = r"""
import os, pytest, torch
from lib.launch.mps import apply_role_mps_env
assert apply_role_mps_env("engine", None, None) == {}
assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ
set_now = apply_role_mps_env("trainer", 40, "20G", device_ordinal=3)
assert set_now == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "3=20G"}
assert os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "3=20G"
assert apply_role_mps_env("engine", None, "0=30G,1=512M")["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=30G,1=512M"
for bad in (0, 101, 50.0, True):
    with pytest.raises(ValueError, match="trainer: MPS SM percentage"):
        apply_role_mps_env("trainer", bad, None)
for bad in ("20GB", "lots", "0=20G,x=1G", ""):
    with pytest.raises(ValueError, match="engine: MPS pinned memory limit"):
        apply_role_mps_env("engine", None, bad)
assert not torch.cuda.is_initialized(), "setting MPS limits must not initialise CUDA"
print("mps env checks passed")
"""


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_apply_role_mps_env_sets_limits_before_cuda():
    done = _fresh_python(MPS_ENV_CHECKS)
    assert done.returncode == 0 and "mps env checks passed" in done.stdout, done.stdout + done.stderr


@pytest.mark.gpu
def test_gpu_apply_role_mps_env_after_cuda_init_is_refused():
    done = _fresh_python("import torch; torch.zeros(1, device='cuda')\n"
                         "from lib.launch.mps import apply_role_mps_env\n"
                         "apply_role_mps_env('trainer', 40, None)")
    assert done.returncode != 0 and "called after CUDA was initialised" in done.stderr, done.stdout + done.stderr


# ---------------------------------------------------------------- launch.sh end to end (CPU ranks)


def _launch_env(tools: dict, tmp_path, pipe: str, log: str, probe: str) -> dict:
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    probe_cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)}"
    return {**tools, "FAKE_GPUS": "1", "SPECDRAFT_ENTRY": str(entry), "SPECDRAFT_MPS_PROBE": probe_cmd,
            "CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log}


def _seen(run_dir, rank: int) -> dict:
    return json.loads((run_dir / f"seen-{rank}.json").read_text())


PROBE_SEES_DAEMON = "import os, sys; sys.exit(not os.path.exists(os.environ['CUDA_MPS_PIPE_DIRECTORY'] + '/control'))"


def test_launch_failure_names_rank_and_role_and_quits_mps(tools, mps_dirs, tmp_path):
    pipe, log = mps_dirs
    run_dir = tmp_path / "run"
    env = _launch_env(tools, tmp_path, pipe, log, PROBE_SEES_DAEMON)
    done = subprocess.run(["bash", LAUNCH, f"run.dir={run_dir}", "fake.fail_rank=1"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr  # torchrun's exit code for a failed rank
    assert "rank 1 (local 1" in done.stderr and "engine, pair rank 0" in done.stderr, done.stderr
    assert "root cause" in done.stderr and "exit code 3" in done.stderr
    seen = _seen(run_dir, 0)
    assert (seen["SPECDRAFT_MPS"], seen["CUDA_MPS_PIPE_DIRECTORY"]) == ("on", pipe)
    assert _events(log) == ["start", "quit"]


def test_launch_reuses_running_daemon_and_leaves_it(tools, mps_dirs, tmp_path, monkeypatch):
    pipe, log = mps_dirs
    run_dir = tmp_path / "run"
    env = _launch_env(tools, tmp_path, pipe, log, PROBE_SEES_DAEMON)
    with _daemon(tools["PATH"], monkeypatch, pipe, log) as outer:
        done = subprocess.run(["bash", LAUNCH, f"run.dir={run_dir}", "mps=on"], env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert daemon_alive(pipe) and outer.started_here
        assert _events(log) == ["start"]
    assert _seen(run_dir, 1)["SPECDRAFT_MPS"] == "on"


def test_launch_auto_falls_back_when_probe_fails(tools, mps_dirs, tmp_path):
    pipe, log = mps_dirs
    run_dir = tmp_path / "run"
    env = _launch_env(tools, tmp_path, pipe, log, "raise SystemExit(1)")
    done = subprocess.run(["bash", LAUNCH, f"run.dir={run_dir}"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "time-slice" in done.stderr
    seen = _seen(run_dir, 0)
    assert (seen["SPECDRAFT_MPS"], seen["CUDA_MPS_PIPE_DIRECTORY"]) == ("off", None)
    assert _events(log) == ["start", "quit"]

    env["FAKE_MPS_START_ERROR"] = "operation not supported"
    failed = subprocess.run(["bash", LAUNCH, f"run.dir={tmp_path / 'run2'}", "mps=on"], env=env,
                            capture_output=True, text=True, timeout=180)
    assert failed.returncode != 0 and "operation not supported" in failed.stderr
    assert not (tmp_path / "run2" / "seen-0.json").exists(), "no rank may start when mps=on fails"


def test_launch_sigterm_stops_ranks_and_quits_mps(tools, mps_dirs, tmp_path):
    pipe, log = mps_dirs
    run_dir = tmp_path / "run"
    env = _launch_env(tools, tmp_path, pipe, log, PROBE_SEES_DAEMON)
    proc = subprocess.Popen(["bash", LAUNCH, f"run.dir={run_dir}", "fake.sleep=300"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((run_dir / f"seen-{r}.json").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.2)
        time.sleep(0.5)  # both seen files complete
        rank_pids = [_seen(run_dir, r)["pid"] for r in (0, 1)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, err
    assert "SIGTERM" in err and _events(log) == ["start", "quit"]
    for pid in rank_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------- real MPS (GPU machines only)

# The gpu marker skips these without CUDA (tests/conftest.py); they also need the MPS control tool.
needs_mps_tool = pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None,
                                    reason="needs nvidia-cuda-mps-control")

ALLOC_2G = "import torch; torch.empty(2 << 30, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize()"


@pytest.mark.gpu
@needs_mps_tool
def test_gpu_real_daemon_serves_clients_and_enforces_role_limits(mps_dirs):
    pipe, log = mps_dirs
    with MpsDaemon("on", pipe_dir=pipe, log_dir=log) as mps:
        assert mps.active and mps.started_here and mps_status(mps.client_env()) == "on"
        env = mps.client_env()
        free = subprocess.run([sys.executable, "-c", ALLOC_2G], env=env, capture_output=True, text=True, timeout=120)
        assert free.returncode == 0, free.stderr
        # The limit names the process's device; a 2 GiB allocation must then fail under a 1G cap.
        capped = dict(env, CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="0=1G", CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="50")
        over = subprocess.run([sys.executable, "-c", ALLOC_2G], env=capped, capture_output=True, text=True, timeout=120)
        assert over.returncode != 0 and "out of memory" in over.stderr.lower(), over.stderr
    assert not daemon_alive(pipe)
    assert "NEW CLIENT" in open(os.path.join(log, "control.log")).read()


@pytest.mark.gpu
@needs_mps_tool
def test_gpu_launch_runs_colocated_pair_under_real_mps(mps_dirs, tmp_path):
    pipe, log = mps_dirs
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECDRAFT_", "CUDA_MPS_"))}
    env.update(PYTHON=sys.executable, SPECDRAFT_ENTRY=str(entry), CUDA_VISIBLE_DEVICES="0",
               CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=log)
    run_dir = tmp_path / "run"
    done = subprocess.run(["bash", LAUNCH, f"run.dir={run_dir}", "mps=on", "fake.cuda=1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [_seen(run_dir, r)["SPECDRAFT_MPS"] for r in (0, 1)] == ["on", "on"]
    assert not daemon_alive(pipe)
    control_log = open(os.path.join(log, "control.log")).read()
    assert control_log.count("NEW CLIENT") >= 3 and "Cmd:quit" in control_log  # probe + 2 ranks
