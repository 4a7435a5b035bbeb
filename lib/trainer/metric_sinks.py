"""Dashboards beside metrics.jsonl: TensorBoard event files and a Weights & Biases run.

Each sink receives exactly the rows metrics.jsonl gets, from the trainer leader only. Only numbers are
logged (a row's strings and lists have no scalar curve); the row's `step` is the x axis. The packages
are optional: lib/config/check.py refuses a sink whose package is missing before the run starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from typing import Any, Optional, Protocol

from lib.config import MetricsConfig, WandbMode, _as_enum

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class MetricSink(Protocol):
    def write(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric entries but `step` (booleans as 0/1; NaN kept: a NaN loss is worth seeing)."""
    out = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


class TensorBoardSink:
    """Event files under run_dir/tensorboard; a resume purges the replayed steps from the earlier files."""

    def __init__(self, run_dir: str, start_step: int):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides the older files' events at or after the resumed step, so the
        # steps trained again after a restart from a checkpoint are not drawn twice.
        # The suffix: event files are named by the second and the host, so a second writer in the same
        # second (a quick resume) would overwrite the first file; nanoseconds keep the names apart and
        # in time order, which is the order TensorBoard reads them in (the purge must come last).
        self._writer = SummaryWriter(logdir=os.path.join(run_dir, TENSORBOARD_DIR), flush_secs=10,
                                     purge_step=start_step if start_step > 0 else None,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per run directory: its id is kept in run_dir/wandb_run_id, so a resume continues it."""

    def __init__(self, run_dir: str, cfg: MetricsConfig, run_config: Optional[dict[str, Any]]):
        import wandb

        w = cfg.wandb
        mode = _as_enum("metrics.wandb.mode", w.mode, WandbMode)
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        try:
            self._run = wandb.init(project=w.project, entity=w.entity, name=w.name or os.path.basename(run_dir),
                                   mode=mode.value, dir=run_dir, id=run_id, resume="allow",
                                   tags=list(w.tags) or None, config=run_config,
                                   settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:  # wandb raises its own types (no API key, no network, ...)
            raise RuntimeError(f"metrics.wandb.project={w.project!r}: W&B did not start ({e}); log in with "
                               "`wandb login`, or set metrics.wandb.mode=offline (no network needed; "
                               "`wandb sync` later), or metrics.wandb.project=null") from e

    def write(self, step: int, scalars: dict[str, float]) -> None:
        # W&B refuses steps that go back (a resume replays those after the checkpoint): drop them.
        if step >= (self._run.step or 0):
            self._run.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self._run.finish()


def config_dict(cfg: Any) -> dict[str, Any]:
    """A resolved Config as plain JSON types (enums as their values) for W&B's run config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def open_sinks(run_dir: str, cfg: Optional[MetricsConfig], start_step: int = 0,
               run_config: Optional[dict[str, Any]] = None) -> list[MetricSink]:
    sinks: list[MetricSink] = []
    if cfg is None:
        return sinks
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir, start_step))
    if cfg.wandb.project:
        sinks.append(WandbSink(run_dir, cfg, run_config))
    return sinks
