"""draft=dflash2 end to end on CPU under the real torchrun: a colocated pair (FSDP2 over the trainer,
the capture plan's aux layers and final hidden state through the handoff) trains a few steps with
online evaluation on the pair's engine; every checkpoint exports both layouts; a resume from the step-2
checkpoint continues exactly like the uninterrupted run; eval.py on the run directory (no draft=) finds
the family in the export, decodes exactly as greedy decoding does and reports tokens per target forward.

One launch is shared by every assertion (module fixture); the resumed run starts from a copy of the
run directory as it stood at the step-2 checkpoint (the newer checkpoint, the later metric rows and
the final exports removed), which is what a run stopped there leaves.

One pair, not two: a 4-process launch costs a 2-core CI machine about twice a 2-process one. DFlash2 is
DFlash's block draft with new layers; two trainers giving one trainer's gradient for DFlash is
tests/test_dflash_dist.py's subject, two colocated pairs of a block draft tests/test_dspark_train.py's.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import eval_main, metric_rows, rewound_copy, torchrun

pytestmark = pytest.mark.integration

TRAIN = ["draft=dflash2", "draft.options.num_layers=2", "draft.options.selector_rank=32", "engine.token_budget=256",
         "data.max_length=256", "eval.every=2", "eval.num_prompts=2", "eval.max_new_tokens=8", "train.log_every=1",
         "train.warmup_steps=1", "train.max_steps=4", "checkpoint.every=2"]
LAYOUTS = ("draft", "draft_speculators")


def _weights(directory: str) -> dict:
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash2")
    whole, split = str(root / "whole"), str(root / "split")
    done = torchrun(2, [*TRAIN, f"run.dir={whole}"], timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rewound_copy(whole, split, LAYOUTS)
    resumed = torchrun(2, [*TRAIN, f"run.dir={split}", "checkpoint.resume=true"], timeout=400)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    result = str(root / "eval.json")
    assert eval_main(["--draft", whole, "--out", result, "--no-progress", "eval.num_prompts=3",
                      "eval.max_new_tokens=12"]) == 0
    with open(result) as f:
        return whole, split, resumed.stdout + resumed.stderr, json.load(f)


def test_a_colocated_pair_trains_the_draft_with_its_metrics(runs):
    whole, *_ = runs
    with open(os.path.join(whole, "topology.json")) as f:
        roles = [r["role"] for r in json.load(f)["ranks"]]
    assert sorted(roles) == ["engine", "trainer"]
    rows = metric_rows(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and {"kl", "selector_ce", "recall_at_k", "acc_6", "unary_acc_6"} <= set(r) for r in rows)
    assert "acc_7" not in rows[-1]  # block 8: drafted indices 0..6
    with open(os.path.join(whole, "metrics.jsonl")) as f:  # online evaluation: the drafter on the pair's engine
        evals = [r for r in map(json.loads, f) if "accept_len_k7" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["accept_len"] >= 1.0 for r in evals)


def test_every_checkpoint_exports_both_layouts(runs):
    whole, *_ = runs
    for step in (2, 4):
        for layout in LAYOUTS:
            with open(os.path.join(whole, "checkpoints", f"step-{step}", layout, "config.json")) as f:
                meta = json.load(f)
            assert meta["architectures"] == ["DFlash2DraftModel"]
            assert (meta.get("speculators_model_type") == "dflash2") == (layout == "draft_speculators")
    research = json.load(open(os.path.join(whole, "draft", "config.json")))
    assert research["dflash_config"]["target_layer_ids"] == [1, 5] and research["dflash_config"]["selector_rank"] == 32
    final, last = _weights(os.path.join(whole, "draft")), _weights(os.path.join(whole, "checkpoints", "step-4", "draft"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert not torch.equal(_weights(os.path.join(whole, "checkpoints", "step-2", "draft"))["fc.weight"], final["fc.weight"])


def test_a_resume_from_the_step_2_checkpoint_continues_exactly(runs):
    whole, split, log, _ = runs
    assert "resumed from" in log and "step 2" in log
    losses = {r["step"]: r["loss"] for r in metric_rows(whole)}
    resumed = {r["step"]: r["loss"] for r in metric_rows(split)}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6), (step, losses, resumed)
    for layout in LAYOUTS:
        a, b = _weights(os.path.join(whole, layout)), _weights(os.path.join(split, layout))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layout


def test_eval_py_on_the_run_dir_finds_dflash2_and_decodes_exactly_greedy(runs):
    *_, report = runs
    (k7,) = report["results"]
    print(f"\ndflash2 after 4 CPU steps: {k7['tau']:.2f} tokens per target forward at k={k7['k']}")
    assert k7["k"] == 7 and k7["matches_greedy"] is True and k7["tau"] >= 1.0
