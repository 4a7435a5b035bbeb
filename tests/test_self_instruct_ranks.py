"""tools/regenerate.py --self-instruct under torchrun: rank 0 samples the questions while rank 1 waits at
the tool's gloo barrier, then both answer their shard of --input's lines and the questions (tiny target)."""
from __future__ import annotations

import json
import os

import pytest

from lib.config import TINY_DATA_DIR, TINY_TARGET_DIR
from tests.helpers import REPO, TORCHRUN, run_process_group

pytestmark = pytest.mark.integration


def test_two_ranks_answer_the_questions_rank_0_wrote(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(os.path.join(TINY_DATA_DIR, "heldout.jsonl")) as f:
        src.write_text("".join(f.readlines()[:3]))
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", os.path.join(REPO, "tools", "regenerate.py"),
                      "--target", TINY_TARGET_DIR, "--input", str(src), "--self-instruct", "5", "--max-new-tokens",
                      "12", "--batch-size", "4", "--device", "cpu", "--output", str(out)]
    done = run_process_group(cmd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("questions kept") == 1  # sampled once, by rank 0
    questions = [json.loads(x) for x in (tmp_path / "out.jsonl.self_instruct.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(questions) == 5 and len(lines) == 8
    assert [o["id"] for o in lines] == [f"heldout-00000{i}" for i in range(3)] + [q["id"] for q in questions]
    assert all(o["category"] == "self-instruct" for o in lines[3:])
    assert not list(tmp_path.glob("out.jsonl.part-*")) and not list(tmp_path.glob("*.tmp.*"))
