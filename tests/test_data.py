"""Data pipeline: templates' loss masks, bad lines, the tokenisation cache, sharded packing, resume."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from tests.helpers import masked_segments
from lib.data import datasets as data_mod
from lib.config import TINY_TARGET_DIR, DataConfig
from lib.data.datasets import DataError, load_dataset, load_heldout_prompts, token_counts
from lib.data.packing import ShardedPackedLoader, epoch_order
from lib.data.templates import TemplateError, get_template

pytestmark = pytest.mark.unit

CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_JINJA = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# The assistant repeats a user message word for word: a span finder that searches from the start
# of the text would mark the user's copy.
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say 42."},
    {"role": "assistant", "content": "Say 42."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7. Done!"},
]
END_OF_TURN = {"tiny": "<|end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>"}


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def _chat(i: int, answer: str = "ok") -> dict:
    return {"id": f"s{i}", "conversations": [{"role": "user", "content": f"question {i}"},
                                             {"role": "assistant", "content": f"{answer} {i}"}]}


@pytest.fixture(scope="module")
def foreign_tokenizers(tmp_path_factory):
    """Small byte-level BPE tokenizers that hold the ChatML and Llama-3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for m in CONVERSATION] * 5 + ["the quick brown fox jumps over 1234 lazy dogs"]
    dirs = {}
    for name, special, jinja in (("qwen", ["<|im_start|>", "<|im_end|>"], CHATML_JINJA),
                                 ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"], LLAMA3_JINJA)):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
        out = tmp_path_factory.mktemp(name)
        PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=jinja).save_pretrained(str(out))
        dirs[name] = str(out)
    return dirs


@pytest.mark.parametrize("template,tok_name", [("tiny", "tiny"), ("auto", "tiny"), ("qwen", "qwen"),
                                               ("auto", "qwen"), ("llama3", "llama3"), ("auto", "llama3")])
def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path, foreign_tokenizers, template, tok_name):
    from transformers import AutoTokenizer

    tok_dir = TINY_TARGET_DIR if tok_name == "tiny" else foreign_tokenizers[tok_name]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "c", "conversations": CONVERSATION}])
    ds = load_dataset(DataConfig(path=path, heldout_path=path, template=template), tok_dir)
    ids, mask = ds[0]
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    expected = [m["content"] + END_OF_TURN[tok_name] for m in CONVERSATION if m["role"] == "assistant"]
    # every masked run decodes to one assistant turn plus its end-of-turn token, and nothing else
    assert masked_segments(tokenizer, ids, mask) == expected
    assert tokenizer.decode(ids) == get_template(template, tokenizer).render(CONVERSATION).text


@pytest.mark.parametrize("registered", ["tiny", "qwen", "llama3"])
def test_auto_template_matches_the_registered_one(tmp_path, foreign_tokenizers, registered):
    """The repeated "Say 42." must be masked in the assistant turn, not in the user turn before it."""
    tok_dir = TINY_TARGET_DIR if registered == "tiny" else foreign_tokenizers[registered]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": CONVERSATION}])
    auto = load_dataset(DataConfig(path=path, heldout_path=path, template="auto"), tok_dir)
    explicit = load_dataset(DataConfig(path=path, heldout_path=path, template=registered), tok_dir)
    assert auto[0] == explicit[0]


def test_bad_lines_are_counted_per_reason_with_line_numbers(tmp_path, caplog):
    long_answer = " ".join(["word"] * 200)
    rows = [
        _chat(1),  # 1 good
        '{"conversations": [',  # 2 malformed JSON
        "[1, 2]",  # 3 not an object
        {"conversations": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 4
        {"conversations": []},  # 5 empty
        {"conversations": [{"role": "user", "content": "only a question"}]},  # 6 no assistant
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},  # 7 ShareGPT ok
        {"text": "pre-formatted text"},  # 8 ok, loss on all tokens
        {"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 9
        {"conversations": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "x"}]},  # 10
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]},  # 11
        {"id": 7},  # 12 neither conversations nor text
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="lib.data.datasets"):
        ds = load_dataset(DataConfig(path=path, heldout_path=path, template="tiny", max_length=64), TINY_TARGET_DIR)
    assert ds.report.bad == {"malformed_json": [2], "not_an_object": [3], "unknown_role": [4],
                             "empty_conversation": [5], "no_assistant_turn": [6], "malformed_turn": [9],
                             "no_loss_tokens_after_truncation": [10], "no_conversations_or_text": [12]}
    assert ds.report.truncated == 1 and ds.report.kept == len(ds) == 4  # lines 1, 7, 8, 11
    assert ds.sample_ids[:2] == ["s1", "d.jsonl:7"]
    assert all(ds[2][1]) and len(ds[3][0]) == 64  # text: loss everywhere; truncated to max_length
    assert "malformed_json: 1 (lines 2)" in caplog.text and "unknown_role: 1 (lines 4)" in caplog.text

    skip = load_dataset(DataConfig(path=path, heldout_path=path, template="tiny", max_length=64,
                                   overlong="skip"), TINY_TARGET_DIR)
    assert skip.report.bad["overlong"] == [10, 11] and skip.report.truncated == 0


def test_unusable_inputs_raise_errors_naming_the_key(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nonsense", {"conversations": []}])
    with pytest.raises(DataError, match="no usable sample in data.path"):
        load_dataset(DataConfig(path=bad, heldout_path=bad), TINY_TARGET_DIR)
    with pytest.raises(DataError, match="data.path=.*does not exist"):
        load_dataset(DataConfig(path=str(tmp_path / "missing.jsonl")), TINY_TARGET_DIR)
    good = _write_jsonl(tmp_path / "good.jsonl", [_chat(i) for i in range(3)])
    with pytest.raises(DataError, match="data.heldout_path=.*does not exist"):
        load_dataset(DataConfig(path=good, heldout_path=str(tmp_path / "nope.jsonl")), TINY_TARGET_DIR, "heldout")
    with pytest.raises(DataError, match="data.heldout_size=5"):
        load_dataset(DataConfig(path=good, heldout_size=5), TINY_TARGET_DIR)
    with pytest.raises(DataError, match="data.overlong='drop'"):
        load_dataset(DataConfig(path=good, overlong="drop"), TINY_TARGET_DIR)
    with pytest.raises(TemplateError, match="data.template='chatgpt'"):
        get_template("chatgpt")


def test_heldout_tail_split_and_prompts(tmp_path):
    from transformers import AutoTokenizer

    path = _write_jsonl(tmp_path / "d.jsonl", [_chat(i, answer=f"answer{i % 3}") for i in range(10)])
    cfg = DataConfig(path=path, heldout_size=3, template="tiny")
    train, heldout = load_dataset(cfg, TINY_TARGET_DIR, "train"), load_dataset(cfg, TINY_TARGET_DIR, "heldout")
    assert train.sample_ids == [f"s{i}" for i in range(7)] and heldout.sample_ids == ["s7", "s8", "s9"]
    assert train.fingerprint != heldout.fingerprint
    prompts = load_heldout_prompts(cfg, TINY_TARGET_DIR, 2)
    tokenizer = AutoTokenizer.from_pretrained(TINY_TARGET_DIR)
    assert [p.sample_id for p in prompts] == ["s7", "s8"]
    for p, i in zip(prompts, (7, 8)):
        assert tokenizer.decode(p.prompt_ids) == f"<|user|>question {i}<|end|><|assistant|>"
        assert tokenizer.decode(p.reference_ids) == f"answer{i % 3} {i}<|end|>"


def test_cache_is_reused_and_keyed_by_settings_and_content(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_chat(i) for i in range(20)])
    cfg = DataConfig(path=path, heldout_size=2, template="tiny", max_length=128)
    runs = data_mod.tokenization_runs
    first = load_dataset(cfg, TINY_TARGET_DIR)
    assert data_mod.tokenization_runs == runs + 1 and not first.from_cache
    assert os.listdir(path + ".tokcache")
    second = load_dataset(cfg, TINY_TARGET_DIR)
    assert data_mod.tokenization_runs == runs + 1 and second.from_cache  # no tokenisation at all
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    assert second.report.summary() == first.report.summary()

    load_dataset(DataConfig(path=path, heldout_size=2, template="tiny", max_length=64), TINY_TARGET_DIR)
    assert data_mod.tokenization_runs == runs + 2  # another max_length is another cache entry
    _write_jsonl(path, [_chat(i) for i in range(21)])
    changed = load_dataset(cfg, TINY_TARGET_DIR)
    assert data_mod.tokenization_runs == runs + 3 and len(changed) == 19
    cached_elsewhere = DataConfig(path=path, heldout_size=2, template="tiny", cache_dir=str(tmp_path / "c"))
    load_dataset(cached_elsewhere, TINY_TARGET_DIR)
    assert os.listdir(tmp_path / "c")


@pytest.mark.integration  # a fork pool of tokeniser workers
def test_parallel_tokenisation_equals_serial(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_chat(i, answer="x" * (i % 7)) for i in range(600)])
    serial = load_dataset(DataConfig(path=path, heldout_size=1, template="tiny", num_workers=1,
                                     cache_dir=str(tmp_path / "a")), TINY_TARGET_DIR)
    parallel = load_dataset(DataConfig(path=path, heldout_size=1, template="tiny", num_workers=2,
                                       cache_dir=str(tmp_path / "b")), TINY_TARGET_DIR)
    assert torch.equal(serial.tokens, parallel.tokens) and torch.equal(serial.mask, parallel.mask)
    assert serial.sample_ids == parallel.sample_ids


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    rows = [_chat(i, answer="y" * (i % 11)) for i in range(53)]  # 53: shards of unequal size
    path = _write_jsonl(tmp_path_factory.mktemp("shards") / "d.jsonl", rows)
    return load_dataset(DataConfig(path=path, heldout_path=path, template="tiny"), TINY_TARGET_DIR)


def _take(loader, n_samples):
    """Sample ids of the next batches until at least n_samples were seen."""
    ids = []
    while len(ids) < n_samples:
        batch = loader.__next__()
        assert batch.num_tokens <= loader.token_budget
        ids += batch.sample_ids
    return ids


def _rounds(loaders, rounds):
    """Batch sample ids of `rounds` rounds, in stream order (round by round, shard by shard)."""
    return [next(loader).sample_ids for _ in range(rounds) for loader in loaders]


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_shards_deal_one_stream_of_epochs_round_robin(small_dataset, num_shards):
    n = len(small_dataset)
    loaders = [ShardedPackedLoader(small_dataset, k, num_shards, token_budget=64, seed=3) for k in range(num_shards)]
    dealt = _rounds(loaders, 40 // num_shards)
    single = ShardedPackedLoader(small_dataset, 0, 1, token_budget=64, seed=3)
    assert dealt == [next(single).sample_ids for _ in dealt]  # the same batches, whatever the shard count
    ids = [i for batch in dealt for i in batch]
    assert len(ids) >= 2 * n
    assert ids[:n] == epoch_order(n, 3, 0).tolist() and ids[n:2 * n] == epoch_order(n, 3, 1).tolist()
    assert sorted(ids[:n]) == list(range(n)) and ids[:n] != ids[n:2 * n]  # every sample once, reshuffled
    states = [loader.state_dict() for loader in loaders]
    assert all(s == {**states[0], "shard": k} for k, s in enumerate(states))  # one position for all shards


def test_packed_batches_hold_the_dataset_samples(small_dataset):
    loader = ShardedPackedLoader(small_dataset, 0, 1, token_budget=64, seed=0)
    for _ in range(5):
        batch = next(loader)
        for k, i in enumerate(batch.sample_ids):
            a, b = int(batch.cu_seqlens[k]), int(batch.cu_seqlens[k + 1])
            tokens, mask = small_dataset[i]
            assert batch.input_ids[a:b].tolist() == tokens and batch.loss_mask[a:b].tolist() == mask
            assert batch.position_ids[a:b].tolist() == list(range(b - a))
    same = ShardedPackedLoader(small_dataset, 0, 1, token_budget=64, seed=0)
    other = ShardedPackedLoader(small_dataset, 0, 1, token_budget=64, seed=1)
    assert _take(same, 20) != _take(other, 20)


def test_resume_from_state_dict_continues_exactly(small_dataset):
    loader = ShardedPackedLoader(small_dataset, 1, 2, token_budget=48, seed=5)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(30)]  # crosses epoch boundaries
    resumed = ShardedPackedLoader(small_dataset, 1, 2, token_budget=48, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    for want in expected:
        got = next(resumed)
        assert got.sample_ids == want.sample_ids and torch.equal(got.input_ids, want.input_ids)
    with pytest.raises(DataError, match="seed=5 but this run has seed=6"):
        ShardedPackedLoader(small_dataset, 1, 2, token_budget=48, seed=6).load_state_dict(state)


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 4)])
def test_resume_on_another_shard_count_trains_every_sample_once(small_dataset, before, after):
    """2 pairs -> 1 pair (and others): the stream continues where all pairs together stopped."""
    old = [ShardedPackedLoader(small_dataset, k, before, token_budget=48, seed=5) for k in range(before)]
    first = _rounds(old, 12 // before)
    new = [ShardedPackedLoader(small_dataset, k, after, token_budget=48, seed=5) for k in range(after)]
    for loader in new:
        loader.load_state_dict(json.loads(json.dumps(old[0].state_dict())))
    second = _rounds(new, 24 // after)
    single = ShardedPackedLoader(small_dataset, 0, 1, token_budget=48, seed=5)
    assert first + second == [next(single).sample_ids for _ in range(len(first) + len(second))]
    n = len(small_dataset)
    ids = [i for batch in first + second for i in batch][:n]
    assert sorted(ids) == list(range(n))  # the first epoch: nothing skipped, nothing repeated


def test_samples_longer_than_the_budget_are_truncated_or_skipped(small_dataset):
    lengths = [small_dataset.length(i) for i in range(len(small_dataset))]
    budget = sorted(lengths)[len(lengths) // 2]
    over = sum(n > budget for n in lengths)
    loader = ShardedPackedLoader(small_dataset, 0, 1, token_budget=budget, seed=0)
    assert len(_take(loader, len(small_dataset))) >= len(small_dataset)
    assert loader.truncated >= over
    skipping = ShardedPackedLoader(small_dataset, 0, 1, token_budget=budget, seed=0, overlong="skip")
    ids = _take(skipping, len(small_dataset) - over)
    assert all(lengths[i] <= budget for i in ids) and skipping.skipped >= over
    with pytest.raises(DataError, match="fewer than the 60 shards"):
        ShardedPackedLoader(small_dataset, 0, 60, token_budget=64, seed=0)


def test_token_counts_count_loss_tokens(small_dataset):
    counts = token_counts(small_dataset, 2048)
    assert counts.dtype == torch.int64 and counts.shape == (2048,)
    assert int(counts.sum()) == int(small_dataset.mask.sum())
    ids, mask = small_dataset[0]
    tok = next(t for t, m in zip(ids, mask) if m)
    assert int(counts[tok]) == sum(int(t == tok and m) for i in range(len(small_dataset))
                                   for t, m in zip(*small_dataset[i]))
    with pytest.raises(DataError, match="vocab_size=10"):
        token_counts(small_dataset, 10)


def test_auto_template_without_a_chat_template_is_a_clear_error(tmp_path, foreign_tokenizers):
    import shutil

    tok_dir = tmp_path / "no_template"
    shutil.copytree(foreign_tokenizers["qwen"], tok_dir)
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    for extra in tok_dir.glob("chat_template*"):
        extra.unlink()
    path = _write_jsonl(tmp_path / "d.jsonl", [_chat(i) for i in range(600)])
    with pytest.raises(TemplateError, match="has no chat_template; set data.template"):
        load_dataset(DataConfig(path=path, heldout_size=1, template="auto", num_workers=2), str(tok_dir))


def test_repeated_trained_tokens_counts_copies_under_the_mask():
    from lib.data.datasets import repeated_trained_tokens

    # 1 2 3 4 5 twice: the second 4 and 5 close 4-grams seen before; an untrained token is never counted,
    # but untrained tokens (a prompt) are context that a trained token can repeat.
    ids = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 9]
    assert repeated_trained_tokens(ids, [True] * 11) == 2
    assert repeated_trained_tokens(ids, [True] * 9 + [False, True]) == 1
    assert repeated_trained_tokens(ids, [False] * 5 + [True] * 6) == 2  # copies of the untrained prompt count
    assert repeated_trained_tokens([7] * 6, [True] * 6) == 2  # 7777 at index 3 is new, at 4 and 5 repeated


def test_data_report_counts_looping_answers_and_warns(tmp_path, caplog):
    loop = " ".join(["I can help you with that."] * 12)
    rows = [_chat(i, answer=loop) for i in range(3)] + [_chat(9, answer="a plain short answer")]
    path = _write_jsonl(tmp_path / "loops.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="lib.data.datasets"):
        ds = load_dataset(DataConfig(path=path, heldout_path=path, template="tiny", max_length=512), TINY_TARGET_DIR)
    trained = sum(sum(ds[i][1]) for i in range(len(ds)))
    assert ds.report.trained_tokens == trained
    assert 0.6 < ds.report.repeated_share < 1.0, ds.report.summary()
    assert f"{trained} trained tokens, {ds.report.repeated_share:.0%} repeating a 4-gram" in caplog.text
    assert "the trainer's accuracy will run above the acceptance" in caplog.text

    plain = _write_jsonl(tmp_path / "plain.jsonl", [_chat(9, answer="a plain short answer")])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lib.data.datasets"):
        load_dataset(DataConfig(path=plain, heldout_path=plain, template="tiny", max_length=512), TINY_TARGET_DIR)
    assert "0% repeating" in caplog.text and "accuracy will run above" not in caplog.text
