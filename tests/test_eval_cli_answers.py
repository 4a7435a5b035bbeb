"""eval.py end to end on the embedded tiny target with a held-out file whose lines carry two categories
and include unanswered prompts: the target answers those first (the filled file is written next to
--out and reused by a rerun), and the table and the JSON carry per-category results that add up to
the overall ones."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lib.config import TINY_DATA_DIR, TINY_TARGET_DIR
from lib.drafts.eagle3.export import export_draft
from lib.target.weights import load_causal_lm
from tests.helpers import eval_main
from tests.test_spec_decode import build_draft

pytestmark = pytest.mark.integration


def heldout_file(path) -> list[dict]:
    with open(os.path.join(TINY_DATA_DIR, "heldout.jsonl")) as f:
        lines = [json.loads(x) for x in f.read().splitlines()[:6]]
    users = [[t for t in line["conversations"] if t["role"] == "user"][0] for line in lines]
    objs = [{**line, "category": "math" if i % 2 else "words"} for i, line in enumerate(lines[:4])]
    objs.append({"category": "math", "conversations": [users[4]]})  # prompt only, no id
    objs.append({"id": "two-turn", "category": "words",
                 "conversations": [users[5], {"role": "assistant", "content": ""}, users[0]]})
    with open(path, "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in objs))
    return objs


def run_eval(tmp_path, heldout, capsys) -> tuple[int, str]:
    """eval.py's main() in this process (its command line as a program is tests/test_spec_decode.py's
    test_eval_cli_end_to_end); (exit code, what it printed)."""
    capsys.readouterr()
    code = eval_main(["--draft", str(tmp_path / "draft"), "--out", str(tmp_path / "out" / "eval.json"),
                      "--no-progress", "--threads", "1", "--batch-size", "4", "--answer-max-new-tokens", "24",
                      f"data.heldout_path={heldout}", "eval.max_new_tokens=12", "eval.draft_tokens=[1,3]"])
    return code, capsys.readouterr().out


def test_unanswered_heldout_prompts_are_answered_and_results_split_by_category(tmp_path, capsys):
    target = load_causal_lm(TINY_TARGET_DIR, torch.float32, torch.device("cpu"))
    draft = build_draft(target, draft_vocab=800, std=0.2)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), dtype=torch.float32)
    source = heldout_file(tmp_path / "heldout.jsonl")

    code, first = run_eval(tmp_path, tmp_path / "heldout.jsonl", capsys)
    assert code == 0, first[-3000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    answers = report["heldout_answers"]
    assert answers["answered_lines"] == 2 and answers["reused"] is False and answers["dropped_lines"] == 0
    filled = answers["file"]
    assert os.path.dirname(filled) == str(tmp_path / "out") and "the target answers them" in first
    with open(filled) as f:
        lines = [json.loads(x) for x in f]
    assert [line["conversations"] for line in lines[:4]] == [o["conversations"] for o in source[:4]]
    expected_roles = [["user", "assistant"], ["user", "assistant", "user", "assistant"]]
    for line, before, roles in zip(lines[4:], source[4:], expected_roles):
        assert [t["role"] for t in line["conversations"]] == roles
        assert all(t["content"].strip() for t in line["conversations"] if t["role"] == "assistant")
        assert line["category"] == before["category"]
    # Every line is evaluated, with the id the loader gives a line without one in the source file.
    assert report["num_prompts"] == 6
    assert report["sample_ids"][4:] == ["heldout.jsonl:5", "two-turn"]
    assert report["categories"] == ["words", "math", "words", "math", "math", "words"]
    for row in report["results"]:
        groups = row["per_category"]
        assert sorted(groups) == ["math", "words"]
        assert [g["prompts"] for g in groups.values()] == [3, 3]
        assert sum(g["verify_rows"] for g in groups.values()) == row["verify_rows"]
        produced = sum(g["tau"] * g["verify_rows"] for g in groups.values())
        assert produced == pytest.approx(row["tau"] * row["verify_rows"])
        assert len(groups["math"]["accept_rates"]) == row["k"] and row["matches_greedy"] is True
    assert "per category" in first and "(all)" in first

    stamp = os.stat(filled).st_mtime_ns
    code, second = run_eval(tmp_path, tmp_path / "heldout.jsonl", capsys)
    assert code == 0, second[-3000:]
    again = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert again["heldout_answers"]["reused"] is True and again["heldout_answers"]["file"] == filled
    assert "reusing" in second and os.stat(filled).st_mtime_ns == stamp
    assert [r["per_category"] for r in again["results"]] == [r["per_category"] for r in report["results"]]
