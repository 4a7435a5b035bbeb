"""launch.sh's launch plan and slurm/train.sbatch on a CPU machine.

The plan (process count, run directory, device, MPS decision, torchrun command) is checked through
`--print-plan`, with stand-ins for the GPU and Slurm tools (tests/launch_stand_ins.py); the MPS lifecycle
and failure reporting that run the real launcher are in tests/test_launch.py.
"""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from tests.launch_stand_ins import LAUNCH, REPO, SBATCH, tools  # noqa: F401 - tools: a fixture

pytestmark = pytest.mark.integration


def plan(env: dict, *args: str) -> dict:
    done = subprocess.run(["bash", LAUNCH, "--print-plan", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = dict(line.split("=", 1) for line in done.stdout.splitlines())
    out["argv"] = shlex.split(out["command"])
    return out


def plan_error(env: dict, *args: str) -> str:
    done = subprocess.run(["bash", LAUNCH, "--print-plan", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    return done.stderr


def torchrun_args(p: dict) -> list[str]:
    """The Hydra overrides torchrun passes to the entry script."""
    argv = p["argv"]
    return argv[argv.index(os.path.join(REPO, "train.py")) + 1:]


def test_scripts_have_valid_bash_syntax():
    for script in (LAUNCH, SBATCH):
        done = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_plan_without_gpu_runs_one_pair_on_cpu(tools):
    env = {**tools, "CUDA_VISIBLE_DEVICES": ""}
    p = plan(env)
    assert (p["gpus"], p["device"], p["nproc"]) == ("0", "cpu", "2")
    assert p["mps"].startswith("off")
    assert p["run_dir"].startswith(os.path.join(REPO, "outputs") + os.sep)
    assert torchrun_args(p) == [f"run.dir={p['run_dir']}", "device=cpu"]
    assert "--standalone" in p["argv"] and "--nproc_per_node=2" in p["argv"]


@pytest.mark.parametrize("placement, gpus, nproc, mps", [
    ("colocate", 4, 8, "start (mps=auto)"),
    ("disaggregate", 4, 4, "off (placement=disaggregate does not share GPUs)"),
    ("sequential", 4, 4, "off (placement=sequential does not share GPUs)"),
])
def test_plan_process_count_follows_placement(tools, placement, gpus, nproc, mps):
    p = plan({**tools, "FAKE_GPUS": str(gpus)}, f"placement={placement}")
    assert (p["device"], p["nproc"], p["mps"]) == ("cuda", str(nproc), mps)
    assert "device=cpu" not in torchrun_args(p)
    assert torchrun_args(p)[-1] == f"placement={placement}"


def test_plan_counts_only_visible_gpus(tools):
    p = plan({**tools, "FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": "2,5"})
    assert (p["gpus"], p["nproc"]) == ("2", "4")


def test_plan_rejects_impossible_launches(tools):
    assert "even number of GPUs" in plan_error({**tools, "FAKE_GPUS": "3"}, "placement=disaggregate")
    assert "placement=nearby" in plan_error(tools, "placement=nearby")
    assert "mps=sometimes" in plan_error(tools, "mps=sometimes")
    assert "mps=auto or mps=off" in plan_error({**tools, "CUDA_VISIBLE_DEVICES": ""}, "mps=on")
    assert "device=cuda" in plan_error({**tools, "CUDA_VISIBLE_DEVICES": ""}, "device=cuda")
    assert "NPROC=3" in plan_error({**tools, "CUDA_VISIBLE_DEVICES": "", "NPROC": "3"})


def test_plan_nproc_override_and_user_environment_kept(tools):
    env = {**tools, "FAKE_GPUS": "2", "NPROC": "6", "OMP_NUM_THREADS": "5",
           "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    p = plan(env)
    assert p["nproc"] == "6"
    assert "OMP_NUM_THREADS=5" in p["env"] and "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:64" in p["env"]
    assert "OMP_NUM_THREADS=" in plan({**tools, "FAKE_GPUS": "2"})["env"]


def test_plan_user_run_dir_is_forwarded_once(tools, tmp_path):
    env = {**tools, "CUDA_VISIBLE_DEVICES": ""}
    p = plan(env, f"run.dir={tmp_path}/mine", "train.max_steps=0")
    assert p["run_dir"] == f"{tmp_path}/mine"
    assert [a for a in torchrun_args(p) if a.startswith("run.dir=")] == [f"run.dir={tmp_path}/mine"]
    quoted = plan(env, f"run.dir='{tmp_path}/my run'")
    assert quoted["run_dir"] == f"{tmp_path}/my run"
    assert torchrun_args(quoted) == ["device=cpu", f"run.dir='{tmp_path}/my run'"]


def test_plan_forwards_overrides_verbatim_in_order(tools):
    overrides = ["train.max_steps=0", "data.path=/d/my chats.jsonl", "target.name='q\"x'",
                 "+extra=[1, 2]", "mps=auto", "placement=colocate"]
    p = plan({**tools, "CUDA_VISIBLE_DEVICES": ""}, *overrides)
    assert torchrun_args(p) == [f"run.dir={p['run_dir']}", "device=cpu", *overrides]


def test_plan_quotes_a_run_dir_with_spaces_for_hydra(tools):
    p = plan({**tools, "CUDA_VISIBLE_DEVICES": "", "SPECDRAFT_RUN_DIR": "/tmp/runs/a b"})
    assert torchrun_args(p)[0] == "run.dir='/tmp/runs/a b'"


def test_sbatch_runs_launch_per_node_with_c10d_rendezvous(tools):
    env = {**tools, "CUDA_VISIBLE_DEVICES": "", "LAUNCH_DRY_RUN": "1", "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": REPO}
    done = subprocess.run(["bash", SBATCH, "train.max_steps=0", "note=a b"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    p = dict(line.split("=", 1) for line in done.stdout.splitlines())
    argv = shlex.split(p["command"])
    rdzv = argv[argv.index("--nnodes"):argv.index("--nnodes") + 8]
    assert rdzv == ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node-a:29500", "--rdzv_id", "42"]
    assert p["run_dir"].startswith(os.path.join(REPO, "outputs") + os.sep) and p["run_dir"].endswith("-job42")
    assert argv[-2:] == ["train.max_steps=0", "note=a b"]
    no_job = subprocess.run(["bash", SBATCH], env=tools, capture_output=True, text=True, timeout=60)
    assert no_job.returncode != 0 and "sbatch" in no_job.stderr
