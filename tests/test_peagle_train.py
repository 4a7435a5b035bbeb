"""draft=peagle end to end on CPU with real torchrun: a colocated pair (the engine captures, the trainer
trains under FSDP2) trains the tiny target's P-EAGLE draft, checkpoints and exports every 2 steps; a
resume from the step-2 checkpoint reproduces steps 3-4 bit for bit; eval.py evaluates the run directory
with no draft= and decodes exactly as greedy decoding, one draft forward per round.

One pair, not two: a 4-process launch costs a 2-core CI machine about twice a 2-process one, and FSDP2
across two trainers of an EAGLE draft is tests/test_trainer_dist.py's subject (1 trainer == 2 trainers),
a resharded resume tests/test_resume.py's.

One launch runs 4 steps unbroken; its directory, cut back to the step-2 checkpoint (later checkpoint,
final export and metrics rows removed), is resumed by a second launch: the checkpoint a stopped run
leaves is the same one (lib/trainer/loop.py checkpoint), and this spares CI a third launch.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lib.drafts.base import family_of_export
from lib.drafts.peagle.export import load_draft
from tests.helpers import metric_rows, torchrun

pytestmark = pytest.mark.integration

BASE = ["draft=peagle", "train.max_steps=4", "checkpoint.every=2", "engine.token_budget=256", "data.max_length=256",
        "eval.every=0", "train.log_every=1", "train.warmup_steps=1"]
DEPTHS = 8  # conf/draft/peagle.yaml num_depths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peagle")
    whole, split = root / "whole", root / "split"
    res = torchrun(2, [*BASE, f"run.dir={whole}"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shutil.copytree(whole, split, ignore=shutil.ignore_patterns("step-4", "draft", "summary.json", "*.png"))
    rows = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= 2))
    res = torchrun(2, [*BASE, f"run.dir={split}", "checkpoint.resume=true"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    return whole, split


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "model.safetensors"))


def test_a_colocated_pair_trains_and_exports_every_checkpoint(runs):
    whole, _ = runs
    topology = json.loads((whole / "topology.json").read_text())
    assert topology["placement"] == "colocate"
    roles = sorted((r["role"], r["pair_index"]) for r in topology["ranks"])
    assert roles == [("engine", 0), ("trainer", 0)]
    rows = metric_rows(str(whole))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert all(f"acc_{d}" in rows[-1] and f"ploss_{d}" in rows[-1] for d in range(DEPTHS))
    for step in (2, 4):
        export = whole / "checkpoints" / f"step-{step}" / "draft"
        assert family_of_export(str(export)) == "peagle"
        config = json.loads((export / "config.json").read_text())
        assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == DEPTHS
        assert load_draft(str(export)).config.num_depths == DEPTHS
    final, last = weights(whole / "draft"), weights(whole / "checkpoints" / "step-4" / "draft")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert not torch.equal(final["embed_tokens.weight"], weights(whole / "checkpoints" / "step-2" / "draft")[
        "embed_tokens.weight"])  # the embedding trains


def test_resume_reproduces_the_unbroken_run_bit_for_bit(runs):
    whole, split = runs
    a, b = metric_rows(str(whole)), metric_rows(str(split))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["loss", "grad_norm", "lr", "samples_seen", *(f"{m}_{d}" for m in ("acc", "ploss") for d in range(DEPTHS))]
    for ra, rb in zip(a[2:], b[2:]):
        assert {k: rb[k] for k in keys} == {k: ra[k] for k in keys}
    wa, wb = weights(whole / "draft"), weights(split / "draft")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_py_reads_the_family_from_the_run_dir_and_decodes_as_greedy(runs, tmp_path):
    import eval as eval_script

    whole, _ = runs
    out = tmp_path / "eval.json"
    assert eval_script.main(["--draft", str(whole), "--out", str(out), "--no-progress", "eval.num_prompts=2",
                             "eval.max_new_tokens=8", "eval.draft_tokens=[3]"]) == 0
    (k3,) = json.loads(out.read_text())["results"]
    assert k3["k"] == 3 and k3["matches_greedy"] is True and 1.0 <= k3["tau"] <= 4.0
    assert k3["draft_forwards"] == 1
