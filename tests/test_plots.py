"""The curves at the end of a run: drawn from metrics.jsonl once it holds enough training rows."""
from __future__ import annotations

import json
import os

import pytest

from lib.trainer.metrics import MIN_PLOTTED_ROWS, plot_curves

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_rows(run_dir, steps: int, evals: tuple[int, ...] = ()) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            loss = float("nan") if step == 3 else 5.0 / step  # a skipped step's NaN must not break the plot
            f.write(json.dumps({"step": step, "loss": loss, "acc_0": 0.1 * (step % 10), "acc_1": 0.05}) + "\n")
        for step in evals:
            f.write(json.dumps({"step": step, "accept_len": 1.5, "accept_len_k3": 1.5, "accept_len_k7": 1.7}) + "\n")


def test_a_short_run_draws_nothing(tmp_path):
    _write_rows(tmp_path, MIN_PLOTTED_ROWS - 1, evals=(0, 4))
    assert plot_curves(str(tmp_path)) == []
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".png")]


def test_a_run_with_enough_rows_gets_every_curve_as_a_png(tmp_path):
    _write_rows(tmp_path, MIN_PLOTTED_ROWS, evals=(0, 5, 10))
    written = plot_curves(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["accept_len.png", "accuracy.png", "loss.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_no_evaluation_rows_means_no_accept_len_curve(tmp_path):
    _write_rows(tmp_path, MIN_PLOTTED_ROWS + 5)
    assert sorted(os.path.basename(p) for p in plot_curves(str(tmp_path))) == ["accuracy.png", "loss.png"]
