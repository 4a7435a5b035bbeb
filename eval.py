"""Offline evaluation of a draft export: acceptance length by greedy speculative decoding.

    python eval.py --draft outputs/run/draft [--out eval.json] [hydra overrides of conf/ ...]
    python eval.py --draft /ckpt/draft target.path=/ckpt/Qwen3-8B data=jsonl data.path=/data/chat.jsonl \\
        eval.draft_tokens=[3,7] eval.num_prompts=64 eval.max_new_tokens=128
    python eval.py --draft RUN/draft target=smollm2_135m data=jsonl data.path=chat.jsonl \\
        data.heldout_path=prompts.jsonl --out eval.json    # a GGUF target; unanswered prompts answered first

The draft's family (eagle3, dflash, ...) is read from the export's config.json, so no draft= is
needed; one given must agree with the export. The target, the held-out prompts (data.heldout_path,
or the last data.heldout_size lines of data.path) and eval.draft_tokens / num_prompts /
max_new_tokens come from the repo's Hydra config, so the same overrides as for train.py apply. For
each k it prints tau, per-position acceptance and speedup proxies, checks the output against plain
greedy decoding, and writes everything to --out (JSON); held-out lines with a "category" also get
those numbers per category. target.path may be any HF checkpoint directory or a GGUF file
(dequantized once, cached). Held-out lines without answers yet (prompt files) are answered by the
target first, and the filled file is reused by later runs.
See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from functools import partial

import torch

from lib.config import ConfigError, LaunchShape, compose, resolve, resolve_device

NO_CATEGORY = "(none)"  # the per-category key of held-out lines without a "category"
ANSWER_SPAN = 64  # answer tokens per group of the by-answer-position table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the description's usage lines kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # A None default is "not given"; the option's help says what that means.
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=HelpFormatter,
                                     epilog="Any other argument is a Hydra override of conf/ (target=..., "
                                            "target.path=..., data=..., data.path=..., eval.draft_tokens=[3,7], ...)")
    parser.add_argument("--draft", required=True, help="draft export directory (config.json + model.safetensors), "
                        "or a run directory holding draft/; its config.json says the family (no draft= needed)")
    parser.add_argument("--out", default=None, help="JSON result file (none: print only); answers the target wrote "
                        "for held-out prompts go next to it")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the config's device= (auto: CUDA when visible)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads when on the CPU (0: one per two "
                        "cores, lib/launch/runtime.py cpu_threads)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts decoded together (none: all)")
    parser.add_argument("--answer-max-new-tokens", type=int, default=256, help="new tokens per answer when the "
                        "target answers held-out prompts that have none (the evaluated last turn gets "
                        "eval.max_new_tokens)")
    parser.add_argument("--no-greedy-check", action="store_true", help="skip plain greedy decoding (faster; no "
                        "matches_greedy / wall_speedup)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}: flags are listed above; config overrides look like key=value")
    if args.threads < 0:
        parser.error(f"--threads={args.threads}: must be >= 0 (0: one per two cores)")
    if args.answer_max_new_tokens < 1:
        parser.error(f"--answer-max-new-tokens={args.answer_max_new_tokens}: must be >= 1, e.g. 256")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size}: must be >= 1 (or left out: all prompts at once)")
    args.overrides = overrides
    return args


def draft_dir(path: str) -> str:
    for candidate in (path, os.path.join(path, "draft")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise SystemExit(f"--draft {path!r}: no config.json there or in {path}/draft; point it at a draft export")


def requested_family(overrides: list[str]) -> str | None:
    """The family named on the command line (draft=CHOICE or draft.name=NAME; the last one wins), if any.
    draft=CHOICE picks a conf file, whose draft.name is the family (draft=eagle3_1 is eagle3)."""
    from lib.config.choices import draft_choice_family

    found = None
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "draft":
            found = draft_choice_family(value)
        elif key.lstrip("+") == "draft.name":
            found = value
    return found


def with_export_family(directory: str, overrides: list[str]) -> list[str]:
    """The overrides with draft=<the export's family> added, so its conf group (eval.draft_tokens,
    draft.options) applies as it did in training; a draft= given must agree with the export."""
    from lib.drafts.base import family_of_export

    requested = requested_family(overrides)
    family = family_of_export(directory, requested, "drop draft= (eval.py reads the family from the export), "
                                                    "or pass draft={family}")
    return list(overrides) if requested is not None else [f"draft={family}", *overrides]


def load_config(args: argparse.Namespace):
    """Composed, resolved for one process on the chosen device, and the target made an HF directory
    (a GGUF dequantized once and cached), as train.py does."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = compose(args.overrides)
    device = resolve_device(args.device if args.device != "auto" else cfg.device, gpus)
    cfg = resolve(replace(cfg, device=device), LaunchShape(1, 1, 1, gpus))
    e = cfg.eval
    if any(k < 1 for k in e.draft_tokens) or e.num_prompts < 1 or e.max_new_tokens < 1:
        raise ConfigError(f"eval.draft_tokens={list(e.draft_tokens)}, eval.num_prompts={e.num_prompts}, "
                          f"eval.max_new_tokens={e.max_new_tokens}: all must be >= 1")
    from lib.target.checkpoint import prepare_target

    return prepare_target(cfg)


def load_target(cfg, device: torch.device):
    from lib.engine.hf import build_random_target
    from lib.target.shape import resolve_dtype
    from lib.target.weights import load_causal_lm

    dtype = resolve_dtype(cfg.target.dtype, device)
    if cfg.target.random_init:
        return build_random_target(cfg.target, dtype, device).eval()
    return load_causal_lm(cfg.target.path, dtype, device)  # prepare_target checked it is an HF checkpoint


def answer_with_regenerate(cfg, batch_size: int, max_new_tokens: int, texts: list[str],
                           filled: str) -> dict[int, dict]:
    """lib.eval.heldout_answers' `answer`: each line of `texts` answered by the target with
    tools/regenerate.py's conversation walk, answer loop, part files and local backend, in this process
    (imported here, and only when there is something to answer: lib/ imports no entry script).

    Greedy, max_new_tokens a turn; answers a line already has are kept and the conversation goes on from
    them; the last answer, only the evaluation's reference, gets eval.max_new_tokens. The part files
    live next to the filled file, so a killed run resumes."""
    import gc
    from dataclasses import dataclass

    from lib.eval.sampling import SamplingConfig
    from tools.regen_backends import LocalTarget
    from tools.regenerate import (Conversation, PartWriter, RegenConfig, answer_lines, merge, parse, part_path,
                                  read_done)

    class Prompt(list):
        """The messages to answer, and whether the answer is the conversation's last."""

        def __init__(self, messages: list[dict], final: bool):
            super().__init__(messages)
            self.final = final

    @dataclass
    class Unanswered(Conversation):
        def next_prompt(self):
            while (prompt := super().next_prompt()) is not None:
                here = self.messages[self.turn] if self.turn < len(self.messages) else None
                if here is None or not here["content"].strip():
                    rest = self.messages[self.turn + 1:]
                    return Prompt(prompt, final=not any(m["role"] in ("user", "assistant") for m in rest))
                # An answer the line has: kept, with the finish reason an earlier regenerate run recorded.
                earlier = (self.obj.get("regenerated") or {}).get("finish")
                n = len(self.answers)
                self.answer(here["content"], earlier[n] if isinstance(earlier, list) and n < len(earlier) else "given")
            return None

    class Answerer(LocalTarget):
        def request(self, messages):
            got = super().request(messages)
            if got is None or not getattr(messages, "final", False):
                return got
            return got[0], min(cfg.eval.max_new_tokens, self.cfg.max_length - len(got[0]))

    pending_file = filled + ".pending.jsonl"
    with open(pending_file, "w") as out:
        out.write("".join(t.rstrip("\n") + "\n" for t in texts))
    # The backend sets torch's CPU threads from its config: keep the count --threads set.
    rcfg = RegenConfig(pending_file, filled + ".answers.jsonl", SamplingConfig(0.0, 1.0, max_new_tokens, 0),
                       target=cfg.target.path, batch_size=batch_size, max_length=cfg.data.max_length,
                       device=cfg.device.value, threads=torch.get_num_threads())
    done, skipped = read_done(rcfg)
    todo = [c for i, t in enumerate(texts) if i not in done and i not in skipped
            and not isinstance(c := parse(i, t), str)]
    writer = PartWriter(part_path(rcfg.output, 0))
    try:
        if todo:
            backend = Answerer(rcfg, 0)
            answer_lines(rcfg, backend, [Unanswered(c.line, c.obj, c.sharegpt, c.messages) for c in todo], writer)
            del backend  # its copy of the target goes before the evaluation loads its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        writer.close()
    merge(rcfg, len(texts))
    with open(rcfg.output) as lines:
        answers = {obj["regenerated"]["source_line"] - 1: obj for obj in map(json.loads, lines)}
    for path in (pending_file, rcfg.output, rcfg.output + ".report.json"):
        os.unlink(path)
    return answers


def per_category(result, prompts) -> dict | None:
    """tau and acceptance per held-out category (None when no line has one), from the same decoding."""
    categories = [p.category if p.category is not None else NO_CATEGORY for p in prompts]
    if all(c == NO_CATEGORY for c in categories):
        return None
    return {str(name): counts.summary() for name, counts in result.by_label(categories).items()}


def format_table(rows: list[dict]) -> str:
    width = max(len(r["accept_rates"]) for r in rows)
    head = ["k", "tau", *[f"acc_{i}" for i in range(width)], "speedup_params", "speedup_measured", "wall_speedup",
            "greedy_match", "tokens", "spec_s"]
    table = [head]
    for r in rows:
        table.append([str(r["k"]), f"{r['tau']:.3f}", *_rates(r["accept_rates"], width), _num(r["speedup_params"]),
                      _num(r["speedup_measured"]), _num(r["wall_speedup"]), str(r["matches_greedy"]), str(r["tokens"]),
                      f"{r['spec_s']:.1f}"])
    return _render(table)


def format_categories(rows: list[dict], num_prompts: int, key: str = "per_category", column: str = "category") -> str:
    """Per k, a row per group (rows[i][key]: a category, or a span of answer positions) and the overall
    row (all) they add up to."""
    width = max(len(r["accept_rates"]) for r in rows)
    table = [["k", column, "prompts", "verify_rows", "tau", *[f"acc_{i}" for i in range(width)]]]
    for r in rows:
        groups = {**r[key], "(all)": {**r, "prompts": num_prompts}}
        for name, g in groups.items():
            table.append([str(r["k"]), name, str(g["prompts"]), str(g["verify_rows"]), f"{g['tau']:.3f}",
                          *_rates(g["accept_rates"], width)])
    return _render(table)


def _rates(rates: list[float], width: int) -> list[str]:
    return [f"{a:.3f}" for a in rates] + ["-"] * (width - len(rates))


def _render(table: list[list[str]]) -> str:
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from lib.data.datasets import DataError
    from lib.eval.heldout_answers import AnswerError, answer_heldout
    from lib.launch.runtime import cpu_threads

    directory = draft_dir(args.draft)
    try:
        args.overrides = with_export_family(directory, args.overrides)
        cfg = load_config(args)
        device = torch.device(cfg.device.value)
        # Before any model loads (the answering below loads the target too).
        threads = cpu_threads(args.threads) if device.type == "cpu" else None
        out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
        answer = partial(answer_with_regenerate, cfg, args.batch_size or 32, args.answer_max_new_tokens)
        cfg, answered = answer_heldout(cfg, args.answer_max_new_tokens, answer, out_dir)
    except (ConfigError, AnswerError, DataError) as err:
        print(f"eval.py: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from lib.data.datasets import load_heldout_prompts
    from lib.drafts.base import get_strategy
    from lib.eval.spec_decode import NEAR_TIE, TargetRunner, speculative_decode
    from lib.eval.target import stop_token_ids

    model = load_target(cfg, device)
    runner = TargetRunner.from_causal_lm(model)
    strategy = get_strategy(cfg.draft.name)  # the export's family: its loader and its drafter
    draft = strategy.drafter(strategy.load_export(directory, device, runner.dtype, model))
    if cfg.target.aux_layers is not None and list(cfg.target.aux_layers) != list(draft.aux_layers):
        print(f"eval.py: target.aux_layers={list(cfg.target.aux_layers)} but the draft was trained on "
              f"{list(draft.aux_layers)}; drop the override (the draft's layers are used)", file=sys.stderr)
        return 2
    tokenizer_path = cfg.target.tokenizer or cfg.target.path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    try:
        prompts = load_heldout_prompts(cfg.data, tokenizer_path, cfg.eval.num_prompts)
    except DataError as err:
        print(f"eval.py: {err}", file=sys.stderr)
        return 2
    stops = stop_token_ids(tokenizer, cfg.target.path)
    target = cfg.target.source or cfg.target.path or cfg.target.name
    print(f"target {target} ({runner.dtype}, {device}{f', {threads} threads' if threads else ''}), draft {directory}, "
          f"{len(prompts)} prompts, max_new_tokens {cfg.eval.max_new_tokens}, stop ids {stops}", flush=True)
    rows = []
    for k in cfg.eval.draft_tokens:
        try:
            result = speculative_decode(runner, draft, [p.prompt_ids for p in prompts], int(k),
                                        cfg.eval.max_new_tokens, stops, check_greedy=not args.no_greedy_check,
                                        batch_size=args.batch_size, progress=not args.no_progress)
        except ValueError as err:  # a draft for another target, prompts outside its vocabulary, ...
            print(f"eval.py: {err}", file=sys.stderr)
            return 2
        rows.append(result.summary())
        categories = per_category(result, prompts)
        if categories is not None:
            rows[-1]["per_category"] = categories
        rows[-1]["by_answer_position"] = {name: counts.summary() for name, counts
                                          in result.by_answer_position(ANSWER_SPAN).items()}
        if result.matches_greedy is False:
            widest = max(result.greedy_margins.values(), default=0.0)
            why = (f"near-ties: the two tokens' logits differ by at most {widest:.3f} where they part, rounding "
                   f"in {runner.dtype} (target.dtype=float32 decodes exactly)" if widest < NEAR_TIE else
                   f"NOT near-ties: the target's logits differ by up to {widest:.3f} where they part (over "
                   f"{NEAR_TIE:g}); the speculative path computed something greedy decoding does not: a bug")
            print(f"warning: k={k}: prompts {result.mismatched_prompts} differ from plain greedy decoding; {why}",
                  file=sys.stderr)
    print(format_table(rows))
    if "per_category" in rows[0]:
        print("\nper category (same decoding; the categories' counts add up to the (all) row):")
        print(format_categories(rows, len(prompts)))
    if len(rows[0]["by_answer_position"]) > 1:
        print(f"\nby where the round starts in the answer ({ANSWER_SPAN} tokens a span; a target that starts "
              "repeating itself is easier to draft late in its answers):")
        print(format_categories(rows, len(prompts), "by_answer_position", "answer tokens"))
    if args.out:
        report = {"target": target, "target_dir": cfg.target.path, "draft": os.path.abspath(directory),
                  "device": str(device), "dtype": str(runner.dtype).removeprefix("torch."), "threads": threads,
                  "num_prompts": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens, "stop_token_ids": stops,
                  "heldout_answers": answered.to_dict() if answered else None,
                  "sample_ids": [p.sample_id for p in prompts], "categories": [p.category for p in prompts],
                  "results": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from lib.launch.exiting import exit_without_teardown

    # Only as a program (tests call main() in-process): main() has written and closed its report.
    exit_without_teardown(main(sys.argv[1:]))
