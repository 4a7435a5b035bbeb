"""bench/real_quality_report.py's regeneration table: rows per (batch, processes), processes summed."""
import importlib.util
import os

import pytest

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report():
    spec = importlib.util.spec_from_file_location("rq_report", os.path.join(ROOT, "bench", "real_quality_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_rows_sum_processes_over_the_longest(tmp_path):
    (tmp_path / "data.log").write_text(
        "batch 64: regenerate[0/1]: 256 answers, 28776 new tokens in 9.3 s (3078 tokens/s); 450 decode steps\n"
        "batch 64: regenerate: 256/256 lines answered, 0 skipped -> x\n"
        "batch 512, 4 processes: regenerate[0/4]: 64 answers, 7000 new tokens in 2.0 s (3500 tokens/s); 1\n"
        "batch 512, 4 processes: regenerate[1/4]: 64 answers, 8000 new tokens in 2.5 s (3200 tokens/s); 1\n")
    rows = _report().sweep_rows(str(tmp_path))
    assert rows[2] == "| 64 | 1 | 28776 | 9.3 | **3094** |"
    assert rows[3] == "| 512 | 4 | 15000 | 2.5 | **6000** |"
    assert len(rows) == 4


def test_sweep_rows_without_a_log(tmp_path):
    assert _report().sweep_rows(str(tmp_path)) == []


def test_seen_rows_put_each_familys_training_prompt_score_beside_its_held_out_one(tmp_path):
    import json

    (tmp_path / "family").mkdir()
    result = {"k": 15, "tau": 1.6, "accept_rates": [0.5, 0.25]}
    (tmp_path / "seen_dflash.json").write_text(json.dumps({"results": [result]}))
    (tmp_path / "family" / "dflash_eval.json").write_text(json.dumps({"results": [{**result, "tau": 1.433}]}))
    (tmp_path / "seen_eagle3.json").write_text(json.dumps({"results": [{**result, "k": 7}]}))  # no held-out score
    rows = _report().seen_rows(str(tmp_path))
    assert rows[2:] == ["| eagle3 | 7 | **1.600** | 0.50 0.25 | - |", "| dflash | 15 | **1.600** | 0.50 0.25 | 1.433 |"]


def test_fp32_rows_count_the_prompts_that_differ_from_greedy(tmp_path):
    import json

    (tmp_path / "fp32_eagle3.json").write_text(json.dumps({"dtype": "float32", "num_prompts": 9, "results": [
        {"k": 3, "tau": 2.5, "matches_greedy": True, "mismatched_prompts": []},
        {"k": 7, "tau": 2.75, "matches_greedy": False, "mismatched_prompts": [4]}]}))
    rows = _report().fp32_rows(str(tmp_path))
    assert rows[2:] == ["| eagle3 | float32 | 3 | **2.500** | True | 0 of 9 |",
                        "| eagle3 | float32 | 7 | **2.750** | False | 1 of 9 |"]
    assert _report().fp32_rows(str(tmp_path / "none")) == []


def test_position_rows_put_held_out_and_seen_side_by_side_by_answer_span(tmp_path):
    import json

    (tmp_path / "family").mkdir()
    held = {"k": 7, "tau": 2.0, "accept_rates": [0.5], "by_answer_position": {
        "0-63": {"tau": 1.8, "verify_rows": 40}, "64-127": {"tau": 2.3, "verify_rows": 20}}}
    seen = {"k": 7, "tau": 2.5, "accept_rates": [0.6], "by_answer_position": {
        "0-63": {"tau": 2.0, "verify_rows": 30}, "64-127": {"tau": 2.9, "verify_rows": 15},
        "128-191": {"tau": 3.6, "verify_rows": 9}}}
    one_span = {"k": 3, "tau": 1.5, "accept_rates": [0.5], "by_answer_position": {"0-63": {"tau": 1.5, "verify_rows": 9}}}
    (tmp_path / "family" / "eagle3_eval.json").write_text(json.dumps({"results": [held]}))
    (tmp_path / "seen_eagle3.json").write_text(json.dumps({"results": [seen]}))
    (tmp_path / "family" / "dflash_eval.json").write_text(json.dumps({"results": [one_span]}))
    rows = _report().position_rows(str(tmp_path))
    assert rows[0] == "| draft | prompts | k | tau, tokens 0-63 | tau, tokens 64-127 | tau, tokens 128-191 |"
    assert rows[2] == "| eagle3 | held-out | 7 | 1.80 (40) | 2.30 (20) | - |"
    assert rows[3] == "| eagle3 | seen | 7 | 2.00 (30) | 2.90 (15) | 3.60 (9) |"
    assert len(rows) == 4  # a result with one span says nothing about position: left out
    assert _report().position_rows(str(tmp_path / "family")) == []
