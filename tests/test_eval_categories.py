"""Per-prompt acceptance counts: grouped by category they add back up to exactly the pooled numbers,
from one batched decoding; a drafter that is perfect on some prompts and always wrong on others shows
per-category tau k+1 and 1 whatever batches the prompts share; which held-out lines eval.py answers,
and how (empty turns answered, given answers kept, the last answer on the evaluation's budget).

The embedded tiny target (assets/tiny_target) and real EAGLE-3 drafts; CPU, one thread.
"""
from __future__ import annotations

import json

import pytest
import torch

from lib.config import TINY_DATA_DIR, TINY_TARGET_DIR
from lib.eval.drafters import ForcedDrafter
from lib.eval.heldout_answers import missing_answers
from lib.eval.spec_decode import greedy_decode, speculative_decode
from lib.target.weights import load_causal_lm
from tests.test_spec_decode import as_drafter, build_draft

pytestmark = pytest.mark.unit

K = 3
MAX_NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: intra-op threads spin against other processes and slow tiny ops down.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def target():
    return load_causal_lm(TINY_TARGET_DIR, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TARGET_DIR)
    with open(f"{TINY_DATA_DIR}/heldout.jsonl") as f:
        lines = [json.loads(x) for x in f.read().splitlines()[:7]]
    texts = [tokenizer.apply_chat_template(line["conversations"][:1], add_generation_prompt=True, tokenize=False)
             for line in lines]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


class HalfOracle(ForcedDrafter):
    """The target's own continuation for the prompts in `good`, a never-accepted token for the others."""

    def __init__(self, reference, vocab_size, good):
        super().__init__(reference, "oracle", vocab_size)
        self.good = set(good)

    def propose(self, block, k, rows, generated):
        tokens = super().propose(block, k, rows, generated)
        wrong = torch.tensor([r not in self.good for r in rows], device=tokens.device)
        return torch.where(wrong[:, None], (tokens + 1) % self.vocab_size, tokens)


def assert_adds_up(result, labels):
    stats = result.stats
    groups = result.by_label(labels)
    assert sum(g.prompts for g in groups.values()) == len(labels)
    for name in ("verify_rows", "produced"):
        assert sum(getattr(g, name) for g in groups.values()) == getattr(stats, name)
    for name in ("reached", "accepted"):
        assert [sum(col) for col in zip(*(getattr(g, name) for g in groups.values()))] == getattr(stats, name)
    whole = stats.for_rows(range(len(labels)))
    assert (whole.tau, whole.accept_rates, whole.verify_rows) == (result.tau, result.accept_rates, stats.verify_rows)
    return groups


@pytest.mark.parametrize("batch_size", [None, 3])
def test_per_category_tau_is_exact_for_oracle_and_wrong_prompts(target, prompts, batch_size):
    # Good prompts straddle the batches, so a batch-local row index would mix the categories up.
    good = [0, 4, 5]
    reference = greedy_decode(target, prompts, MAX_NEW + K)
    drafter = HalfOracle(reference, target.config.vocab_size, good)
    result = speculative_decode(target, drafter, prompts, K, MAX_NEW, check_greedy=False, batch_size=batch_size,
                                progress=False)
    labels = ["good" if i in good else "bad" for i in range(len(prompts))]
    groups = assert_adds_up(result, labels)
    assert list(groups) == ["bad", "good"]
    assert groups["good"].tau == K + 1 and groups["good"].accept_rates == [1.0] * K
    assert groups["bad"].tau == 1.0 and groups["bad"].accept_rates == [0.0] * K
    assert groups["good"].summary() == {"tau": K + 1, "accept_rates": [1.0] * K, "prompts": 3,
                                        "verify_rows": groups["good"].verify_rows}
    assert 1.0 < result.tau < K + 1
    assert result.outputs == [r[:MAX_NEW] for r in reference]


def test_real_draft_categories_add_up_to_the_pooled_numbers(target, prompts):
    draft = build_draft(target, draft_vocab=800, std=0.2)
    stop = [int(target.config.eos_token_id)]
    result = speculative_decode(target, as_drafter(draft), prompts, K, MAX_NEW, stop, check_greedy=False, batch_size=4,
                                progress=False)
    before = (result.tau, result.accept_rates, result.stats.verify_rows, result.stats.reached)
    labels = ["a", "b", None, "a", "b", "b", "a"]
    groups = assert_adds_up(result, [str(x) for x in labels])
    assert set(groups) == {"a", "b", "None"}
    # Grouping reads the counts; it changes nothing of the pooled result.
    assert (result.tau, result.accept_rates, result.stats.verify_rows, result.stats.reached) == before
    assert result.summary()["tau"] == result.tau
    with pytest.raises(ValueError, match="6 labels for 7 decoded prompts"):
        result.by_label(labels[:-1])
    with pytest.raises(ValueError, match=r"rows \[7\] were not decoded"):
        result.stats.for_rows([7])


def test_which_heldout_lines_need_answers():
    user, empty, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": " "}, \
        {"role": "assistant", "content": "a"}
    line = lambda turns: json.dumps({"conversations": turns})  # noqa: E731
    assert missing_answers(line([user]))
    assert missing_answers(line([user, empty, user]))
    assert missing_answers(line([user, empty]))
    assert missing_answers(line([user, answer, user, empty]))
    sharegpt = [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]
    assert missing_answers(json.dumps({"conversations": sharegpt}))
    assert not missing_answers(line([user, answer]))
    assert not missing_answers(line([user, answer, user, answer]))
    assert not missing_answers(json.dumps({"text": "pre-formatted"}))
    assert not missing_answers("{not json")


def test_regenerate_answers_empty_turns_keeps_given_ones_and_budgets_the_last(tmp_path):
    import argparse

    from transformers import AutoTokenizer

    import eval as eval_cli

    args = argparse.Namespace(device="cpu", overrides=["eval.max_new_tokens=3"])
    cfg = eval_cli.load_config(args)
    with open(f"{TINY_DATA_DIR}/heldout.jsonl") as f:
        users = [[t for t in json.loads(x)["conversations"] if t["role"] == "user"][0] for x in f.readlines()[:3]]
    kept = {"role": "assistant", "content": "kept as it is"}
    texts = [json.dumps({"conversations": [users[0], {"role": "assistant", "content": ""}, users[1], kept]}),
             json.dumps({"conversations": [users[2]]})]
    answers = eval_cli.answer_with_regenerate(cfg, 2, 8, texts, str(tmp_path / "filled.jsonl"))
    assert sorted(answers) == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(TINY_TARGET_DIR)
    first = answers[0]["conversations"]
    assert [t["role"] for t in first] == ["user", "assistant", "user", "assistant"]
    assert first[1]["content"].strip() and first[3] == kept
    assert answers[0]["regenerated"]["finish"][1] == "given" and answers[0]["regenerated"]["max_new_tokens"] == 8
    middle = len(tokenizer(first[1]["content"], add_special_tokens=False)["input_ids"])
    last = answers[1]["conversations"][-1]
    assert last["role"] == "assistant" and last["content"].strip()
    # the middle answer may run to --answer-max-new-tokens, the evaluated last one to eval.max_new_tokens
    assert 3 < middle <= 8 and len(tokenizer(last["content"], add_special_tokens=False)["input_ids"]) <= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # working files removed; eval writes the filled one


class EarlyOracle(ForcedDrafter):
    """The target's own continuation while the answer is shorter than `until` tokens, wrong after."""

    def __init__(self, reference, vocab_size, until):
        super().__init__(reference, "oracle", vocab_size)
        self.until = until

    def propose(self, block, k, rows, generated):
        tokens = super().propose(block, k, rows, generated)
        late = torch.tensor([g >= self.until for g in generated], device=tokens.device)
        return torch.where(late[:, None], (tokens + 1) % self.vocab_size, tokens)


def test_rounds_grouped_by_answer_position_add_up_and_split_early_from_late(target, prompts):
    reference = greedy_decode(target, prompts, MAX_NEW + K)
    until = 5
    result = speculative_decode(target, EarlyOracle(reference, target.config.vocab_size, until), prompts, K, MAX_NEW,
                                check_greedy=False, batch_size=3, progress=False)
    groups = result.by_answer_position(until)
    assert list(groups)[:2] == ["0-4", "5-9"]
    assert groups["0-4"].tau == K + 1 and groups["0-4"].accept_rates == [1.0] * K
    assert all(g.tau == 1.0 for name, g in groups.items() if name != "0-4")
    stats = result.stats
    assert sum(g.verify_rows for g in groups.values()) == stats.verify_rows
    assert sum(g.produced for g in groups.values()) == stats.produced
    assert [sum(col) for col in zip(*(g.accepted for g in groups.values()))] == stats.accepted
    assert groups["0-4"].prompts == len(prompts)
    with pytest.raises(ValueError, match="span=0 must be > 0"):
        result.by_answer_position(0)
