"""Stand-ins for the GPU and cluster tools that launch.sh and slurm/train.sbatch call, for the launch
tests on a CPU machine (tests/test_launch.py, tests/test_launch_plan.py). Helpers only: no tests here.

Stand-ins, and why: this machine has no GPU, no NVIDIA driver and no Slurm, so `nvidia-smi`,
`nvidia-cuda-mps-control`, `scontrol` and `srun` cannot run here. Small executables put first on
PATH take their place. The MPS stand-in behaves like the real daemon as observed on the lent H100
(`-d` forks a daemon that serves a Unix socket `<pipe>/control` and writes a pid file; a client
with no daemon prints "Cannot find MPS control daemon process" and exits 1; `quit` removes the pid
file but leaves the socket), so the lifecycle rules — start only if absent, quit only what we
started, auto falls back, on fails with the log tail, quit on SIGTERM — are exercised for real.
The client probe is replaced through SPECDRAFT_MPS_PROBE because a CUDA call cannot succeed here.

`tools` is a fixture: a test module imports it by name to use it.
"""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.sh")
SBATCH = os.path.join(REPO, "slurm", "train.sbatch")

FAKE_MPS_CONTROL = r'''#!PYTHON
import os, socket, sys
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
control = os.path.join(pipe, "control")
pid_file = os.path.join(pipe, "nvidia-cuda-mps-control.pid")

def log(line):
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "control.log"), "a") as f:
        f.write(line + "\n")

def ask(command):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(control)
    except OSError:
        return None
    s.sendall(command.encode())
    s.shutdown(socket.SHUT_WR)
    return s.makefile().read()

if sys.argv[1:] == ["-d"]:
    if os.environ.get("FAKE_MPS_START_ERROR"):
        log("fake start failure: " + os.environ["FAKE_MPS_START_ERROR"])
        sys.exit(1)
    if ask("get_server_list") is not None:
        print("An instance of this daemon is already running")
        sys.exit(1)
    if os.fork():
        sys.exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if os.path.exists(control):
        os.unlink(control)
    server = socket.socket(socket.AF_UNIX)
    server.bind(control)
    server.listen(16)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    log("start")
    while True:
        conn, _ = server.accept()
        command = conn.makefile().read().strip()
        if command == "quit":
            os.unlink(pid_file)
            log("quit")
            conn.close()
            os._exit(0)
        conn.sendall(b"\n")
        conn.close()
else:
    reply = ask(sys.stdin.read().strip())
    if reply is None:
        print("Cannot find MPS control daemon process")
        sys.exit(1)
    sys.stdout.write(reply)
'''

FAKE_NVIDIA_SMI = """#!/bin/sh
i=0
while [ "$i" -lt "${FAKE_GPUS:-0}" ]; do echo "GPU $i: Fake GPU (UUID: GPU-fake-$i)"; i=$((i + 1)); done
"""

FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 1
echo node-a; echo node-b
"""

# Drops srun's own options and runs the task once, as on one node.
FAKE_SRUN = """#!/bin/sh
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""


def _write_exe(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text.replace("#!PYTHON", "#!" + sys.executable))
    os.chmod(path, 0o755)


@pytest.fixture
def tools(tmp_path):
    """A PATH directory with the stand-ins, and an environment using them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-cuda-mps-control", FAKE_MPS_CONTROL), ("nvidia-smi", FAKE_NVIDIA_SMI),
                       ("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        _write_exe(str(bin_dir / name), text)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CUDA_", "SPECDRAFT_", "PYTORCH_", "SLURM_", "LAUNCH_")) and k not in ("NPROC", "OMP_NUM_THREADS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable
    return env

