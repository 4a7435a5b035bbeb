"""Show what the loss mask trains: samples of the tokenised data with their trained tokens marked.

    python tools/show_masks.py                                           # the embedded tiny data
    python tools/show_masks.py target=smollm2_135m data=jsonl data.path=regen.jsonl --n 5
    python tools/show_masks.py target.path=/models/Qwen3-8B data=jsonl data.path=/data/chat.jsonl \\
        --split heldout --start 10 --plain | less

Any other argument is a Hydra override of conf/, as for train.py (target=, target.path=, data=,
data.path=, data.template=, data.max_length=, ...). The target is resolved as training resolves it (a
GGUF file is converted once and cached: lib/target/checkpoint.py) and the data is loaded through the
training pipeline (lib/data/datasets.py, reusing its cached tokenisation), so what is shown is what
the draft trains on. Each sample's text is printed token run by token run, special tokens included:
on a terminal trained runs are green and the rest dim; with --plain, or when stdout is not a
terminal, trained runs are put in ⟦ ⟧ instead.

Per sample: its id, category, tokens, trained tokens, and for each answer whether its end-of-turn
marker is trained. It is not after an answer cut off by a token limit (`"regenerated": {"finish":
[..., "length"]}` from tools/regenerate.py, or a turn's own `"finish": "length"`): the target never
ended that turn there, so the draft must not learn to. "none" means the sample ends inside the answer
(cut at data.max_length).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: never part of a chat template's markup
TRAINED_COLOUR, UNTRAINED_COLOUR, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's examples as written, and every option's default."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--n", type=int, default=3, help="samples to show")
    ap.add_argument("--split", choices=["train", "heldout"], default="train",
                    help="the training split, or the held-out one (data.heldout_path or data.path's tail)")
    ap.add_argument("--start", type=int, default=0, help="index of the first sample shown, among the kept samples")
    ap.add_argument("--plain", action="store_true",
                    help=f"mark trained runs with {OPEN} {CLOSE} instead of colour (always so when stdout is not a "
                         "terminal)")
    args, overrides = ap.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        ap.error(f"unrecognised arguments {unknown}: flags are listed above; config overrides look like key=value")
    if args.n < 1 or args.start < 0:
        ap.error(f"--n={args.n} --start={args.start}: --n must be >= 1 and --start >= 0")
    args.overrides = overrides
    return args


def runs(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal [start, end) runs of equal mask values."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((start, i, mask[start]))
            start = i
    return out


def run_texts(tokenizer: Any, ids: list[int], spans: list[tuple[int, int, bool]]) -> list[str]:
    """Each run's text, as the difference of decoded prefixes: decoding a run alone can lose the space
    or the byte a token shares with the run before it."""
    texts, before = [], ""
    for start, end, _ in spans:
        upto = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if upto.startswith(before):
            texts.append(upto[len(before):])
        else:
            texts.append(tokenizer.decode(ids[start:end], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False))
        before = upto
    return texts


def end_of_turn_trained(ids: list[int], spans: list[tuple[int, int, bool]], eot: list[int]) -> list[str]:
    """Per trained run (an answer): "yes" when it ends with the end-of-turn marker, "no (cut off)" when
    the marker follows it untrained, "none" when neither (the sample ends inside the answer)."""
    out = []
    for start, end, trained in spans:
        if not trained:
            continue
        if eot and ids[max(start, end - len(eot)):end] == eot:
            out.append("yes")
        elif eot and ids[end:end + len(eot)] == eot:
            out.append("no (cut off)")
        else:
            out.append("none")
    return out


def render(texts: list[str], spans: list[tuple[int, int, bool]], colour: bool) -> str:
    parts = []
    for text, (_, _, trained) in zip(texts, spans):
        if colour:
            parts.append((TRAINED_COLOUR if trained else UNTRAINED_COLOUR) + text + RESET)
        else:
            parts.append(OPEN + text + CLOSE if trained else text)
    return "".join(parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from lib.config import ConfigError, LaunchShape, compose, resolve
    from lib.data.datasets import DataError, load_dataset
    from lib.data.templates import TemplateError, get_template
    from lib.target.checkpoint import prepare_target

    try:
        # No GPU counted: nothing here runs the model, and a GGUF target is converted for the CPU.
        cfg = prepare_target(resolve(compose(args.overrides), LaunchShape(1, 1, 1, 0)))
        tokenizer_path = cfg.target.tokenizer or cfg.target.path
        if tokenizer_path is None:
            raise ConfigError("target.tokenizer: this target has no checkpoint; set target.tokenizer to a directory "
                              "with tokenizer files")
        ds = load_dataset(cfg.data, tokenizer_path, args.split)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        marker = getattr(get_template(cfg.data.template, tokenizer), "end_of_turn", "")
    except (ConfigError, DataError, TemplateError) as err:
        print(f"show_masks: {err}", file=sys.stderr)
        return 2
    if args.start >= len(ds):
        print(f"show_masks: --start={args.start}: the {args.split} split has {len(ds)} samples; give a smaller "
              "--start", file=sys.stderr)
        return 2
    eot = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    colour = not args.plain and sys.stdout.isatty()
    print(f"data {args.split}{' (cached)' if ds.from_cache else ''}: {ds.report.summary()}")
    print(f"template {cfg.data.template}, end-of-turn marker {marker!r}, tokenizer {tokenizer_path}")
    for i in range(args.start, min(len(ds), args.start + args.n)):
        ids, mask = ds[i]
        spans = runs(mask)
        eot_state = end_of_turn_trained(ids, spans, eot)
        print(f"\n== sample {i}: id={ds.sample_ids[i]} category={ds.categories[i] or '-'} tokens={len(ids)} "
              f"trained={sum(mask)} end-of-turn trained per answer: {', '.join(eot_state) or '-'}")
        print(render(run_texts(tokenizer, ids, spans), spans, colour))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
