"""Config composition (Hydra compose API) and validation: each bad input fails fast and says why."""
from __future__ import annotations

import os

import pytest

from lib.config import CONF_DIR, ConfigError, LaunchShape, Placement, compose, validate

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
])
def test_invalid_configs_fail_with_the_key_and_a_fix(overrides, shape, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), shape)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    (["placement=nowhere"], "placement/nowhere"),
    (["train.not_a_key=1"], "train.not_a_key: unknown key"),
    (["placement.name=sideways"], "placement.name: Invalid value 'sideways'"),
    (["train.max_steps=many"], "train.max_steps"),
])
def test_unknown_options_fail_at_composition(overrides, needle):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert needle in str(err.value)
    assert "Fix:" in str(err.value)
