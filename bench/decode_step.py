"""One decode step of regeneration's lean path, alone: where a batched step's time goes.

bench/regen.py times whole regeneration runs (prefills, refills and cache joins included); this holds a
batch of rows at a fixed context and times only the one-token steps, eager and compiled, at a few
contexts, then profiles a few steps of each mode (top kernels and CPU ops to --profile).

    python bench/decode_step.py --shape qwen3_8b --out decode.json [--rows 64 --contexts 512,2048]
        [--modes eager,compile] [--profile DIR]
    python bench/decode_step.py --shape tiny --device cpu --rows 4 --contexts 32 --steps 3 --out x.json  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.trainer import target_config, write_profile  # noqa: E402
from lib.drafts.drafting import visible_keys  # noqa: E402
from lib.eval.target import TargetRunner  # noqa: E402


def prefill(decoder, rows: int, context: int, vocab: int, device: torch.device):
    ids = torch.randint(0, vocab, (rows, context), device=device)
    valid = torch.ones(rows, context, dtype=torch.bool, device=device)
    positions = torch.arange(context, device=device).expand(rows, context)
    logits, cache = decoder.last_logits(ids, positions, visible_keys(valid, context), None)
    return logits, cache, valid


def decode(decoder, logits, cache, valid, steps: int, context: int):
    """`steps` greedy steps as sample_stream takes them (the tokens reach the host every step)."""
    rows = valid.shape[0]
    for i in range(steps):
        tokens = logits.argmax(-1)
        tokens.tolist()
        valid = torch.cat([valid, torch.ones(rows, 1, dtype=torch.bool, device=valid.device)], 1)
        position = torch.full((rows, 1), context + i, device=valid.device)
        logits, cache = decoder.last_logits(tokens[:, None], position, visible_keys(valid, 1), cache)
    return logits, cache, valid


def measure(runner: TargetRunner, mode: str, rows: int, context: int, steps: int, vocab: int, device, profile):
    decoder = runner.lean_decoder(compile=mode == "compile")
    if decoder is None:
        raise SystemExit("this target has no lean decode path (lib/eval/fast_decode.py)")
    logits, cache, valid = prefill(decoder, rows, context, vocab, device)
    logits, cache, valid = decode(decoder, logits, cache, valid, 3, context)  # compiles, fills the allocator
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits, cache, valid = decode(decoder, logits, cache, valid, steps, context + 3)
    sync()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    if profile:
        os.makedirs(profile, exist_ok=True)
        state = [logits, cache, valid]

        def few(_):
            state[:] = decode(decoder, *state, 1, context + 3 + steps)
        write_profile(os.path.join(profile, f"decode_{mode}_{context}.txt"), range(5), few, device.type == "cuda")
    return {"mode": mode, "rows": rows, "context": context, "ms_per_step": ms, "tokens_per_s": rows * 1e3 / ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_8b", help="a conf/target name, or tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--profile", help="a directory for the per-mode profiles (at the longest context)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    config = target_config(args.shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    runner = TargetRunner.from_causal_lm(model)
    contexts = [int(c) for c in args.contexts.split(",")]
    results = []
    with torch.inference_mode():
        for mode in args.modes.split(","):
            for context in contexts:
                r = measure(runner, mode, args.rows, context, args.steps, config.vocab_size, device,
                            args.profile if context == contexts[-1] else None)
                results.append(r)
                print(f"{mode:8} rows {r['rows']:4} context {context:6}: {r['ms_per_step']:8.2f} ms/step "
                      f"{r['tokens_per_s']:9.0f} tokens/s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
