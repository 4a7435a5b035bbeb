"""draft=dflash end to end on CPU: launch.sh trains the tiny target's DFlash draft (engine + trainer
under torchrun, the strategy's capture plan through the handoff), the loss falls, per-position
accuracies and online block-drafting evaluation land in metrics.jsonl, the export is in the DFlash
layout, and eval.py decodes with it exactly as greedy decoding does."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import eval_main, launch, metric_rows, rewound_copy, torchrun

pytestmark = pytest.mark.integration


def test_launch_sh_trains_dflash_with_falling_loss_online_eval_export_and_greedy_equal_eval(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = launch(["draft=dflash", f"run.dir={run_dir}", "train.max_steps=20", "engine.token_budget=512",
                   "data.max_length=256", "eval.every=10", "eval.draft_tokens=[15]", "eval.num_prompts=4",
                   "eval.max_new_tokens=16", "train.log_every=5", "train.warmup_steps=2"])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "loss weights dpace (alpha 0.5)" in out, out[-3000:]  # the default weighting
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    early = sum(r["loss"] for r in rows[1:5]) / 4
    late = sum(r["loss"] for r in rows[-5:]) / 5
    assert late < 0.85 * early, [round(r["loss"], 3) for r in rows]
    assert all(f"acc_{j}" in rows[-1] for j in range(15)) and "acc_15" not in rows[-1]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "accept_len_k15" in r]
    assert [r["step"] for r in evals] == [0, 10, 20] and all(r["accept_len"] >= 1.0 for r in evals)
    with open(os.path.join(run_dir, "draft", "config.json")) as f:
        meta = json.load(f)
    assert meta["architectures"] == ["DFlashDraftModel"] and meta["block_size"] == 16
    assert meta["dflash_config"]["target_layer_ids"] == [1, 2, 3, 4, 5]
    result = str(tmp_path / "eval.json")
    assert eval_main(["--draft", os.path.join(run_dir, "draft"), "--out", result, "--no-progress", "draft=dflash",
                      "eval.draft_tokens=[15]", "eval.num_prompts=4", "eval.max_new_tokens=16"]) == 0
    with open(result) as f:
        (k15,) = json.load(f)["results"]
    assert k15["k"] == 15 and k15["matches_greedy"] is True and k15["tau"] >= 1.0


def test_dflash_decay_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """Under the decay position weights (draft.options.loss_weights=decay; the launch above trains with the
    default D-PACE): the option reaches the trainer, and resumed from the step-4 checkpoint of an 8-step run
    (its directory as it stood then) equals the 8 steps: the checkpoint holds the draft and optimiser, and
    the anchors come from the run seed and each batch's tokens (no sampler state to lose)."""
    base = ["draft=dflash", "draft.options.loss_weights=decay", "engine.token_budget=256", "data.max_length=256",
            "eval.every=0", "train.log_every=1", "train.warmup_steps=2", "train.max_steps=8", "checkpoint.every=4"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")

    def train(run_dir: str, *extra: str) -> tuple[str, dict]:
        # Bare torchrun: launch.sh's own path is the test above's (saves its ~3 s a launch).
        res = torchrun(2, [*base, f"run.dir={run_dir}", *extra], timeout=240)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert "loss weights decay (gamma 7)" in out, out[-3000:]
        return out, {r["step"]: r["loss"] for r in metric_rows(run_dir)}

    _, whole_losses = train(whole)
    # The resumed run starts from the uninterrupted run's directory as it stood at its step-4 checkpoint.
    rewound_copy(whole, split, last_step=4, checkpoint="step-8")
    out, split_losses = train(split, "checkpoint.resume=true")
    losses = {"whole": whole_losses, "split": split_losses}
    assert "resumed from" in out and "step-4" in out, out[-3000:]
    assert sorted(losses["split"]) == list(range(1, 9))
    for step in range(5, 9):
        assert losses["split"][step] == pytest.approx(losses["whole"][step], rel=1e-6), (step, losses)
    whole_w = load_file(os.path.join(whole, "draft", "model.safetensors"))
    split_w = load_file(os.path.join(split, "draft", "model.safetensors"))
    assert whole_w.keys() == split_w.keys() and all(torch.equal(whole_w[k], split_w[k]) for k in whole_w)
