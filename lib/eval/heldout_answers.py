"""Held-out prompts with no answer yet, answered by the target before evaluation.

Prompt files (tools/real_prompts.py) hold lines such as `[user]` or `[user, assistant "", user]`: no
answer to evaluate against, so the loader would reject them (`no_assistant_turn`). Evaluation compares
against the target's own greedy output anyway, so eval.py lets the target write the missing answers
first: every empty assistant turn and a final user turn get the target's greedy answer, turn by turn;
answers a line already has are kept. Lines with every answer in place are copied unchanged.

This module picks the lines, names the filled file and writes it; the answering itself is
tools/regenerate.py's machinery, which eval.py passes in (`answer`), since lib/ imports no entry script.
Only the first eval.num_prompts conversations are taken (the loader takes no more). The filled file
is named by a hash of those lines, the target checkpoint and the answer settings, so a rerun reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from lib.config import Config
from lib.data.datasets import _read_lines, _split_source
from lib.data.records import SHAREGPT_ROLES

ANSWER_FORMAT = 1  # bump when the filled file's content changes for the same inputs, so old ones are not reused
DEFAULT_DIR = "answered-heldout"  # under lib.target.checkpoint.cache_root() when eval.py has no --out
# answer(texts, filled): each pending line's answered object by its index in `texts` (lines that cannot
# be answered left out); `filled` is the file to be written, for the answerer's own working files.
Answerer = Callable[[list[str], str], dict[int, dict]]


class AnswerError(ValueError):
    """The held-out prompts cannot be answered as configured; the message names the key and the fix."""


def _roles(text: str) -> Optional[list[tuple[str, str]]]:
    """(role, content) per turn of a conversation line (role/content or ShareGPT); None for anything
    else (pre-formatted text, malformed lines: the loader reports those)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return None
    out = []
    for t in turns:
        role = t["role"] if "role" in t else SHAREGPT_ROLES.get(t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            return None
        out.append((role, content))
    return out if any(role == "user" for role, _ in out) else None


def missing_answers(text: str) -> bool:
    """True for a conversation line with an empty assistant turn after a user turn, or ending with a
    user turn; False for an answered line and for anything that is not a conversation."""
    turns = _roles(text)
    if turns is None:
        return False
    seen_user = False
    for role, content in turns:
        seen_user = seen_user or role == "user"
        if role == "assistant" and seen_user and not content.strip():
            return True
    return turns[-1][0] == "user"


@dataclass
class AnswerReport:
    file: str  # the held-out file evaluated (the filled one)
    source: str  # the file the prompts came from
    lines: int  # lines taken from it
    answered_lines: int  # lines that had answers missing
    dropped_lines: int  # of those, lines whose prompt alone exceeds data.max_length
    reused: bool  # the filled file came from an earlier run
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _target_identity(path: str) -> dict:
    """The checkpoint by place and weights (size and modification time of each file), so a retrained
    checkpoint at the same path is not answered for by its predecessor's cached answers."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".json")))
    return {"path": os.path.abspath(path),
            "files": [[f, os.path.getsize(os.path.join(path, f)), os.stat(os.path.join(path, f)).st_mtime_ns]
                      for f in files]}


def _take(lines: list[tuple[int, str]], n: int) -> list[tuple[int, str]]:
    """The lines up to and including the n-th conversation (what the loader will use)."""
    taken, conversations = [], 0
    for line_no, text in lines:
        if conversations == n:
            break
        taken.append((line_no, text))
        conversations += _roles(text) is not None
    return taken


def answer_heldout(cfg: Config, answer_max_new_tokens: int, answer: Answerer,
                   out_dir: Optional[str] = None) -> tuple[Config, Optional[AnswerReport]]:
    """cfg with data.heldout_path at a filled copy of the held-out prompts, and what was done; cfg
    unchanged and None when every prompt that evaluation takes already has its answers (`answer` is
    then never called).

    cfg must be resolved and prepared (lib.target.checkpoint.prepare_target): target.path an HF directory.
    """
    from lib.target.checkpoint import cache_root

    key, source, tail = _split_source(cfg.data, "heldout")
    if not os.path.isfile(source):
        return cfg, None  # the loader names the missing file and the key
    taken = _take(_read_lines(key, source, "heldout", tail), cfg.eval.num_prompts)
    pending = [i for i, (_, text) in enumerate(taken) if missing_answers(text)]
    if not pending:
        return cfg, None
    where = f"{key}={source!r}" + (f" (its last data.heldout_size={tail} lines)" if tail else "")
    if cfg.target.random_init or not cfg.target.path:
        raise AnswerError(f"{where} has {len(pending)} prompts without answers, and a random-init target cannot "
                          "answer them; answer them first (tools/regenerate.py --target CHECKPOINT --temperature 0) "
                          "or evaluate with a checkpoint in target.path")
    if answer_max_new_tokens < 1:
        raise AnswerError(f"--answer-max-new-tokens={answer_max_new_tokens}: must be >= 1, e.g. 256")
    settings = {"format": ANSWER_FORMAT, "lines": hashlib.sha256("\n".join(t for _, t in taken).encode()).hexdigest(),
                "target": _target_identity(cfg.target.path), "answer_max_new_tokens": answer_max_new_tokens,
                "final_max_new_tokens": cfg.eval.max_new_tokens, "max_length": cfg.data.max_length}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.basename(source).removesuffix(".jsonl") + ("-heldout" if tail else "")
    folder = os.path.abspath(out_dir) if out_dir else os.path.join(cache_root(), DEFAULT_DIR)
    filled = os.path.join(folder, f"{stem}.answered-{digest}.jsonl")
    start = time.perf_counter()
    reused = os.path.isfile(filled)
    dropped = 0
    if reused:
        with open(filled) as f:
            dropped = len(taken) - sum(1 for line in f if line.strip())
        print(f"held-out: {len(pending)} of the {len(taken)} lines taken from {where} have answers missing; "
              f"reusing the target's answers from {filled}", flush=True)
    else:
        print(f"held-out: {len(pending)} of the {len(taken)} lines taken from {where} have answers missing; the "
              f"target answers them (greedy, {answer_max_new_tokens} new tokens a turn, the last turn "
              f"eval.max_new_tokens={cfg.eval.max_new_tokens})", flush=True)
        if cfg.data.template != "auto":
            print(f"held-out: note: the answers follow the tokenizer's own chat template; data.template="
                  f"{cfg.data.template} formats the evaluation prompts", flush=True)
        os.makedirs(folder, exist_ok=True)
        answers = answer([taken[i][1] for i in pending], filled)
        dropped = sum(i not in answers for i in range(len(pending)))
        _write(filled, taken, dict(zip(pending, range(len(pending)))), answers, os.path.basename(source))
        print(f"held-out: {len(pending) - dropped} lines answered in {time.perf_counter() - start:.1f} s"
              + (f", {dropped} dropped (prompt alone longer than data.max_length={cfg.data.max_length})"
                 if dropped else "") + f" -> {filled}", flush=True)
    data = replace(cfg.data, heldout_path=filled, path=cfg.data.path or filled)
    report = AnswerReport(filled, source, len(taken), len(pending), dropped, reused, time.perf_counter() - start)
    return replace(cfg, data=data), report


def _write(filled: str, taken: list[tuple[int, str]], pending: dict[int, int], answers: dict[int, dict],
           source_name: str) -> None:
    """The taken lines in order, answered ones replaced; a line without an id gets the one the loader
    would have given it in the source file, so sample ids do not change with the file."""
    out = []
    for i, (line_no, text) in enumerate(taken):
        if i in pending:
            obj = answers.get(pending[i])
            if obj is None:
                continue
            if isinstance(obj.get("regenerated"), dict):
                obj["regenerated"]["source_line"] = line_no  # the source file's line, not the pending file's
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict) or "id" in obj:
                out.append(text.rstrip("\n"))
                continue
        obj.setdefault("id", f"{source_name}:{line_no}")
        out.append(json.dumps(obj, ensure_ascii=False))
    tmp = f"{filled}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in out))
    os.replace(tmp, filled)  # the name means "complete": a rerun reuses it
