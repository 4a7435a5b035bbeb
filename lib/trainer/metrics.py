"""metrics.jsonl, summary.json and the PNG curves of a run (written by the trainer leader only)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from lib.config import MetricsConfig
from lib.trainer.metric_sinks import open_sinks, scalars_of


class MetricsWriter:
    """Appends one JSON object per line; a resumed run appends to the same file. The same rows go to the
    sinks of `sinks` (TensorBoard, W&B; lib/trainer/metric_sinks.py). Only the writer built with
    enabled=True (the trainer leader) opens any file or dashboard run."""

    def __init__(self, run_dir: str, enabled: bool, sinks: Optional[MetricsConfig] = None, start_step: int = 0,
                 run_config: Optional[dict[str, Any]] = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self._file = open(self.path, "a", buffering=1) if enabled else None
        self._sinks = open_sinks(run_dir, sinks, start_step, run_config) if enabled else []

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row, allow_nan=True) + "\n")
        if self._sinks and "step" in row:
            scalars = scalars_of(row)
            for sink in self._sinks:
                sink.write(int(row["step"]), scalars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


# A run that logged fewer training rows draws no curves: a handful of points is no curve, and matplotlib
# costs ~2 s of CPU at the end of every short run (smoke runs, the test suite's hundred launches).
MIN_PLOTTED_ROWS = 10


def plot_curves(run_dir: str, min_rows: int = MIN_PLOTTED_ROWS) -> list[str]:
    """loss.png, accuracy.png and (if evaluated) accept_len.png when metrics.jsonl holds at least `min_rows`
    training rows; returns the files written."""
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "accept_len" in r]
    written: list[str] = []
    if len(train_rows) < min_rows:
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        path = os.path.join(run_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    if train_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*_series(train_rows, "loss"), label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("TTT loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        save(fig, "loss.png")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = sorted((k for k in train_rows[-1] if k.startswith("acc_")), key=lambda k: int(k[4:]))
        for k in keys:
            ax.plot(*_series(train_rows, k), label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("draft/target argmax agreement")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "accuracy.png")
    if eval_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        # accept_len repeats the first accept_len_k{K}: plot the per-k series only.
        keys = sorted({k for r in eval_rows for k in r if k.startswith("accept_len_k")}) or ["accept_len"]
        for k in keys:
            ax.plot(*_series(eval_rows, k), marker="o", label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens per target forward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "accept_len.png")
    return written


def write_summary(run_dir: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "accept_len" in r]
    summary: dict[str, Any] = {"run_dir": run_dir, "steps": train_rows[-1]["step"] if train_rows else 0}
    if train_rows:
        first, last = train_rows[0], train_rows[-1]
        summary["first"] = {k: first[k] for k in ("step", "loss", "acc_0") if k in first}
        summary["last"] = {k: last[k] for k in last if k.startswith(("loss", "acc_", "sim_accept"))}
        times = [r["step_time_s"] for r in train_rows[1:] if "step_time_s" in r] or [0.0]
        summary["mean_step_time_s"] = sum(times) / len(times)
        summary["mean_tokens_per_s"] = sum(r.get("tokens_per_s", 0.0) for r in train_rows[1:]) / max(1, len(train_rows) - 1)
        summary["samples_seen"] = last.get("samples_seen")
    if eval_rows:
        summary["eval_first"] = eval_rows[0]
        summary["eval_last"] = eval_rows[-1]
    summary["files"] = {
        "metrics": "metrics.jsonl", "config": "config.yaml", "topology": "topology.json",
        "draft_export": "draft/", "checkpoints": "checkpoints/",
        "plots": sorted(f for f in os.listdir(run_dir) if f.endswith(".png")),
    }
    summary.update(extra or {})
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
