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

With --self-instruct-seeds FILE (JSON Lines, e.g. the training split of tools/real_prompts.py; never
the held-out split), each row's user message starts with the first --self-instruct-seed-words words of
one seed line's first user turn (the seeds taken in turn, one category after another), and the target
writes the rest: questions that open as the seeds do (code, math, extraction...) instead of only what
the target asks unprompted. A seeded question keeps its opening words; its line's category is
"self-instruct:<the seed's category>".

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


@dataclass(frozen=True)
class Seed:
    opening: str  # the first words of a seed line's first user turn
    category: str


def first_user_turn(line: str) -> Optional[tuple[str, Optional[str]]]:
    """(content of the first user turn, category) of a JSON Lines conversation (role/content or ShareGPT),
    or None when the line has none."""
    from lib.data.records import SHAREGPT_ROLES

    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    for turn in turns if isinstance(turns, list) else []:
        role = turn.get("role", SHAREGPT_ROLES.get(turn.get("from"))) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if role == "user" else None
        if isinstance(content, str) and content.strip():
            category = obj.get("category")
            return content, category if isinstance(category, str) else None
    return None


def load_seeds(path: str, words: int) -> list[Seed]:
    """One Seed per line of `path` with a user turn (its first `words` words), the categories interleaved
    (one of each in turn, each in file order); SelfInstructError naming the file when none has one."""
    seeds = []
    with open(path) as f:
        for line in f:
            found = first_user_turn(line) if line.strip() else None
            if found:
                seeds.append(Seed(" ".join(found[0].split()[:words]), found[1] or "seed"))
    if not seeds:
        raise SelfInstructError(f"--self-instruct-seeds={path!r}: no line with a user turn to open questions with; "
                                "give a JSON Lines file of conversations (e.g. tools/real_prompts.py's train.jsonl)")
    # Categories taken in turn (a file grouped by category would otherwise give N questions of the first).
    groups: dict[str, list[Seed]] = {}
    for seed in seeds:
        groups.setdefault(seed.category, []).append(seed)
    rounds = max(len(g) for g in groups.values())
    return [g[i] for i in range(rounds) for g in groups.values() if i < len(g)]


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
    categories: list[str] = field(default_factory=list)  # one per question
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


def sample_questions(backend: Any, n: int, sampling: Any, chat_template_kwargs: dict, max_length: int,
                     seeds: Optional[list[Seed]] = None) -> Sampled:
    """Up to n distinct user turns from `backend` (a tools.regen_backends.LocalTarget); row r opens with
    seeds[r % len(seeds)] when seeds are given."""
    prefix = user_turn_prefix(backend.tokenizer, chat_template_kwargs)
    # No space after the opening: the target's next token brings its own (as BPE vocabularies write words).
    starts = [Seed("", CATEGORY)] if not seeds else [Seed(s.opening, f"{CATEGORY}:{s.category}") for s in seeds]
    prompts = [backend.tokenizer(prefix + s.opening, add_special_tokens=False)["input_ids"] for s in starts]
    longest = max(len(ids) for ids in prompts)
    budget = min(sampling.max_new_tokens, max_length - longest)
    if budget < 1:
        raise SelfInstructError(f"--max-length={max_length}: the question's prompt alone takes {longest} tokens; "
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
        rows = [(r, prompts[r % len(starts)], budget) for r in range(out.drawn, out.drawn + take)]
        out.drawn += take
        live += take
        return rows

    start = time.perf_counter()
    for row, (text, finish) in backend.stream(feed, seed=sampling.seed, sampling=sampling):
        live -= 1
        opening = starts[row % len(starts)]
        text = (opening.opening + text).strip()
        key = normalise(text)
        reason = ("cut_off" if finish != "stop" else "special_token" if any(s in text for s in specials)
                  else "too_short" if len(text) < MIN_CHARS else "duplicate" if key in seen else None)
        if reason:
            out.dropped[reason] += 1
            continue
        seen.add(key)
        out.questions.append(text)
        out.categories.append(opening.category)
        if len(out.questions) == n:
            break  # closes the stream: rows still decoding are dropped unfinished
    out.seconds = time.perf_counter() - start
    return out


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)


def question_line(i: int, text: str, category: str = CATEGORY) -> str:
    return json.dumps({"id": f"self-instruct-{i}", "category": category,
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
        seeds = load_seeds(cfg.self_instruct_seeds, cfg.self_instruct_seed_words) if cfg.self_instruct_seeds else None
        backend = make_backend()  # after the seeds: a bad seed file fails before the target loads
        sampled = sample_questions(backend, cfg.self_instruct, cfg.self_instruct_sampling, cfg.chat_template_kwargs,
                                   cfg.max_length, seeds)
        print(sampled.summary(cfg.self_instruct) + f" -> {path}", file=sys.stderr, flush=True)
        backend.reset_stats()
        if not sampled.questions:
            raise SelfInstructError(f"--self-instruct={cfg.self_instruct}: no question kept from {sampled.drawn} "
                                    "samples (see the counts above); raise --self-instruct-max-tokens or give --input")
        _write_atomically(path, lambda f: f.writelines(question_line(i, q, c) for i, (q, c) in
                                                        enumerate(zip(sampled.questions, sampled.categories))))
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
