"""Shared test utilities: run the real torchrun on this machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def torchrun(nproc: int, overrides: list[str], timeout: float = 300, nnodes: int = 1, node_rank: int = 0,
             port: int | None = None, wait: bool = True):
    """Start train.py under torchrun; returns CompletedProcess (wait) or Popen."""
    if nnodes == 1:
        launch = ["--standalone"]
    else:
        launch = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
                  f"--master_port={port}"]
    cmd = TORCHRUN + launch + [f"--nproc_per_node={nproc}", os.path.join(REPO, "train.py"), "device=cpu", *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
