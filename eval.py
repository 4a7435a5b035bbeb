"""Offline evaluation of an EAGLE-3 draft: acceptance length by greedy speculative decoding.

    python eval.py --draft outputs/run/draft [--out eval.json] [hydra overrides of conf/ ...]
    python eval.py --draft /ckpt/draft target.path=/ckpt/Qwen3-8B data=jsonl data.path=/data/chat.jsonl \
        eval.draft_tokens=[3,7] eval.num_prompts=64 eval.max_new_tokens=128

The target, the held-out prompts (data.heldout_path, or the last data.heldout_size lines of data.path)
and eval.draft_tokens / num_prompts / max_new_tokens come from the repo's Hydra config, so the same
overrides as for train.py apply. For each k it prints tau, per-position acceptance and speedup
proxies, checks the output against plain greedy decoding, and writes everything to --out (JSON).
See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lib.config import ConfigError, compose, resolve_device


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any other argument is a Hydra override of conf/ (target=..., "
                                            "target.path=..., data=..., data.path=..., eval.draft_tokens=[3,7], ...)")
    parser.add_argument("--draft", required=True, help="draft export directory (config.json + model.safetensors), "
                        "or a run directory holding draft/")
    parser.add_argument("--out", default=None, help="JSON result file (default: print only)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="prompts decoded together (default: all)")
    parser.add_argument("--no-greedy-check", action="store_true", help="skip plain greedy decoding (faster; no "
                        "matches_greedy / wall_speedup)")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}: flags are listed above; config overrides look like key=value")
    args.overrides = overrides
    return args


def draft_dir(path: str) -> str:
    for candidate in (path, os.path.join(path, "draft")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise SystemExit(f"--draft {path!r}: no config.json there or in {path}/draft; point it at a draft export")


def load_target(cfg, device: torch.device):
    from lib.engine.hf import build_random_target
    from lib.target.shape import resolve_dtype
    from lib.target.weights import load_causal_lm

    dtype = resolve_dtype(cfg.target.dtype, device)
    if cfg.target.random_init:
        return build_random_target(cfg.target, dtype, device).eval()
    if cfg.target.path is None or not os.path.isfile(os.path.join(cfg.target.path, "config.json")):
        raise SystemExit(f"target.path={cfg.target.path!r}: no config.json there; set target.path to a local HF "
                         f"checkpoint (or target=<shape> target.random_init=true)")
    return load_causal_lm(cfg.target.path, dtype, device)


def format_table(rows: list[dict]) -> str:
    width = max(len(r["accept_rates"]) for r in rows)
    head = ["k", "tau", *[f"acc_{i}" for i in range(width)], "speedup_params", "speedup_measured", "wall_speedup",
            "greedy_match", "tokens", "spec_s"]
    table = [head]
    for r in rows:
        rates = [f"{a:.3f}" for a in r["accept_rates"]] + ["-"] * (width - len(r["accept_rates"]))
        table.append([str(r["k"]), f"{r['tau']:.3f}", *rates, _num(r["speedup_params"]), _num(r["speedup_measured"]),
                      _num(r["wall_speedup"]), str(r["matches_greedy"]), str(r["tokens"]), f"{r['spec_s']:.1f}"])
    widths = [max(len(line[c]) for line in table) for c in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in table)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = compose(args.overrides)
    except ConfigError as err:
        print(f"eval.py: {err}", file=sys.stderr)
        return 2
    if any(k < 1 for k in cfg.eval.draft_tokens) or cfg.eval.num_prompts < 1 or cfg.eval.max_new_tokens < 1:
        print(f"eval.py: eval.draft_tokens={cfg.eval.draft_tokens}, eval.num_prompts={cfg.eval.num_prompts}, "
              f"eval.max_new_tokens={cfg.eval.max_new_tokens}: all must be >= 1", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from lib.data.datasets import load_heldout_prompts
    from lib.drafts.base import get_strategy
    from lib.eval.spec_decode import TargetRunner, speculative_decode
    from lib.eval.target import stop_token_ids

    directory = draft_dir(args.draft)
    device = torch.device(resolve_device(args.device, torch.cuda.device_count() if torch.cuda.is_available() else 0).value)
    model = load_target(cfg, device)
    runner = TargetRunner.from_causal_lm(model)
    strategy = get_strategy(cfg.draft.name)  # draft=<name> picks the loader and the drafter
    draft = strategy.drafter(strategy.load_export(directory, device, runner.dtype, model))
    if cfg.target.aux_layers is not None and list(cfg.target.aux_layers) != list(draft.aux_layers):
        print(f"eval.py: target.aux_layers={list(cfg.target.aux_layers)} but the draft was trained on "
              f"{list(draft.aux_layers)}; drop the override (the draft's layers are used)", file=sys.stderr)
        return 2
    tokenizer_path = cfg.target.tokenizer or cfg.target.path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts = load_heldout_prompts(cfg.data, tokenizer_path, cfg.eval.num_prompts)
    stops = stop_token_ids(tokenizer, cfg.target.path)
    print(f"target {cfg.target.path or cfg.target.name} ({runner.dtype}, {device}), draft {directory}, "
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
        if result.matches_greedy is False:
            print(f"warning: k={k}: prompts {result.mismatched_prompts} differ from plain greedy decoding "
                  f"(numerical near-ties in {runner.dtype}; exact in fp32)", file=sys.stderr)
    print(format_table(rows))
    if args.out:
        report = {"target": cfg.target.path or cfg.target.name, "draft": os.path.abspath(directory),
                  "device": str(device), "dtype": str(runner.dtype).removeprefix("torch."),
                  "num_prompts": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens, "stop_token_ids": stops,
                  "sample_ids": [p.sample_id for p in prompts], "results": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
