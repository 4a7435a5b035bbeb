"""train.max_time_s: a wall-clock budget ends the run like max_steps does (final checkpoint, export, exit 0),
with every trainer at the same step. (A negative budget is refused in tests/test_config.py.)"""
from __future__ import annotations

import os
import re

import pytest

from lib.trainer.checkpoint import latest_checkpoint
from tests.helpers import metric_rows

pytestmark = pytest.mark.integration


def test_time_budget_ends_run_at_a_checkpointed_step(time_limited_run):
    # Two pairs: the trainers must agree on the last step or the next collective would hang. The run
    # (tests/conftest.py) also logs to TensorBoard with train.loss=lk for tests/test_metric_sinks.py.
    run_dir, log = time_limited_run
    steps = [r["step"] for r in metric_rows(run_dir)]
    assert 1 < len(steps) < 100000
    assert steps == list(range(1, len(steps) + 1))
    last = steps[-1]
    assert re.search(rf"train.max_time_s=4 reached after step {last}\b", log), log[-4000:]
    assert latest_checkpoint(run_dir).endswith(f"step-{last}")
    assert os.path.isfile(os.path.join(run_dir, "draft", "config.json"))
    assert not os.path.exists(os.path.join(run_dir, "stopped.json"))  # a normal end, not a preemption
