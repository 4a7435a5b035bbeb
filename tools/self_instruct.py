"""`tools/regenerate.py --self-instruct N`: the target writes the questions too, for users with no data.

    python tools/regenerate.py --target /models/model.gguf --self-instruct 1000 --output regen.jsonl
    python tools/regenerate.py --target /models/Qwen3-8B --input mine.jsonl --self-instruct 500 --output regen.jsonl

The prompt is the target's chat template rendered for a conversation of one user message, cut where
that message's content starts (a template that inserts a default system prompt, as SmolLM2's does,
keeps it). The target continues from there, batched with the answers' sampler (lib/eval/sampling.py),
until it ends the user turn itself. A question is kept when it ended by itself (finish "stop"; one cut
at --self-instruct-max-tokens is dropped, not kept half-written), holds no special token, has at least
MIN_CHARS characters once stripped, and is new (compared with whitespace runs collapsed, ignoring
case). Rows are drawn until N are kept or MAX_SAMPLES(N) were drawn; fewer than N is reported, with
what was dropped and why.

Sampling: at --temperature and --top-p when the answers are sampled too (--temperature > 0); with
greedy answers (--temperature 0, the default) at 1.0 and 0.95: the target's own distribution (the
questions a draft should see) with only the far tail cut, since greedy would write one question N
times. The answers then use --temperature/--top-p exactly as for --input lines.

Files: OUTPUT.self_instruct.jsonl, one line per question,
    {"id": "self-instruct-<n>", "category": "self-instruct", "conversations": [{"role": "user", "content": ...}]}
written whole and then renamed, so it exists only complete. A rerun reuses it as it is (the answers
already in OUTPUT's part files belong to those very lines); delete it to sample again. With --input as
well, OUTPUT.input.jsonl (the input's lines, then the questions) is what regenerate answers, so the
input's lines keep their line numbers. A resume matches lines by number: rerun with the same --input
(or none) and --self-instruct as the run it continues. Under torchrun rank 0 samples while the other
ranks wait at a barrier of the tool's gloo group.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

SELF_INSTRUCT_TEMPERATURE = 1.0
SELF_INSTRUCT_TOP_P = 0.95
SELF_INSTRUCT_MAX_TOKENS = 96
MIN_CHARS = 10  # shorter "questions" are fragments ("Hi", "?") that teach a draft nothing
CATEGORY = "self-instruct"
# Rows kept in flight per question still missing: cut-off and duplicate questions get replaced without a
# last round of one row decoding alone.
OVERSAMPLE = 1.25
_PROBE = "\u2063probe\u2063"  # invisible separators: no template trims or rewrites them


class SelfInstructError(ValueError):
    """The target or a setting cannot make questions; the message names the option, its value and the fix."""


def max_samples(n: int) -> int:
    """How many rows are drawn at most for n questions: a target that mostly repeats itself or runs past
    --self-instruct-max-tokens stops here rather than sampling forever."""
    return 4 * n + 32


def prompts_path(output: str) -> str:
    return output + ".self_instruct.jsonl"


def input_path(output: str, has_input: bool) -> str:
    """What regenerate answers: the questions alone, or --input's lines followed by them."""
    return output + ".input.jsonl" if has_input else prompts_path(output)


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def user_turn_prefix(tokenizer: Any, chat_template_kwargs: dict) -> str:
    """The chat template's text up to where the first user message's content starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                         add_generation_prompt=False, **chat_template_kwargs)
    at = text.find(_PROBE)
    if at < 0:
        raise SelfInstructError("--self-instruct: the target's chat template does not copy the user's message into "
                                "its text, so there is no place to start a question; give --input data instead")
    return text[:at]


@dataclass
class Sampled:
    questions: list[str]
    drawn: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    seconds: float = 0.0

    def summary(self, n: int) -> str:
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        text = (f"self-instruct: {len(self.questions)} of {n} questions kept from {self.drawn} samples in "
                f"{self.seconds:.1f} s (dropped: {why})")
        if len(self.questions) < n:
            text += (f"; stopped at {max_samples(n)} samples: raise --self-instruct-max-tokens if many were "
                     "cut_off, or --temperature if many were duplicate")
        return text


def sample_questions(backend: Any, n: int, sampling: Any, chat_template_kwargs: dict, max_length: int) -> Sampled:
    """Up to n distinct user turns from `backend` (a tools.regen_backends.LocalTarget)."""
    prefix = user_turn_prefix(backend.tokenizer, chat_template_kwargs)
    ids = backend.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    budget = min(sampling.max_new_tokens, max_length - len(ids))
    if budget < 1:
        raise SelfInstructError(f"--max-length={max_length}: the question's prompt alone takes {len(ids)} tokens; "
                                "raise --max-length")
    specials = [t for t in backend.tokenizer.all_special_tokens if t]
    out = Sampled([])
    seen: set[str] = set()
    live = 0
    limit = max_samples(n)

    def feed(k: int) -> list:
        nonlocal live
        want = math.ceil((n - len(out.questions)) * OVERSAMPLE) - live
        take = max(0, min(k, want, limit - out.drawn))
        rows = [(out.drawn + i, ids, budget) for i in range(take)]
        out.drawn += take
        live += take
        return rows

    start = time.perf_counter()
    for _, (text, finish) in backend.stream(feed, seed=sampling.seed, sampling=sampling):
        live -= 1
        text = text.strip()
        key = normalise(text)
        reason = ("cut_off" if finish != "stop" else "special_token" if any(s in text for s in specials)
                  else "too_short" if len(text) < MIN_CHARS else "duplicate" if key in seen else None)
        if reason:
            out.dropped[reason] += 1
            continue
        seen.add(key)
        out.questions.append(text)
        if len(out.questions) == n:
            break  # closes the stream: rows still decoding are dropped unfinished
    out.seconds = time.perf_counter() - start
    return out


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)


def question_line(i: int, text: str) -> str:
    return json.dumps({"id": f"self-instruct-{i}", "category": CATEGORY,
                       "conversations": [{"role": "user", "content": text}]}, ensure_ascii=False) + "\n"


def prepare_input(cfg: Any, make_backend: Callable[[], Any]) -> Optional[Any]:
    """Rank 0, before anything is answered: writes input_path(); returns the backend if one was built.

    `cfg` is tools.regen_args.RegenConfig; the questions are sampled only when no complete
    OUTPUT.self_instruct.jsonl exists."""
    path, backend = prompts_path(cfg.output), None
    if os.path.exists(path):
        with open(path) as f:
            count = sum(1 for line in f if line.strip())
        print(f"regenerate: reusing the {count} self-instruct questions in {path} (--self-instruct={cfg.self_instruct} "
              "not sampled again; delete the file to sample anew)", file=sys.stderr, flush=True)
    else:
        backend = make_backend()
        sampled = sample_questions(backend, cfg.self_instruct, cfg.self_instruct_sampling, cfg.chat_template_kwargs,
                                   cfg.max_length)
        print(sampled.summary(cfg.self_instruct) + f" -> {path}", file=sys.stderr, flush=True)
        backend.reset_stats()
        if not sampled.questions:
            raise SelfInstructError(f"--self-instruct={cfg.self_instruct}: no question kept from {sampled.drawn} "
                                    "samples (see the counts above); raise --self-instruct-max-tokens or give --input")
        _write_atomically(path, lambda f: f.writelines(question_line(i, q) for i, q in enumerate(sampled.questions)))
    if cfg.input is None:
        return backend
    combined = input_path(cfg.output, True)

    def write(f: Any) -> None:
        # Rewritten every run from the same two files, so line numbers stay what the parts recorded.
        with open(cfg.input) as src:
            text = src.read()
        f.write(text if not text or text.endswith("\n") else text + "\n")
        with open(path) as questions:
            f.write(questions.read())

    _write_atomically(combined, write)
    return backend
