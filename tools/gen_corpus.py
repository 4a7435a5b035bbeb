"""Generate the embedded procedural conversation corpus (assets/tiny_data).

Every conversation is built here from small task families with checkable answers, so the project
ships its own data and the tiny target's greedy answers can be scored exactly. The answer format
of a family is fixed (it depends only on the question and on whether a "terse" system message asks
for the bare result): a target can then learn it, and a draft model has something to predict.

Output: JSON Lines `{"id", "conversations": [{"role", "content"}], "tasks": [family per assistant
turn]}`. `tasks` is extra metadata for scoring; the data pipeline ignores unknown keys.

    python tools/gen_corpus.py --out-dir assets/tiny_data --train 16000 --heldout 400
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from typing import Callable

WORDS = (
    "apple river stone garden window candle forest silver rocket pencil mirror button ladder "
    "orange planet market basket bridge castle dragon engine feather guitar harbor island jacket "
    "kitten lemon meadow needle ocean parrot pepper rabbit saddle tunnel valley wagon yellow zipper "
    "anchor banana cactus dollar eagle falcon ginger hammer insect jungle kettle lizard magnet "
    "napkin pillow quartz ribbon salmon tomato violin walnut cherry dinner energy finger helmet "
    "lantern monkey number orbit puzzle rocket summer ticket winter butter cotton desert frozen "
    "hollow marble pirate shadow spider sunset thunder turtle velvet wizard coffee letter "
    "bottle camera cookie copper flower garlic honey mango noodle potato silk table wallet"
).split()
WORDS = tuple(dict.fromkeys(WORDS))  # keep first occurrence, stable order
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
# (from unit, to unit, factor, largest quantity asked): small quantities where the factor is not a
# power of ten keep the multiplication within reach of a tiny model.
UNITS = (
    ("kilometers", "meters", 1000, 99),
    ("meters", "centimeters", 100, 99),
    ("kilograms", "grams", 1000, 99),
    ("liters", "milliliters", 1000, 99),
    ("hours", "minutes", 60, 12),
    ("minutes", "seconds", 60, 12),
    ("days", "hours", 24, 9),
    ("weeks", "days", 7, 12),
)
PLAIN_SYSTEMS = (
    "You are a helpful assistant.",
    "You are a patient tutor who answers questions about numbers and words.",
    "You are a careful assistant. Check your work.",
    "You help with small puzzles.",
    "Be friendly and precise.",
)
TERSE_SYSTEMS = (
    "Reply with the answer only.",
    "Give only the final result, nothing else.",
    "Answer tersely: just the result.",
)


@dataclass(frozen=True)
class Turn:
    family: str
    question: str
    full_answer: str  # the answer under a plain (or no) system message
    bare_answer: str  # the answer under a terse system message
    state: object = None  # what a follow-up question builds on


def _addition(rng: random.Random) -> Turn:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    q = rng.choice((
        f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute the sum of {a} and {b}.",
        f"What do you get when you add {b} to {a}?", f"{a} plus {b} equals what?",
        f"Please calculate {a} + {b}.",
    ))
    return Turn("addition", q, f"{a} + {b} = {a + b}.", str(a + b), a + b)


def _subtraction(rng: random.Random) -> Turn:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    a, b = max(a, b), min(a, b)
    q = rng.choice((
        f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Compute {a} minus {b}.",
        f"What is the difference between {a} and {b}?", f"Take {b} away from {a}. What is left?",
    ))
    return Turn("subtraction", q, f"{a} - {b} = {a - b}.", str(a - b), a - b)


def _sorting(rng: random.Random) -> Turn:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    listed = ", ".join(map(str, nums))
    if rng.random() < 0.5:
        q = rng.choice((f"Sort these numbers from smallest to largest: {listed}.",
                        f"Put {listed} in ascending order.",
                        f"Order the list {listed} from low to high."))
        result = ", ".join(map(str, sorted(nums)))
        return Turn("sorting", q, f"In ascending order: {result}.", result)
    q = rng.choice((f"Sort these numbers from largest to smallest: {listed}.",
                    f"Put {listed} in descending order.",
                    f"Order the list {listed} from high to low."))
    result = ", ".join(map(str, sorted(nums, reverse=True)))
    return Turn("sorting", q, f"In descending order: {result}.", result)


def _reverse(rng: random.Random) -> Turn:
    w = rng.choice(WORDS)
    q = rng.choice((f"Reverse the word '{w}'.", f"Spell '{w}' backwards.",
                    f"What is '{w}' written in reverse?", f"Write the letters of '{w}' in reverse order."))
    return Turn("reverse", q, f"'{w}' reversed is '{w[::-1]}'.", w[::-1])


def _uppercase(rng: random.Random) -> Turn:
    w = rng.choice(WORDS)
    q = rng.choice((f"Write '{w}' in capital letters.", f"Convert '{w}' to uppercase.",
                    f"How is '{w}' spelled in all caps?", f"Make the word '{w}' uppercase."))
    return Turn("uppercase", q, f"In uppercase, '{w}' is '{w.upper()}'.", w.upper())


def _count_letter(rng: random.Random) -> Turn:
    w = rng.choice(WORDS)
    # mostly letters of the word; sometimes one it lacks, so "0" is a possible answer
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = w.count(letter)
    q = rng.choice((f"How many times does the letter '{letter}' appear in '{w}'?",
                    f"Count the letter '{letter}' in the word '{w}'.",
                    f"How many '{letter}'s are there in '{w}'?"))
    times = "time" if n == 1 else "times"
    return Turn("count_letter", q, f"The letter '{letter}' appears {n} {times} in '{w}'.", str(n))


def _unit_conversion(rng: random.Random) -> Turn:
    src, dst, factor, largest = rng.choice(UNITS)
    n = rng.randint(2, largest)
    q = rng.choice((f"Convert {n} {src} to {dst}.", f"How many {dst} are in {n} {src}?",
                    f"What is {n} {src} in {dst}?", f"Express {n} {src} in {dst}."))
    return Turn("unit_conversion", q, f"{n} {src} is {n * factor} {dst}.", str(n * factor))


def _sequence(rng: random.Random) -> Turn:
    start, step, count = rng.randint(0, 60), rng.randint(1, 12), rng.randint(4, 5)
    terms = [start + i * step for i in range(count)]
    listed = ", ".join(map(str, terms))
    q = rng.choice((f"What comes next in the sequence {listed}?", f"Continue the pattern: {listed}, ...",
                    f"Find the next number: {listed}.", f"Which number follows {listed}?"))
    nxt = start + count * step
    return Turn("sequence", q, f"The next number is {nxt}.", str(nxt))


def _weekday(rng: random.Random) -> Turn:
    i = rng.randrange(7)
    r = rng.random()
    if r < 0.4:
        q = rng.choice((f"What day comes after {DAYS[i]}?", f"Which day follows {DAYS[i]}?",
                        f"If today is {DAYS[i]}, what day is tomorrow?"))
        j = (i + 1) % 7
        return Turn("weekday", q, f"The day after {DAYS[i]} is {DAYS[j]}.", DAYS[j], j)
    if r < 0.7:
        q = rng.choice((f"What day comes before {DAYS[i]}?", f"Which day precedes {DAYS[i]}?",
                        f"If today is {DAYS[i]}, what day was yesterday?"))
        j = (i - 1) % 7
        return Turn("weekday", q, f"The day before {DAYS[i]} is {DAYS[j]}.", DAYS[j], j)
    k = rng.randint(2, 6)
    q = rng.choice((f"What day is {k} days after {DAYS[i]}?", f"If today is {DAYS[i]}, what day is it in {k} days?",
                    f"Count {k} days forward from {DAYS[i]}. Which day is it?"))
    j = (i + k) % 7
    return Turn("weekday", q, f"{k} days after {DAYS[i]} is {DAYS[j]}.", DAYS[j], j)


def _month(rng: random.Random) -> Turn:
    i = rng.randrange(12)
    if rng.random() < 0.6:
        q = rng.choice((f"Which month comes after {MONTHS[i]}?", f"What month follows {MONTHS[i]}?",
                        f"Name the month after {MONTHS[i]}."))
        j = (i + 1) % 12
        return Turn("month", q, f"The month after {MONTHS[i]} is {MONTHS[j]}.", MONTHS[j])
    k = rng.randint(2, 5)
    q = rng.choice((f"Which month is {k} months after {MONTHS[i]}?", f"What month comes {k} months after {MONTHS[i]}?"))
    j = (i + k) % 12
    return Turn("month", q, f"{k} months after {MONTHS[i]} is {MONTHS[j]}.", MONTHS[j])


FAMILIES: dict[str, Callable[[random.Random], Turn]] = {
    "addition": _addition, "subtraction": _subtraction, "sorting": _sorting, "reverse": _reverse,
    "uppercase": _uppercase, "count_letter": _count_letter, "unit_conversion": _unit_conversion,
    "sequence": _sequence, "weekday": _weekday, "month": _month,
}


def _follow_up(rng: random.Random, prev: Turn) -> Turn | None:
    """A question that only makes sense with the previous turn in context (multi-turn skill)."""
    if prev.family in ("addition", "subtraction"):
        k = rng.randint(2, 99)
        total = prev.state + k
        q = rng.choice((f"Now add {k} to that.", f"And if you add {k} more?", f"Add {k} to the result."))
        return Turn("addition", q, f"{prev.state} + {k} = {total}.", str(total), total)
    if prev.family == "weekday":
        i = prev.state
        j = (i + 1) % 7
        q = rng.choice(("And the day after that?", "What comes after that one?"))
        return Turn("weekday", q, f"The day after {DAYS[i]} is {DAYS[j]}.", DAYS[j], j)
    return None


def make_conversation(rng: random.Random) -> tuple[list[dict[str, str]], list[str]]:
    messages: list[dict[str, str]] = []
    terse = False
    r = rng.random()
    if r < 0.12:
        terse = True
        messages.append({"role": "system", "content": rng.choice(TERSE_SYSTEMS)})
    elif r < 0.30:
        messages.append({"role": "system", "content": rng.choice(PLAIN_SYSTEMS)})
    n_turns = rng.choices((1, 2, 3), weights=(70, 20, 10))[0]
    tasks: list[str] = []
    prev: Turn | None = None
    for _ in range(n_turns):
        turn = _follow_up(rng, prev) if prev is not None and rng.random() < 0.5 else None
        if turn is None:
            turn = FAMILIES[rng.choice(list(FAMILIES))](rng)
        messages.append({"role": "user", "content": turn.question})
        messages.append({"role": "assistant", "content": turn.bare_answer if terse else turn.full_answer})
        tasks.append(turn.family)
        prev = turn
    return messages, tasks


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What makes two conversations 'the same prompt': everything but the final answer."""
    return json.dumps(messages[:-1], sort_keys=True)


def generate(n: int, seed: int, prefix: str, exclude: set[str] | None = None) -> list[dict]:
    """n conversations, deterministic in seed; prompts in `exclude` and repeats are skipped."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    records = []
    while len(records) < n:
        messages, tasks = make_conversation(rng)
        key = prompt_key(messages)
        if key in seen:
            continue
        seen.add(key)
        records.append({"id": f"{prefix}-{len(records):06d}", "conversations": messages, "tasks": tasks})
    return records


def write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_data"))
    ap.add_argument("--train", type=int, default=16000, help="training conversations")
    ap.add_argument("--heldout", type=int, default=400, help="held-out conversations (disjoint prompts)")
    ap.add_argument("--seed", type=int, default=1234, help="train seed; held-out uses seed + 1")
    args = ap.parse_args(argv)
    if args.train < 1 or args.heldout < 1:
        ap.error(f"--train ({args.train}) and --heldout ({args.heldout}) must be >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    train = generate(args.train, args.seed, "train")
    heldout = generate(args.heldout, args.seed + 1, "heldout", exclude={prompt_key(r["conversations"]) for r in train})
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "heldout.jsonl"), heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out conversations to {args.out_dir}")


if __name__ == "__main__":
    main()
