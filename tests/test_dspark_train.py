"""draft=dspark end to end on CPU with real torchrun: 2 colocated pairs (engines capture the DSpark plan,
aux layers and the final hidden state, through the handoff; 2 FSDP2 trainers), an export per
checkpoint in speculators' layout, exact resume, and eval.py on the run directory without draft=
(the family read from the export) decoding exactly as greedy decoding does.

One uninterrupted run is shared by the assertions (module fixture). Resume: a copy of that run
directory as it stood at the step-2 checkpoint (later checkpoint, exports and metric rows removed) is
resumed to step 4 and must reproduce the uninterrupted run's steps 3-4 and final weights bit for bit.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import eval_main, metric_rows, rewound_copy, torchrun

pytestmark = pytest.mark.integration

BLOCK = 4
BASE = ["draft=dspark", "train.max_steps=4", "checkpoint.every=2", "engine.token_budget=256", "data.max_length=256",
        "eval.every=0", "train.log_every=1", "train.warmup_steps=1", "draft.options.num_layers=2",
        f"draft.options.block_size={BLOCK}", "draft.options.markov_rank=32", f"eval.draft_tokens=[{BLOCK}]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dspark") / "run")
    res = torchrun(4, [*BASE, f"run.dir={out}"], timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return out


def test_two_colocated_pairs_train_and_export_every_checkpoint_in_speculators_layout(run_dir):
    with open(os.path.join(run_dir, "topology.json")) as f:
        topology = json.load(f)
    assert topology["placement"] == "colocate"
    assert sorted(r["role"] for r in topology["ranks"]) == ["engine", "engine", "trainer", "trainer"]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert all(f"acc_{k}" in rows[-1] for k in range(BLOCK)) and f"acc_{BLOCK}" not in rows[-1]
    assert {"kl", "conf_bce", "conf_abs_err", "tv_accept_len", "sim_accept_len"} <= set(rows[-1])
    exports = [os.path.join(run_dir, "checkpoints", f"step-{s}", "draft") for s in (2, 4)] + [
        os.path.join(run_dir, "draft")]
    states = []
    for directory in exports:
        with open(os.path.join(directory, "config.json")) as f:
            meta = json.load(f)
        assert meta["speculators_model_type"] == "dspark" and meta["block_size"] == BLOCK
        assert meta["aux_hidden_state_layer_ids"] == [2, 6]  # ours [1, 5] (2 layers over [1, L-3]) + 1
        assert meta["speculators_config"]["verifier"]["name_or_path"].endswith("tiny_target")
        states.append(load_file(os.path.join(directory, "model.safetensors")))
    assert "markov_head.markov_w1.weight" in states[0] and "confidence_head.proj.bias" in states[0]
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[2])  # the final export is step 4's
    assert not torch.equal(states[0]["fc.weight"], states[1]["fc.weight"])


def test_resume_from_a_checkpoint_continues_exactly(run_dir, tmp_path):
    resumed = str(tmp_path / "resumed")
    rewound_copy(run_dir, resumed)
    res = torchrun(4, [*BASE, f"run.dir={resumed}", "checkpoint.resume=true"], timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    whole, split = metric_rows(run_dir), metric_rows(resumed)
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], split[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["samples_seen"] == a["samples_seen"]
    wa = load_file(os.path.join(run_dir, "draft", "model.safetensors"))
    wb = load_file(os.path.join(resumed, "draft", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_py_reads_the_family_from_the_run_directory_and_decodes_as_greedy(run_dir, tmp_path):
    result = str(tmp_path / "eval.json")
    assert eval_main(["--draft", run_dir, "--out", result, "--no-progress", f"eval.draft_tokens=[{BLOCK}]",
                      "eval.num_prompts=3", "eval.max_new_tokens=12"]) == 0
    with open(result) as f:
        (row,) = json.load(f)["results"]
    assert row["k"] == BLOCK and row["matches_greedy"] is True and row["tau"] >= 1.0
