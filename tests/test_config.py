"""Config composition (Hydra compose API) and validation: each bad input fails fast and says why."""
from __future__ import annotations

import os

import pytest

import dataclasses
import enum

from lib.config import (
    CONF_DIR, AttnImpl, Config, ConfigError, DataConfig, Device, EngineConfig, LaunchShape, Placement, ProcessLayout,
    TargetConfig, TargetDtype, compose, resolve,
)
from lib.config.check import validate
from lib.config.choices import draft_families

pytestmark = pytest.mark.unit

CPU2 = LaunchShape(world_size=2, nproc_per_node=2, nnodes=1, gpus_per_node=0)


def _shipped(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def test_default_composes_and_validates():
    cfg = compose([])
    validate(cfg, CPU2)
    assert cfg.placement.name == Placement.colocate
    assert os.path.isfile(os.path.join(cfg.target.path, "config.json"))


@pytest.mark.parametrize("target", _shipped("target"))
def test_every_shipped_target_composes_and_validates(target):
    tiny = compose([]).target.path
    extra = [] if target == "tiny" else ["target.random_init=true", f"target.tokenizer={tiny}"]
    cfg = compose([f"target={target}", *extra])
    validate(cfg, CPU2)
    assert cfg.target.name == target


@pytest.mark.parametrize("placement", _shipped("placement"))
def test_every_shipped_placement_composes_and_validates(placement):
    cfg = compose([f"placement={placement}"])
    validate(cfg, CPU2)
    assert cfg.placement.name.value == placement


def test_jsonl_data_group_validates_with_a_path():
    data = compose([]).data.path
    validate(compose(["data=jsonl", f"data.path={data}"]), CPU2)


GPU_NODE = LaunchShape(world_size=8, nproc_per_node=8, nnodes=1, gpus_per_node=4)


@pytest.mark.parametrize("overrides, shape, needle", [
    (["train_frac=0"], CPU2, "train_frac=0"),
    (["infer_frac=1.0"], CPU2, "infer_frac=1.0"),
    (["train_frac=0.5", "infer_frac=0.45"], CPU2, "headroom"),
    ([], LaunchShape(3, 3, 1, 0), "even process count"),
    (["placement=disaggregate"], GPU_NODE, "needs 8 GPUs per node but 4 are visible"),
    ([], LaunchShape(8, 8, 1, 2), "needs 4 GPUs per node but 2 are visible"),
    (["engine.tp=3"], GPU_NODE, "engine.tp=3: must divide the 4 engines"),
    (["target.path=/nonexistent/model"], CPU2, "target.path='/nonexistent/model'"),
    (["data.path=/nonexistent/chat.jsonl"], CPU2, "data.path='/nonexistent/chat.jsonl'"),
    (["data=jsonl"], CPU2, "data.path=None"),
    (["target=qwen3_8b"], CPU2, "target.random_init=true"),
    (["device=cuda"], CPU2, "no GPU is visible"),
    (["handoff.slots=0"], CPU2, "handoff.slots=0"),
    (["data.max_length=4096", "engine.token_budget=1024"], CPU2, "data.max_length=4096"),
    (["data.template=nonexistent"], CPU2, "data.template='nonexistent': not a registered template; use one of auto,"),
    (["checkpoint.resume=true"], CPU2, "checkpoint.resume=true: run.dir=auto makes a fresh directory"),
    (["eval.every=5", "engine.tp=2"], GPU_NODE, "eval.every=5: online evaluation needs engine.tp=1"),
    (["train_frac=0.6", "infer_frac=0.4"], CPU2, "train_frac+infer_frac=1.0: must leave 0.10 headroom"),
    (["engine.attn_impl=varlen"], CPU2, "engine.attn_impl=varlen: needs a CUDA device and bf16/fp16 weights"),
    (["engine.attn_impl=varlen", "target.dtype=float32"], GPU_NODE, "engine.attn_impl=varlen: needs a CUDA"),
    (["draft=dflash", "train.recompute=true"], CPU2, "train.recompute=true: only the EAGLE-3 unroll has it"),
    (["train.max_time_s=-1"], CPU2, "train.max_time_s=-1.0: must be >= 0"),
])
def test_invalid_configs_fail_with_the_key_and_a_fix(overrides, shape, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), shape)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    (["placement=nowhere"], "placement/nowhere"),
    (["train.not_a_key=1"], "train.not_a_key: unknown key"),
    (["placement.name=sideways"], "placement.name='sideways': not one of colocate, disaggregate, sequential"),
    (["train.max_steps=many"], "train.max_steps"),
    # a family option its conf file does not set: the fix is the `+` that adds it
    (["draft=eagle3_1", "draft.options.head_init=random"], "Fix: add it with +draft.options.head_init=..."),
])
def test_unknown_options_fail_at_composition(overrides, needle):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert needle in str(err.value)
    assert "Fix:" in str(err.value)


def test_a_family_option_outside_its_conf_file_is_added_with_plus():
    cfg = compose(["draft=eagle3_1", "+draft.options.head_init=random"])
    assert dict(cfg.draft.options) == {"fc_norm": True, "head_init": "random"}


# ---------------------------------------------------------------------- choice-valued keys are enums


@pytest.mark.parametrize("override, key, allowed", [
    ("engine.attn_impl=bogus", "engine.attn_impl", "auto, varlen, sdpa, eager"),
    ("target.dtype=bf17", "target.dtype", "auto, bfloat16, float16, float32"),
    ("engine.backend=vllm", "engine.backend", "hf, sglang"),
    ("engine.varlen_kernel=fa3", "engine.varlen_kernel", "flash, cudnn"),
    ("data.overlong=drop", "data.overlong", "truncate, skip"),
    # the packages under lib/drafts/ (not an enum), so the list grows with each family
    ("draft.name=medusa", "draft.name", ", ".join(sorted(draft_families()))),
])
def test_bad_enum_value_is_one_line_naming_key_value_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        compose([override])
    msg = str(err.value)
    assert msg.startswith(f"{key}='{override.split('=')[1]}': not one of {allowed}"), msg
    assert "Fix:" in msg and "\n" not in msg


@pytest.mark.parametrize("field, value, key", [
    ("engine", EngineConfig(attn_impl="bogus"), "engine.attn_impl='bogus'"),
    ("engine", EngineConfig(backend="vllm"), "engine.backend='vllm'"),
    ("engine", EngineConfig(varlen_kernel="fa3"), "engine.varlen_kernel='fa3'"),
    ("target", TargetConfig(path=compose([]).target.path, dtype="bf17"), "target.dtype='bf17'"),
    ("data", dataclasses.replace(compose([]).data, overlong="drop"), "data.overlong='drop'"),
    ("draft", dataclasses.replace(compose([]).draft, name="medusa"), "draft.name='medusa'"),
])
def test_configs_built_in_python_are_checked_too(field, value, key):
    cfg = dataclasses.replace(compose([]), **{field: value})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, CPU2)


@pytest.mark.parametrize("spelling, canonical", [
    ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"), ("half", "float16"),
    ("fp32", "float32"), ("float", "float32"), ("auto", "auto"),
])
def test_target_dtype_keeps_the_short_spellings(spelling, canonical):
    import torch

    from lib.target.shape import resolve_dtype

    assert compose([f"target.dtype={spelling}"]).target.dtype == TargetDtype(canonical)
    expected = torch.float32 if canonical == "auto" else getattr(torch, canonical)
    assert resolve_dtype(spelling, torch.device("cpu")) == expected  # library callers pass strings


def test_resume_with_an_explicit_run_dir_is_fine(tmp_path):
    validate(compose(["checkpoint.resume=true", f"run.dir={tmp_path}"]), CPU2)


# ---------------------------------------------------------------------- resolve(): no auto, no None


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


RESOLVED_KEYS = ("device", "target.dtype", "engine.attn_impl", "engine.compile", "train.compile", "run.dir")


@pytest.mark.parametrize("shape, expect", [
    (CPU2, {"device": Device.cpu, "target.dtype": TargetDtype.float32, "engine.attn_impl": AttnImpl.sdpa,
            "engine.compile": False, "train.compile": False}),
    (GPU_NODE, {"device": Device.cuda, "target.dtype": TargetDtype.bfloat16, "engine.attn_impl": AttnImpl.varlen,
                "engine.compile": True, "train.compile": True}),
])
def test_resolved_config_has_no_auto_or_none(shape, expect, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    composed = compose([])
    cfg = resolve(composed, shape)
    leaves = dict(_leaves(cfg))
    for key, value in leaves.items():
        plain = value.value if isinstance(value, enum.Enum) else value
        # data.template=auto is a template's name (the tokenizer's own), not a choice left open.
        assert plain != "auto" or key == "data.template", key
    assert all(leaves[k] is not None for k in RESOLVED_KEYS)
    assert {k: leaves[k] for k in expect} == expect
    assert leaves["run.dir"].startswith(str(tmp_path / "outputs") + os.sep)
    assert composed.engine.compile is None and composed.run.dir == "auto", "resolve() returns a copy"
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))  # what train.py writes as the run's config.yaml
    assert text.count(": auto") == 1 and "template: auto" in text and "compile: null" not in text


def test_resolve_keeps_explicit_choices(tmp_path):
    cfg = resolve(compose(["target.dtype=fp32", "engine.compile=false", "train.compile=false",
                           f"run.dir={tmp_path}/run"]), GPU_NODE)
    assert (cfg.target.dtype, cfg.engine.attn_impl) == (TargetDtype.float32, AttnImpl.sdpa)  # no flash in fp32
    assert (cfg.engine.compile, cfg.train.compile, cfg.run.dir) == (False, False, f"{tmp_path}/run")


# ---------------------------------------------------------------------- the placement -> process-count rule


@pytest.mark.parametrize("placement, gpus, nproc, pairs, need", [
    (Placement.colocate, 0, 2, 1, 1), (Placement.disaggregate, 0, 2, 1, 2), (Placement.sequential, 0, 1, 1, 1),
    (Placement.colocate, 4, 8, 4, 4), (Placement.disaggregate, 4, 4, 2, 4), (Placement.sequential, 4, 4, 4, 4),
])
def test_process_layout_is_the_one_rule(placement, gpus, nproc, pairs, need):
    from lib.launch.topology import Topology

    layout = ProcessLayout.for_gpus(placement, gpus)
    assert (layout.nproc, layout.pairs, layout.gpus_needed) == (nproc, pairs, need)
    assert Topology(1, nproc, placement, use_cuda=gpus > 0).pairs_per_node == pairs


def test_process_layout_refuses_what_cannot_pair():
    with pytest.raises(ConfigError, match="placement=disaggregate: needs an even number of GPUs per node"):
        ProcessLayout.for_gpus(Placement.disaggregate, 3)
    with pytest.raises(ConfigError, match="NPROC=3: placement=colocate needs an even process count"):
        ProcessLayout(Placement.colocate, 3, key="NPROC")
    assert ProcessLayout(Placement.sequential, 3).pairs == 3


def test_command_line_prints_nproc_or_one_error_line(capsys):
    from lib.config.check import main

    assert main(["nproc", "--placement", "colocate", "--gpus", "4"]) == 0
    assert capsys.readouterr().out == "8\n"
    assert main(["check", "--gpus", "0", "--", "device=cpu"]) == 0
    assert capsys.readouterr().out == "nproc=2\n"
    assert main(["check", "--gpus", "0", "--", "engine.attn_impl=bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: engine.attn_impl='bogus'") and err.count("\n") == 1


# ---------------------------------------------------------------------- the whole launch, real processes

BAD = {  # override(s) -> the start of the one line that must name them
    "engine.attn_impl=bogus": "engine.attn_impl='bogus'",
    "target.dtype=bf17": "target.dtype='bf17'",
    "data.template=nonexistent": "data.template='nonexistent'",
    "checkpoint.resume=true": "checkpoint.resume=true",
    "train_frac=0.6 infer_frac=0.4": "train_frac+infer_frac=1.0",
    "draft=dflash train.loss=lk": "train.loss=lk",  # the EAGLE-3 line's losses only
}


@pytest.mark.integration
@pytest.mark.parametrize("bad", list(BAD))
def test_launch_sh_prints_the_line_once_and_exits_2_before_torchrun(bad, tmp_path):
    import subprocess
    import time

    from tests.helpers import REPO, cpu_env

    run_dir = tmp_path / "run"
    extra = [] if bad.startswith("checkpoint.") else [f"run.dir={run_dir}"]  # resume needs run.dir=auto
    start = time.monotonic()
    done = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), *bad.split(), *extra], cwd=tmp_path,
                          env=cpu_env(), capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert time.monotonic() - start < 30
    assert out.count(BAD[bad]) == 1 and out.count("\n") == 1, out
    assert "Traceback" not in out and "torch.distributed" not in out
    assert not run_dir.exists() and not (tmp_path / "outputs").exists(), "nothing may start"


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["engine.attn_impl=bogus", "checkpoint.resume=true"])
def test_bare_torchrun_prints_the_line_once_and_ranks_exit_2(bad):
    import time

    from tests.helpers import torchrun

    start = time.monotonic()
    done = torchrun(2, bad.split(), timeout=60)
    out = done.stdout + done.stderr
    assert time.monotonic() - start < 30, out
    # One rank per node logs the line, whichever fails first; torchrun's own summary may quote it again
    # from the ranks' error files (lib/launch/stopping.py records every rank's exception there).
    logged = [line for line in out.splitlines() if "ERROR config error: " + BAD[bad] in line]
    assert len(logged) == 1, out
    assert "exitcode  : 2" in out, out  # torchrun names the first rank's exit code in its summary
    assert done.returncode != 0


@pytest.mark.integration
def test_plan_reports_the_check_and_a_fresh_sbatch_dir_cannot_resume(tmp_path):
    import subprocess

    from tests.helpers import REPO, cpu_env

    def plan(*args, **env):
        done = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "--print-plan", *args],
                              env={**cpu_env(), **env}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(line.split("=", 1) for line in done.stdout.splitlines())["config"]

    assert plan() == "ok"
    assert plan("target.dtype=bf17").startswith("config error: target.dtype='bf17'")
    assert plan("checkpoint.resume=true", SPECDRAFT_RUN_DIR=str(tmp_path)) == "ok"  # chosen by hand
    assert plan("checkpoint.resume=true", SPECDRAFT_RUN_DIR=str(tmp_path),
                SPECDRAFT_RUN_DIR_FRESH="1").startswith("config error: checkpoint.resume=true")
