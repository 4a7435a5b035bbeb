"""Training data: parse JSON Lines, tokenize once (cached); lib.data.packing shards and packs it into batches.

Accepted lines: `{"id"?, "conversations": [{"role", "content"}]}`, ShareGPT
`{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`, and pre-formatted `{"text"}` (loss on
every token). An optional `"category"` tags a line for per-category evaluation.

An answer cut off by a token limit is not a finished answer: tools/regenerate.py records each answer's
finish reason (`"regenerated": {"finish": ["stop", "length", ...]}`, one per assistant turn in order), and
a turn may carry `"finish": "length"` itself. Such a turn keeps its content under the loss but not its
end-of-turn marker (the model never ended it there); the data report counts these lines
(`answer_cut_off_end_untrained`). Bad lines are counted per reason with their line numbers and logged, never fatal unless
nothing is left; lines kept although the chat template rewrote an answer (e.g. trimmed it) are counted
per rewrite the same way.

Tokenisation runs once per (data file content, tokenizer files, template, max_length, overlong,
split) and is cached as one file (`<data>.tokcache/` or `data.cache_dir`), written atomically under a
file lock so concurrent ranks tokenise once and later runs load it without touching the tokenizer.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lib.config import TINY_DATA_DIR, DataConfig
from lib.data.records import Record, parse_line
from lib.data.templates import TemplateError, TemplateProblem, get_template

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 2: answers located by the template's own rendering (trimmed spans); 3: cut-off answers,
# categories; 4: the report counts trained tokens that repeat their conversation
SHOWN_LINES = 5  # line numbers listed per bad-line reason
CUT_OFF = "answer_cut_off_end_untrained"  # the report's reason for kept lines with a cut-off answer
HELDOUT_SHARE_WARNING = 0.2  # a held-out tail above this share of data.path is worth a warning
# A trained token "repeats" when the REPEAT_NGRAM tokens ending at it already occurred earlier in its
# conversation: a copy the draft learns easily. Small targets loop (SmolLM2: 70% of answer tokens past
# the 128th), and a loop-heavy corpus lifts the trainer's accuracy above what short generations accept.
REPEAT_NGRAM = 4
REPEAT_SHARE_WARNING = 0.3
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")
tokenization_runs = 0  # how often a dataset was tokenised in this process (cache misses)


class DataError(ValueError):
    """The data cannot be used as configured; the message names the key and the fix."""


@dataclass
class DataReport:
    path: str
    lines: int = 0
    kept: int = 0
    truncated: int = 0
    bad: dict[str, list[int]] = field(default_factory=dict)  # reason -> line numbers (1-based)
    rewritten: dict[str, list[int]] = field(default_factory=dict)  # kept lines: rewrite reason -> line numbers
    heldout: int = 0  # train split of a file whose tail is held out: how many lines that tail took
    trained_tokens: int = 0
    repeated_tokens: int = 0  # trained tokens repeating their conversation (REPEAT_NGRAM)

    @property
    def repeated_share(self) -> float:
        return self.repeated_tokens / max(1, self.trained_tokens)

    def add_bad(self, reason: str, line_no: int) -> None:
        self.bad.setdefault(reason, []).append(line_no)

    def add_rewritten(self, reason: str, line_no: int) -> None:
        self.rewritten.setdefault(reason, []).append(line_no)

    def summary(self) -> str:
        text = f"{self.path}: {self.lines} lines, {self.kept} kept, {self.truncated} truncated"
        if self.heldout:
            share = self.heldout / (self.heldout + self.lines)
            text += f"; {self.heldout} further lines ({share:.0%} of the file) held out for evaluation"
        for label, counts in (("", self.bad), ("kept, ", self.rewritten)):
            for reason, lines in sorted(counts.items()):
                shown = ", ".join(map(str, lines[:SHOWN_LINES])) + (", ..." if len(lines) > SHOWN_LINES else "")
                text += f"; {label}{reason}: {len(lines)} (lines {shown})"
        if self.trained_tokens:
            text += (f"; {self.trained_tokens} trained tokens, {self.repeated_share:.0%} repeating a "
                     f"{REPEAT_NGRAM}-gram earlier in their conversation")
        return text


def repeated_trained_tokens(ids: list[int], mask: list[bool], n: int = REPEAT_NGRAM) -> int:
    """How many trained tokens (mask) close an n-gram that already occurred earlier in `ids`."""
    seen: set[tuple[int, ...]] = set()
    count = 0
    for end in range(n, len(ids) + 1):
        gram = tuple(ids[end - n:end])
        count += mask[end - 1] and gram in seen
        seen.add(gram)
    return count


# ---- tokenisation (runs in worker processes; state set once per worker) ----
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, template: str, max_length: int, overlong: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    _worker.update(tokenizer=tokenizer, template=get_template(template, tokenizer),
                   max_length=max_length, overlong=overlong)


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> list[bool]:
    """A token is trained on when its characters overlap an assistant span."""
    return [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in offsets]


def tokenize_record(rec: Record) -> tuple[list[int], list[bool], int, int, bool, tuple[str, ...]] | str:
    """(ids, loss_mask, prompt_len, answer_end, truncated, rewrite reasons) or a bad-line reason.

    prompt_len/answer_end bound the last assistant turn in tokens (-1 when the record has none).
    """
    tokenizer, max_length = _worker["tokenizer"], _worker["max_length"]
    rewrites: tuple[str, ...] = ()
    if rec.messages is None:
        text, spans, header_end = rec.text, ((0, len(rec.text)),), -1
    else:
        try:
            rendered = _worker["template"].render(rec.messages)
        except TemplateError as e:  # the template names the message; the report names the line
            return (e.problem or TemplateProblem.BAD_MESSAGE).value
        text, spans, header_end = rendered.text, rendered.assistant_spans, rendered.last_assistant_header_end
        rewrites = tuple(sorted({r.value for _, r in rendered.rewrites}))
        if rec.cut_turns:
            if len(rendered.content_ends) != len(spans):
                return "cut_off_answer_not_located"  # a registered template that reports no content ends
            spans = tuple((a, rendered.content_ends[j]) if j in rec.cut_turns else (a, b)
                          for j, (a, b) in enumerate(spans))
            rewrites += (CUT_OFF,)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, mask = list(enc["input_ids"]), _mask_from_offsets(enc["offset_mapping"], spans)
    prompt_len = answer_end = -1
    if header_end >= 0:
        last = _mask_from_offsets(enc["offset_mapping"], spans[-1:])
        prompt_len = last.index(True) if True in last else -1
        answer_end = len(last) - last[::-1].index(True) if True in last else -1
    truncated = len(ids) > max_length
    if truncated:
        if _worker["overlong"] == "skip":
            return "overlong"
        ids, mask = ids[:max_length], mask[:max_length]
        prompt_len = prompt_len if 0 <= prompt_len < max_length else -1
        answer_end = min(answer_end, max_length) if prompt_len >= 0 else -1
    if not any(mask):
        return "no_loss_tokens_after_truncation" if truncated else "no_loss_tokens"
    return ids, mask, prompt_len, answer_end, truncated, rewrites


def _progress(items, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for i, item in enumerate(items, 1):
            if i % step == 0 or i == total:
                log.info("%s: %d/%d", desc, i, total)
            yield item
        return
    yield from tqdm(items, total=total, desc=desc, mininterval=2.0)


def _tokenize_all(records: list[Record], tokenizer_path: str, cfg: DataConfig, desc: str) -> list:
    global tokenization_runs
    tokenization_runs += 1
    # here, not in a pool initializer: a bad template or tokenizer must fail once, not restart workers forever
    _init_worker(tokenizer_path, cfg.template, cfg.max_length, cfg.overlong)
    workers = cfg.num_workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(records) < 512:  # a pool's start-up costs more than it saves here
        return list(_progress(map(tokenize_record, records), len(records), desc))
    try:
        with tokenizer_pool(workers) as pool:
            return list(_progress(pool.map(tokenize_record, records, chunksize=256), len(records), desc))
    except BrokenProcessPool as exc:
        raise DataError(f"a tokenizer worker died while {desc} ({exc}); out of memory or killed? Nothing was "
                        f"cached; rerun with fewer workers (data.num_workers, now {workers})") from exc


def _parent_handles_sigint() -> None:
    # Ctrl-C reaches the whole process group; the rank notes it and stops, the workers finish their chunk.
    # (SIGTERM kills a worker even under the rank's inherited stop handler: lib/launch/stopping.py.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenizer_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that inherit the loaded tokenizer (fork: no re-import of the caller's __main__).
    An executor, not multiprocessing.Pool: a worker that dies (the OOM killer) breaks it with an error,
    where Pool waits forever for the lost chunk, and its exit does not terminate workers with SIGTERM."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_parent_handles_sigint)


# ---- dataset ----
class TokenizedDataset:
    """Samples stored flat: sample i is tokens[offsets[i]:offsets[i+1]] with its loss mask."""

    def __init__(self, state: dict, from_cache: bool):
        self.tokens: torch.Tensor = state["tokens"]
        self.mask: torch.Tensor = state["mask"]
        self.offsets: torch.Tensor = state["offsets"]
        self.prompt_len: torch.Tensor = state["prompt_len"]
        self.answer_end: torch.Tensor = state["answer_end"]
        self.sample_ids: list[str] = state["sample_ids"]
        self.categories: list[Optional[str]] = state["categories"]
        self.fingerprint: str = state["fingerprint"]  # identifies data, tokenizer, template and split
        self.report = DataReport(**state["report"])
        self.from_cache = from_cache

    def __len__(self) -> int:
        return len(self.sample_ids)

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i: int) -> tuple[list[int], list[bool]]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b].tolist(), self.mask[a:b].tolist()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer_path: str) -> str:
    if not os.path.isdir(tokenizer_path):
        raise DataError(f"tokenizer path {tokenizer_path!r} is not a directory; set target.tokenizer (or "
                        "target.path) to a local checkpoint directory with tokenizer files")
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(tokenizer_path) if n.startswith(TOKENIZER_FILE_PREFIXES))
    if not names:
        raise DataError(f"no tokenizer files (tokenizer.json, ...) in {tokenizer_path!r}; set target.tokenizer")
    for name in names:
        h.update(name.encode() + b"\0" + _sha256_file(os.path.join(tokenizer_path, name)).encode())
    return h.hexdigest()


def _split_source(cfg: DataConfig, split: str) -> tuple[str, str, Optional[int]]:
    """(data key the path came from, path, held-out tail size or None when the file is used whole)."""
    if split not in ("train", "heldout"):
        raise DataError(f"split={split!r}; use 'train' or 'heldout'")
    if cfg.path is None:  # the embedded corpus ships its own held-out file
        name = "train.jsonl" if split == "train" else "heldout.jsonl"
        return "data.path", os.path.join(TINY_DATA_DIR, name), None
    if cfg.heldout_path is not None:
        return ("data.path", cfg.path, None) if split == "train" else ("data.heldout_path", cfg.heldout_path, None)
    if cfg.heldout_size < 1:
        raise DataError(f"data.heldout_size={cfg.heldout_size}; set it >= 1 or set data.heldout_path")
    return "data.path", cfg.path, cfg.heldout_size


def _read_lines(key: str, path: str, split: str, tail: Optional[int]) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    if tail is None:
        return lines
    if len(lines) <= tail:
        raise DataError(f"{key}={path!r} has {len(lines)} lines, not more than data.heldout_size={tail}; "
                        "lower data.heldout_size or set data.heldout_path")
    return lines[-tail:] if split == "heldout" else lines[:-tail]


def _build(cfg: DataConfig, key: str, path: str, split: str, tail: Optional[int], tokenizer_path: str,
           fingerprint: str) -> dict:
    report = DataReport(path=path, heldout=tail if (tail and split == "train") else 0)
    records = []
    for line_no, line in _read_lines(key, path, split, tail):
        report.lines += 1
        parsed = parse_line(line, line_no, f"{os.path.basename(path)}:{line_no}")
        if isinstance(parsed, str):
            report.add_bad(parsed, line_no)
        else:
            records.append(parsed)
    results = _tokenize_all(records, tokenizer_path, cfg, f"tokenizing {split} {os.path.basename(path)}")
    tokens, masks, offsets, prompt_len, answer_end, sample_ids, categories = [], [], [0], [], [], [], []
    for rec, res in zip(records, results):
        if isinstance(res, str):
            report.add_bad(res, rec.line_no)
            continue
        ids, mask, p_len, a_end, truncated, rewrites = res
        report.truncated += truncated
        report.trained_tokens += sum(mask)
        report.repeated_tokens += repeated_trained_tokens(ids, mask)
        for reason in rewrites:
            report.add_rewritten(reason, rec.line_no)
        tokens.extend(ids)
        masks.extend(mask)
        offsets.append(len(tokens))
        prompt_len.append(p_len)
        answer_end.append(a_end)
        sample_ids.append(rec.sample_id)
        categories.append(rec.category)
    report.kept = len(sample_ids)
    if not sample_ids:
        raise DataError(f"no usable sample in {key}={path!r} ({report.summary()}); fix the file or its format "
                        "(see lib/data/datasets.py for the accepted line formats)")
    return {"tokens": torch.tensor(tokens, dtype=torch.int32), "mask": torch.tensor(masks, dtype=torch.bool),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "prompt_len": torch.tensor(prompt_len, dtype=torch.int32),
            "answer_end": torch.tensor(answer_end, dtype=torch.int32),
            "sample_ids": sample_ids, "categories": categories, "fingerprint": fingerprint, "report": report.__dict__}


def load_dataset(cfg: DataConfig, tokenizer_path: str, split: str = "train") -> TokenizedDataset:
    if cfg.overlong not in ("truncate", "skip"):
        raise DataError(f"data.overlong={cfg.overlong!r}; use 'truncate' or 'skip'")
    if cfg.max_length < 2:
        raise DataError(f"data.max_length={cfg.max_length}; set it >= 2")
    key, path, tail = _split_source(cfg, split)
    if not os.path.isfile(path):
        raise DataError(f"{key}={path!r} does not exist; point {key} at a JSON Lines file")
    fields = {"version": CACHE_VERSION, "data": _sha256_file(path), "tokenizer": tokenizer_fingerprint(tokenizer_path),
              "template": cfg.template, "max_length": cfg.max_length, "overlong": cfg.overlong,
              "split": split, "heldout_tail": tail}
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    cache_dir = cfg.cache_dir or path + ".tokcache"
    os.makedirs(cache_dir, exist_ok=True)
    cache_file = os.path.join(cache_dir, f"{split}-{fingerprint[:20]}.pt")
    # one rank tokenises; the others wait on the lock and then read its file
    with open(cache_file + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from_cache = os.path.isfile(cache_file)
        if from_cache:
            state = torch.load(cache_file, weights_only=True)
        else:
            state = _build(cfg, key, path, split, tail, tokenizer_path, fingerprint)
            tmp = f"{cache_file}.tmp.{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, cache_file)
    ds = TokenizedDataset(state, from_cache)
    (log.warning if ds.report.bad else log.info)("data %s%s: %s", split, " (cached)" if from_cache else "",
                                                  ds.report.summary())
    if split == "train" and ds.report.repeated_share > REPEAT_SHARE_WARNING:
        log.warning("%.0f%% of the trained tokens in %s repeat a %d-gram earlier in their conversation (the "
                    "target loops?): the trainer's accuracy will run above the acceptance of generations "
                    "shorter than these answers; compare them at equal lengths (docs/real_model.md)",
                    100 * ds.report.repeated_share, path, REPEAT_NGRAM)
    share = ds.report.heldout / max(1, ds.report.heldout + ds.report.lines)
    if share > HELDOUT_SHARE_WARNING:
        log.warning("data.heldout_size=%d holds out %.0f%% of %s from training; lower data.heldout_size or set "
                    "data.heldout_path to a separate file", ds.report.heldout, 100 * share, path)
    return ds


@dataclass(frozen=True)
class EvalPrompt:
    sample_id: str
    prompt_ids: list[int]  # up to and including the header of the last assistant turn
    reference_ids: list[int]  # that turn's answer, end-of-turn token included (not when it was cut off)
    category: Optional[str] = None  # the line's "category", for per-category acceptance


def load_heldout_prompts(cfg: DataConfig, tokenizer_path: str, n: int) -> list[EvalPrompt]:
    """The first n held-out conversations that end in an assistant turn, split into prompt and answer."""
    ds = load_dataset(cfg, tokenizer_path, "heldout")
    prompts = []
    for i in range(len(ds)):
        p, e = int(ds.prompt_len[i]), int(ds.answer_end[i])
        if p > 0 and e > p:
            a = int(ds.offsets[i])
            prompts.append(EvalPrompt(ds.sample_ids[i], ds.tokens[a:a + p].tolist(), ds.tokens[a + p:a + e].tolist(),
                                      ds.categories[i]))
        if len(prompts) == n:
            break
    if not prompts:
        raise DataError(f"the held-out split ({ds.report.path}) has no conversation with an assistant turn "
                        "to evaluate; set data.heldout_path to chat data")
    return prompts


def token_counts(dataset: TokenizedDataset, vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: how often each token id is a training target (under the loss mask)."""
    ids = dataset.tokens[dataset.mask].long()
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise DataError(f"token id {int(ids.max())} >= vocab_size={vocab_size}: the dataset was tokenised "
                        "with a different tokenizer than the target's; set target.tokenizer to match")
    return torch.bincount(ids, minlength=vocab_size)
