"""One run per run directory: a reused directory is refused, continued under checkpoint.resume=true with
the keys that shape the draft or order the data kept, or cleared by run.overwrite=true (only the run's
own files, never anything outside it)."""
from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from lib.config import ConfigError, LaunchShape, compose, resolve
from lib.config.check import RESUME_MUST_MATCH, clear_run_dir, prepare_run_dir, validate

pytestmark = pytest.mark.unit

CPU2 = LaunchShape(world_size=2, nproc_per_node=2, nnodes=1, gpus_per_node=0)


def _old_run(run_dir, *overrides: str) -> None:
    """What a finished run leaves: its resolved config.yaml, metrics and a complete checkpoint."""
    os.makedirs(os.path.join(run_dir, "checkpoints", "step-3"))
    os.makedirs(os.path.join(run_dir, "checkpoints", "step-6"))
    for step in (3, 6):
        open(os.path.join(run_dir, "checkpoints", f"step-{step}", "meta.json"), "w").close()
    os.makedirs(os.path.join(run_dir, "checkpoints", "step-9.tmp"))  # incomplete: never named
    cfg = resolve(compose([f"run.dir={run_dir}", "device=cpu", *overrides]), CPU2)
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 5.0}) + "\n")


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(list(overrides)), CPU2)
    return str(info.value)


def test_a_fresh_or_empty_directory_is_fine(tmp_path):
    validate(compose([f"run.dir={tmp_path / 'new'}"]), CPU2)
    validate(compose([f"run.dir={tmp_path}"]), CPU2)  # launch.sh creates it empty before torchrun


def test_a_directory_holding_a_run_is_refused_naming_the_newest_checkpoint_and_the_ways_on(tmp_path):
    _old_run(str(tmp_path))
    line = _error(f"run.dir={tmp_path}", "train.max_steps=4")
    assert line.startswith(f"run.dir='{tmp_path}': already holds a run (config.yaml, metrics.jsonl, checkpoints/")
    assert "newest checkpoint: checkpoints/step-6" in line
    assert "checkpoint.resume=true" in line and "run.overwrite=true" in line
    # Metrics alone (a run that died before its first checkpoint) count too.
    only_metrics = tmp_path / "m"
    only_metrics.mkdir()
    (only_metrics / "metrics.jsonl").write_text("{}\n")
    assert "newest checkpoint: none" in _error(f"run.dir={only_metrics}")


def test_resume_keeps_the_keys_that_shape_the_draft_or_order_the_data(tmp_path):
    _old_run(str(tmp_path))
    base = [f"run.dir={tmp_path}", "checkpoint.resume=true"]
    validate(compose(base + ["train.lr=5e-4", "train.max_steps=900", "eval.every=0", "train.log_every=1"]), CPU2)
    for override, key in (("train.seed=1", "train.seed"), ("train.ttt_length=3", "train.ttt_length"),
                          ("draft.draft_vocab_size=512", "draft.draft_vocab_size"),
                          (f"data.path={tmp_path / 'other.jsonl'}", "data.path")):
        if key == "data.path":
            (tmp_path / "other.jsonl").write_text("{}\n")
        line = _error(*base, override)
        assert line.startswith(f"{key}=") and "a resume must keep it" in line, line
        assert key in RESUME_MUST_MATCH


def test_overwrite_and_resume_exclude_each_other(tmp_path):
    line = _error(f"run.dir={tmp_path}", "checkpoint.resume=true", "run.overwrite=true")
    assert line.startswith("run.overwrite=true: removes the run that checkpoint.resume=true would continue")


def test_resume_records_what_changed(tmp_path):
    _old_run(str(tmp_path))
    cfg = resolve(compose([f"run.dir={tmp_path}", "device=cpu", "checkpoint.resume=true", "train.lr=5e-4"]), CPU2)
    lines = prepare_run_dir(cfg)
    assert lines == ["resuming with changed keys (recorded in resumes.jsonl): train.lr 0.001 -> 0.0005"]
    row = json.loads((tmp_path / "resumes.jsonl").read_text())
    assert row["changed"] == {"train.lr": [0.001, 0.0005]} and row["resume_from"] == "checkpoints/step-6"


def test_overwrite_removes_only_the_run_files_and_never_follows_links(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    _old_run(str(run_dir))
    for name in ("draft", "draft_speculators", "samples", "dry_run"):
        (run_dir / name).mkdir()
        (run_dir / name / "x").write_text("old")
    (run_dir / "notes.txt").write_text("mine")  # not a run file: kept
    (run_dir / "drafts.md").write_text("mine")  # a file named draft*: only directories are exports
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    os.symlink(outside, run_dir / "checkpoints" / "link")  # inside a removed tree: unlinked, not followed
    (run_dir / "summary.json").symlink_to(outside / "keep.txt")  # a run file that is a link: the link goes
    validate(compose([f"run.dir={run_dir}", "run.overwrite=true"]), CPU2)
    cfg = resolve(compose([f"run.dir={run_dir}", "device=cpu", "run.overwrite=true"]), CPU2)
    (line,) = prepare_run_dir(cfg)
    assert line.startswith("run.overwrite=true: removed the previous run's checkpoints, config.yaml, ")
    assert sorted(os.listdir(run_dir)) == ["drafts.md", "notes.txt"]
    assert (outside / "keep.txt").read_text() == "keep"
    assert clear_run_dir(str(tmp_path / "missing")) == []
